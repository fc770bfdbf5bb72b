"""Queue records: the log payloads that every change of queue state is written as.

The leader decides (reading the clock and the queue's configuration) and writes what it
decided; applying a record is then a pure function, the same on a restart, on a follower
and in a test. docs/FORMAT.md draws each layout; the tags, flags and fixed-part sizes are
in engine/format.py.

All integers are little-endian; strings are UTF-8 with a u16 length prefix.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from engine import format as fmt

_TAG_NOW = struct.Struct("<Bq")  # tag, now: how every record but SEND starts
_SEND_FIXED = struct.Struct("<BBQqq")  # tag, flags, seq, sent_at_ms, visible_at_ms
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_ORIGIN = struct.Struct("<QQI")  # origin queue uid, origin seq, receive count so far
_SEQ = struct.Struct("<Q")
_SEQS_FIXED = struct.Struct("<BqqH")  # tag, now, until, count
_PAIR = struct.Struct("<QQ")
_TRIPLE = struct.Struct("<QQq")
_PURGE = struct.Struct("<BqQ")

MESSAGE_ID_BYTES = fmt.SEND_MESSAGE_ID_BYTES
BODY_MD5_BYTES = fmt.SEND_BODY_MD5_BYTES

# The structs restate the fixed-part sizes that format.py names and the Cython codec
# compiles in from engine/_format.pxd: a layout edited on one side only fails on import
# (and in tests/engine/test_format.py).
assert _SEND_FIXED.size == fmt.SEND_FIXED_BYTES
assert _SEQS_FIXED.size == fmt.SEQS_FIXED_BYTES
assert _TAG_NOW.size + _U16.size == fmt.RECEIPTS_FIXED_BYTES  # tag, now, count
assert _PURGE.size == fmt.PURGE_BYTES
assert _TAG_NOW.size == fmt.CONFIG_FIXED_BYTES


class MessageAttribute(NamedTuple):
    """One message attribute: an SQS data type ("String", "Number", "Binary", optionally
    with a ".custom" suffix) and its value (str, or bytes for Binary types)."""

    data_type: str
    value: str | bytes


class Origin(NamedTuple):
    """Where a message moved into a dead-letter queue came from."""

    queue_uid: int
    seq: int
    receive_count: int


class Send(NamedTuple):
    seq: int
    sent_at: int
    visible_at: int
    group: str | None
    dedup: str | None
    message_id: bytes | None
    origin: Origin | None
    attributes: Mapping[str, MessageAttribute] | None
    sender: str | None
    system_attributes: Mapping[str, MessageAttribute] | None
    body_md5: bytes | None
    body: bytes


class SendMeta(NamedTuple):
    """What apply needs from a SEND: everything but the attributes and body."""

    seq: int
    sent_at: int
    visible_at: int
    group: str | None
    dedup: str | None
    message_id: bytes | None
    origin: Origin | None


class SeqList(NamedTuple):
    """LEASE, MOVING, MOVE_OUT and EXPIRE: a time (and a lease end) and some seqs."""

    tag: int
    now: int
    until: int
    seqs: tuple[int, ...]


class Receipts(NamedTuple):
    """DELETE and CHANGE_VISIBILITY: (seq, lease[, visible_at]) entries."""

    tag: int
    now: int
    entries: tuple[tuple[int, ...], ...]


class Purge(NamedTuple):
    now: int
    below_seq: int


class Config(NamedTuple):
    now: int
    attributes: dict[str, object]


Record = SendMeta | Send | SeqList | Receipts | Purge | Config


# --- encoding -------------------------------------------------------------------------


def _str(value: str) -> bytes:
    data = value.encode()
    return _U16.pack(len(data)) + data


def encode_attributes(attributes: Mapping[str, MessageAttribute]) -> bytes:
    parts = [bytes([len(attributes)])]
    for name, (data_type, value) in sorted(attributes.items()):
        raw = value if isinstance(value, bytes) else value.encode()
        kind = fmt.ATTR_BINARY if isinstance(value, bytes) else fmt.ATTR_STRING
        parts += [_str(name), _str(data_type), bytes([kind]), _U32.pack(len(raw)), raw]
    return b"".join(parts)


def encode_send(
    seq: int,
    sent_at: int,
    visible_at: int,
    body: bytes,
    *,
    group: str | None = None,
    dedup: str | None = None,
    message_id: bytes | None = None,
    origin: Origin | None = None,
    attributes: Mapping[str, MessageAttribute] | None = None,
    sender: str | None = None,
    system_attributes: Mapping[str, MessageAttribute] | None = None,
    body_md5: bytes | None = None,
) -> bytes:
    flags = 0
    tail = []
    if group is not None:
        flags |= fmt.SEND_HAS_GROUP
        tail.append(_str(group))
    if dedup is not None:
        flags |= fmt.SEND_HAS_DEDUP
        tail.append(_str(dedup))
    if message_id is not None:
        flags |= fmt.SEND_HAS_MESSAGE_ID
        tail.append(message_id)
    if origin is not None:
        flags |= fmt.SEND_HAS_ORIGIN
        tail.append(_ORIGIN.pack(*origin))
    if attributes:
        flags |= fmt.SEND_HAS_ATTRIBUTES
        blob = encode_attributes(attributes)
        tail.append(_U32.pack(len(blob)) + blob)
    if sender is not None:
        flags |= fmt.SEND_HAS_SENDER
        tail.append(_str(sender))
    if system_attributes:
        flags |= fmt.SEND_HAS_SYSTEM_ATTRIBUTES
        blob = encode_attributes(system_attributes)
        tail.append(_U32.pack(len(blob)) + blob)
    if body_md5 is not None:
        flags |= fmt.SEND_HAS_BODY_MD5
        tail.append(body_md5)
    head = _SEND_FIXED.pack(fmt.QREC_SEND, flags, seq, sent_at, visible_at)
    if not tail:
        return head + body
    return head + b"".join(tail) + body


def encode_seqs(tag: int, now: int, seqs: Sequence[int], until: int = 0) -> bytes:
    """LEASE (with until), MOVING, MOVE_OUT, EXPIRE."""
    return _SEQS_FIXED.pack(tag, now, until, len(seqs)) + b"".join(_SEQ.pack(s) for s in seqs)


def encode_deletes(now: int, entries: Sequence[tuple[int, int]]) -> bytes:
    return (_TAG_NOW.pack(fmt.QREC_DELETE, now) + _U16.pack(len(entries))
            + b"".join(_PAIR.pack(seq, lease) for seq, lease in entries))


def encode_visibility(now: int, entries: Sequence[tuple[int, int, int]]) -> bytes:
    return (_TAG_NOW.pack(fmt.QREC_CHANGE_VISIBILITY, now) + _U16.pack(len(entries))
            + b"".join(_TRIPLE.pack(*entry) for entry in entries))


def encode_purge(now: int, below_seq: int) -> bytes:
    return _PURGE.pack(fmt.QREC_PURGE, now, below_seq)


def encode_config(now: int, attributes: Mapping[str, object]) -> bytes:
    body = json.dumps(attributes, sort_keys=True, separators=(",", ":")).encode()
    return _TAG_NOW.pack(fmt.QREC_CONFIG, now) + body


# --- decoding -------------------------------------------------------------------------


class RecordError(ValueError):
    """A queue record is malformed (a log that passed its checksums holds bad content)."""


def _read_str(data: bytes | memoryview, pos: int) -> tuple[str, int]:
    (n,) = _U16.unpack_from(data, pos)
    pos += 2
    if pos + n > len(data):
        raise RecordError("string runs past the record")
    return bytes(data[pos : pos + n]).decode(), pos + n


def _send_head(data: bytes | memoryview) -> tuple[SendMeta, int, int]:
    """The SEND fields apply needs, the flags, and where the attributes begin."""
    _, flags, seq, sent_at, visible_at = _SEND_FIXED.unpack_from(data, 0)
    if flags & ~fmt.SEND_FLAGS_KNOWN:
        raise RecordError(f"unknown SEND flags {flags:#x}")
    pos = _SEND_FIXED.size
    group = dedup = None
    message_id = None
    origin = None
    if flags & fmt.SEND_HAS_GROUP:
        group, pos = _read_str(data, pos)
    if flags & fmt.SEND_HAS_DEDUP:
        dedup, pos = _read_str(data, pos)
    if flags & fmt.SEND_HAS_MESSAGE_ID:
        message_id = bytes(data[pos : pos + MESSAGE_ID_BYTES])
        pos += MESSAGE_ID_BYTES
    if flags & fmt.SEND_HAS_ORIGIN:
        origin = Origin(*_ORIGIN.unpack_from(data, pos))
        pos += _ORIGIN.size
    if pos > len(data):
        raise RecordError("SEND fields run past the record")
    return SendMeta(seq, sent_at, visible_at, group, dedup, message_id, origin), flags, pos


def decode_send(data: bytes | memoryview) -> Send:
    """A SEND record in full: body and attributes included."""
    meta, flags, pos = _send_head(data)
    attributes: dict[str, MessageAttribute] | None = None
    system_attributes: dict[str, MessageAttribute] | None = None
    sender = None
    body_md5 = None
    try:
        if flags & fmt.SEND_HAS_ATTRIBUTES:
            (blob_len,) = _U32.unpack_from(data, pos)
            pos += 4
            attributes = _decode_attributes(data, pos, pos + blob_len)
            pos += blob_len
        if flags & fmt.SEND_HAS_SENDER:
            sender, pos = _read_str(data, pos)
        if flags & fmt.SEND_HAS_SYSTEM_ATTRIBUTES:
            (blob_len,) = _U32.unpack_from(data, pos)
            pos += 4
            system_attributes = _decode_attributes(data, pos, pos + blob_len)
            pos += blob_len
        if flags & fmt.SEND_HAS_BODY_MD5:
            body_md5 = bytes(data[pos : pos + BODY_MD5_BYTES])
            pos += BODY_MD5_BYTES
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise RecordError(f"malformed SEND record: {exc}") from exc
    if pos > len(data):
        raise RecordError("SEND fields run past the record")
    return Send(*meta, attributes, sender, system_attributes, body_md5, bytes(data[pos:]))


def _decode_attributes(data: bytes | memoryview, pos: int, end: int
                       ) -> dict[str, MessageAttribute]:
    count = data[pos]
    pos += 1
    out: dict[str, MessageAttribute] = {}
    for _ in range(count):
        name, pos = _read_str(data, pos)
        data_type, pos = _read_str(data, pos)
        kind = data[pos]
        (n,) = _U32.unpack_from(data, pos + 1)
        pos += 5
        raw = bytes(data[pos : pos + n])
        pos += n
        out[name] = MessageAttribute(data_type, raw if kind == fmt.ATTR_BINARY else raw.decode())
    if pos != end:
        raise RecordError("attribute block length does not match its contents")
    return out


def decode(data: bytes | memoryview) -> Record:
    """Decode any queue record. SEND comes back as SendMeta (no body): what apply needs."""
    if not data:
        raise RecordError("empty record")
    tag = data[0]
    try:
        if tag == fmt.QREC_SEND:
            return _send_head(data)[0]
        if tag in (fmt.QREC_LEASE, fmt.QREC_MOVING, fmt.QREC_MOVE_OUT, fmt.QREC_EXPIRE):
            _, now, until, count = _SEQS_FIXED.unpack_from(data, 0)
            seqs = struct.unpack_from(f"<{count}Q", data, _SEQS_FIXED.size)
            _check_length(data, _SEQS_FIXED.size + 8 * count)
            return SeqList(tag, now, until, seqs)
        if tag == fmt.QREC_DELETE:
            return _decode_receipts(data, tag, 2)
        if tag == fmt.QREC_CHANGE_VISIBILITY:
            return _decode_receipts(data, tag, 3)
        if tag == fmt.QREC_PURGE:
            _check_length(data, _PURGE.size)
            _, now, below = _PURGE.unpack_from(data, 0)
            return Purge(now, below)
        if tag == fmt.QREC_CONFIG:
            _, now = _TAG_NOW.unpack_from(data, 0)
            return Config(now, json.loads(bytes(data[_TAG_NOW.size :])))
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"malformed record with tag {tag}: {exc}") from exc
    raise RecordError(f"unknown record tag {tag}")


def _decode_receipts(data: bytes | memoryview, tag: int, width: int) -> Receipts:
    _, now = _TAG_NOW.unpack_from(data, 0)
    (count,) = _U16.unpack_from(data, _TAG_NOW.size)
    start = fmt.RECEIPTS_FIXED_BYTES
    _check_length(data, start + 8 * width * count)
    flat = struct.unpack_from(f"<{width * count}q", data, start)
    entries = tuple(tuple(flat[i : i + width]) for i in range(0, len(flat), width))
    return Receipts(tag, now, entries)


def _check_length(data: bytes | memoryview, expected: int) -> None:
    if len(data) != expected:
        raise RecordError(f"record is {len(data)} bytes, expected {expected}")
