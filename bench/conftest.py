"""Benchmark fixtures. Run with `make bench`; never part of `make test`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def scratch() -> Iterator[str]:
    """A fresh directory on the same disk the tests use, removed afterwards."""
    path = tempfile.mkdtemp(prefix="conveyor-bench-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def settled_disk() -> None:
    """Start every benchmark with no dirty pages left by the one before.

    Without this, writeback of an earlier benchmark's data runs during a later one and
    its fsync latencies measure the earlier benchmark, not this one.
    """
    os.sync()
