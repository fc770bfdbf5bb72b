"""One connection per pair of nodes, every partition a stream on it, none holding up another.

Real LeaderRoles, real logs, real TCP through the real inter-node listener, with the
control plane held in memory (tests/replication/test_roles.py). Connections are counted
where the kernel keeps them (/proc/net/tcp). Each test has its negative control: the
protocol's frames unchanged, but a connection per partition as before
(link.CONNECTION_PER_STREAM), or the connection shared without flow control
(link.FLOW_CONTROL off).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from engine import AsyncQueue
from engine.results import SendEntry
from replication import frames as fr
from replication import leader as leader_module
from replication import link as link_module
from replication.history import batch_end
from replication.leader import LeaderRole
from replication.listener import Listener
from replication.peer import Channel, Peers
from tests.replication.test_roles import (
    PEER_KEY,
    QUEUE,
    WAIT_S,
    Cluster,
    FakeNode,
    eventually,
    log_bytes,
)

PARTITIONS = 60
# Long enough for two heartbeats on every connection.
IDLE_S = 1.2


@pytest.fixture
async def cluster(tmp_path: object, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[Cluster]:
    monkeypatch.setattr(link_module, "RETRY_S", 0.05)
    # Nobody leaves the ISR: what a test holds back must stay counted, so that its
    # commits wait for it.
    monkeypatch.setattr(leader_module, "REPLICA_LAG_S", 60.0)
    running = Cluster(tmp_path)  # type: ignore[arg-type]
    try:
        yield running
    finally:
        for node in running.nodes.values():
            await node.close()


def established(port: int) -> int:
    """TCP connections established to a listener on port (the kernel's count)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == port:
                    count += 1
    return count


async def _replicate_many(cluster: Cluster) -> tuple[dict[str, int], int]:
    """Three nodes; PARTITIONS partitions on all three, each led by one node in turn; a
    write committed on each. Returns, per node, the connections established to its
    inter-node port; and the frames every link sent in the IDLE_S that followed, with
    nothing written."""
    nodes = [await cluster.add(n) for n in ("a", "b", "c")]
    roles: list[tuple[FakeNode, str]] = []
    for i in range(PARTITIONS):
        name = f"{QUEUE}-{i}"
        cluster.control.create(name, ("a", "b", "c"), uid=1000 + i)
        leader = nodes[i % 3]
        await leader.lead(name, cluster.control.elect(name, leader.node_id), min_insync=3)
        roles.append((leader, name))
    await asyncio.gather(*(AsyncQueue(leader.broker, name).send(b"to all three")
                           for leader, name in roles))
    for leader, name in roles:
        for node in nodes:
            if node is not leader:
                assert log_bytes(node.log(name)) == log_bytes(leader.log(name))
    connections = {node.node_id: established(node.address[1]) for node in nodes}
    links = [link for node in nodes for link in node.links.links()]
    before = sum(link.frames_sent for link in links)
    await asyncio.sleep(IDLE_S)
    return connections, sum(link.frames_sent for link in links) - before


async def test_one_connection_per_pair_of_nodes_carries_every_partition(
        cluster: Cluster) -> None:
    connections, idle_frames = await _replicate_many(cluster)
    # Each node follows 40 partitions, led by the two others: one connection from each.
    assert connections == {"a": 2, "b": 2, "c": 2}
    # At rest, the six connections send heartbeats (one each per HEARTBEAT_S), and the
    # 120 streams nothing.
    assert idle_frames <= 6 * (IDLE_S / link_module.HEARTBEAT_S + 1), idle_frames
    for node in cluster.nodes.values():
        links = node.links.links()
        assert sorted(link.follower for link in links) == sorted(
            n for n in cluster.nodes if n != node.node_id)
        assert [len(link.streams) for link in links] == [PARTITIONS // 3] * 2
        assert [link.connections for link in links] == [1, 1]


async def test_negative_control_a_connection_per_partition(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts above tell the two apart: with a connection per partition (as before),
    each node takes one for each of the 40 partitions it follows, and each heartbeats."""
    monkeypatch.setattr(link_module, "CONNECTION_PER_STREAM", True)
    connections, idle_frames = await _replicate_many(cluster)
    assert connections == {"a": 40, "b": 40, "c": 40}
    # And a heartbeat for each of them.
    assert idle_frames >= 120 * 2, idle_frames


class HandFollower:
    """A follower by hand, on a real listener with the peer key: it follows every
    partition from an empty log and acknowledges every APPEND as soon as it comes - but
    those of ``held``, which it takes in and does not acknowledge until ``release``."""

    def __init__(self, node_id: str, held: int) -> None:
        self.listener = Listener(Peers(node_id, PEER_KEY))
        self.listener.route(fr.MAGIC, self._serve, fr.FRAME_BYTES_MAX)
        self.advertised = ("127.0.0.1", 0)
        self.held = held
        self.received: dict[int, int] = {}
        """Per uid, the bytes of batches received."""
        self.ends: dict[int, int] = {}
        self._epochs: dict[int, int] = {}
        self._channel: Channel | None = None

    async def start(self) -> None:
        self.advertised = await self.listener.start("127.0.0.1", 0)

    async def close(self) -> None:
        await self.listener.close()

    async def release(self) -> None:
        """Acknowledge the held partition from now on, and all it has taken in."""
        held, self.held = self.held, -1
        assert self._channel is not None
        self._channel.send(fr.encode(fr.Ack(held, self._epochs[held], self.ends[held])))
        await self._channel.drain()

    async def _serve(self, channel: Channel) -> None:
        self._channel = channel
        with contextlib.suppress(*fr.LINK_ERRORS):
            while True:
                frame = await fr.read_frame(channel)
                if isinstance(frame, fr.Heartbeat):
                    channel.send(fr.encode(frame))
                elif isinstance(frame, fr.Open):
                    self._epochs[frame.uid] = frame.epoch
                    self.ends[frame.uid] = 0
                    channel.send(fr.encode(fr.Position(frame.uid, frame.epoch, 0, ())))
                elif isinstance(frame, fr.Append):
                    self.received[frame.uid] = self.received.get(frame.uid, 0) \
                        + len(frame.data)
                    if frame.data:
                        self.ends[frame.uid] = batch_end(frame.data)
                    if frame.uid != self.held:
                        channel.send(fr.encode(fr.Ack(frame.uid, frame.epoch,
                                                      self.ends[frame.uid])))
                await channel.drain()


HELD = 2000
BACKLOG_MIB = 32


async def _hold_one_back(cluster: Cluster) -> tuple[HandFollower, dict[int, int]]:
    """Twenty partitions and HELD led on l, followed on f, whose follower does not
    acknowledge HELD. In one turn of the event loop, HELD is given a backlog of
    BACKLOG_MIB MiB (one write after the other, none waiting), then every other partition
    a write; the others' commits are awaited. Returns the follower and, per uid, the bytes
    it had received when the last of the others committed."""
    leader = await cluster.add("l")
    follower = HandFollower("f", HELD)
    await follower.start()
    cluster.nodes["f"] = follower  # type: ignore[assignment]
    roles: dict[int, LeaderRole] = {}
    for uid in [HELD, *range(1, 21)]:
        name = f"{QUEUE}-{uid}"
        cluster.control.create(name, ("l", "f"), uid=uid)
        roles[uid] = await leader.lead(name, cluster.control.elect(name, "l"), min_insync=2)
    await eventually(lambda: all(r._connected == {"f"} for r in roles.values()),
                     "every stream is shipping")
    cores = {uid: leader.broker._core_of(role.name) for uid, role in roles.items()}
    body = b"." * (1 << 20) + b"!"
    sent = [cores[HELD].send([SendEntry(body[:-1])]) for _ in range(BACKLOG_MIB)]
    backlog = [offset for _, offset in sent]
    writes = [cores[uid].wait_durable_async(cores[uid].send([SendEntry(b"small")])[1])
              for uid in roles if uid != HELD]
    await asyncio.wait_for(asyncio.gather(*writes), WAIT_S)
    received = dict(follower.received)
    # The held partition's writes are not committed: its follower acknowledged nothing.
    assert roles[HELD].commit_offset() < backlog[0]
    return follower, received


async def test_a_partition_held_back_holds_up_no_other_on_the_connection(
        cluster: Cluster) -> None:
    follower, received = await _hold_one_back(cluster)
    # The others committed while the held partition had shipped no more than its window
    # (the check comes before a turn, so one turn's frame past it at most).
    window = link_module.INFLIGHT_BYTES_MAX + link_module.TURN_BYTES_MAX
    assert received[HELD] <= window, received[HELD]
    await asyncio.sleep(0.2)
    assert follower.received[HELD] <= window, "the window let more out meanwhile"
    # Once acknowledged, it ships the rest: held back, never stuck.
    await follower.release()
    leader = next(n for n in cluster.nodes.values() if isinstance(n, FakeNode))
    log = leader.log(f"{QUEUE}-{HELD}")
    await eventually(lambda: follower.ends.get(HELD) == log.next_offset,
                     "the held partition catches up")
    assert follower.received[HELD] > BACKLOG_MIB << 20


async def test_negative_control_without_flow_control_the_held_partition_goes_first(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The assertion above tells the two apart: shared without flow control, the
    connection ships the held partition's whole backlog, unacknowledged, before the
    others' writes, which wait behind it."""
    monkeypatch.setattr(link_module, "FLOW_CONTROL", False)
    started = time.monotonic()
    _, received = await _hold_one_back(cluster)
    assert received[HELD] > BACKLOG_MIB << 20, received[HELD]
    assert time.monotonic() - started < WAIT_S
