"""The garbage collector's policy in a server process: old objects are frozen.

CPython's full collection walks every object the collector tracks, holding the GIL. A node
of a cluster holding 10,000 queues tracks about 650,000 (some 60 per queue: its log, its
leader's or follower's state, their tasks and streams). A full collection runs whenever the
objects that survived two younger collections since the last one pass a quarter of those
that survived it, and a node taking over 1,850 partitions makes that many in about a
second. Measured in a leader kill (docs/SCALING.md, "Failover"): each surviving node ran a
full collection every 1.5 s, of 400-860 ms each; that was half of its CPU in the takeover.

So every FREEZE_S the objects alive are frozen (``gc.freeze``, a constant-time move to
the permanent generation): collections walk only what was made since, and the queues'
long-lived objects are walked no more. A frozen object is still freed when its last
reference goes. What freezing costs is a frozen cycle of objects that then becomes garbage:
nothing collects it while it is frozen. So once the frozen objects have grown by
THAW_GROWTH since the last full collection (counted every CHECK_S, and at most once per
THAW_MIN_S), they are thawed and collected whole, one pause, and frozen again. Garbage held
frozen is thereby kept below THAW_GROWTH of the heap, as CPython's own rule keeps it below a
quarter. A process whose heap does not grow runs no full collection of its old objects.

Only the server's process runs this (``server.web.listener``): the engine, a library, leaves
the collector of the program it is in alone.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.metrics import Render

# Objects alive this long (at most) are frozen: collections walk only younger ones.
FREEZE_S = 1.0
# How often the frozen objects are counted: a walk of the permanent generation's list, one
# cache miss an object, about 70 ms in a node holding 10,000 queues (650,000 objects; py-spy
# at rest). Every 10 s that was 0.7% of a core at rest; a thaw comes at most every
# THAW_MIN_S anyway.
CHECK_S = 60.0
# Growth of the frozen objects, since the last full collection, that makes the next one.
THAW_GROWTH = 0.25
# Full collections of the thawed heap are at least this far apart.
THAW_MIN_S = 60.0


class GcPolicy:
    """Freezes old objects on the event loop's clock; see the module docstring. Also a
    metrics source (server.metrics): collections of the oldest generation and their
    pauses, thaws, and how many objects are frozen."""

    def __init__(self) -> None:
        self.frozen = 0
        """Objects frozen, at the last count."""
        self.thaws = 0
        self._base = 0
        """Objects frozen just after the last full collection (0: none yet)."""
        self._thawed_at = time.monotonic()
        self._next_check = 0.0
        self._oldest_started = 0.0
        self.oldest_collections = 0
        """Collections of the oldest generation: of what is not frozen, or (a thaw) all."""
        self.oldest_pause_s = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        gc.callbacks.append(self._observe)
        self._handle = loop.call_later(FREEZE_S, self._tick, loop)

    def stop(self) -> None:
        """Stop freezing, and thaw: what was frozen is the collector's again."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)
        gc.unfreeze()

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self.step()
        self._handle = loop.call_later(FREEZE_S, self._tick, loop)

    def step(self) -> None:
        """Freeze what is alive; every CHECK_S, count it, and thaw and collect it whole
        if it grew by THAW_GROWTH since the last full collection."""
        gc.freeze()
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_S
        self.frozen = gc.get_freeze_count()
        if self._base == 0:
            self._base = self.frozen  # the heap the process started with
        elif self.frozen > self._base * (1 + THAW_GROWTH) and \
                now - self._thawed_at >= THAW_MIN_S:
            self.thaw()

    def thaw(self) -> None:
        """Collect everything, frozen objects too (one full pause), and freeze again."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.thaws += 1
        self._thawed_at = time.monotonic()
        self.frozen = self._base = gc.get_freeze_count()

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        # Called around every collection, the young ones thousands of times a second under
        # load: a comparison, and a clock read for the oldest generation's only.
        if info["generation"] != 2:
            return
        if phase == "start":
            self._oldest_started = time.perf_counter()
        else:
            self.oldest_collections += 1
            self.oldest_pause_s += time.perf_counter() - self._oldest_started

    def snapshot(self) -> Render:
        frozen, thaws = self.frozen, self.thaws
        collections, pause = self.oldest_collections, self.oldest_pause_s

        def render() -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
            yield GaugeMetricFamily("conveyor_gc_frozen_objects",
                                    "Objects frozen: the collector no longer walks them",
                                    value=frozen)
            yield CounterMetricFamily("conveyor_gc_oldest_collections",
                                      "Collections of the collector's oldest generation",
                                      value=collections)
            yield CounterMetricFamily("conveyor_gc_oldest_pause_seconds",
                                      "Time in collections of the oldest generation, the GIL "
                                      "held", value=pause)
            yield CounterMetricFamily("conveyor_gc_thaws",
                                      "Full collections of the frozen objects too",
                                      value=thaws)

        return render
