"""The Cython writer and engine/format.py must describe the same bytes."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from types import ModuleType

import pytest
import xxhash
import zstandard

import engine
from engine import Log, _queue, _segment, format
from engine import records as rec
from engine._segment import batch_spans

FORMAT_PXD = Path(engine.__file__).with_name("_format.pxd")


def pxd_constant_names() -> list[str]:
    """The members of the enum in engine/_format.pxd: every constant it declares."""
    names: list[str] = []
    in_enum = False
    for line in FORMAT_PXD.read_text().splitlines():
        if line.startswith("cdef enum:"):
            in_enum = True
        elif in_enum and line.strip() and not line[0].isspace():
            in_enum = False
        elif in_enum and (member := re.match(r"\s+([A-Z][A-Z0-9_]*)\s*=", line)):
            names.append(member.group(1))
    return names


def test_pxd_declares_the_shared_constants() -> None:
    # Guards the parser above: an empty list would make the next test pass vacuously.
    names = pxd_constant_names()
    assert len(names) == len(set(names))
    assert {"BATCH_HEADER_BYTES", "INDEX_MAGIC_U32", "QREC_CONFIG", "SEND_FIXED_BYTES"} <= set(
        names
    )


@pytest.mark.parametrize("extension", [_segment, _queue], ids=lambda m: m.__name__)
def test_cython_constants_match_format_module(extension: ModuleType) -> None:
    # Each extension exports the constants as compiled into it from _format.pxd, all of
    # them (a member missing from format_constants() fails too), and each must have the
    # same value under the same name in format.py.
    compiled = extension.FORMAT_CONSTANTS
    assert compiled == {name: getattr(format, name, None) for name in pxd_constant_names()}


def test_magic_numbers_are_the_magic_bytes() -> None:
    assert format.BATCH_MAGIC_U32.to_bytes(4, "little") == format.BATCH_MAGIC
    assert format.INDEX_MAGIC_U32.to_bytes(4, "little") == format.INDEX_MAGIC


def test_record_structs_match_fixed_part_sizes() -> None:
    # records.py spells the layouts as structs; they must add up to the named sizes.
    assert rec._SEND_FIXED.size == format.SEND_FIXED_BYTES
    assert rec._SEQS_FIXED.size == format.SEQS_FIXED_BYTES
    assert rec._TAG_NOW.size + rec._U16.size == format.RECEIPTS_FIXED_BYTES
    assert rec._PURGE.size == format.PURGE_BYTES
    assert rec._TAG_NOW.size == format.CONFIG_FIXED_BYTES
    assert rec.MESSAGE_ID_BYTES == format.SEND_MESSAGE_ID_BYTES
    # And the records both codecs write have those fixed parts.
    assert len(rec.encode_send(1, 2, 3, b"")) == format.SEND_FIXED_BYTES
    assert len(_queue.encode_send(1, 2, 3, b"")) == format.SEND_FIXED_BYTES
    with_id = rec.encode_send(1, 2, 3, b"", message_id=bytes(format.SEND_MESSAGE_ID_BYTES))
    assert len(with_id) == format.SEND_FIXED_BYTES + format.SEND_MESSAGE_ID_BYTES
    with_md5 = _queue.encode_send(1, 2, 3, b"", body_md5=bytes(format.SEND_BODY_MD5_BYTES))
    assert len(with_md5) == format.SEND_FIXED_BYTES + format.SEND_BODY_MD5_BYTES
    assert with_md5[1] == format.SEND_HAS_BODY_MD5
    assert len(rec.encode_seqs(format.QREC_LEASE, 1, [], 2)) == format.SEQS_FIXED_BYTES
    assert len(rec.encode_deletes(1, [])) == format.RECEIPTS_FIXED_BYTES
    assert len(rec.encode_visibility(1, [])) == format.RECEIPTS_FIXED_BYTES
    assert len(rec.encode_purge(1, 2)) == format.PURGE_BYTES
    assert len(rec.encode_config(1, {})) == format.CONFIG_FIXED_BYTES + len(b"{}")


def test_header_struct_matches_drawn_offsets() -> None:
    # The struct in format.py and the named field offsets must tell the same story.
    header = format.encode_batch([b"x"], base_offset=7, timestamp_ms=99, epoch=3)
    assert header[format.BATCH_MAGIC_AT:4] == format.BATCH_MAGIC
    assert header[format.BATCH_VERSION_AT] == format.BATCH_VERSION
    assert struct.unpack_from("<Q", header, format.BATCH_BASE_OFFSET_AT)[0] == 7
    assert struct.unpack_from("<Q", header, format.BATCH_EPOCH_AT)[0] == 3
    assert struct.unpack_from("<q", header, format.BATCH_TIMESTAMP_AT)[0] == 99
    assert struct.unpack_from("<I", header, format.BATCH_RECORD_COUNT_AT)[0] == 1
    assert struct.unpack_from("<I", header, format.BATCH_PAYLOAD_BYTES_AT)[0] == 5


@pytest.mark.parametrize(
    "records",
    [[b""], [b"a"], [b"hello", b"", b"world" * 100], [bytes(range(256)) * 3] * 7],
)
def test_cython_batches_equal_python_encoder(tmp_path: str, records: list[bytes]) -> None:
    with Log(os.path.join(tmp_path, "log"), fsync="never") as log:
        log.append(b"first", timestamp_ms=1000)
        log.epoch = 42
        log.append_batch(records, timestamp_ms=2000)
        raw = log.read_raw(0, 1 << 20)
    expected = format.encode_batch([b"first"], 0, 1000) + format.encode_batch(
        records, 1, 2000, epoch=42
    )
    assert raw == expected


def test_compressed_batch_layout(tmp_path: str) -> None:
    records = [b"compressible " * 50] * 20
    with Log(os.path.join(tmp_path, "log"), fsync="never", compression="zstd") as log:
        log.append_batch(records, timestamp_ms=5)
        raw = log.read_raw(0, 1 << 20)
    header = format.decode_batch_header(raw)
    assert header.flags == format.FLAG_ZSTD
    assert header.payload_bytes < len(format.encode_record_area(records))
    payload = raw[format.BATCH_HEADER_BYTES :]
    assert len(payload) == header.payload_bytes
    area = zstandard.ZstdDecompressor().decompress(payload)
    assert format.decode_record_area(area, header.record_count) == records
    assert header.checksum == format.batch_checksum(raw)


def test_incompressible_batch_is_stored_plain(tmp_path: str) -> None:
    records = [os.urandom(300)]
    with Log(os.path.join(tmp_path, "log"), fsync="never", compression="zstd") as log:
        log.append_batch(records, timestamp_ms=5)
        raw = log.read_raw(0, 1 << 20)
    assert raw == format.encode_batch(records, 0, 5)


def test_checksum_covers_everything_after_itself() -> None:
    batch = bytearray(format.encode_batch([b"abc", b"de"], 10, 123))
    assert format.batch_checksum(batch) == format.decode_batch_header(batch).checksum
    expected = xxhash.xxh3_64_intdigest(bytes(batch[format.BATCH_CHECKSUMMED_FROM :]))
    assert format.decode_batch_header(batch).checksum == expected


def test_index_file_matches_python_encoder(tmp_path: str) -> None:
    path = os.path.join(tmp_path, "log")
    with Log(path, fsync="never", segment_bytes_max=4096, index_interval_bytes=512) as log:
        for i in range(200):
            log.append_batch([b"%d" % i, b"x" * 40], timestamp_ms=1)
        assert log.segment_count > 2
    first_index = os.path.join(path, format.segment_file_name(0, format.INDEX_SUFFIX))
    with open(first_index, "rb") as f:
        saved = f.read()
    with open(os.path.join(path, format.segment_file_name(0)), "rb") as f:
        segment = f.read()
    # Recompute the entries from the segment itself, by the rule FORMAT.md states.
    entries: list[tuple[int, int]] = []
    pos = 0
    base = 0
    while pos < len(segment):
        header = format.decode_batch_header(segment[pos:])
        if not entries or pos - entries[-1][1] >= 512:
            entries.append((header.base_offset - base, pos))
        pos += format.BATCH_HEADER_BYTES + header.payload_bytes
        next_offset = header.base_offset + header.record_count
    assert saved == format.encode_index(0, next_offset, len(segment), entries)


def test_batch_spans_splits_concatenated_batches() -> None:
    a = format.encode_batch([b"a"], 0, 1)
    b = format.encode_batch([b"bb", b"c"], 1, 1)
    assert batch_spans(a + b) == [(0, len(a)), (len(a), len(a) + len(b))]
    assert batch_spans(b"") == []


def test_segment_file_names_sort_numerically() -> None:
    names = [format.segment_file_name(n) for n in (10, 9, 100, 0, 2**63)]
    assert sorted(names) == [format.segment_file_name(n) for n in (0, 9, 10, 100, 2**63)]
    assert len(format.segment_file_name(0)) == format.OFFSET_DIGITS + len(format.LOG_SUFFIX)
