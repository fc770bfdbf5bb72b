"""What a broker's queued messages hold in memory, against a bound.

Each open queue's state counts its own bytes (``State.memory_bytes``: its chunks of
message records, their lease times and ids, timers, and an estimate for FIFO and moved
messages' dict entries). A queue reports the change after each operation, under its own
lock, so the total is exact between operations and costs nothing per message; a closed
queue takes its bytes back. Sends are refused while the total is at the bound
(:class:`~engine.errors.MemoryFullError`); everything that drains a queue goes on, so the
total falls back under it as consumers catch up.

Bodies are not counted: they stay in the queues' logs on disk, and reads go through the
page cache, which the kernel reclaims under pressure.
"""

from __future__ import annotations

import threading

from engine.errors import MemoryFullError


class MemoryBudget:
    """The bytes the open queues' states hold; ``limit`` None bounds nothing."""

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit <= 0:
            raise ValueError(f"a memory bound is positive, not {limit}")
        self.limit = limit
        self._used = 0
        # Queues report from many threads at once (each under its own lock).
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def change(self, delta: int) -> None:
        with self._lock:
            self._used += delta

    def check(self) -> None:
        """Raise MemoryFullError if the total is at the bound (a send is about to be
        made: it may pass the bound by its own few records, never by more)."""
        if self.limit is not None and self._used >= self.limit:
            raise MemoryFullError(self._used, self.limit)
