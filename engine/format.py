"""Byte layouts of the on-disk log, defined once.

docs/FORMAT.md draws these layouts; this module holds their constants and a plain-Python
codec. The Cython extensions take the same constants, under the same names, from
engine/_format.pxd (compile-time constants, so they cost nothing there), and
``tests/engine/test_format.py`` checks that every constant in that file has the same value
here and that both codecs produce the same bytes.

All integers are little-endian.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import xxhash

# --- record batch -------------------------------------------------------------------
# One batch is one write(). Offsets below are byte positions within the batch header.
BATCH_MAGIC = b"CVYB"
BATCH_MAGIC_U32 = int.from_bytes(BATCH_MAGIC, "little")  # how the Cython code compares it
BATCH_VERSION = 1
BATCH_HEADER_BYTES = 48

BATCH_MAGIC_AT = 0  # 4 bytes
BATCH_CHECKSUM_AT = 4  # u64: xxh3-64 over bytes [BATCH_CHECKSUMMED_FROM, end of batch)
BATCH_VERSION_AT = 12  # u8
BATCH_FLAGS_AT = 13  # u8
BATCH_RESERVED_AT = 14  # u16, must be zero
BATCH_BASE_OFFSET_AT = 16  # u64: offset of the first record
BATCH_EPOCH_AT = 24  # u64: leader epoch that wrote the batch (0 on a single node)
BATCH_TIMESTAMP_AT = 32  # i64: milliseconds since the Unix epoch, stamped by the writer
BATCH_RECORD_COUNT_AT = 40  # u32: records in the batch, at least 1
BATCH_PAYLOAD_BYTES_AT = 44  # u32: bytes that follow the header
BATCH_CHECKSUMMED_FROM = 12

# Flag bits. Unknown bits make a batch invalid, so a newer writer cannot be misread.
FLAG_ZSTD = 0x01  # payload is one zstd frame holding the uncompressed record area
FLAGS_KNOWN = FLAG_ZSTD

# Each record in the (uncompressed) payload: u32 length, then that many bytes.
RECORD_LENGTH_BYTES = 4

# --- sparse offset index ------------------------------------------------------------
INDEX_MAGIC = b"CVYI"
INDEX_MAGIC_U32 = int.from_bytes(INDEX_MAGIC, "little")
INDEX_VERSION = 1
INDEX_HEADER_BYTES = 48
INDEX_ENTRY_BYTES = 8  # u32 offset relative to the segment base, u32 byte position

INDEX_MAGIC_AT = 0
INDEX_CHECKSUM_AT = 4  # u64: xxh3-64 over bytes [INDEX_CHECKSUMMED_FROM, end of file)
INDEX_VERSION_AT = 12
INDEX_BASE_OFFSET_AT = 16  # u64: must equal the segment's base offset
INDEX_NEXT_OFFSET_AT = 24  # u64: offset after the segment's last record
INDEX_SEGMENT_BYTES_AT = 32  # u64: size of the .log file the index describes
INDEX_ENTRY_COUNT_AT = 40  # u32
INDEX_CHECKSUMMED_FROM = 12

# --- queue records (the payload of one log record in a queue's log) -----------------
# Every change of queue state is one of these. All start with a u8 tag and an i64 "now"
# (or sent_at): the leader's clock, so that apply never reads a clock. See FORMAT.md.
QREC_SEND = 1
QREC_LEASE = 2
QREC_DELETE = 3
QREC_CHANGE_VISIBILITY = 4
QREC_PURGE = 5
QREC_MOVING = 6
QREC_MOVE_OUT = 7
QREC_EXPIRE = 8
QREC_CONFIG = 9

# SEND flag bits: which optional fields follow the fixed part.
SEND_HAS_GROUP = 0x01
SEND_HAS_DEDUP = 0x02
SEND_HAS_ATTRIBUTES = 0x04
SEND_HAS_MESSAGE_ID = 0x08
SEND_HAS_ORIGIN = 0x10
SEND_HAS_SENDER = 0x20
SEND_HAS_SYSTEM_ATTRIBUTES = 0x40
SEND_HAS_BODY_MD5 = 0x80
SEND_FLAGS_KNOWN = 0xFF

# Sizes of the fixed parts, what precedes a record's variable fields; engine/records.py
# checks its struct layouts against them.
SEND_FIXED_BYTES = 26  # tag u8, flags u8, seq u64, sent_at i64, visible_at i64
SEND_MESSAGE_ID_BYTES = 16  # the optional message id field of a SEND
SEND_BODY_MD5_BYTES = 16  # the optional body MD5 field of a SEND
SEQS_FIXED_BYTES = 19  # LEASE, MOVING, MOVE_OUT, EXPIRE: tag u8, now i64, until i64, count u16
RECEIPTS_FIXED_BYTES = 11  # DELETE, CHANGE_VISIBILITY: tag u8, now i64, count u16
PURGE_BYTES = 17  # tag u8, now i64, below_seq u64
CONFIG_FIXED_BYTES = 9  # tag u8, now i64; the JSON follows

# Message attribute value kinds.
ATTR_STRING = 0
ATTR_BINARY = 1

# --- snapshot file ------------------------------------------------------------------
SNAPSHOT_MAGIC = b"CVYS"
SNAPSHOT_VERSION = 3
# Version 1 lacks the message id of dedup window entries; it is read, never written.
# Version 3 has version 2's layout: it says that the queue's log may hold SEND records
# with a body MD5 (SEND_HAS_BODY_MD5), so that a build before them refuses the queue at
# open rather than failing each receive of such a message.
SNAPSHOT_VERSIONS_READ = (1, 2, 3)

# --- file names ---------------------------------------------------------------------
OFFSET_DIGITS = 20  # zero-padded so that `ls` sorts segments by offset
LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"

# --- limits (defaults and hard caps) ------------------------------------------------
RECORD_BYTES_MAX = 8 * 1024 * 1024
BATCH_BYTES_MAX = 16 * 1024 * 1024
SEGMENT_BYTES_MAX = 64 * 1024 * 1024
# Index positions are u32 and a segment may overrun its limit by one batch, so the
# configurable segment limit is capped well below 4 GiB.
SEGMENT_BYTES_MAX_CAP = 1024 * 1024 * 1024
SEGMENT_BYTES_MIN = BATCH_HEADER_BYTES + RECORD_LENGTH_BYTES
INDEX_INTERVAL_BYTES = 4096

_HEADER = struct.Struct("<4sQBBHQQqII")
_INDEX_HEADER = struct.Struct("<4sQB3xQQQI4x")
_U32 = struct.Struct("<I")

assert _HEADER.size == BATCH_HEADER_BYTES
assert _INDEX_HEADER.size == INDEX_HEADER_BYTES


def segment_file_name(base_offset: int, suffix: str = LOG_SUFFIX) -> str:
    return f"{base_offset:0{OFFSET_DIGITS}d}{suffix}"


def batch_bytes(record_lengths: list[int]) -> int:
    """Size on disk of an uncompressed batch holding records of these lengths."""
    return BATCH_HEADER_BYTES + sum(RECORD_LENGTH_BYTES + n for n in record_lengths)


class BatchHeader(NamedTuple):
    checksum: int
    version: int
    flags: int
    base_offset: int
    epoch: int
    timestamp_ms: int
    record_count: int
    payload_bytes: int


def encode_record_area(records: list[bytes]) -> bytes:
    return b"".join(_U32.pack(len(r)) + r for r in records)


def encode_batch(
    records: list[bytes],
    base_offset: int,
    timestamp_ms: int,
    epoch: int = 0,
    flags: int = 0,
    payload: bytes | None = None,
) -> bytes:
    """Plain-Python batch encoder: the reference for what the Cython writer produces.

    ``payload`` overrides the record area, for a compressed batch.
    """
    body = encode_record_area(records) if payload is None else payload
    fields = (BATCH_VERSION, flags, 0, base_offset, epoch, timestamp_ms, len(records), len(body))
    tail = _HEADER.pack(BATCH_MAGIC, 0, *fields)[BATCH_CHECKSUMMED_FROM:]
    checksum = xxhash.xxh3_64_intdigest(tail + body)
    return _HEADER.pack(BATCH_MAGIC, checksum, *fields) + body


def decode_batch_header(data: bytes | memoryview) -> BatchHeader:
    magic, *rest = _HEADER.unpack_from(data, 0)
    if magic != BATCH_MAGIC:
        raise ValueError(f"bad batch magic {bytes(magic)!r}")
    checksum, version, flags, _reserved, base, epoch, ts, count, nbytes = rest
    return BatchHeader(checksum, version, flags, base, epoch, ts, count, nbytes)


def batch_checksum(batch: bytes | memoryview) -> int:
    """The checksum a batch should carry, computed from its bytes."""
    return xxhash.xxh3_64_intdigest(bytes(batch[BATCH_CHECKSUMMED_FROM:]))


def decode_record_area(area: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        (n,) = _U32.unpack_from(area, pos)
        pos += RECORD_LENGTH_BYTES
        out.append(area[pos : pos + n])
        pos += n
    if pos != len(area):
        raise ValueError("record area length does not match its records")
    return out


def encode_index(
    base_offset: int, next_offset: int, segment_bytes: int, entries: list[tuple[int, int]]
) -> bytes:
    body = b"".join(struct.pack("<II", rel, pos) for rel, pos in entries)
    fields = (INDEX_VERSION, base_offset, next_offset, segment_bytes, len(entries))
    tail = _INDEX_HEADER.pack(INDEX_MAGIC, 0, *fields)[INDEX_CHECKSUMMED_FROM:]
    checksum = xxhash.xxh3_64_intdigest(tail + body)
    return _INDEX_HEADER.pack(INDEX_MAGIC, checksum, *fields) + body
