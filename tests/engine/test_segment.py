"""engine._segment.Segment: the contract the Log relies on."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import xxhash

from engine import format
from engine._segment import Records, Segment, concat


def open_segment(path: Path, *, writable: bool = True, base: int = 0, limit: int = 4096,
                 interval: int = 100, flush_bytes: int = 0) -> Segment:
    return Segment(str(path / format.segment_file_name(base)), base, writable=writable,
                   record_bytes_max=1000, batch_bytes_max=2048, segment_bytes_max=limit,
                   index_interval_bytes=interval, flush_bytes=flush_bytes)


def test_full_segment_says_so_instead_of_growing(tmp_path: Path) -> None:
    seg = open_segment(tmp_path, limit=200)
    seg.recover()
    assert seg.append_one(b"x" * 90) == 0
    size = seg.size
    assert seg.append_one(b"x" * 90) == -1
    assert seg.append([b"y" * 90]) == -1
    assert (seg.size, seg.next_offset) == (size, 1)
    seg.close()


def test_an_empty_segment_takes_one_batch_over_its_limit(tmp_path: Path) -> None:
    seg = open_segment(tmp_path, limit=100)
    seg.recover()
    assert seg.append([b"z" * 500]) == 0  # a batch always fits an empty segment
    assert seg.size > 100
    seg.close()


def test_sealed_segment_refuses_appends_and_recover(tmp_path: Path) -> None:
    seg = open_segment(tmp_path)
    seg.recover()
    seg.append_one(b"a")
    seg.seal()
    assert not seg.writable
    with pytest.raises(ValueError):
        seg.append_one(b"b")
    seg.close()
    sealed = open_segment(tmp_path, writable=False)
    with pytest.raises(ValueError):
        sealed.recover()
    sealed.rebuild_index()
    assert sealed.next_offset == 1
    sealed.close()


def test_buffering_and_flush(tmp_path: Path) -> None:
    seg = open_segment(tmp_path, flush_bytes=1 << 20)
    seg.recover()
    seg.append_one(b"buffered")
    assert seg.buffered_bytes == seg.size > 0
    assert os.path.getsize(seg.path) == 0
    assert seg.read(0, 10, 1 << 20, None).tolist() == [(0, b"buffered")]
    seg.flush()
    assert seg.buffered_bytes == 0
    assert os.path.getsize(seg.path) == seg.size
    seg.close()


def test_reads_span_file_and_buffer(tmp_path: Path) -> None:
    seg = open_segment(tmp_path, flush_bytes=1 << 20)
    seg.recover()
    seg.append([b"on-disk-1", b"on-disk-2"])
    seg.flush()
    seg.append([b"in-buffer"])
    assert [p for _, p in seg.read(0, 10, 1 << 20, None).tolist()] == [
        b"on-disk-1", b"on-disk-2", b"in-buffer"
    ]
    seg.close()


def test_index_entries_follow_the_interval(tmp_path: Path) -> None:
    seg = open_segment(tmp_path, interval=100, limit=1 << 20)
    seg.recover()
    for i in range(50):
        seg.append_one(b"%02d" % i + b"." * 20)  # 74-byte batches
    entries = seg.index_entries
    assert entries[0] == (0, 0)
    gaps = [b[1] - a[1] for a, b in itertools.pairwise(entries)]
    assert all(100 <= gap < 100 + 74 for gap in gaps)
    for offset in range(50):
        assert seg.read(offset, 1, 1 << 20, None).tolist()[0][1].startswith(b"%02d" % offset)
    seg.close()


def sealed_with_index(tmp_path: Path) -> tuple[bytes, int]:
    seg = open_segment(tmp_path, limit=1 << 20)
    seg.recover()
    for i in range(30):
        seg.append([b"%d" % i] * 3)
    seg.seal()
    data, next_offset = seg.index_bytes(), seg.next_offset
    seg.close()
    return data, next_offset


def test_load_index_adopts_an_exact_index(tmp_path: Path) -> None:
    data, next_offset = sealed_with_index(tmp_path)
    seg = open_segment(tmp_path, writable=False)
    assert seg.load_index(data, next_offset)
    assert seg.next_offset == next_offset
    assert bytes(seg.read(44, 1, 1 << 20, None)[0][1]) == b"14"
    seg.close()


@pytest.mark.parametrize("damage", ["flip", "short", "next", "base", "size", "order"])
def test_load_index_refuses_anything_inexact(tmp_path: Path, damage: str) -> None:
    data, next_offset = sealed_with_index(tmp_path)
    seg = open_segment(tmp_path, writable=False)
    expected_next = next_offset
    if damage == "flip":
        data = data[:60] + bytes([data[60] ^ 4]) + data[61:]
    elif damage == "short":
        data = data[:-8]
    elif damage == "next":
        expected_next = next_offset + 1
    elif damage == "base":
        # The same file presented as a segment with another base offset.
        seg.close()
        seg = Segment(seg.path, 5, writable=False, record_bytes_max=1000,
                      batch_bytes_max=2048, segment_bytes_max=4096,
                      index_interval_bytes=100, flush_bytes=0)
    elif damage == "size":
        with open(seg.path, "ab") as f:
            f.write(b"\0")
        seg.close()
        seg = open_segment(tmp_path, writable=False)
    elif damage == "order":
        # Swap two entries and re-checksum: a well-formed file with a wrong index.
        body = bytearray(data)
        e = format.INDEX_HEADER_BYTES
        body[e : e + 8], body[e + 8 : e + 16] = body[e + 8 : e + 16], body[e : e + 8]
        checksum = xxhash.xxh3_64_intdigest(bytes(body[format.INDEX_CHECKSUMMED_FROM :]))
        body[format.INDEX_CHECKSUM_AT : format.INDEX_CHECKSUM_AT + 8] = checksum.to_bytes(
            8, "little")
        data = bytes(body)
    assert not seg.load_index(data, expected_next)
    seg.close()


def test_truncate_after_keeps_whole_batches(tmp_path: Path) -> None:
    seg = open_segment(tmp_path, limit=1 << 20)
    seg.recover()
    for i in range(10):
        seg.append([b"%d" % i] * 3)  # batches at 0, 3, 6, ...
    assert seg.batch_start(7) == 6
    assert seg.batch_start(6) == 6
    assert seg.truncate_after(7) == 6
    assert seg.next_offset == 6
    assert os.path.getsize(seg.path) == seg.size
    assert seg.append_one(b"new") == 6
    assert seg.truncate_after(0) == 0
    assert seg.size == 0
    seg.close()


def test_released_descriptor_reopens(tmp_path: Path) -> None:
    seg = open_segment(tmp_path)
    seg.recover()
    seg.append_one(b"a")
    seg.release_fd()
    assert not seg.fd_open
    seg.append_one(b"b")
    assert seg.fd_open
    assert [p for _, p in seg.read(0, 5, 1 << 20, None).tolist()] == [b"a", b"b"]
    fd = seg.dup_fd()
    os.close(fd)
    seg.close()
    with pytest.raises(ValueError):
        seg.append_one(b"c")


def test_concat_requires_continuity(tmp_path: Path) -> None:
    seg = open_segment(tmp_path)
    seg.recover()
    seg.append([b"a", b"b", b"c"])
    first: Records = seg.read(0, 1, 1 << 20, None)
    rest: Records = seg.read(1, 5, 1 << 20, None)
    assert concat(first, rest).tolist() == [(0, b"a"), (1, b"b"), (2, b"c")]
    with pytest.raises(ValueError):
        concat(rest, first)
    seg.close()
