"""The follower side of replication: where this node's replicas take in their leaders' logs.

A leader connects once per queue and sends OPEN. The follower checks the epoch against
etcd (a leader whose epoch is not the queue's current leader key is refused), answers
with its log's end and epoch history, cuts its log where the leader says (SYNC), then
appends each APPEND exactly as sent and acknowledges once it is durable. One fsync
covers every APPEND that arrived while the previous fsync ran. A newer leader's OPEN ends
an older leader's session, and the older one's frames are refused from then on.

The node is reached only through ``FollowerNode``; the connection comes from the
inter-node listener (replication.listener), which has read its ``CVR2`` and
authenticated the peer (replication.peer). The OPEN must come from the node the control
plane names leader, for the queue's current uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Protocol

from engine import files
from engine.log import Log
from engine.queue import QUEUE_SEGMENT_BYTES, SNAPSHOT_FILE
from replication import frames as fr
from replication.control import Leader, Partition
from replication.history import EpochHistory
from replication.peer import Channel

_log = logging.getLogger("conveyor.replication")

# A session that hears nothing (not even a heartbeat) for this long is dropped.
IDLE_S = 10.0


class Replica:
    """A follower's copy of one queue: its log and the log's epoch history."""

    def __init__(self, name: str, uid: int, directory: str, fsync: str) -> None:
        self.name = name
        self.uid = uid
        self.directory = directory
        self.log = Log(os.path.join(directory, "log"), fsync=fsync, lock=False,
                       segment_bytes_max=QUEUE_SEGMENT_BYTES)
        self.history = EpochHistory()
        self.history.update(self.log)
        self.epoch = 0
        """The newest leader epoch this replica has accepted."""
        self.session: Channel | None = None
        """The current leader's connection; a newer leader's OPEN closes it."""

    def truncate(self, offset: int) -> int:
        """Cut the log at offset (a divergent suffix); return its new end."""
        if offset >= self.log.next_offset:
            return self.log.next_offset
        # A snapshot this node took while it led may describe records about to be cut.
        # It goes first, durably: a crash between the two steps must not leave a snapshot
        # that describes records the log no longer has (this log is kept whole, so
        # replay from its start needs no snapshot).
        files.remove(os.path.join(self.directory, SNAPSHOT_FILE))
        end = self.log.truncate_after(offset)
        self.history.truncate(end)
        _log.warning("queue %s: cut divergent records at %d", self.name, end)
        return end

    def close(self) -> None:
        self.log.close()


def refusal(me: str, leader: Leader | None, partition: Partition | None, uid: int,
            epoch: int, node_id: str) -> tuple[int, str] | None:
    """Why this node (me) refuses an OPEN from node_id for queue uid in epoch, given the
    queue's leader key and partition record; None if it follows. (The newest epoch known
    goes back with the reason: a fenced leader learns from it that it is fenced.)"""
    if leader is None or leader.epoch != epoch:
        return (leader.epoch if leader else 0), "not the current leader epoch"
    if leader.node_id == me:
        return leader.epoch, "this node is the leader"
    if leader.node_id != node_id:
        return leader.epoch, f"{node_id} is not the queue's leader"
    if partition is None or me not in partition.replicas:
        return leader.epoch, "this node is not one of the queue's replicas"
    if partition.uid != uid:
        # Another queue of the name (deleted and made again): this node's copy of the
        # current one must not be dropped for it.
        return leader.epoch, "not the queue's current uid"
    return None


class FollowerNode(Protocol):
    """What the replication port needs of its node (replication.node.ClusterNode)."""

    async def accept_leader(self, name: str, uid: int, epoch: int, node_id: str
                            ) -> tuple[int, str] | None:
        """None if node_id leads the queue ``uid`` in epoch, by the control plane, and
        this node is one of its followers; else (the newest epoch known, why not)."""

    async def replica(self, name: str, uid: int, attributes: dict[str, Any]) -> Replica:
        """This node's copy of the queue, made empty if it has none."""


class ReplicationServer:
    """A session per leader connection: the handler of ``CVR2`` on the inter-node port."""

    def __init__(self, node: FollowerNode) -> None:
        self.node = node

    async def serve(self, channel: Channel) -> None:
        """One leader's session; the listener has authenticated it and closes it after."""
        replica: Replica | None = None
        try:
            opening = await asyncio.wait_for(fr.read_frame(channel), fr.HANDSHAKE_S)
            if not isinstance(opening, fr.Open):
                raise fr.ProtocolError(f"expected OPEN, got {type(opening).__name__}")
            # Checked before the replica is touched: an OPEN that names another queue
            # (an old uid, say) changes nothing here, not even an open session.
            refusal = await self.node.accept_leader(opening.name, opening.uid, opening.epoch,
                                                    channel.peer)
            if refusal is not None:
                channel.send(fr.encode(fr.Refuse(opening.uid, refusal[0], refusal[1])))
                await channel.drain()
                return
            replica = await self.node.replica(opening.name, opening.uid, opening.attributes)
            if opening.epoch < replica.epoch:
                channel.send(fr.encode(fr.Refuse(opening.uid, replica.epoch, "stale epoch")))
                await channel.drain()
                return
            previous = replica.session
            replica.epoch = opening.epoch
            replica.session = channel
            if previous is not None:
                previous.close()
            await self._follow(replica, opening.epoch, channel)
        except fr.LINK_ERRORS as exc:
            _log.info("replication session ended: %s", exc)
        finally:
            if replica is not None and replica.session is channel:
                replica.session = None

    async def _follow(self, replica: Replica, epoch: int, channel: Channel) -> None:
        log = replica.log
        always = log.fsync_policy.mode == "always"
        if always and log.durable_offset < log.next_offset:
            # The leader counts the position as acknowledged: records an earlier session
            # wrote and did not see fsync'd must be on disk before they are counted.
            await log.durable_async(log.next_offset)
        channel.send(fr.encode(fr.Position(replica.uid, epoch, log.next_offset,
                                           tuple(replica.history.entries))))
        appended = asyncio.Event()
        acks = asyncio.create_task(self._acknowledge(replica, epoch, channel, appended,
                                                     always))
        try:
            while not acks.done():
                frame = await asyncio.wait_for(fr.read_frame(channel), IDLE_S)
                if getattr(frame, "uid", None) != replica.uid:
                    raise fr.ProtocolError(f"a {type(frame).__name__} for another queue")
                if getattr(frame, "epoch", None) != epoch or replica.epoch != epoch:
                    channel.send(fr.encode(fr.Refuse(replica.uid, replica.epoch,
                                                     "stale epoch")))
                    return
                if isinstance(frame, fr.Sync):
                    end = await asyncio.to_thread(replica.truncate, frame.truncate_to)
                    channel.send(fr.encode(fr.Ack(replica.uid, epoch, end)))
                elif isinstance(frame, fr.Append):
                    if frame.base != log.next_offset:
                        raise fr.ProtocolError(f"APPEND at {frame.base}, log ends at "
                                               f"{log.next_offset}")
                    if frame.data:
                        replica.history.note(frame.data)
                        log.append_raw(frame.data, wait=False)
                    appended.set()
                else:
                    raise fr.ProtocolError(f"unexpected {type(frame).__name__}")
        finally:
            acks.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acks
            if acks.done() and not acks.cancelled() and acks.exception() is not None:
                _log.warning("queue %s: acknowledging failed: %s", replica.name,
                             acks.exception())

    @staticmethod
    async def _acknowledge(replica: Replica, epoch: int, channel: Channel,
                           appended: asyncio.Event, always: bool) -> None:
        """Acknowledge what is durable, one fsync for everything appended meanwhile.

        Durable means what the node's fsync policy promises, as the leader counts its own
        log: with fsync always, fsync'd (the log's durable offset, read after the fsync,
        never the end it asked for); otherwise written.
        """
        while True:
            await appended.wait()
            appended.clear()
            log = replica.log
            end = log.next_offset
            if always:
                if end:
                    await log.durable_async(end)
                end = log.durable_offset
            # Heartbeats are answered too, so the leader sees the link alive.
            channel.send(fr.encode(fr.Ack(replica.uid, epoch, end)))
            await channel.drain()
