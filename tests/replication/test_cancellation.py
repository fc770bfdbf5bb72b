"""A loop that waits for a wake-up with a timeout must end when its task is cancelled.

The node's background loops (reconciling partitions, a leader's monitor, a link's
heartbeat, the lease keeper) each wait for an event with a timeout, and shutting down
cancels them and waits for them to end. Python 3.11's ``asyncio.wait_for`` returns the
event's result when the cancellation arrives in the same loop iteration as the wake-up,
dropping the cancellation: the loop goes round again and the shutdown waits forever (a
node that never exited on SIGTERM, under load). ``asyncio.timeout`` keeps it. The project
bans ``wait_for`` (ruff TID251, pyproject.toml); this shows why, and that the rule's
replacement holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable

import pytest

from replication import node

Waiting = Callable[[asyncio.Event, float], Awaitable[object]]


async def _with_wait_for(wake: asyncio.Event, seconds: float) -> object:
    return await asyncio.wait_for(wake.wait(), seconds)


async def _with_timeout(wake: asyncio.Event, seconds: float) -> object:
    async with asyncio.timeout(seconds):
        return await wake.wait()


async def _cancelled_as_woken(wait: Waiting) -> bool:
    """Whether a loop around wait ends when it is cancelled as it is woken."""
    wake = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await wait(wake, 10)

    task = asyncio.create_task(loop())
    for _ in range(3):
        await asyncio.sleep(0)
    assert rounds == 1
    wake.set()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.5)
    task.cancel()  # the control's loop: let it go
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return bool(done)


def test_a_loop_waiting_with_a_timeout_ends_when_cancelled_as_it_wakes() -> None:
    assert asyncio.run(_cancelled_as_woken(_with_timeout))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for was rewritten in 3.12")
def test_control_wait_for_drops_the_cancellation() -> None:
    assert not asyncio.run(_cancelled_as_woken(_with_wait_for))


class _Stubborn:
    """A step that does not end when cancelled, as one behind a library's wait_for may,
    until released (so that the test's loop can close)."""

    def __init__(self) -> None:
        self.released = False
        self.tasks: list[asyncio.Task[None]] = []

    async def step(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        while not self.released:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    async def release(self) -> None:
        self.released = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _old_step(work: Awaitable[None]) -> None:
    """The rule bounded_step replaced: a timeout around awaiting the step."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(node.CLOSE_STEP_S):
            await work


async def _ends(step: Awaitable[None]) -> bool:
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait([task], timeout=1)
    task.cancel()
    return bool(done)


def test_a_shutdown_step_that_ignores_its_cancellation_is_left_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node, "CLOSE_STEP_S", 0.1)

    async def run() -> tuple[bool, bool]:
        stubborn = _Stubborn()
        try:
            return (await _ends(node.bounded_step("a stubborn step", stubborn.step())),
                    await _ends(_old_step(stubborn.step())))
        finally:
            await stubborn.release()

    ended, control_ended = asyncio.run(run())
    assert ended
    assert not control_ended  # the control: the old rule waits on such a step for ever
