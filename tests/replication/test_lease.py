"""A node's lease kept on a thread of its own (replication/lease.py), against a real etcd.

The lease outlives a node's event loop that is blocked, or busy in Python, for longer
than its TTL. Negative control: the same lease refreshed on that loop itself is lost
(what a node did before: its leaderships all went at once). A lease that really lapses
makes the node step down everywhere before it takes a new one; negative control: a
keeper that does not wait for the step-down rejoins under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from replication.control import Control, NodeInfo
from replication.lease import LeaseKeeper
from tests.support.etcd import EtcdServer

PREFIX = "/conveyor/"
TTL_S = 2
BLOCKED_S = TTL_S + 1.5  # past the lease's TTL: refreshed on the loop, it is lost
NODE = NodeInfo("n0", "http://127.0.0.1:1", "127.0.0.1:2")
NODE_KEY = b"/conveyor/nodes/n0"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


async def _node_key(etcd: EtcdServer) -> bytes | None:
    control = Control(etcd.access(), PREFIX)
    await control.connect()
    try:
        kv = await control.client.get(NODE_KEY)
        return None if kv is None else bytes(kv.value)
    finally:
        await control.close()


async def _nothing() -> None:
    pass


def _busy(seconds: float) -> int:
    """Python work that holds the interpreter lock as long as the interpreter lets it."""
    end, spins = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        spins += sum(range(100))
    return spins


async def test_the_lease_outlives_a_blocked_or_busy_event_loop(etcd: EtcdServer) -> None:
    keeper = LeaseKeeper(etcd.access(), PREFIX, NODE, TTL_S, _nothing, lambda: None)
    await keeper.start()
    try:
        first = keeper.lease_id
        time.sleep(BLOCKED_S)  # the node's loop does nothing else meanwhile
        assert keeper.valid() and keeper.losses == 0
        _busy(BLOCKED_S)
        assert keeper.valid() and keeper.losses == 0 and keeper.lease_id == first
        assert await _node_key(etcd) is not None
    finally:
        await keeper.stop()
    assert not keeper.valid()
    assert await _node_key(etcd) is None  # revoked: its keys go at once


async def test_negative_control_a_lease_refreshed_on_the_blocked_loop_is_lost(
        etcd: EtcdServer) -> None:
    control = Control(etcd.access(), PREFIX)
    await control.connect()
    lease = await control.grant(TTL_S)
    await control.register(NODE, lease)

    async def keep() -> None:
        while True:
            await asyncio.sleep(TTL_S / 3)
            await control.refresh(lease)

    task = asyncio.create_task(keep())
    try:
        await asyncio.sleep(0.5)
        assert await _node_key(etcd) is not None
        time.sleep(BLOCKED_S)
        assert await _node_key(etcd) is None  # etcd expired it: every key of the node went
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await control.close()


class DoesNotWait(LeaseKeeper):
    """Negative control: asks the node to step down but rejoins without waiting."""

    async def _hand_over(self) -> None:
        assert self._node_loop is not None
        asyncio.run_coroutine_threadsafe(self._lost(), self._node_loop)


@pytest.mark.parametrize("keeper_class", [LeaseKeeper, DoesNotWait])
async def test_a_lapsed_lease_steps_down_everywhere_before_a_new_one(
        etcd: EtcdServer, keeper_class: type[LeaseKeeper]) -> None:
    """The lease is revoked under the node (as etcd expires one that went unrefreshed):
    the next refresh finds it gone; the node's leases stops counting at once, the node
    steps down (slowly here), and only then is a new lease granted and the node
    registered again."""
    seen: list[tuple[bool, int | None]] = []
    rejoined = asyncio.Event()
    keeper: LeaseKeeper

    async def lost() -> None:
        seen.append((keeper.valid(), keeper.lease_id))
        await asyncio.sleep(1.0)  # stepping down takes a while
        seen.append((keeper.valid(), keeper.lease_id))

    keeper = keeper_class(etcd.access(), PREFIX, NODE, TTL_S, lost, rejoined.set)
    await keeper.start()
    try:
        old = keeper.lease_id
        control = Control(etcd.access(), PREFIX)
        await control.connect()
        await control.client.revoke_lease(old)
        await control.close()
        await asyncio.wait_for(rejoined.wait(), 10)
        while len(seen) < 2:
            await asyncio.sleep(0.1)
        assert keeper.losses == 1 and keeper.lease_id != old and keeper.valid()
        assert await _node_key(etcd) is not None
        if keeper_class is DoesNotWait:
            assert seen[-1] != (False, old), seen  # it rejoined under the step-down
            return
        assert seen == [(False, old), (False, old)]
    finally:
        await keeper.stop()
