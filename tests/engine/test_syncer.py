"""The group commit of event loops: rounds on a loop's native sync threads
(engine/_syncer.pyx), taken by the loop, or by a thread when the loop cannot take them.

Acknowledgements released by these rounds survive power loss: test_power_loss.py runs its
child on an event loop too, with a negative control of native syncs that do nothing.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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


@pytest.mark.usefixtures("slow_syncs")
def test_a_round_a_closed_loop_left_is_taken_by_close(path: str) -> None:
    log = Log(path, fsync="always")
    loop = asyncio.new_event_loop()

    async def start_a_round() -> None:
        log.append(b"x", wait=False)
        log.durable_async(1)
        while not log._syncing:  # the kick's turns
            await asyncio.sleep(0)

    loop.run_until_complete(start_a_round())
    loop.close()  # with the round still in its slow sync: nobody will take it
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
    loop = asyncio.new_event_loop()

    async def start_a_round() -> None:
        log.append(b"x", wait=False)
        log.durable_async(1)
        while not log._syncing:
            await asyncio.sleep(0)

    loop.run_until_complete(start_a_round())
    loop.close()
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

        async def append_during_the_threads_round() -> None:
            thread.start()
            while not log._syncing:
                await asyncio.sleep(0.001)
            await asyncio.wait_for(log.append_batch_async([b"loop"]), 5)

        asyncio.run(append_during_the_threads_round())
        thread.join(5)
        assert log.durable_offset == log.next_offset == 2


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
