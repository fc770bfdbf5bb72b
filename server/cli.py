"""The ``conveyor`` command line.

click is used for the command tree because the CLI grows verbs (serve, queue clients, key
management, a dev cluster) that each want their own options, help and validation.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version

import click

from engine import Log, format
from engine.errors import EngineError


@click.group()
@click.version_option(version("conveyor"), prog_name="conveyor")
def main() -> None:
    """Conveyor: a durable message queue with SQS semantics."""


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
