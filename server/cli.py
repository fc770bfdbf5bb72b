"""The ``conveyor`` command line.

click is used for the command tree because the CLI grows verbs (serve, queue clients, key
management, a dev cluster) that each want their own options, help and validation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any, TypeVar

import click

from engine import Log, format
from engine.errors import EngineError
from engine.log import FsyncPolicy
from server.client import DEFAULT_ENDPOINT, ClientError, NativeClient
from server.config import SHUTDOWN_GRACE_S, ServerConfig

_T = TypeVar("_T")


@click.group()
@click.version_option(version("conveyor"), prog_name="conveyor")
def main() -> None:
    """Conveyor: a durable message queue with SQS semantics."""


# --- the server ------------------------------------------------------------------------


def _fsync(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return str(FsyncPolicy.parse(value))
    except EngineError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.option("--data-dir", default="./conveyor-data", show_default=True,
              help="Where queues and metadata are stored (created if absent).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9324, show_default=True, type=click.IntRange(0, 65535))
@click.option("--fsync", default="always", show_default=True, callback=_fsync,
              help="always | never | interval:<ms>: when appended data is fsync'd.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One JSON audit line per request on stdout.")
def serve(data_dir: str, host: str, port: int, fsync: str, access_log: bool) -> None:
    """Run the server: the SQS protocols and the native API on one port.

    SIGTERM and SIGINT stop it gracefully: it stops accepting, lets requests in flight
    finish, then flushes and fsyncs everything before exiting 0.
    """
    from aiohttp import web

    from server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    config = ServerConfig(data_dir=data_dir, host=host, port=port, fsync=fsync,
                          access_log=access_log)
    loop = _event_loop()
    url = f"http://{host}:{port}"

    def announce(_: str) -> None:
        click.echo(f"Conveyor serving {url} (data: {os.path.abspath(data_dir)}, "
                   f"fsync={fsync}, loop={type(loop).__module__.split('.')[0]})", err=True)

    web.run_app(create_app(config), host=host, port=port, print=announce,
                shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None, loop=loop)


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# --- the everyday client verbs ------------------------------------------------------------

_endpoint = click.option("--endpoint", default=DEFAULT_ENDPOINT, show_default=True,
                         envvar="CONVEYOR_ENDPOINT", help="The server's URL.")
_as_json = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@contextmanager
def _client_errors() -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach the server: {exc}") from None


def _call(fn: Callable[[], _T]) -> _T:
    with _client_errors():
        return fn()


def _emit(value: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(value) if as_json else text(value))


@main.group()
def queue() -> None:
    """Create, list, inspect, purge and delete queues on a running server."""


@queue.command("create")
@click.argument("name")
@click.option("--attribute", "-a", "attributes", multiple=True, metavar="NAME=VALUE",
              help="A queue attribute, e.g. visibility_timeout=60 (repeatable).")
@_endpoint
@_as_json
def queue_create(name: str, attributes: tuple[str, ...], endpoint: str, as_json: bool) -> None:
    parsed: dict[str, Any] = {}
    for item in attributes:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--attribute")
        parsed[key] = json.loads(value) if value[:1] in "0123456789-tfn[{\"" else value
    result = _call(lambda: NativeClient(endpoint).create_queue(name, parsed))
    _emit(result, as_json, lambda r: f"queue {r['name']}: {r['url']}")


@queue.command("list")
@click.option("--prefix", default="", help="Only names starting with this.")
@_endpoint
@_as_json
def queue_list(prefix: str, endpoint: str, as_json: bool) -> None:
    names = _call(lambda: NativeClient(endpoint).list_queues(prefix))
    _emit(names, as_json, lambda n: "\n".join(n) if n else "(no queues)")


@queue.command("stats")
@click.argument("name")
@_endpoint
@_as_json
def queue_stats(name: str, endpoint: str, as_json: bool) -> None:
    result = _call(lambda: NativeClient(endpoint).get_queue(name))
    _emit(result, as_json, lambda r: "\n".join(
        [f"{'name':>22}: {r['name']}"]
        + [f"{k:>22}: {v}" for k, v in r["stats"].items()]
        + [f"{k:>22}: {v}" for k, v in r["attributes"].items()]))


@queue.command("purge")
@click.argument("name")
@_endpoint
def queue_purge(name: str, endpoint: str) -> None:
    _call(lambda: NativeClient(endpoint).purge_queue(name))
    click.echo(f"purged {name}")


@queue.command("delete")
@click.argument("name")
@_endpoint
def queue_delete(name: str, endpoint: str) -> None:
    _call(lambda: NativeClient(endpoint).delete_queue(name))
    click.echo(f"deleted {name}")


@main.command()
@click.argument("name")
@click.argument("body", required=False)
@click.option("--file", "path", type=click.File("rb"), help="Send this file's bytes ('-': stdin).")
@click.option("--delay", type=click.IntRange(0, 900), help="Delay in seconds.")
@click.option("--group", help="Message group (FIFO queues).")
@click.option("--dedup-id", help="Deduplication id (FIFO queues).")
@_endpoint
@_as_json
def send(name: str, body: str | None, path: Any, delay: int | None, group: str | None,
         dedup_id: str | None, endpoint: str, as_json: bool) -> None:
    """Send BODY (or a file's bytes) to queue NAME."""
    if (body is None) == (path is None):
        raise click.UsageError("give either BODY or --file")
    data = body.encode() if body is not None else path.read()
    result = _call(lambda: NativeClient(endpoint).send(name, data, delay, group, dedup_id))
    _emit(result, as_json, lambda r: f"sent {r['message_id']}")


@main.command()
@click.argument("name")
@click.option("--max", "max_messages", default=1, show_default=True,
              type=click.IntRange(1, 100))
@click.option("--wait", default=0, show_default=True, type=click.IntRange(0, 20),
              help="Long-poll seconds.")
@click.option("--visibility", type=click.IntRange(0, 43200), help="Visibility timeout.")
@click.option("--delete/--keep", default=True, show_default=True,
              help="Delete what was received (acknowledge it).")
@_endpoint
@_as_json
def receive(name: str, max_messages: int, wait: int, visibility: int | None, delete: bool,
            endpoint: str, as_json: bool) -> None:
    """Receive from queue NAME, deleting what arrives unless --keep."""
    client = NativeClient(endpoint)
    messages = _call(lambda: client.receive(name, max_messages, wait, visibility))
    if delete and messages:
        _call(lambda: client.delete(name, [m["receipt"] for m in messages]))

    def shown(m: dict[str, Any]) -> str:
        body = m["body"] if m["body"] is not None else base64.b64decode(m["body_base64"])
        return f"{m['message_id']}  {body!r}"

    def text(ms: list[dict[str, Any]]) -> str:
        return "\n".join(shown(m) for m in ms) if ms else "(no messages)"

    _emit(messages, as_json, text)


@main.group("log")
def log_group() -> None:
    """Inspect a partition log directory (the log must not be open elsewhere)."""


def _open(path: str) -> Log:
    if not os.path.isdir(path):
        raise click.BadParameter(f"{path} is not a directory", param_hint="PATH")
    try:
        # fsync="never": an inspection must not add fsyncs, and it appends nothing.
        return Log(path, fsync="never")
    except EngineError as exc:
        raise click.ClickException(str(exc)) from exc


@log_group.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def log_info(path: str, as_json: bool) -> None:
    """Offsets, segments and sizes of the log at PATH.

    Opening a log recovers it: a torn tail of the last segment is cut off and reported.
    """
    with _open(path) as log:
        segments = sorted(n for n in os.listdir(path) if n.endswith(format.LOG_SUFFIX))
        info = {
            "path": path,
            "first_offset": log.first_offset,
            "next_offset": log.next_offset,
            "records": log.next_offset - log.first_offset,
            "segments": len(segments),
            "bytes": log.size_bytes,
            "recovered_bytes": log.recovery.dropped_bytes,
            "indexes_rebuilt": log.recovery.indexes_rebuilt,
        }
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        click.echo(f"{key:>16}: {value}")


@log_group.command("verify")
@click.argument("path")
def log_verify(path: str) -> None:
    """Check every batch of the log at PATH against its checksum.

    Exits 0 when the whole log is intact and 1 at the first damaged batch, naming it.
    """
    with _open(path) as log:
        try:
            records = log.verify()
        except EngineError as exc:
            click.echo(f"damaged: {exc}", err=True)
            sys.exit(1)
    click.echo(f"ok: {records} records verified")


if __name__ == "__main__":
    main()
