"""The supervisor of ``conveyor serve --workers N``: one process that serves nothing
itself. It

- holds the data directory's lock for the whole server: its workers inherit the
  descriptor, so no other server opens the directory while any of them lives, even if
  the supervisor itself was killed;
- does once, before any worker starts, what one process must do alone: set aside
  strays, reconcile the queue records with the engine's queues, upgrade the key stores;
- binds the port plainly (refused if anything holds it), claims it among Conveyor
  servers (server/web/listener.py, claim_port), and reserves it with SO_REUSEPORT (which
  also resolves port 0); then starts the workers, which bind it too, the kernel spreading
  connections over them;
- restarts a worker that dies, after a pause that doubles from 0.1 s to 5 s while it
  keeps dying (another worker then serves the port; calls to the partitions of the dead
  one fail with 503 until it is back);
- forwards SIGTERM and SIGINT to every worker, each of which stops gracefully, and exits
  once they all have.

A worker that finds the supervisor gone (the end of a pipe it holds closes) stops
gracefully by itself.

In a cluster (``--cluster``), each worker is a member of its own, as a node of one
process is: its id is ``NODE_ID/wI``, it replicates on REPLICATION_PORT+I, and it keeps
its copies in DATA_DIR/wI. The cluster's partition calls carry the engine calls that
the workers' call sockets carry on one node, and the ring places at most one copy of a
queue on each server (replication.members). The workers still share the port and the
rate limits, and over the call sockets the server's views (/metrics, /v1/usage,
/v1/cluster) and the FIFO receive attempts of each queue at its home. There is nothing
for the supervisor to prepare: each member's directory is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from engine import AsyncBroker
from engine.broker import lock_directory
from engine.files import make_dirs
from replication.members import MEMBER_SEPARATOR
from server.backend import LocalBackend
from server.config import WORKERS_MAX, ServerConfig
from server.deployment import METADATA_FILE, engine_guard
from server.metadata import SQLiteMetadataStore
from server.partitioned import EnginePartitions
from server.protection import keystore, masterkey, sse
from server.protection._shared_buckets import SLOT_BYTES, SharedBuckets
from server.protection.keystore import KeyStore
from server.protection.sse import Keyring
from server.web.listener import claim_port

if TYPE_CHECKING:
    from replication.node import ClusterConfig

_log = logging.getLogger("conveyor.server")

RESTART_PAUSE_MIN_S = 0.1
RESTART_PAUSE_MAX_S = 5.0
# A worker that ran this long before it died is restarted after the shortest pause.
RESTART_STEADY_S = 30.0
# Workers get this long to stop after SIGTERM (their own grace is SHUTDOWN_GRACE_S, 25 s,
# and closing the engine snapshots each open queue), then are killed.
STOP_WAIT_S = 60.0
POLL_S = 0.1
# Workers that have not all served this long after they were started (a hang in a
# worker's start: a database locked by another program, say) mean the server cannot
# start.
STARTUP_S = 120.0
# The environment a worker learns its place from.
RUN_DIR_ENV = "CONVEYOR_WORKER_RUN_DIR"
SUPERVISOR_FD_ENV = "CONVEYOR_SUPERVISOR_FD"
BUCKETS_FD_ENV = "CONVEYOR_BUCKETS_FD"
READY_FD_ENV = "CONVEYOR_READY_FD"
BUCKET_SLOTS = 1 << 17
"""Slots of the rate-limit table the workers share (2 MiB): busy buckets of principals
and queues together (server/protection/_shared_buckets.pyx)."""
# sockaddr_un holds 108 bytes; a socket path this long or longer goes under /tmp instead.
SOCKET_PATH_MAX = 100


def prepare(config: ServerConfig, master: bytes) -> None:
    """What must be done by one process before the workers open the data directory."""

    async def run() -> None:
        broker = AsyncBroker(config.data_dir, config.fsync, shared=True,
                             partitions=EnginePartitions())
        try:
            broker.broker.set_aside_strays()
            store = SQLiteMetadataStore(os.path.join(config.data_dir, METADATA_FILE))
            try:
                await LocalBackend(broker, engine_guard()).reconcile(store)
            finally:
                await store.close()
        finally:
            await broker.close()
        KeyStore(os.path.join(config.data_dir, keystore.FILE_NAME), master).close()
        Keyring(os.path.join(config.data_dir, sse.FILE_NAME), master).close()

    asyncio.run(run())


def member_data_dir(data_dir: str, index: int) -> str:
    """Where worker index of a cluster node keeps its copies."""
    return os.path.join(data_dir, f"w{index}")


def member_cluster(cluster: ClusterConfig, index: int) -> ClusterConfig:
    """Worker index's membership of the cluster: its id and its replication port."""

    host, _, port = cluster.replication_advertise.rpartition(":")
    return dataclasses.replace(
        cluster, node_id=f"{cluster.node_id}{MEMBER_SEPARATOR}w{index}",
        replication_port=cluster.replication_port + index,
        replication_advertise=f"{host}:{int(port) + index}")


def run_directory(data_dir: str) -> tuple[str, bool]:
    """The directory (mode 0700) of the workers' call sockets, and whether it is a
    temporary one (the data directory's path too long for a socket path under it)."""
    path = os.path.join(os.path.abspath(data_dir), "run")
    if len(os.path.join(path, f"w{WORKERS_MAX - 1}.sock")) < SOCKET_PATH_MAX:
        make_dirs(path)
        os.chmod(path, 0o700)
        return path, False
    return tempfile.mkdtemp(prefix="conveyor-run-"), True


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) with SO_REUSEPORT, not listening: it holds the port
    for the workers' sockets, and tells a port 0 the kernel chose.

    SO_REUSEPORT would let any process of this user bind the port beside the workers, and
    the kernel would split connections between two servers. So the port is first bound
    without it, as any server binds: that fails if anything holds the port, this server's
    workers included once they run (a second server is refused, as on one process)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    def __init__(self, config: ServerConfig, argv: list[str],
                 announce: Callable[[int], None]) -> None:
        self.config = config
        self.argv = argv
        self.announce = announce
        self.count = config.workers
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * self.count
        self.started_at = [0.0] * self.count
        self.pause = [RESTART_PAUSE_MIN_S] * self.count
        self.due = [0.0] * self.count
        self.stopping = False
        self.began = 0.0
        self.ready: set[int] = set()
        """Workers that have served since they started (each tells the ready pipe)."""
        self.started = False
        """Every worker has been ready once: from then on, one that dies is restarted;
        before, one that exits means the server cannot start (a bad setting, a damaged
        file), and the supervisor stops with it rather than restart it forever."""

    def run(self) -> int:
        config = self.config
        make_dirs(config.data_dir)
        master = masterkey.load_or_create(config.master_key_path)
        lock = lock_directory(config.data_dir)
        run_dir, temporary = run_directory(config.data_dir)
        reserved = reserve_port(config.host, config.port)
        port = reserved.getsockname()[1]
        # Held by the workers too, so that it outlives a supervisor killed before them.
        claim = claim_port(config.host, port)
        death_read, death_write = os.pipe()
        # Memory, not a file: the table changes on every request, and nothing of it
        # outlives the server.
        buckets = os.memfd_create("conveyor-rate-buckets")
        os.ftruncate(buckets, BUCKET_SLOTS * SLOT_BYTES)
        ready_read, ready_write = os.pipe()
        os.set_blocking(ready_read, False)
        self._ready_read = ready_read
        fds = (lock, death_read, buckets, ready_write, claim.fileno())
        for fd in fds:
            os.set_inheritable(fd, True)
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM,
                                                                      signal.SIGINT)}
        try:
            if config.cluster is None:
                prepare(config, master)
            if self.stopping:  # told to stop while preparing: nothing to stop yet
                return 0
            env = {**os.environ, RUN_DIR_ENV: run_dir, SUPERVISOR_FD_ENV: str(death_read),
                   BUCKETS_FD_ENV: str(buckets), READY_FD_ENV: str(ready_write)}
            command = [sys.executable, "-m", "server.cli", *self.argv,
                       "--port", str(port), "--workers", str(self.count)]
            for index in range(self.count):
                self._start(index, command, env, fds)
            self.began = time.monotonic()
            return self._watch(command, env, fds, lambda: self.announce(port))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_all()
            reserved.close()
            claim.close()
            os.close(death_write)
            os.close(death_read)
            os.close(buckets)
            os.close(ready_read)
            os.close(ready_write)
            os.close(lock)
            if temporary:
                shutil.rmtree(run_dir, ignore_errors=True)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _start(self, index: int, command: list[str], env: dict[str, str],
               fds: tuple[int, ...]) -> None:
        self.processes[index] = subprocess.Popen(
            [*command, "--worker-index", str(index)], env=env, pass_fds=fds)
        self.started_at[index] = time.monotonic()

    def _watch(self, command: list[str], env: dict[str, str], fds: tuple[int, ...],
               announce: Callable[[], None]) -> int:
        while not self.stopping:
            time.sleep(POLL_S)
            self._read_ready()
            if not self.started and len(self.ready) == self.count:
                self.started = True
                announce()
            if not self.started and time.monotonic() - self.began > STARTUP_S:
                _log.error("the workers did not all serve within %.0f s (ready: %s): the "
                           "server does not start", STARTUP_S, sorted(self.ready))
                self._stop_all()
                return 1
            now = time.monotonic()
            for index, process in enumerate(self.processes):
                if process is not None and process.poll() is not None:
                    if not self.started:
                        _log.error("worker %d exited with %s before it served: the server "
                                   "does not start", index, process.returncode)
                        self._stop_all()
                        return process.returncode if process.returncode > 0 else 1
                    self.ready.discard(index)
                    ran = now - self.started_at[index]
                    if ran >= RESTART_STEADY_S:
                        self.pause[index] = RESTART_PAUSE_MIN_S
                    _log.warning("worker %d (pid %d) exited with %s after %.1f s; "
                                 "restarting it in %.1f s", index, process.pid,
                                 process.returncode, ran, self.pause[index])
                    self.processes[index] = None
                    self.due[index] = now + self.pause[index]
                    self.pause[index] = min(self.pause[index] * 2, RESTART_PAUSE_MAX_S)
                elif process is None and now >= self.due[index] and not self.stopping:
                    self._start(index, command, env, fds)
        return self._stop_all()

    def _read_ready(self) -> None:
        try:
            data = os.read(self._ready_read, 4096)
        except BlockingIOError:
            return
        self.ready.update(data)

    def _stop_all(self) -> int:
        """SIGTERM to every worker, and wait for them (SIGKILL after STOP_WAIT_S)."""
        live = [p for p in self.processes if p is not None and p.poll() is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_S
        failed = 0
        for process in live:
            try:
                code = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _log.error("worker pid %d did not stop in %.0f s: killed", process.pid,
                           STOP_WAIT_S)
                process.kill()
                code = process.wait()
            failed += code != 0
        self.processes = [None] * self.count
        return 1 if failed else 0


def shared_buckets() -> SharedBuckets:
    """In a worker: the rate-limit table its supervisor made for the workers."""
    fd = int(os.environ[BUCKETS_FD_ENV])
    return SharedBuckets(mmap.mmap(fd, os.fstat(fd).st_size))


def follow_supervisor(loop: asyncio.AbstractEventLoop, index: int) -> None:
    """In a worker that serves now: tell the supervisor so, and stop gracefully (as on
    SIGTERM) once the supervisor is gone, which closes the write end of the pipe whose
    read end this worker holds."""
    ready = int(os.environ[READY_FD_ENV])
    os.write(ready, bytes([index]))
    os.close(ready)
    fd = int(os.environ[SUPERVISOR_FD_ENV])

    def gone() -> None:
        loop.remove_reader(fd)
        os.kill(os.getpid(), signal.SIGTERM)

    loop.add_reader(fd, gone)
