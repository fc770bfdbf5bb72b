"""What the workers of one server share beyond the data directory, through files in
their run directory (mode 0700), so that nothing is lost or left held when a worker is
killed: the kernel drops a dead process's locks, and a counter needs no owner.

- :class:`Generation`: a counter each worker bumps after it changes a queue record, and
  reads on every lookup, so that no worker serves a record another has changed since
  (server/metadata.py, CachedMetadata).
- :class:`KeyedFileLocks`: a lock per queue name across the workers, held around a create,
  a change and a delete of the queue (server/service.py), as one process's asyncio lock is.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import time
from collections.abc import AsyncIterator

import xxhash

from server.errors import DependencyUnavailableError

GENERATION_FILE = "metadata.generation"
LOCKS_DIR = "locks"
LOCK_SLOTS = 4096
"""Files the queue names hash to (made at first use): two names in one slot wait for
each other while one is being made, changed or deleted, which takes milliseconds."""
QUEUE_LOCK_WAIT_S = 10.0
"""How long a worker waits for another's hold of a queue's lock (a create or delete of a
queue of many partitions, each made durable) before the request fails with 503."""
_LOCK_POLL_S = 0.002


class Generation:
    """An 8-byte counter in a file every worker maps."""

    def __init__(self, run_dir: str) -> None:
        self._fd = os.open(os.path.join(run_dir, GENERATION_FILE),
                           os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < 8:
            os.ftruncate(self._fd, 8)
        self._map = mmap.mmap(self._fd, 8)

    def value(self) -> int:
        """The counter now: a read of the mapping, no system call."""
        return int.from_bytes(self._map[:8], "little")

    def bump(self) -> None:
        """Add one. The file's lock is held only around the add, so two workers bumping at
        once both count: a lost bump would leave a worker serving a stale record."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._map[:8] = (self.value() + 1).to_bytes(8, "little")
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)


class KeyedFileLocks:
    """A lock per key across processes: flock on one of LOCK_SLOTS files, on a descriptor
    opened for each hold (so that two holds in one process exclude each other too)."""

    def __init__(self, run_dir: str) -> None:
        self._dir = os.path.join(run_dir, LOCKS_DIR)
        os.makedirs(self._dir, mode=0o700, exist_ok=True)

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        slot = xxhash.xxh3_64_intdigest("\0".join(key).encode()) % LOCK_SLOTS
        fd = os.open(os.path.join(self._dir, f"{slot:03x}"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Polled, not a blocking flock on a thread: a worker that stops waits on no
            # thread it cannot interrupt. Holds last a metadata write or two.
            deadline = time.monotonic() + QUEUE_LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise DependencyUnavailableError(
                            "queue's lock", f"another worker held it {QUEUE_LOCK_WAIT_S:g} s; "
                                            "retry") from None
                    await asyncio.sleep(_LOCK_POLL_S)
            yield
        finally:
            os.close(fd)  # releases the lock
