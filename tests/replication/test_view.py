"""The cluster view kept by an etcd watch (replication/view.py), against a real etcd.

The view follows every change without reading the whole state again; after etcd
compacted the revisions it was to resume from, it reads the whole state again; after etcd
restarts, it catches up from where it was. "Caught up" is always checked the same way:
the view equals a whole read made at that moment. Each fault has its negative control: a
view that ignores the compaction, or resumes from etcd's newest revision rather than its
own, goes stale, and that check sees it.

The node under test reaches etcd through a fault proxy, so that changes can be made while
its watch is cut off: the changes it must not miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from replication import control as control_module
from replication.control import ClusterView, Control, NodeInfo
from replication.errors import HistoryCompactedError
from replication.etcd_access import EtcdAccess
from replication.view import Changes, ViewKeeper
from tests.support.etcd import EtcdServer
from tests.support.faultproxy import FaultProxy

PREFIX = "/conveyor/"
CONVERGE_S = 15.0


class IgnoresCompaction(ViewKeeper):
    """Negative control: on a compaction, watches on from the compaction's revision,
    without reading the whole state again."""

    def _compacted(self, exc: HistoryCompactedError) -> None:
        self.view.revision = exc.compact_revision


class ResumesFromNow(ViewKeeper):
    """Negative control: a broken watch opened again from etcd's newest revision (what a
    plain ``watch_prefix`` does), not from the first one the view has not applied."""

    opened = 0

    def _resume_from(self) -> int:
        self.opened += 1
        if self.opened == 1:  # the first watch, right after the read
            return super()._resume_from()
        return 0  # etcd: from the next revision written


def _content(view: ClusterView) -> tuple[object, ...]:
    return view.nodes, view.partitions, view.leaders


async def _converged(keeper: ViewKeeper, writer: Control, within_s: float) -> bool:
    """Whether the kept view equals a whole read, within within_s."""
    deadline = time.monotonic() + within_s
    while True:
        if _content(keeper.view) == _content(await writer.view()):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def _kept(etcd: EtcdServer, proxy: FaultProxy, keeper_class: type[ViewKeeper],
                changes: list[Changes]) -> AsyncIterator[tuple[ViewKeeper, Control]]:
    """A view kept through the proxy, and a writer that reaches etcd directly."""
    watched = Control(EtcdAccess.from_url(f"etcd://127.0.0.1:{proxy.port}"), PREFIX)
    writer = Control(etcd.access(), PREFIX)
    await watched.connect()
    await writer.connect()
    keeper = keeper_class(watched, changes.append)
    await keeper.load()
    task = asyncio.create_task(keeper.run())
    try:
        yield keeper, writer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await watched.close()
        await writer.close()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path / "etcd") as server:
        yield server


@pytest.fixture
def proxy(etcd: EtcdServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", etcd.client_port) as p:
        yield p


async def _some_state(writer: Control) -> int:
    """Nodes, partitions and leaders to start from; the lease the node and leader hold."""
    lease = await writer.grant(30)
    await writer.register(NodeInfo("a", "http://127.0.0.1:1", "127.0.0.1:2"), lease)
    for i in range(20):
        assert await writer.create_partition(f"q{i}", i + 1, {}, ["a", "b"], 2)
    for i in range(10):
        partition = await writer.partition(f"q{i}")
        assert partition is not None
        assert await writer.elect(partition, "a", lease.id) is not None
    return int(lease.id)


async def _more_changes(writer: Control, lease_id: int) -> None:
    """One change of every kind: a queue deleted, one made, a leader gone, one elected,
    an ISR changed, a node come."""
    await writer.delete_partition("q1")
    assert await writer.create_partition("new", 99, {"a": 1}, ["b", "a"], 2)
    await writer.resign("q2", (await writer.leader("q2")).epoch)  # type: ignore[union-attr]
    partition = await writer.partition("q15")
    assert partition is not None and await writer.elect(partition, "a", lease_id)
    partition = await writer.partition("q3")
    leader = await writer.leader("q3")
    assert partition is not None and leader is not None
    assert await writer.set_members(partition, leader.epoch, ("a", "b"), ("a",))
    lease = await writer.grant(30)
    await writer.register(NodeInfo("b", "http://127.0.0.1:3", "127.0.0.1:4"), lease)


async def _watching_again(keeper: ViewKeeper, writer: Control) -> None:
    """Return once the view follows etcd again: a change made now reaches it. (For the
    negative controls: a view that is stale, not one merely slow to resume.)"""
    deadline = time.monotonic() + CONVERGE_S
    for attempt in range(1_000_000):
        # Made again and again: a watch opened from "now" sees only later ones.
        await writer.create_partition(f"marker-{attempt}", 1, {}, ["a"], 1)
        await asyncio.sleep(0.1)
        if any(n.startswith("marker-") for n in keeper.view.partitions):
            return
        assert time.monotonic() < deadline, "the view never watched again"


async def _compact(writer: Control) -> None:
    revision = (await writer.view()).revision
    await writer.client.compact(revision, physical=True)


async def test_the_view_follows_every_change_without_reading_again(
        etcd: EtcdServer, proxy: FaultProxy) -> None:
    changes: list[Changes] = []
    async with _kept(etcd, proxy, ViewKeeper, changes) as (keeper, writer):
        lease_id = await _some_state(writer)
        assert await _converged(keeper, writer, CONVERGE_S)
        changes.clear()
        await _more_changes(writer, lease_id)
        assert await _converged(keeper, writer, CONVERGE_S)
        assert keeper.reads == 1
        named = Changes()
        for change in changes:
            for field in ("nodes", "partitions", "leaders", "gone", "deleted"):
                getattr(named, field).update(getattr(change, field))
        assert named.deleted == {"q1"} and named.nodes == {"b"} and not named.gone
        assert {"q1", "new", "q3"} <= named.partitions
        assert {"q1", "q2", "q15"} <= named.leaders
        # A live watch is not disturbed by a compaction behind it.
        await _compact(writer)
        await writer.delete_partition("q4")
        assert await _converged(keeper, writer, CONVERGE_S)
        assert keeper.reads == 1


async def _miss_while_cut(proxy: FaultProxy, writer: Control, lease_id: int) -> None:
    proxy.cut()
    await asyncio.sleep(1)  # the watch has seen its connection go
    await _more_changes(writer, lease_id)


@pytest.mark.parametrize("keeper_class", [ViewKeeper, IgnoresCompaction])
async def test_after_a_compaction_the_view_reads_the_whole_state_again(
        etcd: EtcdServer, proxy: FaultProxy, keeper_class: type[ViewKeeper]) -> None:
    """Its watch cut off, the node misses changes, and etcd compacts them away: the watch
    cannot resume from its revision. The view reads everything again, and the deletion
    it missed is reported as one. Negative control: ignoring the compaction leaves the
    view stale."""
    changes: list[Changes] = []
    async with _kept(etcd, proxy, keeper_class, changes) as (keeper, writer):
        lease_id = await _some_state(writer)
        assert await _converged(keeper, writer, CONVERGE_S)
        await _miss_while_cut(proxy, writer, lease_id)
        await _compact(writer)
        proxy.heal()
        if keeper_class is IgnoresCompaction:
            await _watching_again(keeper, writer)
            assert not await _converged(keeper, writer, 0)
            assert "q1" in keeper.view.partitions  # a deleted queue still seen
            return
        assert await _converged(keeper, writer, CONVERGE_S)
        assert keeper.reads == 2
        assert any("q1" in change.deleted for change in changes)
        # And it watches on from the new read.
        await writer.delete_partition("q5")
        assert await _converged(keeper, writer, CONVERGE_S)
        assert keeper.reads == 2


@pytest.mark.parametrize("keeper_class", [ViewKeeper, ResumesFromNow])
async def test_after_etcd_restarts_the_view_catches_up_from_its_revision(
        etcd: EtcdServer, proxy: FaultProxy, keeper_class: type[ViewKeeper]) -> None:
    """etcd restarts, and changes are made before the node's watch is back: it resumes
    from the first revision it had not applied and misses none, without a whole read.
    Negative control: resuming from etcd's newest revision misses them."""
    changes: list[Changes] = []
    async with _kept(etcd, proxy, keeper_class, changes) as (keeper, writer):
        lease_id = await _some_state(writer)
        assert await _converged(keeper, writer, CONVERGE_S)
        etcd.stop()
        proxy.cut()
        etcd.start()
        await writer.close()
        await writer.connect()
        await _more_changes(writer, lease_id)
        proxy.heal()
        if keeper_class is ResumesFromNow:
            await _watching_again(keeper, writer)
            assert not await _converged(keeper, writer, 0)
            assert "new" not in keeper.view.partitions  # a queue made meanwhile unseen
            return
        assert await _converged(keeper, writer, CONVERGE_S)
        assert keeper.reads == 1


async def test_a_whole_read_comes_in_pages_at_one_revision(
        etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """More keys than a page: every one is read, all as of the first page's revision (a
    change made between two pages is not half in the read), and nothing else."""
    monkeypatch.setattr(control_module, "RANGE_PAGE_KEYS", 7)
    reader, writer = Control(etcd.access(), PREFIX), Control(etcd.access(), PREFIX)
    await reader.connect()
    await writer.connect()
    try:
        for i in range(30):
            await writer.create_partition(f"p{i:02d}", i + 1, {}, ["a"], 1)
        await writer.client.put(b"/conveyor/queues/000000000000/p00", b"{}")  # not the view's
        pages = 0
        read = reader._rpc

        async def read_then_write(stub: str, method: str, request: Any) -> Any:
            nonlocal pages
            reply = await read(stub, method, request)
            pages += 1
            if pages == 1:
                await writer.create_partition("p99", 99, {}, ["a"], 1)
                await writer.delete_partition("p29")
            return reply

        monkeypatch.setattr(reader, "_rpc", read_then_write)
        first = await reader.view()
        assert pages == 5
        assert sorted(first.partitions) == [f"p{i:02d}" for i in range(30)]
        assert not first.nodes and not first.leaders
        monkeypatch.undo()
        assert "p99" in (await reader.view()).partitions
    finally:
        await reader.close()
        await writer.close()


async def test_the_views_keys_are_one_range_without_the_queue_records() -> None:
    control = Control(EtcdAccess.from_url("etcd://127.0.0.1:1"), PREFIX)
    start, end = control.view_range()
    inside = [b"leaders/a/q", b"nodes/n0", b"partitions/a/q", b"partitions/a-p1/q.fifo"]
    outside = [b"queues/a/q", b"access-keys/CVY1", b"receipt-key", b"peer-key-fingerprint",
               b"partitionsX", b"leaders"]
    for key in inside:
        assert start <= PREFIX.encode() + key < end, key
    for key in outside:
        assert not start <= PREFIX.encode() + key < end, key
