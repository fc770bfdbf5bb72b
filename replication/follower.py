"""The follower side of replication: where this node's replicas take in their leaders' logs.

A leader connects once per queue and sends OPEN. The follower checks the epoch against
etcd (a leader whose epoch is not the queue's current leader key is refused), answers
with its log's end and epoch history, cuts its log where the leader says (SYNC), then
appends each APPEND exactly as sent and acknowledges once it is durable. One fsync
covers every APPEND that arrived while the previous fsync ran. A newer leader's OPEN ends
an older leader's session, and the older one's frames are refused from then on.

The node is reached only through ``FollowerNode``; the connection comes from the
inter-node listener (replication.listener), which has read its ``CVR1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Protocol

from engine.log import Log
from engine.queue import QUEUE_SEGMENT_BYTES, SNAPSHOT_FILE
from replication import frames as fr
from replication.history import EpochHistory

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
        self.session: asyncio.StreamWriter | None = None
        """The current leader's connection; a newer leader's OPEN closes it."""

    def truncate(self, offset: int) -> int:
        """Cut the log at offset (a divergent suffix); return its new end."""
        if offset >= self.log.next_offset:
            return self.log.next_offset
        end = self.log.truncate_after(offset)
        self.history.truncate(end)
        # A snapshot this node took while it led may describe records just cut.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.directory, SNAPSHOT_FILE))
        _log.warning("queue %s: cut divergent records at %d", self.name, end)
        return end

    def close(self) -> None:
        self.log.close()


class FollowerNode(Protocol):
    """What the replication port needs of its node (replication.node.ClusterNode)."""

    async def accept_leader(self, name: str, epoch: int) -> tuple[int, str] | None:
        """None if epoch is the queue's current leader epoch and this node one of its
        followers; else (the newest epoch known, why not)."""

    async def replica(self, name: str, uid: int, attributes: dict[str, Any]) -> Replica:
        """This node's copy of the queue, made empty if it has none."""


class ReplicationServer:
    """A session per leader connection: the handler of ``CVR1`` on the inter-node port."""

    def __init__(self, node: FollowerNode) -> None:
        self.node = node

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One leader's session; the listener has read its magic and closes it after."""
        replica: Replica | None = None
        try:
            opening = await asyncio.wait_for(fr.read_frame(reader), fr.HANDSHAKE_S)
            if not isinstance(opening, fr.Open):
                raise fr.ProtocolError(f"expected OPEN, got {type(opening).__name__}")
            refusal = await self.node.accept_leader(opening.name, opening.epoch)
            if refusal is not None:
                writer.write(fr.encode(fr.Refuse(opening.uid, refusal[0], refusal[1])))
                await writer.drain()
                return
            replica = await self.node.replica(opening.name, opening.uid, opening.attributes)
            if opening.epoch < replica.epoch:
                writer.write(fr.encode(fr.Refuse(opening.uid, replica.epoch, "stale epoch")))
                await writer.drain()
                return
            previous = replica.session
            replica.epoch = opening.epoch
            replica.session = writer
            if previous is not None:
                previous.close()
            await self._follow(replica, opening.epoch, reader, writer)
        except fr.LINK_ERRORS as exc:
            _log.info("replication session ended: %s", exc)
        finally:
            if replica is not None and replica.session is writer:
                replica.session = None

    async def _follow(self, replica: Replica, epoch: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        log = replica.log
        writer.write(fr.encode(fr.Position(replica.uid, epoch, log.next_offset,
                                           tuple(replica.history.entries))))
        always = log.fsync_policy.mode == "always"
        appended = asyncio.Event()
        acks = asyncio.create_task(self._acknowledge(replica, epoch, writer, appended, always))
        try:
            while not acks.done():
                frame = await asyncio.wait_for(fr.read_frame(reader), IDLE_S)
                if getattr(frame, "epoch", None) != epoch or replica.epoch != epoch:
                    writer.write(fr.encode(fr.Refuse(replica.uid, replica.epoch,
                                                     "stale epoch")))
                    return
                if isinstance(frame, fr.Sync):
                    end = await asyncio.to_thread(replica.truncate, frame.truncate_to)
                    writer.write(fr.encode(fr.Ack(replica.uid, epoch, end)))
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

    @staticmethod
    async def _acknowledge(replica: Replica, epoch: int, writer: asyncio.StreamWriter,
                           appended: asyncio.Event, always: bool) -> None:
        """Acknowledge the durable end, one fsync for everything appended meanwhile."""
        while True:
            await appended.wait()
            appended.clear()
            end = replica.log.next_offset
            if always and end:
                await replica.log.durable_async(end)
            # Heartbeats are answered too, so the leader sees the link alive.
            writer.write(fr.encode(fr.Ack(replica.uid, epoch, end)))
            await writer.drain()
