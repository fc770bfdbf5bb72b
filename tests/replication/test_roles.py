"""The replication roles in one process, against a control plane held in memory.

Real LeaderRole and ReplicationServer, real brokers and logs in temporary directories,
real TCP on loopback through the real inter-node listener; etcd's part is played by
FakeControl and ClusterNode's by FakeNode, through the roles' protocols. No etcd, no
subprocess: each test sets up exactly the interleaving it is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from engine import AsyncQueue, Broker, QueueAttributes
from engine.log import Log
from engine.queue import QueueCore
from replication import frames as fr
from replication import leader as leader_module
from replication import link as link_module
from replication.control import Leader, Partition
from replication.errors import (
    NotEnoughReplicasError,
    NotLeaderError,
    ReplicationUnavailableError,
)
from replication.follower import Replica, ReplicationServer, refusal
from replication.history import batch_end
from replication.leader import LeaderRole
from replication.link import Links
from replication.listener import Listener
from replication.peer import Channel, Peers, peer_key
from tests.support.faultproxy import FaultProxy

QUEUE = "000000000000/roles"
UID = 0x5EED
ATTRIBUTES = QueueAttributes().to_dict()
PEER_KEY = peer_key(b"the cluster secret of these tests")
# Long enough for loopback and a thread hop under load; every wait ends far sooner.
WAIT_S = 10.0


class FakeControl:
    """etcd's part: partition records and leader keys, with the compares that make their
    changes safe. Epochs and revisions come from one counter, as both are etcd revisions.
    """

    def __init__(self) -> None:
        self.revision = 0
        self.partitions: dict[str, Partition] = {}
        self.leaders: dict[str, Leader] = {}
        self.isr_changes: list[tuple[float, tuple[str, ...]]] = []
        """(when, ISR) of every ISR change recorded, in order."""

    def _next(self) -> int:
        self.revision += 1
        return self.revision

    def create(self, name: str, replicas: tuple[str, ...], uid: int = UID) -> Partition:
        partition = Partition(name, uid, ATTRIBUTES, replicas, replicas, self._next(),
                              len(replicas))
        self.partitions[name] = partition
        return partition

    def elect(self, name: str, node_id: str) -> int:
        """Give the queue a new leader key (the previous one's lease ran out); its epoch."""
        epoch = self._next()
        self.leaders[name] = Leader(node_id, epoch, 0)
        return epoch

    def isr(self, name: str) -> tuple[str, ...]:
        return self.partitions[name].isr

    # -- LeaderControl ------------------------------------------------------------------

    async def set_members(self, partition: Partition, epoch: int, replicas: tuple[str, ...],
                          isr: tuple[str, ...], *, background: bool = False
                          ) -> Partition | None:
        leader = self.leaders.get(partition.name)
        current = self.partitions.get(partition.name)
        if leader is None or leader.epoch != epoch or current is None \
                or current.revision != partition.revision:
            return None
        updated = dataclasses.replace(current, replicas=replicas, isr=isr,
                                      revision=self._next())
        self.partitions[partition.name] = updated
        if updated.isr != current.isr:
            self.isr_changes.append((time.monotonic(), updated.isr))
        return updated

    async def leader(self, name: str) -> Leader | None:
        return self.leaders.get(name)

    async def partition(self, name: str) -> Partition | None:
        return self.partitions.get(name)


class FakeNode:
    """One node: a broker in its own directory, its inter-node port, the queues it leads
    and those it follows. It is ClusterNode for the roles (LeaderNode, FollowerNode) and
    for the broker (Leadership), reading the cluster from a FakeControl."""

    def __init__(self, node_id: str, control: FakeControl, nodes: dict[str, FakeNode],
                 root: Path) -> None:
        self.node_id = node_id
        self.control = control
        self.nodes = nodes
        self.broker = Broker(root / node_id, fsync="always", leadership=self)
        self.leading: dict[str, LeaderRole] = {}
        self.replicas: dict[str, Replica] = {}
        self.peers = Peers(node_id, PEER_KEY)
        self.listener = Listener(self.peers)
        self.listener.route(fr.MAGIC, ReplicationServer(self).serve, fr.FRAME_BYTES_MAX)
        self.links = Links(self.peers, self.replication_address)
        self.address = ("127.0.0.1", 0)
        self.advertised = self.address
        """Where leaders connect: the listener, or a proxy in front of it."""
        self._ring: list[str] | None = None
        self.stepped_down: list[str] = []
        """Why this node stopped leading, each time it did."""
        self.refused: list[tuple[int, str]] = []
        """The OPENs the control plane's check refused (epoch, why)."""
        self.holds: dict[int, asyncio.Event] = {}
        """An OPEN of these epochs waits, once accepted, until its event is set."""
        self.holding = asyncio.Event()
        """Set once an OPEN waits on one of ``holds``."""
        self._stopping: set[asyncio.Task[None]] = set()
        self.mending_names: list[str] = []
        """Queues whose copy here started over (FollowerNode.mending), in order."""

    @property
    def ring(self) -> list[str] | None:
        """The replicas the ring gives every queue, over the members alive or gone for
        less than node_gone_s; None: not watched long enough to move anything (most
        tests: placement moves are not what they are about)."""
        return self._ring

    @ring.setter
    def ring(self, replicas: list[str] | None) -> None:
        # The ring changes with the membership, and ClusterNode wakes every led partition's
        # check when the membership changes (ClusterNode._saw).
        self._ring = replicas
        for role in self.leading.values():
            role.wake()

    async def start(self) -> None:
        self.address = self.advertised = await self.listener.start("127.0.0.1", 0)

    async def close(self) -> None:
        for name in list(self.leading):
            self.step_down(name, "closing")
        await self.settled()
        await self.links.close()
        await self.listener.close()
        for replica in self.replicas.values():
            await asyncio.to_thread(replica.close)
        await asyncio.to_thread(self.broker.close)

    async def settled(self) -> None:
        """Until every step-down has closed its queue."""
        for task in list(self._stopping):
            with contextlib.suppress(Exception):
                await task

    async def lead(self, name: str, epoch: int, min_insync: int) -> LeaderRole:
        """Lead the queue in epoch, as ClusterNode._lead does once elected."""
        replica = self.replicas.pop(name, None)
        if replica is not None:
            await asyncio.to_thread(replica.close)
        partition = self.control.partitions[name]
        role = LeaderRole(self, self.control, partition, epoch, min_insync)
        self.leading[name] = role
        await asyncio.to_thread(self.broker.adopt_queue, name, partition.uid,
                                partition.attributes, epoch)
        await role.start(lambda: self.broker._core_of(name))
        return role

    def log(self, name: str) -> Log:
        """The queue's log here: the leader's open queue, or the follower's replica."""
        core = self.broker.open_core(name)
        return core.log if core is not None else self.replicas[name].log

    # -- LeaderNode -----------------------------------------------------------------------

    def lease_valid(self) -> bool:
        return True

    def seen_partition(self, name: str) -> Partition | None:
        return self.control.partitions.get(name)

    def live_nodes(self) -> set[str] | None:
        return set(self.nodes)

    def replication_address(self, node_id: str) -> tuple[str, int] | None:
        node = self.nodes.get(node_id)
        return None if node is None else node.advertised

    def step_down(self, name: str, reason: str) -> None:
        role = self.leading.pop(name, None)
        if role is None:
            return
        self.stepped_down.append(reason)
        role.close(reason)
        task = asyncio.create_task(self._finish_step_down(role))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _finish_step_down(self, role: LeaderRole) -> None:
        await role.stop(role.reason)
        await asyncio.to_thread(self.broker.close_queue, role.name)

    def knows_members(self) -> bool:
        return self.ring is not None

    def placement(self, name: str, rf: int) -> list[str]:
        return list(self.ring or [])[:rf]

    # -- Leadership (the broker's) ---------------------------------------------------------

    def check(self, name: str) -> None:
        role = self.leading.get(name)
        if role is None or role.closed:
            raise NotLeaderError(name, None)

    def opened(self, core: QueueCore) -> None:
        self.leading[core.name].opened(core)

    def pinned(self, name: str) -> bool:
        role = self.leading.get(name)
        return role is not None and role.pinned()

    # -- FollowerNode ---------------------------------------------------------------------

    async def view_at(self, epoch: int) -> None:
        pass  # the control plane held in memory is current at once

    async def accept_leader(self, name: str, uid: int, epoch: int, node_id: str
                            ) -> tuple[int, str] | None:
        refused = refusal(self.node_id, self.control.leaders.get(name),
                          self.control.partitions.get(name), uid, epoch, node_id)
        if refused is not None:
            self.refused.append(refused)
            return refused
        self.step_down(name, f"epoch {epoch} is newer")
        await self.settled()
        # ClusterNode waits here too (for its own step-down), after it read etcd: a newer
        # leader can be elected, and accepted, meanwhile.
        hold = self.holds.get(epoch)
        if hold is not None:
            self.holding.set()
            await hold.wait()
        return None

    def mending(self, name: str) -> None:
        self.mending_names.append(name)

    async def replica(self, name: str, uid: int, attributes: dict[str, Any]) -> Replica:
        replica = self.replicas.get(name)
        if replica is None:
            directory = await asyncio.to_thread(self.broker.adopt_queue, name, uid, attributes)
            replica = await asyncio.to_thread(Replica, name, uid, directory, "always")
            self.replicas[name] = replica
        return replica


class Cluster:
    """The control plane, and the nodes that read it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.control = FakeControl()
        self.nodes: dict[str, FakeNode] = {}

    async def add(self, node_id: str) -> FakeNode:
        node = FakeNode(node_id, self.control, self.nodes, self.root)
        self.nodes[node_id] = node
        await node.start()
        return node


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    # A broken link is tried again soon: the tests break links on purpose.
    monkeypatch.setattr(link_module, "RETRY_S", 0.05)
    running = Cluster(tmp_path)
    try:
        yield running
    finally:
        for node in running.nodes.values():
            await node.close()


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S:g} s: {what}")
        await asyncio.sleep(0.01)


def log_bytes(log: Log) -> bytes:
    """Every batch of a log, as stored."""
    chunks, offset = [], log.first_offset
    while offset < log.next_offset:
        chunk = log.read_raw(offset, 1 << 20)
        chunks.append(chunk)
        offset = batch_end(chunk)
    return b"".join(chunks)


async def test_a_divergent_follower_is_cut_back_and_then_holds_the_leaders_log(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nobody leaves the ISR here: the old leader's last write must stay uncommitted, as
    # it is when its leader is cut off, rather than be committed by a smaller ISR.
    monkeypatch.setattr(leader_module, "REPLICA_LAG_S", 60.0)
    a, b = await cluster.add("a"), await cluster.add("b")
    cluster.control.create(QUEUE, ("a", "b"))
    old = cluster.control.elect(QUEUE, "a")
    await a.lead(QUEUE, old, min_insync=2)
    for body in (b"one", b"two"):
        await AsyncQueue(a.broker, QUEUE).send(body)
    agreed = b.log(QUEUE).next_offset
    # b drops off the network: a's next write reaches a's log alone, and is not committed.
    await b.listener.close()
    monkeypatch.setattr(leader_module, "COMMIT_WAIT_S", 0.5)
    with pytest.raises(ReplicationUnavailableError):
        await AsyncQueue(a.broker, QUEUE).send(b"uncommitted")
    monkeypatch.setattr(leader_module, "COMMIT_WAIT_S", WAIT_S)
    assert a.log(QUEUE).next_offset > agreed
    assert b"uncommitted" in log_bytes(a.log(QUEUE))

    # b is elected in a newer epoch; a stops leading and follows b.
    a.step_down(QUEUE, "its lease ran out")
    await a.settled()
    new = cluster.control.elect(QUEUE, "b")
    await b.lead(QUEUE, new, min_insync=2)
    # Committed only once a holds it: a was cut back to the agreed offset first.
    await AsyncQueue(b.broker, QUEUE).send(b"three")

    follower, leader = a.log(QUEUE), b.log(QUEUE)
    assert follower.next_offset == leader.next_offset
    assert log_bytes(follower) == log_bytes(leader)
    assert b"uncommitted" not in log_bytes(follower)
    assert a.replicas[QUEUE].history.entries == [(old, 0), (new, agreed)]


async def test_a_new_leaders_follower_slow_to_start_its_stream_stays_in_an_idle_isr(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leader just elected has heard from no follower. While no write waits, one whose
    stream is slow to start (a node taking over thousands of partitions positioned them
    in seconds) stays in the ISR: it took healthy followers out, and back in once heard,
    two etcd writes each, the partition refusing writes between. A write that waits for
    a follower not heard from REPLICA_LAG_S after the election still takes it out."""
    monkeypatch.setattr(leader_module, "REPLICA_LAG_S", 0.2)
    leader, follower = await cluster.add("l"), await cluster.add("f")
    with FaultProxy(*follower.address) as proxy:
        follower.advertised = ("127.0.0.1", proxy.port)
        proxy.delay(0.3)  # each way: the stream starts well past REPLICA_LAG_S
        cluster.control.create(QUEUE, ("l", "f"))
        role = await leader.lead(QUEUE, cluster.control.elect(QUEUE, "l"), min_insync=1)
        await eventually(lambda: "f" in role.acked, "f's stream starts")
        assert cluster.control.isr_changes == []
        assert cluster.control.isr(QUEUE) == ("l", "f")

        leader.step_down(QUEUE, "a test")
        await leader.settled()
        proxy.blackhole()
        role = await leader.lead(QUEUE, cluster.control.elect(QUEUE, "l"), min_insync=1)
        await asyncio.sleep(0.5)
        assert cluster.control.isr(QUEUE) == ("l", "f")
        await AsyncQueue(leader.broker, QUEUE).send(b"leader only")
        assert [isr for _, isr in cluster.control.isr_changes] == [("l",)]


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
async def test_a_follower_that_stops_acknowledging_leaves_the_isr_then_rejoins(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """cut: f's link is reset and new ones refused. blackhole: the link stays open and
    nothing comes back on it, so only the lag tells the leader."""
    lag_s = 0.3
    leader, follower = await cluster.add("l"), await cluster.add("f")
    with FaultProxy(*follower.address) as proxy:
        follower.advertised = ("127.0.0.1", proxy.port)
        cluster.control.create(QUEUE, ("l", "f"))
        epoch = cluster.control.elect(QUEUE, "l")
        await leader.lead(QUEUE, epoch, min_insync=1)
        queue = AsyncQueue(leader.broker, QUEUE)
        await queue.send(b"both")
        assert cluster.control.isr(QUEUE) == ("l", "f")
        assert cluster.control.isr_changes == []

        # Set only now: the link's first connection must not count as lagging.
        monkeypatch.setattr(leader_module, "REPLICA_LAG_S", lag_s)
        proxy.cut() if fault == "cut" else proxy.blackhole()  # f acknowledges nothing more
        sent_at = time.monotonic()
        await queue.send(b"leader only")
        acknowledged_at = time.monotonic()
        # Acknowledged without f only after etcd's ISR stopped naming f.
        changes = cluster.control.isr_changes
        assert [isr for _, isr in changes] == [("l",)]
        assert sent_at + lag_s <= changes[0][0] <= acknowledged_at
        assert b"leader only" not in log_bytes(follower.log(QUEUE))

        # The link connects again; f catches up, and only then is back in.
        if fault == "blackhole":
            proxy.cut()  # the open link's bytes are lost: it must break to start over
        proxy.heal()
        await eventually(lambda: cluster.control.isr(QUEUE) == ("l", "f"), "f rejoins")
        assert [isr for _, isr in cluster.control.isr_changes] == [("l",), ("l", "f")]
        assert log_bytes(follower.log(QUEUE)) == log_bytes(leader.log(QUEUE))


async def test_a_follower_far_behind_catches_up_on_large_batches(cluster: Cluster) -> None:
    """Messages near the size limit, a batch each, and a follower more than a frame's worth
    behind: every APPEND must fit FRAME_BYTES_MAX. (A read of APPEND_BYTES_MAX stopped only
    once its batches reached it, so its last batch ran past: the follower refused the
    frame, and the link failed the same way on every try.)"""
    leader = await cluster.add("l")
    cluster.control.create(QUEUE, ("l", "f"))
    epoch = cluster.control.elect(QUEUE, "l")
    await leader.lead(QUEUE, epoch, min_insync=1)
    queue = AsyncQueue(leader.broker, QUEUE)
    for i in range(6):
        await queue.send(b"%d" % i + b"." * 1_000_000)
    assert leader.log(QUEUE).size_bytes > fr.APPEND_BYTES_MAX + 1_000_000
    follower = await cluster.add("f")  # joins now: the whole log is its backlog
    await eventually(lambda: QUEUE in follower.replicas and follower.log(QUEUE).next_offset
                     == leader.log(QUEUE).next_offset, "f catches up")
    assert log_bytes(follower.log(QUEUE)) == log_bytes(leader.log(QUEUE))


async def _open(address: tuple[str, int], epoch: int, leader: str, follower: str
                ) -> tuple[Channel, fr.Frame]:
    """A leader's connection, by hand: OPEN, and the follower's answer."""
    channel = await Peers(leader, PEER_KEY).connect(address, follower, fr.MAGIC,
                                                    fr.FRAME_BYTES_MAX, WAIT_S)
    channel.send(fr.encode(fr.Open(epoch, UID, QUEUE, ATTRIBUTES)))
    return channel, await asyncio.wait_for(fr.read_frame(channel), WAIT_S)


async def test_a_follower_refuses_a_stale_epoch_and_its_leader_steps_down(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The old leader's only way to learn of the newer epoch is then the follower's
    # refusal: its ISR change, which etcd would refuse too, is not due for a minute.
    monkeypatch.setattr(leader_module, "REPLICA_LAG_S", 60.0)
    old_leader, follower = await cluster.add("old"), await cluster.add("f")
    cluster.control.create(QUEUE, ("old", "f"))
    old = cluster.control.elect(QUEUE, "old")
    # The old leader's OPEN passes the control plane's check, then waits; meanwhile a
    # newer leader is elected, and its OPEN is taken first.
    release = follower.holds[old] = asyncio.Event()
    await old_leader.lead(QUEUE, old, min_insync=1)
    await asyncio.wait_for(follower.holding.wait(), WAIT_S)
    new = cluster.control.elect(QUEUE, "new")
    channel, position = await _open(follower.address, new, "new", "f")
    try:
        assert position == fr.Position(UID, new, 0, ())
        release.set()

        # The follower itself refuses the old epoch, and the old leader steps down.
        await eventually(lambda: bool(old_leader.stepped_down), "the old leader steps down")
        assert old_leader.stepped_down == [f"fenced by epoch {new}"]
        assert follower.refused == []
        replica = follower.replicas[QUEUE]
        assert replica.epoch == new

        # The newer leader's session goes on ...
        channel.send(fr.encode(fr.Append(UID, new, 0, 0, b"")))
        reply = await asyncio.wait_for(fr.read_frame(channel), WAIT_S)
        assert reply == fr.Ack(UID, new, 0)
        # ... and a frame on it that carries the old epoch is refused, not appended.
        with Log(tmp_path / "stale", fsync="never") as scratch:
            scratch.epoch = old
            scratch.append_batch([b"stale"], wait=False)
            batch = scratch.read_raw(0, 1 << 20)
        channel.send(fr.encode(fr.Append(UID, old, 0, 0, batch)))
        reply = await asyncio.wait_for(fr.read_frame(channel), WAIT_S)
        assert reply == fr.Refuse(UID, new, "stale epoch")
        assert replica.log.next_offset == 0
    finally:
        channel.close()
        with contextlib.suppress(OSError):
            await channel.writer.wait_closed()


class LyingFollower:
    """A follower, by hand, that holds the peer key but acknowledges more than it was
    sent: to every OPEN, POSITION at 0, then an ACK far ahead."""

    def __init__(self, node_id: str, claim: int) -> None:
        self.claim = claim
        self.listener = Listener(Peers(node_id, PEER_KEY))
        self.listener.route(fr.MAGIC, self._serve, fr.FRAME_BYTES_MAX)
        self.advertised = ("127.0.0.1", 0)
        self.sessions = 0

    async def start(self) -> None:
        self.advertised = await self.listener.start("127.0.0.1", 0)

    async def close(self) -> None:
        await self.listener.close()

    async def _serve(self, channel: Channel) -> None:
        with contextlib.suppress(*fr.LINK_ERRORS):
            while True:
                frame = await fr.read_frame(channel)
                if isinstance(frame, fr.Heartbeat):
                    channel.send(fr.encode(frame))
                elif isinstance(frame, fr.Open):
                    self.sessions += 1
                    channel.send(fr.encode(fr.Position(frame.uid, frame.epoch, 0, ())))
                    channel.send(fr.encode(fr.Ack(frame.uid, frame.epoch, self.claim)))
                await channel.drain()


async def test_an_ack_past_what_was_sent_counts_for_nothing(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records a follower was never sent cannot be durable there: its stream is dropped
    (and opened again), and the commit offset does not count the claim."""
    monkeypatch.setattr(leader_module, "REPLICA_LAG_S", 60.0)
    leader = await cluster.add("l")
    liar = LyingFollower("f", claim=1 << 40)
    await liar.start()
    cluster.nodes["f"] = liar  # type: ignore[assignment]
    cluster.control.create(QUEUE, ("l", "f"))
    role = await leader.lead(QUEUE, cluster.control.elect(QUEUE, "l"), min_insync=2)
    await eventually(lambda: liar.sessions >= 2, "the leader drops the link and retries")
    assert role.acked.get("f", 0) == 0
    monkeypatch.setattr(leader_module, "COMMIT_WAIT_S", 0.5)
    with pytest.raises(ReplicationUnavailableError):
        await AsyncQueue(leader.broker, QUEUE).send(b"on one disk only")
    assert role.commit_offset() == 0


async def test_an_open_for_another_uid_leaves_the_replica_alone(cluster: Cluster) -> None:
    """A queue deleted and made again has a new uid: an OPEN that names the old one (a
    leader of the deleted queue, or a peer replaying it) is refused, and the follower
    keeps its copy of the current queue and its session with the current leader."""
    leader, follower = await cluster.add("l"), await cluster.add("f")
    cluster.control.create(QUEUE, ("l", "f"))
    epoch = cluster.control.elect(QUEUE, "l")
    await leader.lead(QUEUE, epoch, min_insync=2)
    await AsyncQueue(leader.broker, QUEUE).send(b"kept")
    replica = follower.replicas[QUEUE]
    session = replica.session
    assert session is not None

    channel = await Peers("l", PEER_KEY).connect(follower.address, "f", fr.MAGIC,
                                                 fr.FRAME_BYTES_MAX, WAIT_S)
    try:
        channel.send(fr.encode(fr.Open(epoch, UID ^ 1, QUEUE, ATTRIBUTES)))
        reply = await asyncio.wait_for(fr.read_frame(channel), WAIT_S)
    finally:
        channel.close()
    assert reply == fr.Refuse(UID ^ 1, epoch, "not the queue's current uid")
    assert follower.replicas[QUEUE] is replica and replica.session is session
    await AsyncQueue(leader.broker, QUEUE).send(b"still replicated")
    assert log_bytes(follower.log(QUEUE)) == log_bytes(leader.log(QUEUE))


async def test_gone_replicas_are_kept_while_no_live_node_can_replace_them(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two of three replicas gone for good and no other node: the ring places the queue on
    the leader alone, but the replicas stay three, and a write is refused rather than
    acknowledged on one disk."""
    monkeypatch.setattr(leader_module, "REBALANCE_S", 0.05)
    leader = await cluster.add("l")
    cluster.control.create(QUEUE, ("l", "a", "b"))  # a and b never start: they are gone
    role = await leader.lead(QUEUE, cluster.control.elect(QUEUE, "l"), min_insync=2)
    leader.ring = ["l"]
    await eventually(lambda: cluster.control.isr(QUEUE) == ("l",), "a and b leave the ISR")
    await asyncio.sleep(0.3)  # several rebalances
    assert cluster.control.partitions[QUEUE].replicas == ("l", "a", "b")
    assert role.under_replicated and role.min_insync == 2
    end = leader.log(QUEUE).next_offset
    with pytest.raises(NotEnoughReplicasError) as refused:
        await AsyncQueue(leader.broker, QUEUE).send(b"on one disk only")
    # Refused before it was written (not ...AfterAppend): it cannot take effect later.
    assert type(refused.value) is NotEnoughReplicasError
    assert leader.log(QUEUE).next_offset == end


async def test_a_gone_replica_is_replaced_by_a_live_node(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader_module, "REBALANCE_S", 0.05)
    leader, a, c = await cluster.add("l"), await cluster.add("a"), await cluster.add("c")
    cluster.control.create(QUEUE, ("l", "a", "b"))  # b is gone
    role = await leader.lead(QUEUE, cluster.control.elect(QUEUE, "l"), min_insync=2)
    await AsyncQueue(leader.broker, QUEUE).send(b"before")
    leader.ring = ["l", "a", "c"]
    role.wake()  # as ClusterNode wakes its led partitions when the members change
    await eventually(lambda: set(cluster.control.partitions[QUEUE].replicas) == {"l", "a", "c"}
                     and len(cluster.control.isr(QUEUE)) == 3, "c replaces b")
    assert not role.under_replicated
    await AsyncQueue(leader.broker, QUEUE).send(b"after")
    assert log_bytes(c.log(QUEUE)) == log_bytes(leader.log(QUEUE))
    assert log_bytes(a.log(QUEUE)) == log_bytes(leader.log(QUEUE))


async def test_a_queue_closed_as_idle_is_opened_again_for_a_follower_behind(
        cluster: Cluster) -> None:
    """Beyond open_queues_max the broker closes idle queues, led ones too. A follower that
    connects later must still be sent the log: the role opens the queue again, and keeps
    it open (pinned) while the follower is behind."""
    leader = await cluster.add("l")
    leader.broker.open_queues_max = 1
    other = "000000000000/other"
    cluster.control.create(QUEUE, ("l", "a"))
    cluster.control.create(other, ("l",), uid=UID + 1)
    role = await leader.lead(QUEUE, cluster.control.elect(QUEUE, "l"), min_insync=1)
    await eventually(lambda: cluster.control.isr(QUEUE) == ("l",), "a leaves the ISR")
    for i in range(20):
        await AsyncQueue(leader.broker, QUEUE).send(b"m%02d" % i)
    expected = log_bytes(leader.log(QUEUE))
    await leader.lead(other, cluster.control.elect(other, "l"), min_insync=1)
    await AsyncQueue(leader.broker, other).send(b"elsewhere")
    assert role.core is not None and role.core.closed, "the idle queue was not closed"

    follower = await cluster.add("a")
    await eventually(lambda: QUEUE in follower.replicas and log_bytes(
        follower.log(QUEUE)) == expected, "a catches up")
