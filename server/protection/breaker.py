"""Bulkheads and circuit breakers around the server's dependencies.

A request handler awaits two dependencies: the metadata store and the engine (the
"backend"). If either gets slow or starts failing, requests pile up behind it on the event
loop, each holding memory and a connection, until everything is slow, including requests
that never touch the sick dependency. Each dependency therefore gets a :class:`Guard`:

* a :class:`Bulkhead` bounds the calls in flight to it, and how long a call may wait for
  a slot, so a slow dependency ties up a fixed share of the server, not all of it;
* a :class:`CircuitBreaker` notices when calls keep failing (or time out) and then refuses
  calls at once for a while, so clients get a fast 503 instead of a slow one and the
  dependency gets room to recover; after the pause, one trial call probes it.

Both refuse with :class:`~server.errors.DependencyUnavailableError`, a 503 that clients
retry. Everything runs on the event loop's thread, so the state needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, Literal, ParamSpec, TypeVar

from engine.errors import ConfigError, EngineError
from server.errors import DependencyUnavailableError

_log = logging.getLogger("conveyor.server")

_P = ParamSpec("_P")
_T = TypeVar("_T")

State = Literal["closed", "open", "half-open"]
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half-open"


def is_dependency_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the dependency is failing, rather than the request being wrong.

    An :class:`EngineError` is an answer: the queue does not exist, the receipt is stale.
    The dependency worked, so it counts as a success. Anything else (OSError, a bug, a
    timeout), or a dependency of the dependency being unavailable, is a failure.
    :class:`~engine.errors.QueueUnavailableError` is deliberately an answer here: it is
    one queue's log that failed, and opening the circuit would refuse every other queue.
    """
    return not isinstance(exc, EngineError) or isinstance(exc, DependencyUnavailableError)


class Bulkhead:
    """At most ``limit`` calls in flight; a call waits ``queue_timeout_s`` for a slot at
    most (0: none), then is refused.

    ``async with bulkhead: ...`` around the call. One Bulkhead is shared by all tasks.
    """

    def __init__(self, name: str, limit: int, queue_timeout_s: float) -> None:
        if limit < 1:
            raise ConfigError(f"{name} concurrency limit", limit, "must be at least 1")
        if not queue_timeout_s >= 0:
            raise ConfigError(f"{name} queue timeout", queue_timeout_s, "must be 0 or more")
        self.name = name
        self.limit = limit
        self.queue_timeout_s = queue_timeout_s
        self._slots = asyncio.Semaphore(limit)
        self.in_flight = 0
        self.waiting = 0
        self.rejected = 0
        """Calls refused for want of a slot, since the start."""

    async def __aenter__(self) -> None:
        slots = self._slots
        if slots.locked():
            if self.queue_timeout_s == 0:
                self._refuse(f"{self.limit} calls in flight")
            self.waiting += 1
            try:
                async with asyncio.timeout(self.queue_timeout_s):
                    await slots.acquire()
            except TimeoutError:
                self._refuse(f"{self.limit} calls in flight, and none finished "
                             f"within {self.queue_timeout_s:g} s")
            finally:
                self.waiting -= 1
        else:
            await slots.acquire()  # a free slot: returns without yielding
        self.in_flight += 1

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.in_flight -= 1
        self._slots.release()

    def _refuse(self, reason: str) -> None:
        self.rejected += 1
        raise DependencyUnavailableError(self.name, reason) from None


class CircuitBreaker:
    """Closed: calls go through, and ``failure_threshold`` failures in a row open it.
    Open: calls are refused at once, without being made. ``reset_timeout_s`` after
    opening, it is half-open: one trial call goes through (others are still refused); its
    success closes the circuit and its failure opens it again.

    ``is_failure`` tells a failure of the dependency from an error that is the caller's
    (which is a success: the dependency answered). A call running longer than
    ``call_timeout_s`` is cancelled, counts as a failure whatever ``is_failure`` says, and
    raises DependencyUnavailableError. Cancelling a coroutine does not stop work it handed
    to a thread: such work must bound itself.
    """

    def __init__(self, name: str, failure_threshold: int = 5, reset_timeout_s: float = 5.0,
                 call_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 is_failure: Callable[[BaseException], bool] = is_dependency_failure) -> None:
        if failure_threshold < 1:
            raise ConfigError(f"{name} failure threshold", failure_threshold,
                              "must be at least 1")
        if not reset_timeout_s >= 0:
            raise ConfigError(f"{name} reset timeout", reset_timeout_s, "must be 0 or more")
        if call_timeout_s is not None and not call_timeout_s > 0:
            raise ConfigError(f"{name} call timeout", call_timeout_s, "must be over 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.call_timeout_s = call_timeout_s
        self.is_failure = is_failure
        self._clock = clock
        self._state: State = CLOSED
        self._opened_at = 0.0
        self._open_reason = ""
        self._trial_in_flight = False
        self.failures = 0
        """Failures in a row while closed."""
        self.rejected = 0
        """Calls refused without being made, since the start."""
        self.timeouts = 0
        """Calls cancelled for running longer than ``call_timeout_s``, since the start."""
        self.trips = 0
        """Times the circuit opened, since the start."""

    @property
    def state(self) -> State:
        """"half-open" as soon as the next call would be let through as a trial."""
        if self._state == OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
            return HALF_OPEN
        return self._state

    def check(self) -> None:
        """Raise DependencyUnavailableError if a call now would be refused; change nothing.

        For a caller that has to wait for something else before the call (a bulkhead
        slot), so that it does not wait only to be refused.
        """
        if self._state != CLOSED:
            reason = self._refusal(self._clock())
            if reason:
                self._refuse(reason)

    async def call(self, fn: Callable[_P, Awaitable[_T]], /,
                   *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``await fn(*args, **kwargs)`` if the circuit lets it through, and learn from it."""
        trial = self._admit()
        # No deadline, no timeout context: entering and leaving one costs a few
        # microseconds, and the engine's guard, on every message call, has none.
        deadline = None if self.call_timeout_s is None else asyncio.timeout(self.call_timeout_s)
        try:
            if deadline is None:
                result = await fn(*args, **kwargs)
            else:
                async with deadline:
                    result = await fn(*args, **kwargs)
        except Exception as exc:
            if deadline is not None and deadline.expired():
                self.timeouts += 1
                self._record(trial, failed=True)
                raise DependencyUnavailableError(
                    self.name, f"no answer within {self.call_timeout_s:g} s") from exc
            self._record(trial, failed=self.is_failure(exc))
            raise
        except BaseException:
            # Cancelled from outside (the client left, or shutdown): says nothing about
            # the dependency. A trial that never finished lets the next call be one.
            if trial:
                self._trial_in_flight = False
            raise
        self._record(trial, failed=False)
        return result

    def _refusal(self, now: float) -> str | None:
        """Why a call now is refused, or None; for a circuit that is not closed."""
        if self._state == OPEN:
            remaining = self._opened_at + self.reset_timeout_s - now
            if remaining > 0:
                return f"circuit open ({self._open_reason}); next trial in {remaining:.1f} s"
            return None
        if self._trial_in_flight:
            return f"circuit half-open ({self._open_reason}); a trial call is in flight"
        return None

    def _admit(self) -> bool:
        """Let a call through or refuse it; True if it is the half-open trial."""
        if self._state == CLOSED:
            return False
        reason = self._refusal(self._clock())
        if reason:
            self._refuse(reason)
        self._state = HALF_OPEN
        self._trial_in_flight = True
        return True

    def _record(self, trial: bool, failed: bool) -> None:
        if trial:
            self._trial_in_flight = False
            if failed:
                self._open("the trial call failed")
            else:
                self.failures = 0
                self._state = CLOSED
                _log.info("the %s circuit closed: the trial call succeeded", self.name)
        elif self._state == CLOSED:
            if not failed:
                self.failures = 0
            else:
                self.failures += 1
                if self.failures >= self.failure_threshold:
                    self._open(f"{self.failures} failures in a row")
        # Else the call was let through while closed and ended after the circuit opened:
        # the trial, not a straggler, decides when to close it again.

    def _open(self, reason: str) -> None:
        self._state = OPEN
        self._opened_at = self._clock()
        self._open_reason = reason
        self.trips += 1
        _log.warning("the %s circuit opened (%s): refusing calls for %g s",
                     self.name, reason, self.reset_timeout_s)

    def _refuse(self, reason: str) -> None:
        self.rejected += 1
        raise DependencyUnavailableError(self.name, reason)


class Guard:
    """A dependency's bulkhead and circuit breaker, used together:
    ``await guards.metadata.run(store.get, account, name)``.

    The breaker is asked first, so that while it is open calls are refused at once rather
    than after waiting for a slot; a call refused by the bulkhead is not a failure of the
    dependency (it is load), so it never opens the circuit.
    """

    def __init__(self, bulkhead: Bulkhead, breaker: CircuitBreaker) -> None:
        self.bulkhead = bulkhead
        self.breaker = breaker

    @property
    def name(self) -> str:
        return self.breaker.name

    async def run(self, fn: Callable[_P, Awaitable[_T]], /,
                  *args: _P.args, **kwargs: _P.kwargs) -> _T:
        self.breaker.check()
        async with self.bulkhead:
            return await self.breaker.call(fn, *args, **kwargs)
