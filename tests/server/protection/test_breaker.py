"""Bulkheads and circuit breakers, on a real event loop (the breaker's pause on a clock the
test moves by hand, so nothing waits for it)."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.errors import ConfigError, QueueNotFoundError, ReceiptInvalidError
from server.errors import DependencyUnavailableError
from server.protection.breaker import Bulkhead, CircuitBreaker, Guard

# Generous for a loaded machine, and still far below the sleeps a refused call would do.
FAST_S = 0.05


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Dependency:
    """A dependency whose behaviour the test sets: answer, fail, or hang until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: BaseException | None = None
        self.release: asyncio.Event | None = None
        self.cancelled = 0

    async def __call__(self, value: str = "ok") -> str:
        self.calls += 1
        if self.release is not None:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.error is not None:
            raise self.error
        return value


def state(breaker: CircuitBreaker) -> str:
    # Read through a function: mypy would narrow the property after one comparison.
    return breaker.state


async def settle() -> None:
    """Let the tasks started so far run up to their first wait."""
    for _ in range(5):
        await asyncio.sleep(0)


# --- Bulkhead ------------------------------------------------------------------------------


async def test_bulkhead_refuses_at_once_beyond_its_limit() -> None:
    bulkhead = Bulkhead("backend", limit=2, queue_timeout_s=0)
    release = asyncio.Event()

    async def hold() -> None:
        async with bulkhead:
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await settle()
    assert bulkhead.in_flight == 2
    start = time.perf_counter()
    with pytest.raises(DependencyUnavailableError) as caught:
        async with bulkhead:
            pytest.fail("entered a full bulkhead")
    assert time.perf_counter() - start < FAST_S
    assert caught.value.dependency == "backend"
    assert "2 calls in flight" in str(caught.value)
    assert bulkhead.rejected == 1
    release.set()
    await asyncio.gather(*holders)
    assert bulkhead.in_flight == 0
    async with bulkhead:
        assert bulkhead.in_flight == 1


async def test_bulkhead_never_exceeds_its_limit() -> None:
    bulkhead = Bulkhead("backend", limit=3, queue_timeout_s=5)
    running = peak = 0

    async def work() -> None:
        nonlocal running, peak
        async with bulkhead:
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.001)
            running -= 1

    await asyncio.gather(*(work() for _ in range(30)))
    assert peak == 3
    assert bulkhead.rejected == 0
    assert bulkhead.in_flight == bulkhead.waiting == 0


async def test_bulkhead_waits_for_a_slot_up_to_its_queue_timeout() -> None:
    bulkhead = Bulkhead("metadata store", limit=1, queue_timeout_s=0.1)
    release = asyncio.Event()

    async def hold() -> None:
        async with bulkhead:
            await release.wait()

    holder = asyncio.create_task(hold())
    await settle()
    start = time.perf_counter()
    with pytest.raises(DependencyUnavailableError):
        async with bulkhead:
            pass
    assert 0.09 <= time.perf_counter() - start < 2
    assert bulkhead.waiting == 0

    # A slot freed within the timeout is taken.
    asyncio.get_running_loop().call_later(0.02, release.set)
    async with bulkhead:
        assert bulkhead.in_flight == 1
    await holder
    assert bulkhead.rejected == 1


def test_bulkhead_settings_are_checked() -> None:
    with pytest.raises(ConfigError):
        Bulkhead("backend", limit=0, queue_timeout_s=0)
    with pytest.raises(ConfigError):
        Bulkhead("backend", limit=1, queue_timeout_s=-1)


# --- CircuitBreaker ------------------------------------------------------------------------


async def test_breaker_opens_after_threshold_failures_and_then_fails_fast() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("backend", failure_threshold=3, reset_timeout_s=5, clock=clock)
    dep = Dependency()
    dep.error = OSError("disk on fire")
    for _ in range(2):
        with pytest.raises(OSError):  # the dependency's own error, unchanged
            await breaker.call(dep)
    assert state(breaker) == "closed"
    with pytest.raises(OSError):
        await breaker.call(dep)
    assert state(breaker) == "open"
    assert breaker.trips == 1

    # Open: refused without calling; the call would otherwise hang until released.
    dep.release = asyncio.Event()
    start = time.perf_counter()
    for _ in range(100):
        with pytest.raises(DependencyUnavailableError) as caught:
            await breaker.call(dep)
    assert time.perf_counter() - start < FAST_S
    assert dep.calls == 3
    assert breaker.rejected == 100
    assert caught.value.dependency == "backend"
    assert "circuit open" in str(caught.value)
    clock.advance(4.9)
    with pytest.raises(DependencyUnavailableError):
        await breaker.call(dep)
    assert dep.calls == 3


async def test_breaker_half_open_lets_one_trial_through_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("backend", failure_threshold=1, reset_timeout_s=5, clock=clock)
    dep = Dependency()
    dep.error = OSError("down")
    with pytest.raises(OSError):
        await breaker.call(dep)
    assert state(breaker) == "open"

    clock.advance(5)
    assert state(breaker) == "half-open"
    dep.error = None
    dep.release = asyncio.Event()
    trial = asyncio.create_task(breaker.call(dep, "trial"))
    await settle()
    assert dep.calls == 2
    # One trial at a time: the others are still refused, without a call.
    with pytest.raises(DependencyUnavailableError, match="trial call is in flight"):
        await breaker.call(dep)
    assert dep.calls == 2

    dep.release.set()
    assert await trial == "trial"
    assert state(breaker) == "closed"
    assert await breaker.call(dep, "after") == "after"


async def test_breaker_reopens_when_the_trial_fails() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("backend", failure_threshold=2, reset_timeout_s=5, clock=clock)
    dep = Dependency()
    dep.error = ConnectionError("refused")
    for _ in range(2):
        with pytest.raises(ConnectionError):
            await breaker.call(dep)
    clock.advance(5)
    with pytest.raises(ConnectionError):  # the trial: one failure is enough
        await breaker.call(dep)
    assert state(breaker) == "open"
    assert breaker.trips == 2
    with pytest.raises(DependencyUnavailableError, match="trial call failed"):
        await breaker.call(dep)
    assert dep.calls == 3


async def test_a_cancelled_trial_lets_the_next_call_be_the_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("backend", failure_threshold=1, reset_timeout_s=1, clock=clock)
    dep = Dependency()
    dep.error = OSError("down")
    with pytest.raises(OSError):
        await breaker.call(dep)
    clock.advance(1)
    dep.error = None
    dep.release = asyncio.Event()
    trial = asyncio.create_task(breaker.call(dep))
    await settle()
    trial.cancel()  # the client went away: says nothing about the dependency
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert state(breaker) == "half-open"
    dep.release = None
    assert await breaker.call(dep) == "ok"
    assert state(breaker) == "closed"


async def test_a_success_resets_the_count_of_failures_in_a_row() -> None:
    breaker = CircuitBreaker("backend", failure_threshold=3, clock=FakeClock())
    dep = Dependency()
    for _ in range(5):
        dep.error = OSError("flaky")
        for _ in range(2):
            with pytest.raises(OSError):
                await breaker.call(dep)
        dep.error = None
        await breaker.call(dep)
    assert state(breaker) == "closed"
    assert breaker.failures == 0


async def test_caller_fault_errors_do_not_trip_the_breaker() -> None:
    breaker = CircuitBreaker("backend", failure_threshold=2, clock=FakeClock())
    dep = Dependency()
    for error in [QueueNotFoundError("q"), ReceiptInvalidError("stale")] * 5:
        dep.error = error
        with pytest.raises(type(error)) as caught:
            await breaker.call(dep)
        assert caught.value is error
    assert state(breaker) == "closed"
    assert breaker.failures == 0


async def test_an_unavailable_dependency_of_the_dependency_trips_the_breaker() -> None:
    breaker = CircuitBreaker("backend", failure_threshold=2, clock=FakeClock())
    dep = Dependency()
    dep.error = DependencyUnavailableError("metadata store", "circuit open")
    for _ in range(2):
        with pytest.raises(DependencyUnavailableError):
            await breaker.call(dep)
    assert state(breaker) == "open"


async def test_the_failure_predicate_can_be_replaced() -> None:
    breaker = CircuitBreaker("backend", failure_threshold=1, clock=FakeClock(),
                             is_failure=lambda exc: not isinstance(exc, KeyError))
    dep = Dependency()
    dep.error = KeyError("x")
    with pytest.raises(KeyError):
        await breaker.call(dep)
    assert state(breaker) == "closed"


async def test_a_call_over_its_timeout_is_cancelled_and_trips_the_breaker() -> None:
    breaker = CircuitBreaker("metadata store", failure_threshold=2, call_timeout_s=0.05,
                             clock=FakeClock())
    dep = Dependency()
    dep.release = asyncio.Event()  # never set: the dependency hangs
    for _ in range(2):
        start = time.perf_counter()
        with pytest.raises(DependencyUnavailableError, match=r"no answer within 0\.05 s"):
            await breaker.call(dep)
        assert 0.04 <= time.perf_counter() - start < 2
    assert dep.cancelled == 2
    assert breaker.timeouts == 2
    assert state(breaker) == "open"


async def test_a_timeout_counts_as_failure_whatever_the_predicate_says() -> None:
    breaker = CircuitBreaker("backend", failure_threshold=1, call_timeout_s=0.01,
                             clock=FakeClock(), is_failure=lambda exc: False)
    dep = Dependency()
    dep.release = asyncio.Event()
    with pytest.raises(DependencyUnavailableError):
        await breaker.call(dep)
    assert state(breaker) == "open"


async def test_a_straggler_does_not_close_an_open_circuit() -> None:
    breaker = CircuitBreaker("backend", failure_threshold=1, clock=FakeClock())
    slow = Dependency()
    slow.release = asyncio.Event()
    straggler = asyncio.create_task(breaker.call(slow))
    await settle()
    failing = Dependency()
    failing.error = OSError("down")
    with pytest.raises(OSError):
        await breaker.call(failing)
    assert state(breaker) == "open"
    slow.release.set()
    assert await straggler == "ok"  # let through while closed, it still answers
    assert state(breaker) == "open"


def test_breaker_settings_are_checked() -> None:
    with pytest.raises(ConfigError):
        CircuitBreaker("backend", failure_threshold=0)
    with pytest.raises(ConfigError):
        CircuitBreaker("backend", reset_timeout_s=-1)
    with pytest.raises(ConfigError):
        CircuitBreaker("backend", call_timeout_s=0)


# --- Guard ---------------------------------------------------------------------------------


def guard(name: str, clock: FakeClock, limit: int = 4) -> Guard:
    return Guard(Bulkhead(name, limit=limit, queue_timeout_s=0),
                 CircuitBreaker(name, failure_threshold=2, reset_timeout_s=5, clock=clock))


async def test_guard_runs_the_call_with_its_arguments() -> None:
    metadata = guard("metadata store", FakeClock())

    async def get(account: str, name: str, *, missing_ok: bool = False) -> str:
        return f"{account}/{name}/{missing_ok}"

    assert await metadata.run(get, "000000000000", "q", missing_ok=True) \
        == "000000000000/q/True"
    assert metadata.name == "metadata store"


async def test_guards_are_independent() -> None:
    clock = FakeClock()
    metadata, backend = guard("metadata store", clock), guard("backend", clock)
    store, engine = Dependency(), Dependency()
    store.error = OSError("metadata store down")
    for _ in range(2):
        with pytest.raises(OSError):
            await metadata.run(store)
    assert state(metadata.breaker) == "open"
    with pytest.raises(DependencyUnavailableError) as caught:
        await metadata.run(store)
    assert caught.value.dependency == "metadata store"

    # The backend still serves, and nothing of the metadata store's state leaked into it.
    assert [await backend.run(engine, str(i)) for i in range(10)] == [str(i) for i in range(10)]
    assert state(backend.breaker) == "closed"
    assert backend.breaker.rejected == backend.bulkhead.rejected == 0


async def test_guard_slow_dependency_holds_only_its_own_slots() -> None:
    clock = FakeClock()
    metadata, backend = guard("metadata store", clock, limit=2), guard("backend", clock)
    store, engine = Dependency(), Dependency()
    store.release = asyncio.Event()
    hung = [asyncio.create_task(metadata.run(store)) for _ in range(2)]
    await settle()
    start = time.perf_counter()
    with pytest.raises(DependencyUnavailableError, match="calls in flight"):
        await metadata.run(store)
    assert time.perf_counter() - start < FAST_S
    assert await backend.run(engine) == "ok"
    # Refusals for want of a slot are load, not failures: the circuit stays closed.
    for _ in range(10):
        with pytest.raises(DependencyUnavailableError):
            await metadata.run(store)
    assert state(metadata.breaker) == "closed"
    assert metadata.bulkhead.rejected == 11
    store.release.set()
    assert await asyncio.gather(*hung) == ["ok", "ok"]


async def test_guard_with_an_open_circuit_does_not_wait_for_a_slot() -> None:
    clock = FakeClock()
    metadata = Guard(Bulkhead("metadata store", limit=1, queue_timeout_s=10),
                     CircuitBreaker("metadata store", failure_threshold=1, clock=clock))
    store = Dependency()
    store.release = asyncio.Event()
    holder = asyncio.create_task(metadata.run(store))  # takes the only slot
    await settle()
    failing = Dependency()
    failing.error = OSError("down")
    with pytest.raises(OSError):  # straight to the breaker, which opens
        await metadata.breaker.call(failing)
    start = time.perf_counter()
    with pytest.raises(DependencyUnavailableError, match="circuit open"):
        await metadata.run(store)
    assert time.perf_counter() - start < FAST_S  # not the bulkhead's 10 s
    assert metadata.breaker.rejected == 1
    assert metadata.bulkhead.rejected == metadata.bulkhead.waiting == 0
    store.release.set()
    assert await holder == "ok"
