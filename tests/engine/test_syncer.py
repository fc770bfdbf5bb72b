"""The group commit of event loops: rounds on a loop's native sync threads
(engine/_syncer.pyx), taken by the loop, or by a thread when the loop cannot take them.

Acknowledgements released by these rounds survive power loss: test_power_loss.py runs its
child on an event loop too, with a negative control of native syncs that do nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import background
from engine import log as log_module
from engine._syncer import Syncer, set_sync_for_tests
from engine.errors import LogFailedError
from engine.log import Log

SLOW_SYNC_S = 0.3


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "log")


@pytest.fixture
def slow_syncs() -> Iterator[None]:
    set_sync_for_tests(delay_s=SLOW_SYNC_S)
    try:
        yield
    finally:
        set_sync_for_tests()


def _taken(syncer: Syncer, count: int) -> list[tuple[object, int, float]]:
    """Wait on the eventfd as a loop would, until count completions are taken."""
    taken: list[tuple[object, int, float]] = []
    deadline = time.monotonic() + 10
    while len(taken) < count:
        assert time.monotonic() < deadline, taken
        select.select([syncer.fileno()], [], [], 1)
        taken += syncer.take()
    return taken


# -- the Syncer -----------------------------------------------------------------------------


def test_a_sync_hands_back_its_token_and_closes_its_descriptor(tmp_path: Path) -> None:
    syncer = Syncer(2)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"abc")
    copy = os.dup(fd)
    syncer.submit(copy, "token")
    [(token, error, seconds)] = _taken(syncer, 1)
    assert (token, error) == ("token", 0)
    assert seconds >= 0
    with pytest.raises(OSError) as info:
        os.fstat(copy)  # the Syncer closed it
    assert info.value.errno == errno.EBADF
    os.close(fd)
    assert syncer.take() == []  # each completion once


def test_a_failed_fdatasync_reports_its_errno() -> None:
    syncer = Syncer(1)
    read, write = os.pipe()  # fdatasync on a pipe fails with EINVAL
    syncer.submit(write, "pipe")
    [(token, error, _)] = _taken(syncer, 1)
    assert (token, error) == ("pipe", errno.EINVAL)
    os.close(read)


def test_many_syncs_each_come_back_once(tmp_path: Path) -> None:
    syncer = Syncer(4)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    tokens = [object() for _ in range(200)]
    for token in tokens:
        syncer.submit(os.dup(fd), token)
    taken = _taken(syncer, len(tokens))
    assert sorted(map(id, (t for t, _, _ in taken))) == sorted(map(id, tokens))
    assert all(error == 0 for _, error, _ in taken)
    os.close(fd)


def test_a_syncer_refuses_a_thread_count_it_cannot_have() -> None:
    for bad in (0, 17):
        with pytest.raises(ValueError):
            Syncer(bad)


# -- a log's rounds on a loop --------------------------------------------------------------


def test_waiters_of_one_loop_share_native_rounds(path: str) -> None:
    with Log(path, fsync="always") as log:

        async def together() -> int:
            offsets = [log.append(b"m", wait=False) for _ in range(100)]
            await asyncio.gather(*(log.durable_async(o + 1) for o in offsets))
            return log.sync_count

        async def one_by_one() -> int:
            before = log.sync_count
            for _ in range(20):
                await log.durable_async(log.append(b"n", wait=False) + 1)
            return log.sync_count - before

        assert asyncio.run(together()) == 1
        # The control: nothing to share, so each waiter is a round of its own.
        assert asyncio.run(one_by_one()) == 20
        assert log.durable_offset == 120


def _appends_over_turns(log: Log, turns: int) -> int:
    """Rounds for appends made one a turn over turns of the loop, after two in the first,
    as a loop reads requests one after another."""

    async def writer(delay: int) -> None:
        for _ in range(delay):
            await asyncio.sleep(0)
        await log.durable_async(log.append(b"r", wait=False) + 1)

    async def main() -> int:
        before = log.sync_count
        await asyncio.gather(writer(0), *(writer(n) for n in range(turns)))
        return log.sync_count - before

    return asyncio.run(main())


def test_requests_read_in_the_turns_before_a_round_share_it(path: str) -> None:
    """A round waits while each turn of the loop appends more (the requests it is reading
    share it), up to KICK_TURNS_MAX turns."""
    with Log(path, fsync="always") as log:
        assert _appends_over_turns(log, log_module.KICK_TURNS_MAX) == 1
        # The bound: a loop that appends on every turn starts the round all the same.
        assert _appends_over_turns(log, log_module.KICK_TURNS_MAX + 4) == 2


def test_a_failed_round_fails_the_log_and_its_waiters(path: str) -> None:
    log = Log(path, fsync="always")
    set_sync_for_tests(error=errno.EIO)
    try:
        async def send() -> None:
            await log.append_batch_async([b"lost"])

        with pytest.raises(LogFailedError) as info:
            asyncio.run(send())
        assert isinstance(info.value.cause, OSError)
        assert info.value.cause.errno == errno.EIO
    finally:
        set_sync_for_tests()
    assert log.failed
    with pytest.raises(LogFailedError):
        log.append(b"after")
    log.close()


def _stop_mid_round(log: Log) -> asyncio.AbstractEventLoop:
    """A loop that started a native round and stopped before taking its outcome (as
    between two run_until_complete calls)."""
    loop = asyncio.new_event_loop()

    async def start_a_round() -> None:
        log.append(b"x", wait=False)
        log.durable_async(log.next_offset)
        while not log._syncing:
            await asyncio.sleep(0)

    loop.run_until_complete(start_a_round())
    return loop


@pytest.mark.usefixtures("slow_syncs")
def test_a_round_a_closed_loop_left_is_taken_by_close(path: str) -> None:
    log = Log(path, fsync="always")
    # Closed with the round still in its slow sync: nobody will take it.
    _stop_mid_round(log).close()
    closing = threading.Thread(target=log.close, daemon=True)
    closing.start()
    closing.join(SLOW_SYNC_S + 5)
    assert not closing.is_alive(), "close() waits forever on a round nobody takes"
    assert log.durable_offset == 1


@pytest.mark.usefixtures("slow_syncs")
def test_a_round_left_by_a_closed_loop_hangs_close_if_nobody_takes_it(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control of the test above: with a waiting thread that never takes the
    completion itself, close() does not return."""
    log = Log(path, fsync="always")
    _stop_mid_round(log).close()
    real = background.take_completions
    monkeypatch.setattr(background, "take_completions", lambda syncer: None)
    closing = threading.Thread(target=log.close, daemon=True)
    closing.start()
    closing.join(SLOW_SYNC_S + 1)
    assert closing.is_alive()
    monkeypatch.setattr(background, "take_completions", real)
    closing.join(5)  # and it ends once the completion is taken
    assert not closing.is_alive()


@pytest.mark.usefixtures("slow_syncs")
def test_close_on_the_loops_own_thread_takes_the_round(path: str) -> None:
    log = Log(path, fsync="always")

    async def close_mid_round() -> bool:
        log.append(b"x", wait=False)
        waiter = log.durable_async(1)
        while not log._syncing:
            await asyncio.sleep(0)
        log.close()  # blocks this loop: the loop cannot take the round, this call does
        await asyncio.wait_for(waiter, 5)
        return waiter.done()

    assert asyncio.run(asyncio.wait_for(close_mid_round(), 10))
    assert log.closed


def test_a_loop_takes_the_rounds_back_after_a_threads_round(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread's wait_durable runs a round of its own. A loop's waiter that came while it
    ran, and that it does not cover, is handed back to the loop, which starts the next
    round: it is not stranded when the thread appends nothing more."""
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:  # the thread's round only; the loop's are native
        time.sleep(SLOW_SYNC_S)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    with Log(path, fsync="always") as log:
        thread = threading.Thread(target=log.append, args=(b"thread",))

        async def append_during_the_threads_round() -> bool:
            thread.start()
            while not log._syncing:
                await asyncio.sleep(0.001)
            waiter = log.durable_async(log.append(b"loop", wait=False) + 1)
            during = log._syncing and log._native is None  # the thread's round, still
            await asyncio.wait_for(waiter, 5)
            return during

        assert asyncio.run(append_during_the_threads_round())
        thread.join(5)
        assert log.durable_offset == log.next_offset == 2
        assert log.sync_count == 2  # the thread's round did not cover the loop's append


def test_waiters_of_two_loops_are_all_released(path: str) -> None:
    with Log(path, fsync="always") as log:
        errors: list[BaseException] = []

        def loop_of_appends() -> None:
            async def appends() -> None:
                for _ in range(200):
                    await asyncio.wait_for(log.append_batch_async([b"l"] * 2), 5)
            try:
                asyncio.run(appends())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=loop_of_appends) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors
        assert log.durable_offset == log.next_offset == 800


@pytest.mark.usefixtures("slow_syncs")
def test_waiters_of_others_are_released_when_the_rounds_loop_stopped(path: str) -> None:
    """A round whose loop stopped is taken by the pool once others wait on it: a future,
    and another loop's waiter, which do not block a thread to take it themselves."""
    with Log(path, fsync="always") as log:
        stopped = _stop_mid_round(log)
        log.append(b"future", wait=False)
        log.durable_future(log.next_offset).result(SLOW_SYNC_S + 5)

        stopped.close()
        stopped = _stop_mid_round(log)  # a round in flight again, nobody to take it

        async def another_loops_waiter() -> None:
            log.append(b"loop", wait=False)
            await asyncio.wait_for(log.durable_async(log.next_offset), SLOW_SYNC_S + 5)

        outcome: list[BaseException | None] = []
        thread = threading.Thread(target=lambda: outcome.append(
            _outcome(another_loops_waiter)))
        thread.start()
        thread.join(30)
        assert outcome == [None]
        stopped.close()


def _outcome(coroutine: Callable[[], Coroutine[Any, Any, None]]) -> BaseException | None:
    try:
        asyncio.run(coroutine())
    except BaseException as exc:
        return exc
    return None


@pytest.mark.usefixtures("slow_syncs")
def test_a_future_waits_on_a_stopped_loops_round_if_nobody_takes_it(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control of the test above: without the late taker, the future waits
    for the stopped loop forever."""
    monkeypatch.setattr(Log, "_arm_taker", lambda self: None)
    log = Log(path, fsync="always")
    stopped = _stop_mid_round(log)
    log.append(b"future", wait=False)
    with pytest.raises(concurrent.futures.TimeoutError):
        log.durable_future(log.next_offset).result(SLOW_SYNC_S + 1)
    stopped.close()
    log.close()  # a blocking wait takes it


def test_a_failure_while_a_loop_is_handed_the_rounds_fails_its_waiter(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop woken to start its next round (a hand-over) that the log fails before it
    runs: its waiter gets the failure, rather than nothing ever."""
    real = os.fdatasync
    failing = threading.Event()

    def fdatasync(fd: int) -> None:  # the threads' rounds only; the loop's are native
        if failing.is_set():
            raise OSError(errno.EIO, "injected")
        time.sleep(SLOW_SYNC_S)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    log = Log(path, fsync="always")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=log.append, args=(b"thread",))
    thread.start()
    while not log._syncing:  # the thread's round, which will not cover the loop's append
        time.sleep(0.001)

    async def wait_beyond_the_round() -> asyncio.Future[None]:
        log.append(b"loop", wait=False)
        return log.durable_async(2)

    waiter = loop.run_until_complete(wait_beyond_the_round())  # the loop stops
    thread.join(10)  # the round ended and handed the loop its waiter
    failing.set()
    with pytest.raises(LogFailedError):
        log.wait_durable(2)  # a round that fails the log before the loop runs again
    with pytest.raises(LogFailedError):
        loop.run_until_complete(asyncio.wait_for(waiter, 5))
    loop.close()
    log.close()


def test_a_fork_drops_its_copy_of_a_syncer_without_touching_its_threads(
        tmp_path: Path) -> None:
    """A forked child has none of the parent's sync threads: collecting its copy of the
    Syncer must not wait on their condition variable, and using it is refused."""
    syncer = Syncer(4)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    for _ in range(3):  # threads started, then idle in their wait
        for _ in range(6):
            syncer.submit(os.dup(fd), None)
        _taken(syncer, 6)
    syncer.submit(os.dup(fd), None)  # one thread woken and back to its wait
    _taken(syncer, 1)
    time.sleep(0.05)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's exit status is the result
        code = 3
        try:
            syncer.take()
        except RuntimeError:
            code = 0
        del syncer  # the dealloc of the copy
        os._exit(code)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        pytest.fail("the child hung dropping its copy of the Syncer")
    assert os.waitstatus_to_exitcode(status) == 0
    os.close(fd)
