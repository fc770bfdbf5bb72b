"""Background threads shared by every log in the process.

Logs never start threads of their own, so that a broker holding 10,000 idle queues holds
no per-queue threads. Two things are shared instead:

- a small pool that runs fsyncs off the caller's thread (group commit for asyncio callers
  and the periodic sync of ``fsync="interval:<ms>"``);
- one timer thread that calls each registered log back at its interval.

The group commit of an event loop's waiters is the exception: its fsyncs run on native
threads of that loop's own (engine/_syncer.pyx, ``loop_syncer``), which never take the GIL,
and the loop reads their outcomes itself.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from engine._syncer import Syncer

_log = logging.getLogger("conveyor.background")

# fsync is I/O bound; a few threads let slow devices overlap without flooding the disk.
SYNC_WORKERS = 4

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def submit(fn: Callable[[], object]) -> Future[Any]:
    """Run fn on the shared sync pool."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(SYNC_WORKERS, thread_name_prefix="conveyor-sync")
        return _pool.submit(fn)


_syncers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Syncer | None] = (
    weakref.WeakKeyDictionary())
_syncers_lock = threading.Lock()


def loop_syncer(loop: asyncio.AbstractEventLoop) -> Syncer | None:
    """The native sync threads of loop (call on its thread), made on first use; None if
    this platform or loop has none (the caller uses the shared pool instead)."""
    try:
        with _syncers_lock:
            if loop in _syncers:
                return _syncers[loop]
    except TypeError:  # a loop that cannot be weakly referenced: the pool, every time
        return None
    syncer: Syncer | None = None
    try:
        from engine._syncer import Syncer

        syncer = Syncer(SYNC_WORKERS)
        loop.add_reader(syncer.fileno(), take_completions, syncer)
    except (ImportError, NotImplementedError, OSError, RuntimeError) as exc:
        _log.info("fsyncs of this event loop run on the shared pool: %s", exc)
        syncer = None
    with _syncers_lock:
        _syncers[loop] = syncer
    return syncer


def take_completions(syncer: Syncer) -> None:
    """Run each of syncer's completed syncs' callbacks, on this thread: the loop's, when
    its reader fires; or a thread that waits on a sync which the loop may never take
    (the loop is closed, stopped, or is that very thread, blocked in the wait)."""
    for done, error, seconds in syncer.take():
        try:
            done(error, seconds)
        except Exception:  # one log's failure must not strand the others' waiters
            _log.exception("a sync's completion failed")


class Ticking(Protocol):
    def tick(self) -> None: ...


class Timer:
    """Calls ``owner.tick()`` every interval until cancelled or the owner is collected.

    ``tick`` runs on the shared timer thread, so it must be short: a flush or the
    submission of a sync to the pool, never an fsync itself.
    """

    __slots__ = ("_owner", "cancelled", "interval_s")

    def __init__(self, owner: Ticking, interval_s: float) -> None:
        self._owner = weakref.ref(owner)
        self.interval_s = interval_s
        self.cancelled = False

    def cancel(self) -> None:
        # Only a flag: the timer thread may be waiting on the owner's lock right now, and
        # the owner may be holding it while it cancels.
        self.cancelled = True

    def fire(self) -> bool:
        """Tick the owner; False once the timer should be dropped."""
        owner = self._owner()
        if owner is None or self.cancelled:
            return False
        owner.tick()
        return True


class _TimerThread:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, timer: Timer) -> None:
        with self._cond:
            self._push(timer, _now() + timer.interval_s)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="conveyor-timer", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _push(self, timer: Timer, deadline: float) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), timer))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > _now():
                    self._cond.wait(self._heap[0][0] - _now() if self._heap else None)
                _, _, timer = heapq.heappop(self._heap)
            try:
                again = timer.fire()
            except Exception:  # a failing owner must not stop every other log's timer
                _log.exception("timer callback failed")
                again = True
            if again:
                with self._cond:
                    self._push(timer, _now() + timer.interval_s)


def _now() -> float:
    return time.monotonic()


_timers = _TimerThread()


def every(owner: Ticking, interval_ms: int) -> Timer:
    """Call ``owner.tick()`` every interval_ms on the shared timer thread."""
    timer = Timer(owner, interval_ms / 1000.0)
    _timers.add(timer)
    return timer
