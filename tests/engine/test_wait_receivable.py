"""wait_receivable: a long poll over several queues waits on each without leasing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from engine import AsyncBroker


async def test_true_at_once_for_a_visible_message_and_nothing_is_leased(tmp_path: Path) -> None:
    async with AsyncBroker(str(tmp_path / "data"), fsync="never") as broker:
        queue = await broker.create_queue("q")
        await queue.send(b"m")
        assert await queue.wait_receivable(5)
        assert (await queue.stats()).in_flight == 0
        assert [m.body for m in await queue.receive(10)] == [b"m"]


async def test_wakes_for_a_send_and_times_out_when_none_comes(tmp_path: Path) -> None:
    async with AsyncBroker(str(tmp_path / "data"), fsync="never") as broker:
        queue = await broker.create_queue("q")
        started = time.monotonic()
        assert not await queue.wait_receivable(0.3)
        assert time.monotonic() - started >= 0.3
        waiting = asyncio.create_task(queue.wait_receivable(10))
        await asyncio.sleep(0.1)
        await queue.send(b"m")
        assert await asyncio.wait_for(waiting, 5)  # woken: the wait asked for is 10 s


async def test_a_fifo_group_behind_a_message_in_flight_is_not_receivable(
        tmp_path: Path) -> None:
    async with AsyncBroker(str(tmp_path / "data"), fsync="never") as broker:
        queue = await broker.create_queue("q.fifo", fifo=True)
        for i in range(3):
            await queue.send(f"a{i}".encode(), group_id="a", dedup_id=f"a{i}")
        [first] = await queue.receive(1)
        # Two visible messages, both behind their group's message in flight: a receive
        # gets nothing, so the wait must not say otherwise (the caller would spin).
        assert (await queue.stats()).visible == 2
        assert await queue.receive(10) == []
        assert not await queue.wait_receivable(0.2)
        await queue.send(b"b0", group_id="b", dedup_id="b0")
        assert await queue.wait_receivable(0.2)
        await queue.delete(first.receipt)
        assert {m.body for m in await queue.receive(10)} == {b"a1", b"a2", b"b0"}
