"""Snapshots of a queue's state, and its digest.

A snapshot file is::

    magic "CVYS" (4) | checksum (u64) | version (u8) | next_offset (u64) | zstd(state)

where the checksum is xxh3-64 over everything after it, and next_offset is the log offset
replay continues from. The state inside is the canonical encoding below (drawn in
docs/FORMAT.md), which is also what :func:`state_digest` hashes: two replicas hold the
same state exactly when their digests are equal.
"""

from __future__ import annotations

import hashlib
import json
import struct

import xxhash
import zstandard

from engine import format as fmt
from engine._queue import State, encode_messages, messages_floor, restore_messages
from engine.errors import CorruptSnapshotError

_STATE_HEAD = struct.Struct("<BQqI")  # fifo, next_seq, last_time, message count
_COUNTERS = ("sent", "received", "deleted", "expired", "moved", "purged")
_SNAPSHOT_HEAD = struct.Struct("<4sQBQ")
_NO_ID = b"\0" * 16


def _opt_str(value: str | None) -> bytes:
    if value is None:
        return b"\xff\xff"
    data = value.encode()
    return struct.pack("<H", len(data)) + data


def encode_state(state: State) -> bytes:
    """Canonical bytes of the state (the derived indexes are not part of it)."""
    return b"".join(state_parts(state))


def state_parts(state: State) -> list[bytes]:
    """encode_state's bytes, in the parts they are made in (joining them would copy
    every message once more)."""
    counters = state.counters
    parts = [
        _STATE_HEAD.pack(state.fifo, state.next_seq, state.last_time, len(state)),
        struct.pack("<6Q", *(counters[c] for c in _COUNTERS)),
    ]
    config = json.dumps(state.config, sort_keys=True, separators=(",", ":")).encode()
    parts.append(struct.pack("<I", len(config)) + config)
    # Messages in seq order, the order every replica applied them in (their layout is
    # engine/_queue.pyx's, "a snapshot's messages").
    parts.append(encode_messages(state))
    entries = state.dedup_entries()
    parts.append(struct.pack("<I", len(entries)))
    for key, (seq, sent_at, message_id) in entries:
        parts.append(_opt_str(key) + struct.pack("<Qq", seq, sent_at)
                     + (message_id if message_id is not None else _NO_ID))
    return parts


def decode_state(data: bytes, version: int = fmt.SNAPSHOT_VERSION) -> State:
    view = memoryview(data)
    fifo, next_seq, last_time, count = _STATE_HEAD.unpack_from(view, 0)
    pos = _STATE_HEAD.size
    state = State(bool(fifo))
    state.next_seq = next_seq
    state.last_time = last_time
    state.set_counters(dict(zip(_COUNTERS, struct.unpack_from("<6Q", view, pos), strict=True)))
    pos += 48
    (config_len,) = struct.unpack_from("<I", view, pos)
    pos += 4
    state.config = json.loads(bytes(view[pos : pos + config_len]))
    pos += config_len

    def read_str() -> str | None:
        nonlocal pos
        (n,) = struct.unpack_from("<H", view, pos)
        pos += 2
        if n == 0xFFFF:
            return None
        value = bytes(view[pos : pos + n]).decode()
        pos += n
        return value

    pos = restore_messages(state, data, pos, count)
    (dedup_count,) = struct.unpack_from("<I", view, pos)
    pos += 4
    for _ in range(dedup_count):
        key = read_str()
        seq, sent_at = struct.unpack_from("<Qq", view, pos)
        pos += 16
        message_id = None
        if version >= 2:  # version 1 kept no message ids in the dedup window
            message_id = bytes(view[pos : pos + 16])
            pos += 16
        if key is None:
            raise ValueError("snapshot dedup entry without a key")
        state.restore_dedup(key, seq, sent_at, message_id if message_id != _NO_ID else None)
    if pos != len(view):
        raise ValueError("snapshot state has trailing bytes")
    return state


def state_digest(state: State) -> str:
    """Hex digest of the canonical state: equal states, equal digests."""
    return hashlib.sha256(encode_state(state)).hexdigest()


def encode_snapshot(state: State, next_offset: int) -> bytes:
    return compress_snapshot(state_parts(state), next_offset)


def compress_snapshot(parts: list[bytes], next_offset: int) -> bytes:
    """The snapshot file of a state's parts (state_parts). The parts are plain bytes,
    so this may run while the state goes on changing (QueueCore.maybe_snapshot)."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj(
        size=sum(len(part) for part in parts))  # the frame says its size, as compress()'s
    body = b"".join([*(compressor.compress(part) for part in parts), compressor.flush()])
    tail = _SNAPSHOT_HEAD.pack(fmt.SNAPSHOT_MAGIC, 0, fmt.SNAPSHOT_VERSION, next_offset)[12:]
    checksum = xxhash.xxh3_64_intdigest(tail + body)
    return _SNAPSHOT_HEAD.pack(fmt.SNAPSHOT_MAGIC, checksum, fmt.SNAPSHOT_VERSION,
                               next_offset) + body


def _checked_head(data: bytes | memoryview, path: str) -> tuple[int, int]:
    """(version, offset) of a whole snapshot file, once its magic, checksum and version
    are checked. Raises CorruptSnapshotError."""
    if len(data) < _SNAPSHOT_HEAD.size:
        raise CorruptSnapshotError(path, "shorter than the snapshot header", len(data))
    magic, checksum, version, next_offset = _SNAPSHOT_HEAD.unpack_from(data, 0)
    if magic != fmt.SNAPSHOT_MAGIC:
        raise CorruptSnapshotError(path, "bad magic")
    if xxhash.xxh3_64_intdigest(data[12:]) != checksum:
        raise CorruptSnapshotError(path, "checksum mismatch")
    if version not in fmt.SNAPSHOT_VERSIONS_READ:
        raise CorruptSnapshotError(path, f"version {version} is not one this build reads", 12)
    return int(version), int(next_offset)


def check_snapshot(data: bytes | memoryview, path: str = "snapshot") -> int:
    """The offset a whole snapshot file's state is at, once its header and checksum are
    checked (the state is not decoded: a replica that installs a snapshot it was sent
    checks it so, engine/install.py). Raises CorruptSnapshotError."""
    return _checked_head(data, path)[1]


def log_floor(data: bytes, path: str = "snapshot") -> tuple[int, int]:
    """(offset, floor) of a whole snapshot file: the state is at offset, and floor is the
    lowest log offset it needs, the oldest of its messages' bodies (at most offset).

    A replica installed from the snapshot needs the log from floor: its state points at
    those bodies. Records after offset may delete some of them, but they may also be cut
    by a later leader, so only the snapshot's own state says what is needed. Read
    without building the state (no object per message). Raises CorruptSnapshotError."""
    offset = _checked_head(data, path)[1]
    try:
        raw = zstandard.ZstdDecompressor().decompress(data[_SNAPSHOT_HEAD.size:])
        view = memoryview(raw)
        count = _STATE_HEAD.unpack_from(view, 0)[3]
        pos = _STATE_HEAD.size + 48  # the counters
        pos += 4 + struct.unpack_from("<I", view, pos)[0]  # the configuration
        floor = messages_floor(raw, pos, count, offset)[1]
    except (ValueError, struct.error, zstandard.ZstdError) as exc:
        raise CorruptSnapshotError(path, f"state does not decode: {exc}",
                                   _SNAPSHOT_HEAD.size) from exc
    return offset, int(floor)


def snapshot_offset(path: str) -> int | None:
    """The offset in a snapshot file's header, unchecked (None: no file). For a cut that
    must know whether the snapshot describes records it removes; the checksum is checked
    when the file is read to be used."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNAPSHOT_HEAD.size)
    except FileNotFoundError:
        return None
    if len(head) < _SNAPSHOT_HEAD.size or head[:4] != fmt.SNAPSHOT_MAGIC:
        raise CorruptSnapshotError(path, "bad header")
    return int(_SNAPSHOT_HEAD.unpack_from(head, 0)[3])


def decode_snapshot(data: bytes, path: str = "snapshot") -> tuple[State, int]:
    """(state, offset to replay the log from).

    Raises CorruptSnapshotError, naming path, if the file is damaged in any way: the
    checksum catches damage, and whatever passes it and still does not decode (a file of
    another build, say) is refused the same way rather than as a ValueError of its own.
    """
    version, next_offset = _checked_head(data, path)
    try:
        body = zstandard.ZstdDecompressor().decompress(data[_SNAPSHOT_HEAD.size :])
        return decode_state(body, version), next_offset
    except (ValueError, LookupError, TypeError, OverflowError, struct.error,
            zstandard.ZstdError) as exc:
        raise CorruptSnapshotError(path, f"state does not decode: {exc}",
                                   _SNAPSHOT_HEAD.size) from exc
