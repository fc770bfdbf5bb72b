"""The replication protocol's frames (drawn in docs/FORMAT.md, "Replication frames").

Every frame is ``u8 type | body``, big-endian, carried whole by the connection's peer
channel (replication.peer), which authenticates it. A connection opens with the 4-byte
magic ``CVR3`` from the leader and the peer handshake, and carries every partition the
leader's node leads and the follower's node follows (replication.link): each partition's
session is a stream on it, named by the partition's uid, which every frame but HEARTBEAT
carries. The leader sends OPEN, SYNC, APPEND, SNAPSHOT, INSTALL and CLOSE; the follower
answers POSITION, ACK, RECEIVED or REFUSE. Every stream frame carries an epoch: the
leader's, the fencing token (or, in REFUSE, the newest the follower knows). HEARTBEAT,
either way, belongs to the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError

if TYPE_CHECKING:
    from replication.peer import Channel

# The 3 is the protocol's version: a node that speaks an older one is refused at the magic
# (version 2 opened a connection per partition and follower).
MAGIC = b"CVR3"
# Opens a connection of partition calls (server/cluster/calls.py), which share the
# replication port: replication/listener.py routes each connection by its magic.
CALLS_MAGIC = b"CVC2"
# A peer must send its magic and finish the handshake this soon after connecting, or be
# dropped: even an idle connection holds a task and a descriptor.
HANDSHAKE_S = 5.0
# Largest frame body: one APPEND carries at most this much log (whole batches), plus its
# header. A longer frame is a protocol error, not an allocation.
APPEND_BYTES_MAX = 4 * 1024 * 1024
FRAME_BYTES_MAX = APPEND_BYTES_MAX + 64 * 1024
# Epoch history entries one POSITION (or INSTALL) may carry.
HISTORY_MAX = 65536
# The largest snapshot a follower takes in (SNAPSHOT's total): a larger one is refused
# rather than written to its disk. A queue's snapshot is its live state, compressed.
SNAPSHOT_SHIP_BYTES_MAX = 16 * 1024 * 1024 * 1024

OPEN, POSITION, SYNC, APPEND, ACK, REFUSE, HEARTBEAT, CLOSE = 1, 2, 3, 4, 5, 6, 7, 8
SNAPSHOT, INSTALL, RECEIVED = 9, 10, 11

_U64x2 = struct.Struct(">QQ")
_U64x3 = struct.Struct(">QQQ")
_U64x4 = struct.Struct(">QQQQ")
_APPEND_HEAD = struct.Struct(">BQQQQ")
_SNAPSHOT_HEAD = struct.Struct(">BQQQQQ")
_POSITION = struct.Struct(">QQQI")
_ENTRY = struct.Struct(">QQ")


class ProtocolError(EngineError):
    """A peer sent bytes that are not a valid frame: the connection is dropped."""


# What a broken or refused link raises. uvloop raises RuntimeError, not an OSError, on a
# write to a connection the peer has just reset.
LINK_ERRORS = (OSError, TimeoutError, RuntimeError, asyncio.IncompleteReadError,
               ProtocolError, EngineError)


@dataclasses.dataclass(frozen=True, slots=True)
class Open:
    """Leader -> follower: replicate queue ``uid`` (``name``) under ``epoch``."""

    epoch: int
    uid: int
    name: str
    attributes: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Position:
    """Follower -> leader: where its log ends, and the epochs that wrote it."""

    uid: int
    epoch: int
    next_offset: int
    history: tuple[tuple[int, int], ...]  # (epoch, first offset), ascending


@dataclasses.dataclass(frozen=True, slots=True)
class Sync:
    """Leader -> follower: drop every record at or after ``truncate_to``."""

    uid: int
    epoch: int
    truncate_to: int


@dataclasses.dataclass(frozen=True, slots=True)
class Append:
    """Leader -> follower: whole batches starting at ``base``; ``commit`` so far."""

    uid: int
    epoch: int
    base: int
    commit: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """Follower -> leader: every record before ``durable`` is on its disk."""

    uid: int
    epoch: int
    durable: int


@dataclasses.dataclass(frozen=True, slots=True)
class Refuse:
    """Follower -> leader: not accepted; ``epoch`` is the newest the follower knows."""

    uid: int
    epoch: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """Either way: the connection is alive (no stream; the follower answers in kind)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """Leader -> follower: the stream of queue ``uid`` in ``epoch`` ends (no answer)."""

    uid: int
    epoch: int


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """Leader -> follower: bytes ``at``.. of the snapshot file (``total`` bytes) of the
    queue's state at ``offset``, sent in place of the log before it."""

    uid: int
    epoch: int
    offset: int
    total: int
    at: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Install:
    """Leader -> follower, after the last SNAPSHOT (the state at ``offset``): install it
    in place of the log, which starts over, empty, at ``log_from`` (<= offset: the live
    messages' bodies are in the log, from there on); ``history`` is the epoch history
    before log_from. Answered by ACK(log_from) once durable; APPENDs follow from there."""

    uid: int
    epoch: int
    offset: int
    log_from: int
    history: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Received:
    """Follower -> leader: the first ``received`` bytes of the snapshot are written (not
    yet durable): room in the stream's window, nothing toward the commit offset."""

    uid: int
    epoch: int
    received: int


Frame = (Open | Position | Sync | Append | Ack | Refuse | Heartbeat | Close | Snapshot
         | Install | Received)
StreamFrame = (Open | Position | Sync | Append | Ack | Refuse | Close | Snapshot | Install
               | Received)
"""The frames of one partition's stream (every frame but HEARTBEAT)."""


def encode(frame: Frame) -> bytes:
    body: bytes
    if isinstance(frame, Append):
        return b"".join((_APPEND_HEAD.pack(APPEND, frame.uid, frame.epoch, frame.base,
                                           frame.commit), frame.data))
    if isinstance(frame, Snapshot):
        return b"".join((_SNAPSHOT_HEAD.pack(SNAPSHOT, frame.uid, frame.epoch, frame.offset,
                                             frame.total, frame.at), frame.data))
    if isinstance(frame, Received):
        kind, body = RECEIVED, _U64x3.pack(frame.uid, frame.epoch, frame.received)
    elif isinstance(frame, Install):
        kind = INSTALL
        body = struct.pack(">Q", frame.offset) + _POSITION.pack(
            frame.uid, frame.epoch, frame.log_from, len(frame.history))
        body += b"".join(_ENTRY.pack(e, o) for e, o in frame.history)
    elif isinstance(frame, Ack):
        kind, body = ACK, _U64x3.pack(frame.uid, frame.epoch, frame.durable)
    elif isinstance(frame, Sync):
        kind, body = SYNC, _U64x3.pack(frame.uid, frame.epoch, frame.truncate_to)
    elif isinstance(frame, Heartbeat):
        kind, body = HEARTBEAT, b""
    elif isinstance(frame, Close):
        kind, body = CLOSE, _U64x2.pack(frame.uid, frame.epoch)
    elif isinstance(frame, Position):
        kind = POSITION
        body = _POSITION.pack(frame.uid, frame.epoch, frame.next_offset, len(frame.history))
        body += b"".join(_ENTRY.pack(e, o) for e, o in frame.history)
    elif isinstance(frame, Open):
        name = frame.name.encode()
        attributes = json.dumps(frame.attributes, sort_keys=True).encode()
        kind = OPEN
        body = (_U64x2.pack(frame.epoch, frame.uid) + struct.pack(">H", len(name)) + name
                + struct.pack(">I", len(attributes)) + attributes)
    else:
        reason = frame.reason.encode()[:1024]
        kind = REFUSE
        body = _U64x2.pack(frame.uid, frame.epoch) + struct.pack(">H", len(reason)) + reason
    return bytes((kind,)) + body


def decode(frame: bytes) -> Frame:
    if not frame:
        raise ProtocolError("an empty frame")
    kind = frame[0]
    try:
        if kind == APPEND:
            _, uid, epoch, base, commit = _APPEND_HEAD.unpack_from(frame)
            return Append(uid, epoch, base, commit, frame[_APPEND_HEAD.size:])
        if kind == SNAPSHOT:
            _, uid, epoch, offset, total, at = _SNAPSHOT_HEAD.unpack_from(frame)
            data = frame[_SNAPSHOT_HEAD.size:]
            if total > SNAPSHOT_SHIP_BYTES_MAX or at + len(data) > total:
                raise ProtocolError("SNAPSHOT: past its total, or a total past "
                                    f"{SNAPSHOT_SHIP_BYTES_MAX}")
            return Snapshot(uid, epoch, offset, total, at, data)
        body = frame[1:]
        if kind == RECEIVED:
            return Received(*_U64x3.unpack(body))
        if kind == INSTALL:
            (offset,) = struct.unpack_from(">Q", body)
            uid, epoch, log_from, history = _position(body[8:], "INSTALL")
            if log_from > offset:
                raise ProtocolError("INSTALL: the log starts past the snapshot")
            return Install(uid, epoch, offset, log_from, history)
        if kind == ACK:
            return Ack(*_U64x3.unpack(body))
        if kind == SYNC:
            return Sync(*_U64x3.unpack(body))
        if kind == HEARTBEAT:
            if body:
                raise ProtocolError("HEARTBEAT: a body")
            return Heartbeat()
        if kind == CLOSE:
            return Close(*_U64x2.unpack(body))
        if kind == POSITION:
            return Position(*_position(body, "POSITION"))
        if kind == OPEN:
            epoch, uid = _U64x2.unpack_from(body)
            at = _U64x2.size
            (name_len,) = struct.unpack_from(">H", body, at)
            name = body[at + 2:at + 2 + name_len].decode()
            at += 2 + name_len
            (attributes_len,) = struct.unpack_from(">I", body, at)
            attributes = json.loads(body[at + 4:at + 4 + attributes_len])
            if not isinstance(attributes, dict) or at + 4 + attributes_len != len(body):
                raise ProtocolError("OPEN: bad attributes")
            return Open(epoch, uid, name, attributes)
        if kind == REFUSE:
            uid, epoch = _U64x2.unpack_from(body)
            (reason_len,) = struct.unpack_from(">H", body, _U64x2.size)
            reason = body[_U64x2.size + 2:_U64x2.size + 2 + reason_len].decode("utf-8",
                                                                              "replace")
            return Refuse(uid, epoch, reason)
    # UnicodeDecodeError and JSON errors are ValueErrors; RecursionError is deep JSON.
    except (struct.error, ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame type {kind}: {exc}") from exc
    raise ProtocolError(f"unknown frame type {kind}")


def _position(body: bytes, name: str
              ) -> tuple[int, int, int, tuple[tuple[int, int], ...]]:
    """uid, epoch, an offset and an epoch history (POSITION's and INSTALL's body)."""
    uid, epoch, offset, count = _POSITION.unpack_from(body)
    if count > HISTORY_MAX or len(body) != _POSITION.size + count * _ENTRY.size:
        raise ProtocolError(f"{name}: bad history length")
    history = tuple(_ENTRY.unpack_from(body, _POSITION.size + i * _ENTRY.size)
                    for i in range(count))
    return uid, epoch, offset, history


async def read_frame(channel: Channel) -> Frame:
    """The next frame; IncompleteReadError at a clean end of stream."""
    return decode(await channel.receive())
