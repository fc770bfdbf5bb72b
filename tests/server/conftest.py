"""Real server processes for the server tests: `conveyor serve` on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `conveyor serve` child process; restartable on the same data directory."""

    def __init__(self, data_dir: Path, fsync: str = "always", port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.fsync = fsync
        self.port = port or free_port()
        self.extra = extra
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(self.data_dir),
                 "--port", str(self.port), "--fsync", self.fsync, "--no-access-log",
                 *self.extra],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            with (contextlib.suppress(OSError),
                  urllib.request.urlopen(self.url + "/readyz", timeout=1) as response):
                if response.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in time: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self.start()

    def sqs(self, **config: Any) -> Any:
        """An unmodified boto3 SQS client pointed at this server (signed with dummy keys),
        with no retries: a retry could hide a failure or a hang."""
        return boto3.client(
            "sqs", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
            config=Config(retries={"total_max_attempts": 1}, **config))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path / "data")
    try:
        yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            running.stop(signal.SIGKILL)


@pytest.fixture
def sqs(server: Server) -> Any:
    return server.sqs()


@pytest.fixture(autouse=True)
def _no_proxy() -> Iterator[None]:
    # Loopback requests must never go through a proxy configured in the environment.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower().endswith("_proxy")}
    try:
        yield
    finally:
        os.environ.update(saved)
