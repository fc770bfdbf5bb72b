"""The ``conveyor`` command line.

click is used for the command tree because the CLI grows verbs (serve, queue clients, key
management, a dev cluster) that each want their own options, help and validation.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import functools
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
from engine.errors import CorruptDatabaseError, EngineError
from engine.log import FsyncPolicy
from server.client import DEFAULT_ENDPOINT, ClientError, NativeClient
from server.config import (
    CONNECTIONS_MAX,
    DEFAULT_ACCOUNT,
    MEMORY_MAX_DEFAULT,
    WORKERS_MAX,
    ServerConfig,
    parse_memory,
)

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


# --- reaching etcd -----------------------------------------------------------------------

ETCD_PASSWORD_ENV = "CONVEYOR_ETCD_PASSWORD"


@dataclasses.dataclass(frozen=True)
class _EtcdFlags:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None

    def given(self) -> bool:
        return any(dataclasses.astuple(self))


_file = click.Path(exists=True, dir_okay=False)
_ETCD_OPTIONS = (
    click.option("--etcd-ca", type=_file,
                 help="PEM CA bundle that etcd's certificate must chain to (etcds:// only; "
                      "default: the system's trusted roots)."),
    click.option("--etcd-cert", type=_file,
                 help="PEM client certificate for etcd's --client-cert-auth (etcds:// only)."),
    click.option("--etcd-key", type=_file, help="PEM private key of --etcd-cert."),
    click.option("--etcd-user", metavar="NAME",
                 help="etcd user, when etcd's authentication is on. Its password comes from "
                      f"--etcd-password-file or ${ETCD_PASSWORD_ENV}, never the command line."),
    click.option("--etcd-password-file", type=_file,
                 help="File holding the --etcd-user password (mode 0600; one line)."),
)


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the option was on the command line (or in the environment), not defaulted."""
    return ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)


def _memory(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_memory(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _etcd_options(command: Callable[..., _T]) -> Callable[..., _T]:
    """Add the options of how to reach etcd, handed to ``command`` as one ``etcd_flags``."""

    @functools.wraps(command)
    def collected(*args: Any, etcd_ca: str | None, etcd_cert: str | None,
                  etcd_key: str | None, etcd_user: str | None,
                  etcd_password_file: str | None, **kwargs: Any) -> _T:
        flags = _EtcdFlags(etcd_ca, etcd_cert, etcd_key, etcd_user, etcd_password_file)
        return command(*args, etcd_flags=flags, **kwargs)

    for option in reversed(_ETCD_OPTIONS):
        collected = option(collected)
    return collected


def _etcd_access(url: str, flags: _EtcdFlags) -> Any:
    """The EtcdAccess the URL and flags describe, or a usage error that says what is wrong.

    The password is read from a file or the environment, not taken as an option: the
    command line of every process is readable by every local user (ps, /proc/PID/cmdline)
    and is kept in shell histories and service managers' logs, while a 0600 file or the
    process's own environment is readable only by its user."""
    from replication.etcd_access import EtcdAccess, parse_url

    try:
        tls, endpoints = parse_url(url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--cluster") from None
    password = None
    if flags.user is not None:
        password = (_read_password(flags.password_file) if flags.password_file
                    else os.environ.get(ETCD_PASSWORD_ENV))
        if not password:
            raise click.UsageError(f"--etcd-user {flags.user} needs its password: "
                                   f"--etcd-password-file PATH or ${ETCD_PASSWORD_ENV}")
        if not tls and not all(_is_loopback(host) for host, _ in endpoints):
            click.echo(f"warning: the etcd password of {flags.user} crosses the network "
                       f"in clear text to {url}: use etcds://", err=True)
    elif flags.password_file is not None:
        raise click.UsageError("--etcd-password-file needs --etcd-user")
    try:
        return EtcdAccess(endpoints, tls, flags.ca, flags.cert, flags.key, flags.user,
                          password)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _read_password(path: str) -> str:
    if os.stat(path).st_mode & 0o077:
        raise click.UsageError(f"{path}: an etcd password file must be readable by its "
                               "owner only (chmod 600)")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    # One line, as `echo secret > file` writes it: the line ending is not the password's.
    return text.removesuffix("\n").removesuffix("\r")


@main.command()
@click.option("--data-dir", default="./conveyor-data", show_default=True,
              help="Where queues and metadata are stored (created if absent).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9324, show_default=True, type=click.IntRange(0, 65535))
@click.option("--fsync", default="always", show_default=True, callback=_fsync,
              help="always | never | interval:<ms>: when appended data is fsync'd.")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One JSON audit line per request on stdout.")
@click.option("--auth", type=click.Choice(["required", "none"]), default="none",
              show_default=True,
              help="required: every request must be signed (SigV4) or carry a bearer "
                   "token of an access key; none: anyone may call, as the default account.")
@click.option("--insecure", is_flag=True,
              help="Allow --auth none on an address other than loopback.")
@click.option("--master-key-file", type=click.Path(dir_okay=False),
              help="The 32-byte master key (created 0600 if absent). "
                   "Default: master.key in the data directory.")
@click.option("--metrics-token-file", type=click.Path(dir_okay=False),
              help="A file (mode 0600) of one line, 32 to 1024 visible ASCII characters: "
                   "/metrics then requires 'Authorization: Bearer <that line>'. Without "
                   "it /metrics is refused under --auth required.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="PEM certificate chain: serve HTTPS (TLS 1.2 or later).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="PEM private key of --tls-cert.")
@click.option("--rate-limit-principal", "principal_rate", default="", metavar="RATE",
              help='Requests per principal, e.g. "100/s" or "100/s:200" (rate:burst).')
@click.option("--rate-limit-queue", "queue_rate", default="", metavar="RATE",
              help="Requests per queue; a queue's ConveyorRateLimit may only lower it.")
@click.option("--connections-max", default=CONNECTIONS_MAX, show_default=True,
              type=click.IntRange(1, 1_000_000),
              help="Connections served at once; more are closed as they arrive.")
@click.option("--memory-max", default=MEMORY_MAX_DEFAULT, show_default=True, metavar="SIZE",
              callback=_memory,
              help="Resident memory the server may reach by holding queued messages, as a "
                   "size (512MiB, 4GiB) or a share of the host's (or container's) memory "
                   "(50%). At it, sends get 503 MemoryFull with Retry-After until "
                   "consumers drain; receives and deletes go on.")
@click.option("--sse-key-rotation-days", default=30.0, show_default=True,
              type=click.FloatRange(min=0),
              help="Replace a queue's data key after this many days (0: by use count only).")
@click.option("--cluster", "etcd", metavar="etcd[s]://HOST:PORT[,HOST:PORT...]",
              help="Join the cluster coordinated by this etcd (default: a single node); "
                   "etcds:// reaches it over TLS.")
@click.option("--node-id", help="This node's name in the cluster (default: HOST:PORT).")
@click.option("--advertise", metavar="HOST",
              help="The address other nodes and forwarded requests reach this node at "
                   "(default: --host).")
@click.option("--replication-port", type=click.IntRange(1, 65535),
              help="TCP port for log shipping between nodes (cluster mode).")
@click.option("--replication-advertise", metavar="HOST:PORT", default="",
              help="Where other nodes connect for log shipping, if not "
                   "ADVERTISE:REPLICATION_PORT (a proxy in between, say).")
@click.option("--lease-ttl", default=5, show_default=True, type=click.IntRange(2, 60),
              help="Seconds of silence after which a node's leaderships pass to others.")
@click.option("--replication-factor", default=3, show_default=True,
              type=click.IntRange(1, 7), help="Replicas of each new queue (capped by nodes).")
@click.option("--min-insync-replicas", default=2, show_default=True,
              type=click.IntRange(1, 7),
              help="Writes are refused (503) while fewer replicas are in sync.")
@click.option("--node-gone-after", default=60.0, show_default=True,
              type=click.FloatRange(1, 86400),
              help="Seconds a node may be down before its replicas move to other nodes.")
@click.option("--cluster-secret-file", type=click.Path(exists=True, dir_okay=False),
              help="32 random bytes (mode 0600), the same on every node, that nodes prove "
                   "to each other on the replication port (default: derived from the "
                   "master key, which every node must then share).")
@click.option("--workers", type=click.IntRange(1, WORKERS_MAX),
              help="Processes serving the port, each owning a share of every queue's "
                   "partitions (default: one per core, at most "
                   f"{WORKERS_MAX}; 1 with --cluster). With --cluster, each worker is a "
                   "member of its own: NODE_ID/wI, replicating on REPLICATION_PORT+I.")
# Set by the supervisor of --workers on each worker it starts.
@click.option("--worker-index", type=click.IntRange(0, WORKERS_MAX - 1), hidden=True)
# Test-only: the negative control of the hostile-peer tests runs a node without it.
@click.option("--unsafe-no-peer-auth", "no_peer_auth", is_flag=True, hidden=True)
@_etcd_options
def serve(data_dir: str, host: str, port: int, fsync: str, access_log: bool, auth: str,
          insecure: bool, master_key_file: str | None, metrics_token_file: str | None,
          tls_cert: str | None, tls_key: str | None, principal_rate: str, queue_rate: str,
          connections_max: int, memory_max: int,
          sse_key_rotation_days: float, etcd: str | None, node_id: str | None,
          advertise: str | None, replication_port: int | None, replication_advertise: str,
          lease_ttl: int, replication_factor: int, min_insync_replicas: int,
          node_gone_after: float, cluster_secret_file: str | None,
          workers: int | None, worker_index: int | None,
          no_peer_auth: bool, etcd_flags: _EtcdFlags) -> None:
    """Run the server: the SQS protocols and the native API on one port.

    SIGTERM and SIGINT stop it gracefully: it stops accepting, lets requests in flight
    finish, then flushes and fsyncs everything before exiting 0.
    """

    from server.protection.ratelimit import parse_rate
    from server.web.app import create_app
    from server.web.listener import run

    if auth == "none" and not insecure and not _is_loopback(host):
        raise click.UsageError(f"--auth none on {host} lets anyone on the network use every "
                               "queue: use --auth required, or say --insecure")
    if metrics_token_file is not None:
        from server.protection.operator import load_metrics_token

        try:
            load_metrics_token(metrics_token_file)
        except EngineError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics-token-file") from None
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    for option, rate in (("--rate-limit-principal", principal_rate),
                         ("--rate-limit-queue", queue_rate)):
        try:
            parse_rate(rate, option)
        except EngineError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    cluster = None
    if etcd is None and etcd_flags.given():
        raise click.UsageError("the --etcd-* options need --cluster")
    if etcd is not None:
        cluster = _cluster_config(_etcd_access(etcd, etcd_flags), node_id,
                                  advertise or host, port, host, replication_port,
                                  replication_advertise, lease_ttl, replication_factor,
                                  min_insync_replicas, tls_cert)
        cluster = dataclasses.replace(cluster, node_gone_s=node_gone_after,
                                      peer_secret_file=cluster_secret_file,
                                      peer_auth=not no_peer_auth)
    # A cluster node keeps one process unless told: with workers, its members (and data
    # directories) are others, and an upgrade must not change a running cluster's.
    workers = workers or (1 if etcd is not None else default_workers())
    if cluster is not None and workers > 1:
        _check_member_ports(cluster, workers, port)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    config = ServerConfig(data_dir=data_dir, host=host, port=port, fsync=fsync,
                          access_log=access_log, auth=auth, master_key_file=master_key_file,
                          metrics_token_file=metrics_token_file,
                          tls_cert=tls_cert, tls_key=tls_key, principal_rate=principal_rate,
                          queue_rate=queue_rate, connections_max=connections_max,
                          memory_max=memory_max,
                          memory_max_given=_given(click.get_current_context(), "memory_max"),
                          sse_rotation_s=sse_key_rotation_days * 24 * 60 * 60,
                          cluster=cluster, workers=workers)
    if workers > 1 and worker_index is None:
        _supervise(config)
        return
    if worker_index is not None:
        config = _worker_config(config, worker_index)
    loop = _event_loop()
    url = f"{'https' if tls_cert else 'http'}://{host}:{port}"
    open_files = _open_files_at_hard_limit()

    def announce() -> None:
        if config.worker is not None:
            from server.workers.supervisor import follow_supervisor

            follow_supervisor(loop, config.worker.index)
            click.echo(f"Conveyor worker {config.worker.index} of {workers} serving {url}",
                       err=True)
            return
        click.echo(f"Conveyor serving {url} (data: {os.path.abspath(data_dir)}, "
                   f"fsync={fsync}, auth={auth}, open files={open_files}, "
                   f"loop={type(loop).__module__.split('.')[0]}"
                   + (f", node={cluster.node_id} in {etcd}" if cluster else "") + ")",
                   err=True)

    try:
        run(create_app(config), config, loop, announce)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        raise click.ClickException(f"cannot serve on {host}:{port}: "
                                   f"{exc.strerror or exc}") from None
    except CorruptDatabaseError as exc:
        raise click.ClickException(
            f"{exc}. The server does not start on a damaged database: see `conveyor db "
            "verify` and docs/OPERATIONS.md, \"A damaged database\"") from None
    except EngineError as exc:  # a bad master key file, say: a message, not a traceback
        raise click.ClickException(str(exc)) from None


def default_workers() -> int:
    """One worker per core this process may run on, at most WORKERS_MAX."""
    return max(1, min(len(os.sched_getaffinity(0)), WORKERS_MAX))


def _supervise(config: ServerConfig) -> None:
    from server.workers.supervisor import Supervisor

    argv = sys.argv[1:]

    def announce(port: int) -> None:
        url = f"{'https' if config.tls_cert else 'http'}://{config.host}:{port}"
        click.echo(f"Conveyor serving {url} with {config.workers} workers (data: "
                   f"{os.path.abspath(config.data_dir)}, fsync={config.fsync}, "
                   f"auth={config.auth})", err=True)

    try:
        code = Supervisor(config, argv, announce).run()
    except CorruptDatabaseError as exc:
        raise click.ClickException(
            f"{exc}. The server does not start on a damaged database: see `conveyor db "
            "verify` and docs/OPERATIONS.md, \"A damaged database\"") from None
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # the port taken, say
        raise click.ClickException(f"cannot serve on {config.host}:{config.port}: "
                                   f"{exc.strerror or exc}") from None
    sys.exit(code)


def _worker_config(config: ServerConfig, index: int) -> ServerConfig:
    """A worker's config: its place, and its share of the memory bound. In a cluster, a
    worker is a member of its own (server/workers/supervisor.py, "In a cluster")."""
    from server.workers.ownership import WorkerPlace
    from server.workers.supervisor import RUN_DIR_ENV, member_cluster, member_data_dir

    place = WorkerPlace(index, config.workers, os.environ[RUN_DIR_ENV])
    memory = None if config.memory_max is None else config.memory_max // config.workers
    config = dataclasses.replace(config, worker=place, memory_max=memory)
    if config.cluster is None:
        return config
    # The master key stays the server's: every member of the cluster shares it.
    return dataclasses.replace(config, cluster=member_cluster(config.cluster, index),
                               data_dir=member_data_dir(config.data_dir, index),
                               master_key_file=config.master_key_path)


@main.command("dev-cluster")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(1, 9))
@click.option("--base-port", default=9324, show_default=True, type=click.IntRange(1024, 65000),
              help="Node i serves on BASE_PORT+i, replicates on BASE_PORT+100+i; "
                   "etcd takes BASE_PORT+200 and +201.")
@click.option("--data-dir", default="./conveyor-cluster", show_default=True,
              help="etcd's and every node's data, and their logs.")
@click.option("--fsync", default="always", show_default=True, callback=_fsync)
def dev_cluster(nodes: int, base_port: int, data_dir: str, fsync: str) -> None:
    """Start etcd and a cluster of NODES on loopback ports, until Ctrl-C."""
    from server.cluster.devcluster import run as run_cluster

    sys.exit(run_cluster(nodes, base_port, data_dir, fsync, lambda line: click.echo(line)))


def _cluster_config(etcd: Any, node_id: str | None, advertise: str, port: int, host: str,
                    replication_port: int | None, replication_advertise: str,
                    lease_ttl: int, replication_factor: int, min_insync_replicas: int,
                    tls_cert: str | None) -> Any:
    from replication.members import MEMBER_SEPARATOR
    from replication.node import ClusterConfig

    if replication_port is None:
        raise click.UsageError("--cluster needs --replication-port")
    if node_id is not None and (MEMBER_SEPARATOR in node_id or not node_id):
        raise click.BadParameter(f"a node id has no {MEMBER_SEPARATOR!r} (it separates a "
                                 "node's workers' ids)", param_hint="--node-id")
    scheme = "https" if tls_cert else "http"
    return ClusterConfig(
        etcd=etcd, node_id=node_id or f"{advertise}:{port}",
        http_url=f"{scheme}://{advertise}:{port}", replication_host=host,
        replication_port=replication_port, replication_advertise=replication_advertise
        or f"{advertise}:{replication_port}", lease_ttl_s=lease_ttl,
        replication_factor=replication_factor, min_insync_replicas=min_insync_replicas)


def _check_member_ports(cluster: Any, workers: int, http_port: int) -> None:
    """Worker i of a cluster node replicates on the node's port + i (and is reached at its
    advertised port + i): every one of them must be a port."""
    _, _, advertised = cluster.replication_advertise.rpartition(":")
    if not advertised.isdigit():
        raise click.BadParameter("not HOST:PORT", param_hint="--replication-advertise")
    if max(cluster.replication_port, int(advertised)) + workers - 1 > 65535:
        raise click.UsageError(f"--workers {workers} replicate on {workers} ports from "
                               "--replication-port (and its advertised port) up: past 65535")
    if http_port in range(cluster.replication_port, cluster.replication_port + workers):
        raise click.UsageError(f"--workers {workers} replicate on ports "
                               f"{cluster.replication_port}-"
                               f"{cluster.replication_port + workers - 1}, which hold --port")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# With no hard limit, the soft one is raised this far (Linux's default fs.nr_open).
OPEN_FILES_UNLIMITED_TARGET = 1024 * 1024


def _open_files_at_hard_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the limit.

    Every open queue log holds a descriptor, as does every connection: a cluster node
    holds a copy of thousands of queues, and the usual soft limit of 1,024 would fail
    opens (EMFILE) long before memory ran out. The hard limit is the operator's ceiling
    (systemd's LimitNOFILE, ulimit -Hn); the soft one is only a default."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft  # a ceiling the kernel refuses (above fs.nr_open): keep the default
        return target
    return soft


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
    """Inspect, verify and salvage logs on disk (no process may hold them open).

    PATH is a log directory, a queue's directory (<data-dir>/queues/<uid>, or its log/),
    or a whole data directory (every queue in it).
    """


class _CannotRun(click.ClickException):
    """The command could not look at PATH at all (exit status 2, unlike damage's 1)."""

    exit_code = 2


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
    """Offsets, segments and sizes of the log directory at PATH.

    Opening a log recovers it: a torn tail of the last segment is cut off and reported.
    Damage is not: the command fails naming it (see `conveyor log verify`).
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


@contextmanager
def _repair_bar(label: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr (stdout stays for the report), fed (bytes done, total)."""
    if quiet:
        yield None
        return
    with click.progressbar(length=1, label=label, file=sys.stderr,
                           show_eta=True) as bar:
        def progress(done: int, total: int) -> None:
            bar.length = max(total, 1)
            bar.update(done - bar.pos)

        yield progress


def _repair_target(path: str) -> str:
    if not os.path.isdir(path):
        raise click.BadParameter(f"{path} is not a directory", param_hint="PATH")
    return path


@log_group.command("verify")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def log_verify(path: str, as_json: bool, quiet: bool) -> None:
    """Report every damaged range under PATH; change nothing.

    Reads every batch of every segment, every sealed segment's index and every queue's
    snapshot. Exit status: 0 when nothing is damaged (a torn tail, which opening cuts, is
    noted but is not damage), 1 when something is (each range: file, bytes, records lost,
    reason), 2 when PATH could not be checked (say, a process holds it open).
    """
    from engine import repair

    _repair_target(path)
    try:
        with _repair_bar("verifying", quiet or as_json) as progress:
            found = repair.survey(path, progress)
    except (EngineError, OSError) as exc:
        raise _CannotRun(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(found.to_json()))
    else:
        for note in found.notes:
            click.echo(f"note: {note}")
        for log in found.logs:
            for note in log.notes:
                click.echo(f"note: {note}")
            for damage in log.damage:
                click.echo(f"damaged: {damage.describe()}", err=True)
            if log.damage and log.refusal:
                click.echo(f"cannot be salvaged: {log.refusal}", err=True)
            state = "DAMAGED" if log.damage else "ok"
            click.echo(f"{state}: {log.label}: {log.records} records verified")
    if found.damage:
        sys.exit(1)


@log_group.command("salvage")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def log_salvage(path: str, as_json: bool, quiet: bool) -> None:
    """Rewrite every damaged log under PATH from its valid records; delete nothing.

    Each damaged segment is replaced by its valid batches, with empty records (a hole) at
    the offsets whose records were lost, so every surviving record keeps its offset. The
    damaged originals (and a damaged queue snapshot) move to quarantine/<time>/ next to
    the log, with report.json saying what was lost. A queue's messages whose record was
    lost are expired. Exit status: 0 when done (or nothing was damaged), 1 when the
    salvage was refused having changed nothing, 2 when PATH could not be read or a process
    holds it open.
    """
    from engine import repair
    from engine.errors import SalvageRefusedError

    _repair_target(path)
    try:
        with _repair_bar("salvaging", quiet or as_json) as progress:
            done = repair.salvage(path, progress)
    except SalvageRefusedError as exc:
        raise click.ClickException(str(exc)) from exc
    except (EngineError, OSError) as exc:
        raise _CannotRun(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(done.to_json()))
        return
    if not done.logs:
        click.echo(f"nothing to salvage: no damage under {path}")
        return
    for log in done.logs:
        click.echo(f"salvaged {log.log.label}:")
        for damage in log.log.damage:
            click.echo(f"  was: {damage.describe()}")
        for first, end in log.holes:
            click.echo(f"  hole: offsets {first}..{end - 1} now hold empty records")
        if log.expired:
            click.echo(f"  expired {len(log.expired)} messages whose records were lost")
        if log.snapshot_quarantined:
            click.echo("  snapshot quarantined: the state is rebuilt from the log")
        click.echo(f"  originals kept in {log.quarantine}")


# --- access keys -----------------------------------------------------------------------------

_data_dir = click.option("--data-dir", default="./conveyor-data", show_default=True,
                         help="The server's data directory (it holds the key database).")
_master_key = click.option("--master-key-file", type=click.Path(dir_okay=False),
                           help="Default: master.key in the data directory.")
_key_cluster = click.option(
    "--cluster", "etcd", metavar="etcd[s]://HOST:PORT[,HOST:PORT...]",
    help="The keys of this cluster, in its etcd, rather than of the data directory; the "
         "master key must be the one every node was started with.")


class _ClusterKeys:
    """A cluster's key store (coroutines) for the command line: one event loop for the
    whole command, on which the etcd client lives."""

    def __init__(self, etcd: Any, master_key: bytes) -> None:
        """etcd: the EtcdAccess to reach it by."""
        from replication.control import Control
        from server.cluster.etcd_keystore import EtcdKeyStore

        self._loop = asyncio.new_event_loop()
        self._control = Control(etcd)
        try:
            self._run(self._control.connect())
        except BaseException:
            self._loop.close()
            raise
        self._store = EtcdKeyStore(self._control.client, master_key, self._control.prefix)

    def _run(self, work: Any) -> Any:
        return self._loop.run_until_complete(work)

    def create(self, principal: str, account: str) -> Any:
        return self._run(self._store.create(principal, account))

    def get(self, access_key_id: str) -> Any:
        return self._run(self._store.get(access_key_id))

    def list(self) -> Any:
        return self._run(self._store.list())

    def revoke(self, access_key_id: str) -> Any:
        return self._run(self._store.revoke(access_key_id))

    def close(self) -> None:
        self._run(self._control.close())
        self._loop.close()


@contextmanager
def _keystore(data_dir: str, master_key_file: str | None, etcd: str | None = None,
              etcd_flags: _EtcdFlags | None = None) -> Iterator[Any]:
    from server.protection import masterkey
    from server.protection.keystore import KeyStore

    flags = etcd_flags or _EtcdFlags()
    if etcd is None and flags.given():
        raise click.UsageError("the --etcd-* options need --cluster")
    access = _etcd_access(etcd, flags) if etcd is not None else None
    store: KeyStore | _ClusterKeys
    try:
        if etcd is None:
            store = KeyStore.open(data_dir, master_key_file)
        else:
            path = master_key_file or os.path.join(data_dir, masterkey.FILE_NAME)
            if not os.path.exists(path):
                raise click.ClickException(f"no master key at {path}: name the cluster's "
                                           "with --master-key-file")
            store = _ClusterKeys(access, masterkey.load_or_create(path))
    except (EngineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield store
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()


@main.group()
def keys() -> None:
    """Create, list and revoke access keys: of a data directory (run on the server's
    machine), or with --cluster, of a cluster."""


@keys.command("create")
@_data_dir
@_master_key
@_key_cluster
@_etcd_options
@click.option("--principal", default="default", show_default=True,
              help="Who the key belongs to: named in audit lines and usage data.")
@click.option("--account", default=DEFAULT_ACCOUNT, show_default=True,
              help="The 12-digit account whose queues the key may use.")
def keys_create(data_dir: str, master_key_file: str | None, principal: str,
                account: str, etcd: str | None, etcd_flags: _EtcdFlags) -> None:
    """Create a key and print it as JSON. The secret is shown this once."""
    with _keystore(data_dir, master_key_file, etcd, etcd_flags) as store:
        key = store.create(principal, account)
    click.echo(json.dumps({"access_key_id": key.access_key_id,
                           "secret_access_key": key.secret, "principal": key.principal,
                           "account": key.account}))


@keys.command("list")
@_data_dir
@_master_key
@_key_cluster
@_etcd_options
@_as_json
def keys_list(data_dir: str, master_key_file: str | None, as_json: bool,
              etcd: str | None, etcd_flags: _EtcdFlags) -> None:
    """List keys (never their secrets)."""
    with _keystore(data_dir, master_key_file, etcd, etcd_flags) as store:
        listed = [{"access_key_id": k.access_key_id, "principal": k.principal,
                   "account": k.account, "created_ms": k.created_ms,
                   "revoked_ms": k.revoked_ms} for k in store.list()]
    _emit(listed, as_json, lambda ks: "\n".join(
        f"{k['access_key_id']}  {k['account']}  {k['principal']}"
        f"{'  (revoked)' if k['revoked_ms'] else ''}" for k in ks) or "no keys")


@keys.command("revoke")
@click.argument("access_key_id")
@_data_dir
@_master_key
@_key_cluster
@_etcd_options
def keys_revoke(access_key_id: str, data_dir: str, master_key_file: str | None,
                etcd: str | None, etcd_flags: _EtcdFlags) -> None:
    """Revoke a key: the server refuses it within a few seconds (its cache's lifetime)."""
    with _keystore(data_dir, master_key_file, etcd, etcd_flags) as store:
        if not store.revoke(access_key_id):
            raise click.ClickException(f"no active key {access_key_id}")
    click.echo(f"revoked {access_key_id}")


@keys.command("token")
@click.argument("access_key_id")
@_data_dir
@_master_key
@_key_cluster
@_etcd_options
@click.option("--ttl", default=3600, show_default=True,
              type=click.IntRange(1, 7 * 24 * 60 * 60), help="Seconds the token is valid.")
def keys_token(access_key_id: str, data_dir: str, master_key_file: str | None,
               ttl: int, etcd: str | None, etcd_flags: _EtcdFlags) -> None:
    """Print a bearer token of a key for the native API (curl -H "Authorization: Bearer
    ..."; the CLI's client verbs read it from CONVEYOR_TOKEN)."""
    import time

    from server.protection.auth import bearer_token

    with _keystore(data_dir, master_key_file, etcd, etcd_flags) as store:
        key = store.get(access_key_id)
    if key is None:
        raise click.ClickException(f"no active key {access_key_id}")
    click.echo(bearer_token(key.access_key_id, key.secret, int(time.time()) + ttl))


# --- orphaned queue directories --------------------------------------------------------------


@main.group()
def orphans() -> None:
    """List, adopt and discard queue directories set aside in <data-dir>/orphaned/.

    A queue directory that the catalog (catalog.sqlite3) or the server's records
    (metadata.sqlite3) do not name is moved there at start, never deleted: it may be a
    whole queue whose entry was lost. Run these with the server stopped.
    """


@contextmanager
def _broker(data_dir: str) -> Iterator[Any]:
    from engine import Broker
    from engine.errors import DataDirectoryLockedError

    if not os.path.isdir(os.path.join(data_dir, "queues")):
        raise click.ClickException(f"{data_dir} is not a data directory (it has no queues/)")
    try:
        broker = Broker(data_dir)
    except DataDirectoryLockedError as exc:
        raise click.ClickException(f"{exc}: stop the server first") from None
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield broker
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        broker.close()


@orphans.command("list")
@_data_dir
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def orphans_list(data_dir: str, as_json: bool) -> None:
    """The directories under orphaned/: uid, queue name (if it says), size."""
    with _broker(data_dir) as broker:
        found = [dataclasses.asdict(o) for o in broker.orphans()]

    def line(r: dict[str, Any]) -> str:
        uid = "?" if r["uid"] is None else f"{r['uid']:016x}"
        return (f"{r['directory']}  uid={uid}  name={r['name'] or '? (adopt with --name)'}  "
                f"{r['size_bytes']} bytes" + ("" if r["has_log"] else "  (no log/)"))

    def text(rows: list[dict[str, Any]]) -> str:
        return "\n".join(map(line, rows)) if rows else "(no orphaned queue directories)"

    _emit(found, as_json, text)


@orphans.command("adopt")
@click.argument("directory", required=False)
@_data_dir
@click.option("--name", help="The queue's name: needed when its directory has no queue.json "
                             "(made before that file existed), or to adopt it under another.")
@click.option("--all", "adopt_all", is_flag=True,
              help="Adopt every orphaned directory whose queue.json names its queue (after "
                   "a damaged catalog was set aside, say).")
def orphans_adopt(directory: str | None, data_dir: str, name: str | None,
                  adopt_all: bool) -> None:
    """Bring orphaned/DIRECTORY back as a queue, with its messages.

    The queue is opened (its log replayed) before anything changes: one that does not
    open stays where it is. On a server's data directory a queue record is made again if
    it is missing, without the tags and SQS-only attributes (Policy, ...) it had.
    """
    from engine.orphans import OrphanError

    if adopt_all == (directory is not None) or (adopt_all and name):
        raise click.UsageError("name one DIRECTORY (with --name if needed), or say --all")
    failed = 0
    with _broker(data_dir) as broker:
        targets = [o.directory for o in broker.orphans()] if adopt_all else [directory]
        adopted: list[tuple[str, str]] = []
        for target in targets:
            assert target is not None
            try:
                adopted.append((target, broker.adopt_orphan(target, name)))
            except OrphanError as exc:
                if not adopt_all:
                    raise
                failed += 1
                click.echo(f"not adopted: {exc}", err=True)
    for target, queue_name in adopted:
        click.echo(f"adopted {target} as queue {queue_name!r}")
        note = _restore_record(data_dir, queue_name)
        if note:
            click.echo(note)
    if adopt_all and not targets:
        click.echo("(no orphaned queue directories)")
    if failed:
        sys.exit(1)


def _restore_record(data_dir: str, engine_name: str) -> str | None:
    """Make the server's record of an adopted queue if its metadata store lacks it."""
    from server.deployment import METADATA_FILE
    from server.metadata import QueueRecord, SQLiteMetadataStore

    path = os.path.join(data_dir, METADATA_FILE)
    account, _, name = engine_name.partition("/")
    if not os.path.exists(path) or not name:
        return None  # a library's data directory, or a queue no server made

    async def restore() -> bool:
        import time

        store = SQLiteMetadataStore(path)
        try:
            if await store.get(account, name) is not None:
                return False
            now = int(time.time() * 1000)
            await store.put(QueueRecord(account, name, now, now))
            return True
        finally:
            await store.close()

    if not asyncio.run(restore()):
        return None
    return (f"made its server record again (account {account}, name {name}): its tags "
            "and SQS-only attributes (Policy, RedriveAllowPolicy, encryption ...) were not "
            "kept with the queue; set them again")


@orphans.command("discard")
@click.argument("directory")
@_data_dir
@click.confirmation_option(prompt="Delete this directory and every message in it?")
def orphans_discard(directory: str, data_dir: str) -> None:
    """Delete orphaned/DIRECTORY and everything in it."""
    with _broker(data_dir) as broker:
        broker.discard_orphan(directory)
    click.echo(f"discarded {directory}")


# --- the data directory's databases ---------------------------------------------------------


def _databases() -> dict[str, tuple[Any, str]]:
    """Each SQLite file of a data directory: its checked tables, and what to do once it is
    set aside (docs/OPERATIONS.md, "A damaged database")."""
    from engine import catalog
    from server import metadata
    from server.deployment import METADATA_FILE
    from server.protection import keystore, sse

    rebuild = ("start the server (every queue directory is then moved to orphaned/, "
               "untouched), stop it, and run `conveyor orphans adopt --all`")
    return {
        "catalog.sqlite3": (catalog.SCHEMA, "run `conveyor orphans adopt --all` (every "
                            "queue directory is found again from its own files)"),
        METADATA_FILE: (metadata.SCHEMA, rebuild + "; set tags and SQS-only attributes "
                        "(Policy ...) again"),
        keystore.FILE_NAME: (keystore.SCHEMA, "restore it from a backup, or make the "
                             "access keys again with `conveyor keys create`"),
        sse.FILE_NAME: (sse.SCHEMA, "restore it from a backup: bodies sealed under its "
                       "data keys cannot be read without it"),
    }


@main.group("db")
def db_group() -> None:
    """Verify and set aside the data directory's SQLite databases (the catalog, queue
    records, access keys and data keys). Run these with the server stopped."""


@db_group.command("verify")
@_data_dir
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def db_verify(data_dir: str, as_json: bool) -> None:
    """Check every database: SQLite's structure, and each row against its check.

    Exit status: 0 when nothing is damaged, 1 when something is, 2 when the directory
    could not be checked (a server holds it).
    """
    from engine import sqlite
    from engine.broker import lock_directory as lock_data_dir

    try:
        fd = lock_data_dir(data_dir)
    except (EngineError, OSError) as exc:
        raise _CannotRun(f"{exc}: stop the server first") from exc
    try:
        found = {}
        for file_name, (schema, _) in _databases().items():
            path = os.path.join(data_dir, file_name)
            if os.path.exists(path):
                found[file_name] = sqlite.verify_file(path, schema)
    finally:
        os.close(fd)
    if as_json:
        click.echo(json.dumps({"data_dir": data_dir, "databases": found,
                               "damaged": any(found.values())}))
    else:
        advice = _databases()
        for file_name, problems in found.items():
            for problem in problems:
                click.echo(f"damaged: {file_name}: {problem}", err=True)
            if problems:
                click.echo(f"DAMAGED: {file_name}: set it aside (conveyor db set-aside "
                           f"{file_name}), then {advice[file_name][1]}")
            else:
                click.echo(f"ok: {file_name}")
    if any(found.values()):
        sys.exit(1)


@db_group.command("set-aside")
@click.argument("file_name", metavar="DATABASE")
@_data_dir
def db_set_aside(file_name: str, data_dir: str) -> None:
    """Move DATABASE (catalog.sqlite3, metadata.sqlite3, ...) with its -wal and -shm into
    <data-dir>/quarantine/<time>/, and say what to do next. Nothing is deleted."""
    from engine.repair import set_aside_database

    advice = _databases().get(file_name)
    if advice is None:
        raise click.BadParameter(f"one of {', '.join(_databases())}", param_hint="DATABASE")
    try:
        quarantine = set_aside_database(data_dir, file_name)
    except EngineError as exc:
        raise click.ClickException(f"{exc}: stop the server first") from None
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"moved {file_name} to {quarantine}; now {advice[1]}")


if __name__ == "__main__":
    main()
