"""Real server processes for tests: `conveyor serve` on a free loopback port.

Every server's log is watched: tests/conftest.py fails a test at teardown when a log
gained a Python traceback meanwhile (the server logs one only for what it did not expect:
a 500, a failed partition call, a crashed background task), or when a server shared by a
module's tests died. A test passes on what its clients saw; this catches what they did
not.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

STARTUP_TIMEOUT_S = 30
WORKERS_ENV = "CONVEYOR_TEST_WORKERS"
"""How many workers a test's server runs (--workers) unless the test says: 1 by default;
`make test` runs the SQS and native suites again with 2."""
TRACEBACK = "Traceback (most recent call last)"
# How much of a log is quoted around each traceback found in it.
QUOTE_BEFORE = 400
QUOTE_AFTER = 3000

# Tracebacks that are no fault of the server's: (the log line before the traceback, the
# start of its exception line). aiohttp's HTTP parser answers a malformed request (a NUL
# in a header, a line too long) with 400 before any of the server's code runs, and logs
# the parser's exception with its traceback at ERROR.
EXPECTED_TRACEBACKS = (
    ("Error handling request from ", "aiohttp.http_exceptions."),
)

_logs: dict[Path, int] = {}
"""Every server log of the session, with how far it has been checked for tracebacks."""
_shared: list[Server] = []
"""Servers that module_server shares between a module's tests, while it does."""


# Under pytest-xdist (`make test` runs two workers) each worker hands out ports of a range
# of its own, below the kernel's ephemeral range: a port is free when handed out but
# bound only once the server has started, and the kernel could give the same port to the
# other worker meanwhile (or to a client's outgoing connection).
WORKER_PORTS_BASE = 20_000
WORKER_PORTS = 3_000
WORKER_PORTS_END = 32_768  # where Linux's default ephemeral range starts
_handed_out: collections.deque[int] = collections.deque(maxlen=WORKER_PORTS // 2)
"""The ports this worker handed out last (a killed server keeps its port for its restart)."""
_rng = random.Random()


def _worker_ports() -> range | None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    start = WORKER_PORTS_BASE + int(worker[2:]) * WORKER_PORTS
    end = min(start + WORKER_PORTS, WORKER_PORTS_END)
    return range(start, end) if end - start >= WORKER_PORTS // 2 else None


def _bindable(port: int) -> bool:
    """Whether nothing holds the loopback port now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on (and, under xdist, not handed out lately)."""
    ports = _worker_ports()
    if ports is not None:
        for _ in range(len(ports)):
            port = _rng.choice(ports)
            if port in _handed_out or not _bindable(port):
                continue
            _handed_out.append(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of count consecutive loopback ports nothing listens on (for a cluster
    node's workers, which replicate on its replication port and those after it)."""
    while True:
        first = free_port()
        if first + count > 65536:
            continue
        for port in range(first + 1, first + count):
            # A port handed out lately may be a killed server's, kept for its restart.
            if port in _handed_out or not _bindable(port):
                break
        else:
            _handed_out.extend(range(first + 1, first + count))
            return first


class Server:
    """A `conveyor serve` child process; restartable on the same data directory."""

    def __init__(self, data_dir: Path, fsync: str = "always", port: int | None = None,
                 extra: tuple[str, ...] = (), cafile: Path | None = None,
                 log: Path | None = None, workers: int | None = None) -> None:
        """``cafile``: the server serves HTTPS (``extra`` names its --tls-cert and --tls-key)
        with a certificate that this CA file verifies. ``log``: where its output goes
        (default: beside the data directory). ``workers``: --workers (default: the
        CONVEYOR_TEST_WORKERS environment variable, else 1; none for a cluster node)."""
        if workers is None and "--cluster" not in extra and "--workers" not in extra:
            workers = int(os.environ.get(WORKERS_ENV, "1"))
        self.workers = workers
        self.data_dir = data_dir
        self.fsync = fsync
        self.port = port or free_port()
        self.extra = extra
        self.cafile = cafile
        self.url = f"{'https' if cafile else 'http'}://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = log or data_dir.parent / f"server-{self.port}.log"
        self.start()

    def start(self) -> None:
        _logs.setdefault(self.log, 0)
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            workers = () if self.workers is None else ("--workers", str(self.workers))
            # A session of its own: kill() ends a supervisor and its workers at once.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(self.data_dir),
                 "--port", str(self.port), "--fsync", self.fsync, "--no-access-log",
                 *workers, *self.extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            context = ssl.create_default_context(cafile=self.cafile) if self.cafile else None
            with (contextlib.suppress(OSError),
                  urllib.request.urlopen(self.url + "/readyz", timeout=1,
                                         context=context) as response):
                if response.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in time: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if sig == signal.SIGKILL:
            # Every process of the server (a supervisor's workers outlive it otherwise).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        elif self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def signal_all(self, sig: int) -> None:
        """Send sig to every process of the server (SIGSTOP pauses its workers too)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def worker_pid(self, index: int) -> int | None:
        """The pid of the server's worker index now (a child of its supervisor)."""
        assert self.process is not None
        pid = self.process.pid
        with contextlib.suppress(FileNotFoundError):
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                with contextlib.suppress(FileNotFoundError):
                    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                    if argv[-3:-1] == [b"--worker-index", str(index).encode()]:
                        return int(child)
        return None

    def kill(self) -> None:
        """SIGKILL the server: the process, and with --workers every worker at once."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self.start()

    def create_key(self, principal: str = "tester", account: str | None = None) -> dict[str, str]:
        """An access key made with the real CLI on this server's data directory."""
        args = ["--principal", principal] + (["--account", account] if account else [])
        output = subprocess.run(
            [sys.executable, "-m", "server.cli", "keys", "create", "--data-dir",
             str(self.data_dir), *args], check=True, capture_output=True).stdout
        key: dict[str, str] = json.loads(output)
        return key

    def sqs(self, key: dict[str, str] | None = None, **config: Any) -> Any:
        """An unmodified boto3 SQS client pointed at this server, signed with ``key`` (from
        :meth:`create_key`; dummy credentials when the server does not check them), with no
        retries: a retry could hide a failure or a hang."""
        return boto3.client(
            "sqs", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id=key["access_key_id"] if key else "AKIDEXAMPLE",
            aws_secret_access_key=key["secret_access_key"] if key else "secret",
            verify=str(self.cafile) if self.cafile else None,
            config=Config(retries={"total_max_attempts": 1}, **config))


@contextlib.contextmanager
def module_server(factory: pytest.TempPathFactory, name: str, **options: Any
                  ) -> Iterator[Server]:
    """A server shared by one module's tests (for a module-scoped fixture); killed after.
    A test during which it dies fails at teardown (see ``problems``)."""
    running = Server(factory.mktemp(name) / "data", **options)
    _shared.append(running)
    try:
        yield running
    finally:
        _shared.remove(running)
        if running.process is not None and running.process.poll() is None:
            running.kill()


def _died(server: Server) -> str:
    assert server.process is not None
    return (f"the shared server {server.url} died (exit code {server.process.returncode}); "
            f"restarted. Its log ends:\n{server.log.read_text(errors='replace')[-2000:]}")


def restarted_if_dead(server: Server) -> Server:
    """The shared server, for the next case. The teardown of the case it died in restarts
    it and fails that case; if it died after that teardown, between cases, it is restarted
    here and this case fails, so that no death passes in silence."""
    assert server.process is not None
    if server.process.poll() is not None:
        server.start()
        pytest.fail(_died(server) + "\n(it died between cases)", pytrace=False)
    return server


def unexpected_tracebacks(text: str) -> list[int]:
    """Where each traceback in a log's text starts, but those EXPECTED_TRACEBACKS."""
    lines = text.splitlines(keepends=True)
    starts, at = [], 0
    for i, line in enumerate(lines):
        if TRACEBACK in line:
            before = lines[i - 1] if i else ""
            # The exception line is the first after the frames that is not indented.
            raised = next((later for later in lines[i + 1:]
                           if later.strip() and not later[0].isspace()), "")
            if not any(before.startswith(said) and raised.startswith(exception)
                       for said, exception in EXPECTED_TRACEBACKS):
                starts.append(at)
        at += len(line)
    return starts


def problems() -> list[str]:
    """What went wrong in the servers since the last call: each traceback written to a
    server log, quoted, and each shared server found dead (restarted, so that one death
    fails one case, not the rest of its module)."""
    found = []
    for path, checked in list(_logs.items()):
        try:
            if path.stat().st_size <= checked:  # the common case: nothing new
                continue
            with open(path, "rb") as f:
                f.seek(checked)
                data = f.read()
        except FileNotFoundError:
            del _logs[path]
            continue
        # Up to the last whole line: a traceback being written is read in full next time.
        end = data.rfind(b"\n") + 1
        _logs[path] = checked + end
        text = data[:end].decode(errors="replace")
        starts = unexpected_tracebacks(text)
        if starts:
            at = starts[0]
            found.append(f"{len(starts)} traceback(s) in {path}; the first:\n"
                         f"{text[max(0, at - QUOTE_BEFORE):at + QUOTE_AFTER]}")
    for server in _shared:
        if server.process is not None and server.process.poll() is not None:
            found.append(_died(server))
            server.start()
    return found


def queue_dir(data_dir: Path, queue: str, account: str = "000000000000") -> Path:
    """Where a stopped server (or cluster node) keeps a queue: its catalog names the uid."""
    from engine.catalog import Catalog

    catalog = Catalog(str(data_dir / "catalog.sqlite3"))
    try:
        entry = catalog.get(f"{account}/{queue}")
    finally:
        catalog.close()
    assert entry is not None, f"{data_dir} holds no queue {queue}"
    return data_dir / "queues" / f"{entry.uid:016x}"
