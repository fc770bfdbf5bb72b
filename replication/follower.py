"""The follower side of replication: where this node's replicas take in their leaders' logs.

A leader node keeps one connection to this node (replication.link) and opens a stream on
it per partition this node follows, with OPEN. The follower checks the epoch against
etcd (a leader whose epoch is not the queue's current leader key is refused), answers
with its log's end and epoch history, cuts its log where the leader says (SYNC), then
appends each APPEND exactly as sent and acknowledges once it is durable. One fsync
covers every APPEND that arrived while the previous fsync ran. A follower far behind is
sent a snapshot instead (SNAPSHOT chunks, then INSTALL): it installs it in place of its
log (engine/install.py) and acknowledges its offset once that is durable. A newer leader's OPEN ends
an older leader's stream, and the older one's frames are refused from then on; a CLOSE
ends a stream; a HEARTBEAT is answered in kind.

The node is reached only through ``FollowerNode``; the connection comes from the
inter-node listener (replication.listener), which has read its ``CVR3`` and
authenticated the peer (replication.peer). The OPEN must come from the node the control
plane names leader, for the queue's current uid.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from engine import files, install
from engine.errors import EngineError
from engine.log import Log
from engine.queue import QUEUE_SEGMENT_BYTES, SNAPSHOT_FILE
from engine.repair import mark_mending
from engine.snapshot import snapshot_offset
from replication import frames as fr
from replication.control import Leader, Partition
from replication.history import EpochHistory
from replication.peer import Channel

_log = logging.getLogger("conveyor.replication")
_T = TypeVar("_T")

# A connection that hears nothing (not even a heartbeat) for this long is dropped.
IDLE_S = 10.0
# Streams one leader's connection may carry, at most: every partition the two nodes share,
# with room. An OPEN past it is refused.
STREAMS_MAX = 65536
# OPENs of one connection checked and opened at once, at most: a leader that starts with
# thousands of partitions opens them all at once. Each is checked against the watched view
# (ClusterNode.accept_leader), and reads etcd only when the view refuses or lags; etcd
# then takes them as fast as it answers this many. An OPEN waits for the view to reach
# its epoch before it takes one of these, holding nothing: after a node is lost the view
# lagged the new leaders' OPENs by up to 2 s, and the OPENs behind the waiting 64 queued
# for seconds more.
OPENS_MAX = 64


class Replica:
    """A follower's copy of one queue: its log and the log's epoch history."""

    def __init__(self, name: str, uid: int, directory: str, fsync: str) -> None:
        self.name = name
        self.uid = uid
        self.directory = directory
        # An install a crash interrupted is finished before the log is opened.
        install.finish(directory, fsync=fsync, segment_bytes_max=QUEUE_SEGMENT_BYTES)
        self.log = Log(os.path.join(directory, "log"), fsync=fsync, lock=False,
                       segment_bytes_max=QUEUE_SEGMENT_BYTES)
        self.history = EpochHistory(install.read_epochs(directory)
                                    if self.log.first_offset else ())
        self.history.update(self.log)
        self.epoch = 0
        """The newest leader epoch this replica has accepted."""
        self.session: FollowerStream | None = None
        """The current leader's stream; a newer leader's OPEN ends it."""
        self._work: asyncio.Future[Any] | None = None
        self.started_over = False
        """Set when a cut emptied the replica (``truncate``): it lost records it had
        acknowledged, so the node must take it out of the ISR (FollowerNode.mending)."""

    def truncate(self, offset: int) -> int:
        """Cut the log at offset (a divergent suffix); return its new end.

        A snapshot at or below the cut stays: it describes only records that are kept. One
        above it (this node took it while it led) describes records about to be cut: it
        goes first, durably, so that a crash between the two steps leaves no snapshot of
        records the log no longer has. Without it the state is replayed from the log's
        start, which needs the log to start at 0. A log that starts later (installed from
        a snapshot) cannot rebuild the state at the cut: the replica starts over empty
        (``start_over``) and is sent the queue again, a snapshot or the log.
        """
        log = self.log
        if offset >= log.next_offset:
            return log.next_offset
        snapshot = os.path.join(self.directory, SNAPSHOT_FILE)
        at = snapshot_offset(snapshot)
        if offset < log.first_offset or (at is not None and at > offset
                                         and log.first_offset > 0):
            return self.start_over(f"a cut at {offset}, below the snapshot at {at} this "
                                   f"copy needs (its log starts at {log.first_offset})")
        if at is not None and at > offset:
            files.remove(snapshot)
        end = log.truncate_after(offset)
        self.history.truncate(end)
        _log.warning("queue %s: cut divergent records at %d", self.name, end)
        return end

    async def change(self, change: Callable[..., _T], *args: Any) -> _T:
        """Run a change of the replica's files (a cut, an install) in a thread. It runs to
        its end even if the stream that asked ends meanwhile; the next stream's opening
        waits for it (``settled``) before it reads the log."""
        work = asyncio.ensure_future(asyncio.to_thread(change, *args))
        work.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._work = work
        result: _T = await asyncio.shield(work)
        return result

    async def settled(self) -> None:
        """Until a change that a previous stream started has ended."""
        if self._work is not None and not self._work.done():
            await asyncio.wait([self._work])

    def start_over(self, why: str) -> int:
        """Empty the replica (offset 0, no snapshot): it holds nothing it cannot rebuild.
        Marked mending first, durably: it may have acknowledged what it drops."""
        mark_mending(self.directory, f"this follower's copy started over empty: {why}")
        install.start_over(self.directory, self.log)
        self.history = EpochHistory()
        self.started_over = True
        _log.warning("queue %s: this copy starts over empty: %s", self.name, why)
        return 0

    def install(self, incoming: install.Incoming, frame: fr.Install) -> None:
        """Put the snapshot received in incoming (the state at frame.offset) in place of
        the log, which starts over at frame.log_from. Durable on return."""
        incoming.seal()
        install.install(self.directory, self.log, frame.offset, frame.log_from,
                        frame.history)
        self.history = EpochHistory(frame.history)
        _log.warning("queue %s: installed a snapshot of the state at offset %d (%d bytes); "
                     "the log starts over at %d", self.name, frame.offset, incoming.total,
                     frame.log_from)

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

    async def view_at(self, epoch: int) -> None:
        """Return once the node's view of the control plane has seen epoch (a leader key
        made at that etcd revision), or once the node has waited long enough for it."""

    async def accept_leader(self, name: str, uid: int, epoch: int, node_id: str
                            ) -> tuple[int, str] | None:
        """None if node_id leads the queue ``uid`` in epoch, by the control plane, and
        this node is one of its followers; else (the newest epoch known, why not)."""

    async def replica(self, name: str, uid: int, attributes: dict[str, Any]) -> Replica:
        """This node's copy of the queue, made empty if it has none."""

    def mending(self, name: str) -> None:
        """The copy of the queue here lost records it may have acknowledged (it started
        over, marked mending on disk): it must leave the ISR before it may lead."""


class ReplicationServer:
    """The handler of ``CVR3`` on the inter-node port: one leader node's connection, and a
    stream per partition on it."""

    def __init__(self, node: FollowerNode) -> None:
        self.node = node

    async def serve(self, channel: Channel) -> None:
        """One leader node's connection; the listener has authenticated it and closes it
        after."""
        await _Connection(self.node, channel).serve()


class _Connection:
    """The streams of one leader node's connection, by uid.

    The reader never waits on a stream: an APPEND is appended as it comes (a write to the
    page cache), and everything that waits - the control plane's check of an OPEN, a SYNC's
    cut, the fsync before an ACK - waits in the stream's own task. So a partition whose
    disk is slow, or whose OPEN waits on etcd, holds up no other partition on the
    connection.
    """

    def __init__(self, node: FollowerNode, channel: Channel) -> None:
        self.node = node
        self.channel = channel
        self.streams: dict[int, FollowerStream] = {}
        self.opening = asyncio.Semaphore(OPENS_MAX)
        """OPENs being checked against the control plane at once, at most."""

    async def serve(self) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_S):
                        frame = await fr.read_frame(self.channel)
                except TimeoutError:
                    raise TimeoutError(f"nothing heard in {IDLE_S:g} s") from None
                if isinstance(frame, fr.Heartbeat):
                    self.channel.send(fr.encode(fr.Heartbeat()))
                    await self.channel.drain()
                elif isinstance(frame, fr.Open):
                    await self._open(frame)
                elif isinstance(frame, fr.Sync | fr.Append | fr.Close | fr.Snapshot
                                | fr.Install):
                    stream = self.streams.get(frame.uid)
                    # None: a stream ended here, of which the leader has been told (REFUSE)
                    # and whose frames sent meanwhile are moot.
                    if stream is not None:
                        stream.received(frame)
                else:
                    raise fr.ProtocolError(f"a leader sent {type(frame).__name__}")
        except fr.LINK_ERRORS as exc:
            _log.info("replication connection from %s ended: %s", self.channel.peer, exc)
        finally:
            for stream in list(self.streams.values()):
                stream.end(None)

    async def _open(self, opening: fr.Open) -> None:
        previous = self.streams.get(opening.uid)
        if previous is not None:
            previous.end(None)  # the leader itself starts this stream over
        if len(self.streams) >= STREAMS_MAX:
            self.channel.send(fr.encode(fr.Refuse(opening.uid, 0, "too many streams")))
            await self.channel.drain()
            return
        self.streams[opening.uid] = FollowerStream(self, opening)


class FollowerStream:
    """One partition's stream on a leader's connection: this node's session with the
    partition's leader, from OPEN until CLOSE, REFUSE, a newer leader's OPEN or the end of
    the connection."""

    def __init__(self, connection: _Connection, opening: fr.Open) -> None:
        self.connection = connection
        self.uid = opening.uid
        self.epoch = opening.epoch
        self.replica: Replica | None = None
        self.ended = False
        self._open = True
        """Until POSITION is sent: any frame of the stream but CLOSE breaks its rules."""
        self._syncing = False
        """A SYNC or INSTALL is being done: any frame of the stream but CLOSE before its
        answer breaks its rules."""
        self._incoming: install.Incoming | None = None
        """The snapshot being received (SNAPSHOT), until its INSTALL."""
        self._appended = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = [asyncio.create_task(self._opening(opening))]

    @property
    def _channel(self) -> Channel:
        return self.connection.channel

    def _send(self, frame: fr.Frame) -> None:
        if not self.ended and not self._channel.is_closing():
            self._channel.send(fr.encode(frame))

    async def _opening(self, opening: fr.Open) -> None:
        node = self.connection.node
        try:
            await node.view_at(opening.epoch)
            async with self.connection.opening:
                # Checked before the replica is touched: an OPEN that names another queue
                # (an old uid, say) changes nothing here, not even an open session.
                refusal = await node.accept_leader(opening.name, opening.uid, opening.epoch,
                                                   self._channel.peer)
                if refusal is not None:
                    self.end(refusal[1], refusal[0])
                    return
                replica = await node.replica(opening.name, opening.uid, opening.attributes)
            await replica.settled()
            if opening.epoch < replica.epoch:
                self.end("stale epoch", replica.epoch)
                return
            previous = replica.session
            replica.epoch = opening.epoch
            replica.session = self
            self.replica = replica
            if previous is not None and previous is not self:
                # Another leader's stream (an older epoch's): it is told, and its leader
                # learns it is fenced.
                previous.end("a newer leader's stream took the queue", replica.epoch)
            log = replica.log
            always = log.fsync_policy.mode == "always"
            if always and log.durable_offset < log.next_offset:
                # The leader counts the position as acknowledged: records an earlier session
                # wrote and did not see fsync'd must be on disk before they are counted.
                await log.durable_async(log.next_offset)
            self._send(fr.Position(replica.uid, self.epoch, log.next_offset,
                                   tuple(replica.history.entries)))
            self._open = False
            await self._acknowledge(replica, always)
        except (EngineError, OSError) as exc:
            _log.warning("queue uid %d: replication stream from %s: %s", self.uid,
                         self._channel.peer, exc)
            self.end(f"{type(exc).__name__}: {exc}", self.replica.epoch if self.replica
                     else 0)

    def received(self, frame: fr.Sync | fr.Append | fr.Close | fr.Snapshot | fr.Install
                 ) -> None:
        replica = self.replica
        if isinstance(frame, fr.Close):
            if frame.epoch == self.epoch:
                self.end(None)
            return
        if replica is None or self._open or self._syncing:
            self.end(f"a {type(frame).__name__} before its answer", self.epoch)
            return
        if frame.epoch != self.epoch or replica.epoch != self.epoch:
            self.end("stale epoch", replica.epoch)
            return
        if isinstance(frame, fr.Sync):
            self._syncing = True
            self._tasks.append(asyncio.create_task(self._sync(replica, frame.truncate_to)))
            return
        if isinstance(frame, fr.Snapshot):
            self._snapshot_chunk(replica, frame)
            return
        if isinstance(frame, fr.Install):
            incoming, self._incoming = self._incoming, None
            if incoming is None or incoming.received != incoming.total:
                if incoming is not None:
                    incoming.abandon()
                self.end("INSTALL before the whole snapshot", self.epoch)
                return
            self._syncing = True
            self._tasks.append(asyncio.create_task(self._install(replica, incoming, frame)))
            return
        log = replica.log
        if frame.base != log.next_offset:
            self.end(f"APPEND at {frame.base}, log ends at {log.next_offset}", self.epoch)
            return
        if frame.data:
            try:
                replica.history.note(frame.data)
                log.append_raw(frame.data, wait=False)
            except (EngineError, OSError) as exc:
                self.end(f"{type(exc).__name__}: {exc}", self.epoch)
                return
        self._appended.set()

    async def _sync(self, replica: Replica, offset: int) -> None:
        try:
            end = await replica.change(replica.truncate, offset)
        except (EngineError, OSError) as exc:
            self.end(f"{type(exc).__name__}: {exc}", self.epoch)
            return
        if replica.started_over:
            replica.started_over = False
            self.connection.node.mending(replica.name)
        self._syncing = False
        self._send(fr.Ack(replica.uid, self.epoch, end))

    def _snapshot_chunk(self, replica: Replica, frame: fr.Snapshot) -> None:
        """Write a SNAPSHOT's bytes as they come (to the page cache, as an APPEND's), and
        say so (RECEIVED): the leader's window counts them until then."""
        try:
            if frame.at == 0:
                if self._incoming is not None:
                    self._incoming.abandon()
                self._incoming = install.Incoming(replica.directory, frame.total)
            incoming = self._incoming
            if incoming is None or frame.at != incoming.received \
                    or frame.total != incoming.total:
                self.end(f"SNAPSHOT bytes at {frame.at}, "
                         f"{incoming.received if incoming else 0} received", self.epoch)
                return
            incoming.write(frame.data)
        except OSError as exc:
            self.end(f"{type(exc).__name__}: {exc}", self.epoch)
            return
        self._send(fr.Received(replica.uid, self.epoch, incoming.received))

    async def _install(self, replica: Replica, incoming: install.Incoming,
                       frame: fr.Install) -> None:
        try:
            await replica.change(replica.install, incoming, frame)
        except (EngineError, OSError) as exc:
            incoming.abandon()
            self.end(f"{type(exc).__name__}: {exc}", self.epoch)
            return
        self._syncing = False
        self._send(fr.Ack(replica.uid, self.epoch, frame.log_from))

    async def _acknowledge(self, replica: Replica, always: bool) -> None:
        """Acknowledge what is durable, one fsync for everything appended meanwhile.

        Durable means what the node's fsync policy promises, as the leader counts its own
        log: with fsync always, fsync'd (the log's durable offset, read after the fsync,
        never the end it asked for); otherwise written.
        """
        while True:
            await self._appended.wait()
            self._appended.clear()
            log = replica.log
            end = log.next_offset
            if always:
                if end:
                    await log.durable_async(end)
                end = log.durable_offset
            self._send(fr.Ack(replica.uid, self.epoch, end))
            await self._channel.drain()

    def close(self) -> None:
        """This node lets the queue's copy go (it leads it now, or drops it): the leader
        is told, and opens the stream again if it still should."""
        self.end("this node closed the queue's stream")

    def end(self, reason: str | None, epoch: int | None = None) -> None:
        """End the stream; with a reason, tell the leader (REFUSE, with epoch, else the
        newest this node knows)."""
        if self.ended:
            return
        if reason is not None:
            known = epoch if epoch is not None else (
                self.replica.epoch if self.replica is not None else self.epoch)
            self._send(fr.Refuse(self.uid, known, reason))
        self.ended = True
        if self._incoming is not None:
            self._incoming.abandon()
            self._incoming = None
        if self.connection.streams.get(self.uid) is self:
            del self.connection.streams[self.uid]
        replica = self.replica
        if replica is not None and replica.session is self:
            replica.session = None
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
