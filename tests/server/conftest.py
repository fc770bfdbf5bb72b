"""Fixtures of the server tests: a fresh `conveyor serve` per test, and no proxies."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import Server


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
