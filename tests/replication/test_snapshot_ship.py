"""Snapshot shipping: a follower far behind is sent the queue's state, not its history.

In one process, against the control plane held in memory (tests/replication/test_roles.py
has the fixtures): real brokers, real logs and snapshots on disk, real TCP on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from typing import Any

import pytest

from engine import AsyncQueue
from engine.install import JOURNAL_FILE, read_epochs
from engine.log import Log
from engine.queue import SNAPSHOT_FILE, QueueCore, read_snapshot, replay
from engine.repair import MENDING_FILE
from engine.snapshot import log_floor, snapshot_offset, state_digest
from replication import leader as leader_module
from replication.history import batch_base, batch_end
from tests.replication.test_roles import (  # noqa: F401 (cluster: the fixture nodes takes)
    QUEUE,
    Cluster,
    FakeNode,
    cluster,
    eventually,
    log_bytes,
)
from tests.support.faultproxy import FaultProxy

BODY = b"x" * 2000


@pytest.fixture
def nodes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """test_roles' cluster, with rules sized for logs of a few MiB, as a test makes in a
    second (the rule, not its scale)."""
    monkeypatch.setattr(leader_module, "SNAPSHOT_SHIP_LOG_BYTES_MIN", 64 * 1024)
    monkeypatch.setattr(leader_module, "REPLICA_LAG_S", 0.3)
    running: Cluster = request.getfixturevalue("cluster")
    return running


async def churn(queue: AsyncQueue, rounds: int, keep: int = 0) -> None:
    """Sends, receives and deletes: a log many times the queue's state. keep messages are
    left in the queue at the end (state to ship)."""
    for i in range(rounds):
        await queue.send_batch([b"%d-%d." % (i, j) + BODY for j in range(10)])
        received = await queue.receive(max_messages=10, visibility_timeout=30)
        await queue.delete_batch([m.receipt for m in received])
    for i in range(keep):
        await queue.send(b"kept-%d." % i + BODY)


def replica_digest(node: FakeNode) -> str:
    replica = node.replicas[QUEUE]
    state, _ = replay(replica.log, read_snapshot(replica.directory))
    return state_digest(state)


def leader_digest(node: FakeNode) -> str:
    core = node.broker.open_core(QUEUE)
    assert core is not None
    return core.digest()


async def start_leader(nodes: Cluster, replicas: tuple[str, ...]) -> FakeNode:
    leader = await nodes.add("l")
    nodes.control.create(QUEUE, replicas)
    epoch = nodes.control.elect(QUEUE, "l")
    await leader.lead(QUEUE, epoch, min_insync=1)
    return leader


def snapshot_now(leader: FakeNode) -> QueueCore:
    """The led queue, its snapshot taken now."""
    core = leader.broker.open_core(QUEUE)
    assert core is not None
    assert core.maybe_snapshot(force=True)
    return core


async def churned_leader(nodes: Cluster, rounds: int, keep: int
                         ) -> tuple[FakeNode, AsyncQueue, QueueCore]:
    """l leads the queue (replicas l and f, f not up), churned, its snapshot taken."""
    leader = await start_leader(nodes, ("l", "f"))
    queue = AsyncQueue(leader.broker, QUEUE)
    await churn(queue, rounds, keep=keep)
    return leader, queue, snapshot_now(leader)


async def test_a_new_follower_is_sent_the_snapshot_then_the_tail_and_can_lead(
        nodes: Cluster) -> None:
    leader, queue, core = await churned_leader(nodes, 120, keep=50)
    offset = snapshot_offset(os.path.join(core.directory, SNAPSHOT_FILE))
    assert offset is not None
    snapshot_bytes = os.path.getsize(os.path.join(core.directory, SNAPSHOT_FILE))
    assert core.log.size_bytes > 20 * snapshot_bytes  # churn: the log dwarfs the state
    await queue.send(b"after the snapshot")  # a tail to ship after it

    follower = await nodes.add("f")
    await eventually(lambda: nodes.control.isr(QUEUE) == ("l", "f"), "f joins the ISR")
    replica = follower.replicas[QUEUE]
    # The snapshot, then the log from the oldest live message's body: nothing before it
    # was shipped.
    oldest = shipped_floor(core.directory)
    assert 0 < oldest < offset
    assert replica.log.first_offset == oldest
    assert leader.leading[QUEUE]._streams["f"].snapshots == 1
    with open(os.path.join(replica.directory, SNAPSHOT_FILE), "rb") as f, \
            open(os.path.join(core.directory, SNAPSHOT_FILE), "rb") as g:
        assert f.read() == g.read()
    assert replica.history.entries == leader.leading[QUEUE]._history.entries
    assert read_epochs(replica.directory) == [e for e in replica.history.entries
                                              if e[1] < oldest]
    assert not os.path.exists(os.path.join(replica.directory, JOURNAL_FILE))
    await churn(queue, 5, keep=3)
    await eventually(lambda: follower.log(QUEUE).next_offset == core.log.next_offset,
                     "f holds the tail")
    assert log_bytes(follower.log(QUEUE)) == log_bytes_from(core.log, oldest)
    digest = leader_digest(leader)
    visible = core.stats().visible
    assert replica_digest(follower) == digest

    # The copy installed from the snapshot leads: its queue opens from snapshot + tail.
    leader.step_down(QUEUE, "its lease ran out")
    await leader.settled()
    epoch = nodes.control.elect(QUEUE, "f")
    await follower.lead(QUEUE, epoch, min_insync=1)
    assert leader_digest(follower) == digest
    bodies = []
    moved = AsyncQueue(follower.broker, QUEUE)
    while batch := await moved.receive(max_messages=10, visibility_timeout=60):
        bodies.extend(m.body for m in batch)
    # Every body is read from the log shipped after the install.
    assert len(bodies) == visible > 40
    assert all(body.endswith(BODY) or body == b"after the snapshot" for body in bodies)


def shipped_floor(directory: str) -> int:
    """Where a replica installed from the queue's snapshot starts its log: the oldest body
    a message of the snapshot's state has."""
    with open(os.path.join(directory, SNAPSHOT_FILE), "rb") as f:
        return log_floor(f.read())[1]


async def test_the_log_sent_after_a_snapshot_starts_at_the_snapshots_oldest_body(
        nodes: Cluster) -> None:
    """Messages deleted after the snapshot was taken still have their bodies sent: the
    delete may be above the commit offset, and cut by a later leader, and the copy must
    then hold those bodies. So the log starts at the snapshot's oldest body, not the
    oldest body live now (the rule before: f would start past the deleted one's)."""
    leader, queue, core = await churned_leader(nodes, 120, keep=5)
    floor = shipped_floor(core.directory)
    # The oldest kept message goes after the snapshot: the state now needs less log.
    received = await queue.receive(max_messages=1, visibility_timeout=30)
    assert received and received[0].body.startswith(b"kept-0.")
    await queue.delete(received[0].receipt)
    live_oldest = core.state.oldest_location()
    assert live_oldest is not None and live_oldest > floor

    follower = await nodes.add("f")
    await eventually(lambda: nodes.control.isr(QUEUE) == ("l", "f"), "f joins the ISR")
    assert leader.leading[QUEUE]._streams["f"].snapshots == 1
    assert follower.replicas[QUEUE].log.first_offset == floor
    assert log_bytes(follower.log(QUEUE)) == log_bytes_from(core.log, floor)


def log_bytes_from(log: Log, offset: int) -> bytes:
    chunks = []
    while offset < log.next_offset:
        chunk = log.read_raw(offset, 1 << 20)
        chunks.append(chunk)
        offset = batch_end(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("above_commit", [False, True], ids=["rule", "negative_control"])
async def test_a_snapshot_above_the_commit_offset_is_not_shipped(
        nodes: Cluster, monkeypatch: pytest.MonkeyPatch, above_commit: bool) -> None:
    """g stays in the ISR and acknowledges nothing: the commit offset stops, the leader's
    log goes on, and its snapshot is taken above the commit offset. f, new, must not be
    sent it (records above commit may be cut); it is once g catches up. The negative
    control ships it anyway (leader.SHIP_ABOVE_COMMIT): the check must see it."""
    monkeypatch.setattr(leader_module, "SHIP_ABOVE_COMMIT", above_commit)
    monkeypatch.setattr(leader_module, "REPLICA_LAG_S", 60.0)
    g = await nodes.add("g")
    with FaultProxy(*g.address) as proxy:
        g.advertised = ("127.0.0.1", proxy.port)
        leader = await start_leader(nodes, ("l", "g", "f"))
        role = leader.leading[QUEUE]
        # f is in the replicas but not up yet: out of the ISR from the start.
        partition = dataclasses.replace(nodes.control.partitions[QUEUE], isr=("l", "g"))
        nodes.control.partitions[QUEUE] = partition
        role._set_partition(partition)
        queue = AsyncQueue(leader.broker, QUEUE)
        await churn(queue, 60, keep=20)
        core = leader.broker.open_core(QUEUE)
        assert core is not None
        proxy.blackhole()
        monkeypatch.setattr(leader_module, "COMMIT_WAIT_S", 0.3)
        results = await asyncio.gather(*(queue.send(b"uncommitted-%d" % i)
                                         for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)
        commit = role.commit_offset()
        assert core.maybe_snapshot(force=True)
        above = snapshot_offset(os.path.join(core.directory, SNAPSHOT_FILE))
        assert above is not None and above > commit

        follower = await nodes.add("f")
        await asyncio.sleep(1.0)  # several tries of its stream
        stream = role._streams["f"]
        replica = follower.replicas.get(QUEUE)
        shipped = replica is not None and replica.log.first_offset > 0
        if above_commit:
            assert shipped, "the check missed a snapshot shipped above the commit offset"
            return
        assert stream.opens >= 2
        assert not shipped, (f"f was sent the snapshot at {above}, above the commit "
                             f"offset {commit}")
        proxy.cut()
        proxy.heal()
        await eventually(lambda: role.commit_offset() >= above, "g catches up")
        await eventually(lambda: stream.snapshots == 1 and stream.state == "streaming",
                         "then f is sent the snapshot")
    assert os.path.exists(os.path.join(follower.replicas[QUEUE].directory, SNAPSHOT_FILE))
    assert follower.replicas[QUEUE].log.first_offset > 0


async def test_a_copy_that_starts_over_at_a_cut_is_sent_the_snapshot_again(
        nodes: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """f's log was installed from a snapshot (it starts past 0). f then leads briefly, in
    an epoch whose writes l never sees (uncommitted), and takes a snapshot of them. l
    leads again and cuts f below that snapshot: f's log, which starts past 0, cannot
    rebuild the state at the cut, so f starts over empty (marked mending, out of the ISR)
    and answers the SYNC with ACK(0). l chooses again (replication.leader, ``received``):
    f is sent the snapshot again, ends with l's state and rejoins the ISR. (With the rule
    before, the log from 0 was shipped: no second snapshot.)"""
    monkeypatch.setattr(leader_module, "REPLICA_LAG_S", 60.0)  # the ISR stays (l, f)
    leader, queue, core = await churned_leader(nodes, 120, keep=20)
    follower = await nodes.add("f")
    await eventually(lambda: nodes.control.isr(QUEUE) == ("l", "f"), "f is installed")
    assert leader.leading[QUEUE]._streams["f"].snapshots == 1
    await churn(queue, 3, keep=2)
    await eventually(lambda: follower.log(QUEUE).next_offset == core.log.next_offset,
                     "f holds the tail")
    kept_end = core.log.next_offset
    installed_from = follower.replicas[QUEUE].log.first_offset
    assert installed_from > 0

    # l steps down and cannot be reached; f leads, and its writes are never committed.
    leader.step_down(QUEUE, "its lease ran out")
    await leader.settled()
    leader.advertised = ("127.0.0.1", 1)  # nothing listens there
    monkeypatch.setattr(leader_module, "COMMIT_WAIT_S", 0.3)
    role = await follower.lead(QUEUE, nodes.control.elect(QUEUE, "f"), min_insync=1)
    led = AsyncQueue(follower.broker, QUEUE)
    results = await asyncio.gather(*(led.send(b"uncommitted-%d" % i) for i in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results), results
    own = follower.broker.open_core(QUEUE)
    assert own is not None and own.log.next_offset > kept_end
    assert own.maybe_snapshot(force=True)
    directory = own.directory
    own_snapshot = snapshot_offset(os.path.join(directory, SNAPSHOT_FILE))
    assert own_snapshot is not None and own_snapshot > kept_end
    assert role.commit_offset() <= kept_end
    follower.step_down(QUEUE, "its lease ran out")
    await follower.settled()

    # l leads again: f is cut at kept_end, below its own snapshot.
    leader.advertised = leader.address
    monkeypatch.setattr(leader_module, "COMMIT_WAIT_S", 10.0)
    again = await leader.lead(QUEUE, nodes.control.elect(QUEUE, "l"), min_insync=1)
    await eventually(lambda: "f" in again._streams and again._streams["f"].snapshots == 1
                     and again._streams["f"].state == "streaming", "f is sent the snapshot")
    assert follower.mending_names == [QUEUE]
    assert os.path.exists(os.path.join(directory, MENDING_FILE))
    assert any("f" not in isr for _, isr in nodes.control.isr_changes[-3:])
    await queue.send(b"after")
    await eventually(lambda: nodes.control.isr(QUEUE) == ("l", "f"), "f rejoins the ISR")
    replica = follower.replicas[QUEUE]
    core = leader.broker.open_core(QUEUE)  # l's queue, opened again
    assert core is not None
    await eventually(lambda: replica.log.next_offset == core.log.next_offset,
                     "f holds the tail")
    # l's snapshot (taken as it closed the queue, at kept_end), and the log after it.
    assert snapshot_offset(os.path.join(directory, SNAPSHOT_FILE)) == kept_end
    assert replica.log.first_offset == shipped_floor(core.directory) > 0
    with open(os.path.join(directory, SNAPSHOT_FILE), "rb") as f, \
            open(os.path.join(core.directory, SNAPSHOT_FILE), "rb") as g:
        assert f.read() == g.read()  # l's snapshot, not f's own
    assert replica_digest(follower) == leader_digest(leader)


async def test_a_follower_behind_rejoins_only_holding_what_the_isr_committed(
        nodes: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leader just elected has heard from no follower: the commit offset over the
    members it keeps is then 0, and a follower outside the ISR, behind, met the rejoin
    rule "holds the commit offset" at once - in the ISR, electable, without records the
    ISR had committed (and so would a copy installed from a snapshot, its log still
    below it, but for the rule that a snapshot shipped is at most the commit offset). The
    bar is taken over the members heard from, this node always among them: here g is
    never heard from, and f rejoins once it holds everything."""
    monkeypatch.setattr(leader_module, "REPLICA_LAG_S", 3.0)
    g, f = await nodes.add("g"), await nodes.add("f")
    with FaultProxy(*g.address) as to_g, FaultProxy(*f.address) as to_f:
        g.advertised = ("127.0.0.1", to_g.port)
        f.advertised = ("127.0.0.1", to_f.port)
        leader = await start_leader(nodes, ("l", "g", "f"))
        queue = AsyncQueue(leader.broker, QUEUE)
        await churn(queue, 5, keep=5)
        # f falls out of the ISR; l and g commit more without it.
        to_f.blackhole()
        role = leader.leading[QUEUE]
        partition = dataclasses.replace(nodes.control.partitions[QUEUE], isr=("l", "g"))
        nodes.control.partitions[QUEUE] = partition
        role._set_partition(partition)
        for i in range(10):  # too little to send a snapshot for: f is sent the log
            await queue.send(b"behind-%d" % i)
        core = leader.broker.open_core(QUEUE)
        assert core is not None
        committed = core.log.next_offset
        assert role.commit_offset() == committed

        # l leads again: g is slow to answer, f is reachable (its frames late).
        to_g.blackhole()
        leader.step_down(QUEUE, "its lease ran out")
        await leader.settled()
        to_f.cut()
        to_f.heal()
        to_f.delay(0.3)
        joined_at: list[int] = []
        set_members = nodes.control.set_members

        async def recording(partition: Any, epoch: int, replicas: tuple[str, ...],
                            isr: tuple[str, ...], *, background: bool = False) -> Any:
            if "f" in isr and "f" not in partition.isr:
                joined_at.append(f.replicas[QUEUE].log.durable_offset)
            return await set_members(partition, epoch, replicas, isr, background=background)

        monkeypatch.setattr(nodes.control, "set_members", recording)
        await leader.lead(QUEUE, nodes.control.elect(QUEUE, "l"), min_insync=1)
        await eventually(lambda: "f" in nodes.control.isr(QUEUE), "f rejoins the ISR")
        assert joined_at and joined_at[0] >= committed, (
            f"f rejoined the ISR holding {joined_at[0]}, the ISR had committed {committed}")


async def test_the_log_sent_after_a_snapshot_starts_at_a_batch(nodes: Cluster) -> None:
    """The snapshot's oldest body is a record in the middle of a batch (sent ten at once,
    the first three deleted): the log is sent from that batch's start, as the follower's
    log only takes whole batches. (The rule before sent it from the record itself: every
    APPEND after the install was refused, "base offset out of sequence", for ever.)"""
    leader = await start_leader(nodes, ("l", "f"))
    queue = AsyncQueue(leader.broker, QUEUE)
    await churn(queue, 60)
    await queue.send_batch([b"batch-%d." % j + BODY for j in range(10)])
    received = await queue.receive(max_messages=3, visibility_timeout=30)
    await queue.delete_batch([m.receipt for m in received])
    core = snapshot_now(leader)
    floor = shipped_floor(core.directory)
    base = batch_base(core.log.read_raw(floor, 1))
    assert base < floor  # mid-batch

    follower = await nodes.add("f")
    await eventually(lambda: nodes.control.isr(QUEUE) == ("l", "f"), "f joins the ISR")
    assert leader.leading[QUEUE]._streams["f"].snapshots == 1
    assert follower.replicas[QUEUE].log.first_offset == base
    assert replica_digest(follower) == leader_digest(leader)


def test_a_snapshot_opened_for_a_stream_stopped_meanwhile_is_closed() -> None:
    """A stream stopped while its thread chooses a snapshot to ship cancels its task; the
    thread cannot be stopped, and the snapshot it opens must be closed when it returns,
    not dropped with its file descriptor open."""
    release = threading.Event()
    shipment = leader_module._Shipment(os.open(os.devnull, os.O_RDONLY), 0, 0, 0)

    def choosing() -> tuple[int, leader_module._Shipment]:
        release.wait(10)
        return 0, shipment

    async def stopped_meanwhile() -> None:
        task = asyncio.ensure_future(leader_module._in_thread(choosing))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        for _ in range(200):
            if shipment.fd is None:
                return
            await asyncio.sleep(0.01)

    try:
        asyncio.run(stopped_meanwhile())
        assert shipment.fd is None
    finally:
        shipment.close()
