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
