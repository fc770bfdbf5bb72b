"""Damaged segment and index files: recovery cuts only a torn tail and refuses damage.

Every test builds a small log once, keeps its files as a pristine copy, and then damages a
fresh copy per case. Expected outcomes are computed from the pristine bytes with
engine.format alone, not from anything the engine reports.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import struct
from pathlib import Path

import pytest

from engine import format
from engine.errors import CorruptSegmentError
from engine.log import Log

SEED = 20240611
# Small segments keep each of the thousand reopens per test cheap.
SEGMENT_BYTES = 4096
# Several index entries per sealed segment, so that reads really go through the index.
INDEX_INTERVAL = 512
SEGMENTS = 4
CASES = 1000


@dataclasses.dataclass(frozen=True)
class Batch:
    start: int
    end: int
    base: int
    count: int

    @property
    def next(self) -> int:
        return self.base + self.count


@dataclasses.dataclass(frozen=True)
class Pristine:
    path: Path
    records: list[bytes]
    segments: list[Path]
    data: dict[Path, bytes]
    batches: dict[Path, list[Batch]]
    indexes: dict[Path, bytes]

    @property
    def last(self) -> Path:
        return self.segments[-1]

    @property
    def sealed(self) -> list[Path]:
        return self.segments[:-1]


def _open(path: Path) -> Log:
    return Log(path, fsync="never", segment_bytes_max=SEGMENT_BYTES,
               index_interval_bytes=INDEX_INTERVAL)


def _record(rng: random.Random, offset: int) -> bytes:
    if rng.random() < 0.05:
        return b""
    return f"{offset}:".encode() + rng.randbytes(rng.randrange(0, 120))


def _segment_paths(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == format.LOG_SUFFIX)


def _index_of(segment: Path) -> Path:
    return segment.with_suffix(format.INDEX_SUFFIX)


def _decode_batches(data: bytes, base: int) -> list[Batch]:
    """Batch boundaries of an intact segment file, from the header layout alone."""
    batches = []
    pos = 0
    expected = base
    while pos < len(data):
        header = format.decode_batch_header(data[pos : pos + format.BATCH_HEADER_BYTES])
        end = pos + format.BATCH_HEADER_BYTES + header.payload_bytes
        assert end <= len(data)
        assert header.base_offset == expected
        assert format.batch_checksum(data[pos:end]) == header.checksum
        batches.append(Batch(pos, end, header.base_offset, header.record_count))
        expected += header.record_count
        pos = end
    return batches


def _build(path: Path, rng: random.Random) -> list[bytes]:
    records: list[bytes] = []
    with _open(path) as log:
        while True:
            n = rng.choice([1, 1, 1, 2, 3, 5])
            batch = [_record(rng, len(records) + i) for i in range(n)]
            if n == 1 and rng.random() < 0.5:
                assert log.append(batch[0]) == len(records)
            else:
                assert log.append_batch(batch) == len(records)
            records.extend(batch)
            if log.segment_count >= SEGMENTS:
                log.flush()
                # A well-filled last segment gives the tail tests many batch boundaries.
                if _segment_paths(path)[-1].stat().st_size >= SEGMENT_BYTES * 3 // 4:
                    return records


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    path = tmp_path_factory.mktemp("pristine")
    records = _build(path, random.Random(SEED))
    segments = _segment_paths(path)
    data = {s: s.read_bytes() for s in segments}
    batches = {s: _decode_batches(data[s], int(s.stem)) for s in segments}
    # The on-disk model must agree with what was appended before anything else can.
    for segment in segments:
        for b in batches[segment]:
            area = data[segment][b.start + format.BATCH_HEADER_BYTES : b.end]
            assert format.decode_record_area(area, b.count) == records[b.base : b.next]
    assert batches[segments[-1]][-1].next == len(records)
    assert len(batches[segments[-1]]) >= 8
    indexes = {s: _index_of(s).read_bytes() for s in segments[:-1]}
    return Pristine(path, records, segments, data, batches, indexes)


def _restore(pristine: Pristine, dest: Path) -> dict[Path, Path]:
    """A fresh copy of the pristine log; maps each pristine segment to its copy."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(pristine.path, dest, copy_function=shutil.copyfile)
    return {s: dest / s.name for s in pristine.segments}


def _read_all(log: Log) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    offset = log.first_offset
    while offset < log.next_offset:
        records = log.read(offset, 1000)
        assert len(records) > 0, f"empty read at {offset} below {log.next_offset}"
        out.extend(records.tolist())
        offset = records.next_offset
    return out


def _expected(pristine: Pristine, end: int) -> list[tuple[int, bytes]]:
    return list(enumerate(pristine.records[:end]))


def _flip(path: Path, position: int, bit: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(data)
    return bytes(data)


def _batch_at(batches: list[Batch], position: int) -> Batch:
    return next(b for b in batches if b.start <= position < b.end)


def _check_append_after_recovery(path: Path, expected_next: int, context: str) -> None:
    with _open(path) as log:
        offset = log.append(b"appended after recovery")
        assert offset == expected_next, context
        assert log.read(offset, 1).tolist() == [(offset, b"appended after recovery")], context
    # The cut must be durable and the append must have landed right after it.
    with _open(path) as log:
        assert log.recovery.dropped_bytes == 0, context
        assert log.next_offset == expected_next + 1, context
        assert log.read(offset, 1).tolist() == [(offset, b"appended after recovery")], context


# --- torn tail of the last segment ----------------------------------------------------


def _check_cut(pristine: Pristine, dest: Path, cut: int, context: str) -> None:
    copies = _restore(pristine, dest)
    last = copies[pristine.last]
    os.truncate(last, cut)
    whole = [b for b in pristine.batches[pristine.last] if b.end <= cut]
    boundary = whole[-1].end if whole else 0
    expected_next = whole[-1].next if whole else int(pristine.last.stem)

    with _open(dest) as log:
        assert log.recovery.dropped_bytes == cut - boundary, context
        assert log.recovery.segment == (str(last) if cut > boundary else None), context
        assert log.recovery.indexes_rebuilt == 0, context
        assert log.next_offset == expected_next, context
        assert _read_all(log) == _expected(pristine, expected_next), context
    assert last.stat().st_size == boundary, context
    _check_append_after_recovery(dest, expected_next, context)


def test_truncated_last_segment_recovers_to_last_whole_batch(
    pristine: Pristine, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    size = len(pristine.data[pristine.last])
    for case in range(CASES):
        cut = rng.randrange(size + 1)
        _check_cut(pristine, tmp_path / "log", cut,
                   f"seed={SEED + 1} case={case} cut={cut} of {size}")


def test_truncation_at_and_next_to_every_batch_boundary(
    pristine: Pristine, tmp_path: Path
) -> None:
    # Random cuts rarely land exactly on a boundary or one byte either side of it.
    size = len(pristine.data[pristine.last])
    points = {0, 1, format.BATCH_HEADER_BYTES - 1, format.BATCH_HEADER_BYTES, size}
    for b in pristine.batches[pristine.last]:
        points.update({b.end - 1, b.end, b.end + 1, b.start + format.BATCH_HEADER_BYTES})
    for cut in sorted(p for p in points if 0 <= p <= size):
        _check_cut(pristine, tmp_path / "log", cut, f"cut={cut} of {size}")


# --- bit flips in the last segment ----------------------------------------------------


def test_bit_flip_in_last_segment_is_damage_unless_in_its_final_batch(
    pristine: Pristine, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 2)
    batches = pristine.batches[pristine.last]
    size = len(pristine.data[pristine.last])
    dest = tmp_path / "log"
    outcomes = {"cut": 0, "refused": 0}
    for case in range(CASES):
        # Half the flips land in the final batch, the only place a torn tail can be.
        final = batches[-1]
        position = (rng.randrange(final.start, final.end) if case % 2
                    else rng.randrange(size))
        bit = rng.randrange(8)
        context = f"seed={SEED + 2} case={case} byte={position} bit={bit}"
        copies = _restore(pristine, dest)
        last = copies[pristine.last]
        damaged_bytes = _flip(last, position, bit)
        damaged = _batch_at(batches, position)

        if damaged is not final:
            # Valid batches follow the bad one: damage, refused, and nothing is changed.
            before = _log_files(dest)
            with pytest.raises(CorruptSegmentError) as caught:
                _open(dest).close()
            assert caught.value.path == str(last), context
            assert caught.value.offset == damaged.base, context
            assert caught.value.position == damaged.start, context
            assert last.read_bytes() == damaged_bytes, context
            assert _log_files(dest) == before, context
            outcomes["refused"] += 1
            continue

        with _open(dest) as log:
            survivors = _read_all(log)
            # Never a record that differs from what was appended, whatever else happens.
            for offset, payload in survivors:
                assert payload == pristine.records[offset], f"{context} offset={offset}"
            assert [o for o, _ in survivors] == list(range(len(survivors))), context
            # Every byte of a batch is covered by its magic, its checksum or the checksummed
            # range, so the damaged batch itself is the first one to go.
            assert log.next_offset == damaged.base, context
            assert log.recovery.dropped_bytes == size - damaged.start, context
            assert log.recovery.segment == str(last), context
        assert last.stat().st_size == damaged.start, context
        _check_append_after_recovery(dest, damaged.base, context)
        outcomes["cut"] += 1
    assert outcomes["cut"] > 0 and outcomes["refused"] > 0, outcomes


# --- bit flips in a sealed segment ----------------------------------------------------


def _sealed_flip_cases(pristine: Pristine, seed: int, n: int) -> list[tuple[Path, int, int]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        segment = rng.choice(pristine.sealed)
        cases.append((segment, rng.randrange(len(pristine.data[segment])), rng.randrange(8)))
    return cases


def _log_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.suffix == format.LOG_SUFFIX}


def test_bit_flip_in_sealed_segment_without_index_fails_open(
    pristine: Pristine, tmp_path: Path
) -> None:
    dest = tmp_path / "log"
    for case, (segment, position, bit) in enumerate(
            _sealed_flip_cases(pristine, SEED + 3, 200)):
        context = f"seed={SEED + 3} case={case} {segment.name} byte={position} bit={bit}"
        copies = _restore(pristine, dest)
        damaged_path = copies[segment]
        damaged_bytes = _flip(damaged_path, position, bit)
        _index_of(damaged_path).unlink()
        before = _log_files(dest)
        damaged = _batch_at(pristine.batches[segment], position)

        with pytest.raises(CorruptSegmentError) as caught:
            _open(dest).close()
        assert caught.value.path == str(damaged_path), context
        assert caught.value.offset == damaged.base, context
        assert caught.value.position == damaged.start, context
        assert damaged_path.read_bytes() == damaged_bytes, context
        assert _log_files(dest) == before, context


def test_bit_flip_in_sealed_segment_with_index_is_caught_at_open_or_on_read(
    pristine: Pristine, tmp_path: Path
) -> None:
    dest = tmp_path / "log"
    caught_at = {"open": 0, "read": 0}
    for case, (segment, position, bit) in enumerate(
            _sealed_flip_cases(pristine, SEED + 4, 200)):
        context = f"seed={SEED + 4} case={case} {segment.name} byte={position} bit={bit}"
        copies = _restore(pristine, dest)
        damaged_path = copies[segment]
        damaged_bytes = _flip(damaged_path, position, bit)
        damaged = _batch_at(pristine.batches[segment], position)

        # Opening checks every index entry against the batch header it names, so damage
        # to an indexed header is caught at open (the index no longer matches the file,
        # and the rebuild finds the bad batch); any other damage is caught on read.
        try:
            log = _open(dest)
        except CorruptSegmentError as at_open:
            assert at_open.path == str(damaged_path), context
            assert at_open.offset == damaged.base, context
            assert at_open.position == damaged.start, context
            assert damaged_path.read_bytes() == damaged_bytes, context
            caught_at["open"] += 1
            continue

        caught_at["read"] += 1
        with log:
            assert log.recovery.dropped_bytes == 0, context
            assert log.next_offset == len(pristine.records), context

            with pytest.raises(CorruptSegmentError) as caught:
                log.read(damaged.base, 1)
            assert caught.value.path == str(damaged_path), context
            assert caught.value.offset == damaged.base, context
            assert caught.value.position == damaged.start, context
            for offset in range(damaged.base + 1, damaged.next):
                with pytest.raises(CorruptSegmentError):
                    log.read(offset, 1)

            for other in pristine.segments:
                if other == segment:
                    continue
                first = pristine.batches[other][0].base
                end = pristine.batches[other][-1].next
                got = log.read(first, end - first).tolist()
                assert got == _expected(pristine, end)[first:], f"{context} {other.name}"
            # Batches in front of the damage do not depend on it.
            for b in pristine.batches[segment]:
                if b.start >= damaged.start:
                    break
                got = log.read(b.base, b.count).tolist()
                assert got == _expected(pristine, b.next)[b.base:], f"{context} {b}"

            with pytest.raises(CorruptSegmentError) as caught:
                log.verify()
            assert caught.value.path == str(damaged_path), context

            appended = log.append(b"still writable")
            assert log.read(appended, 1).tolist() == [(appended, b"still writable")], context
        assert damaged_path.read_bytes() == damaged_bytes, context
    # Both ways of finding the damage must have been exercised.
    assert caught_at["open"] > 0 and caught_at["read"] > 0, caught_at


def test_truncated_sealed_segment_fails_open_and_is_left_alone(
    pristine: Pristine, tmp_path: Path
) -> None:
    # Only the last segment may have a torn tail; a short sealed one lost acknowledged data.
    rng = random.Random(SEED + 7)
    dest = tmp_path / "log"
    for case in range(200):
        segment = rng.choice(pristine.sealed)
        size = len(pristine.data[segment])
        cut = rng.randrange(size)
        keep_index = rng.random() < 0.5
        context = f"seed={SEED + 7} case={case} {segment.name} cut={cut} index={keep_index}"
        copies = _restore(pristine, dest)
        os.truncate(copies[segment], cut)
        if not keep_index:
            _index_of(copies[segment]).unlink()
        before = _log_files(dest)
        whole = [b for b in pristine.batches[segment] if b.end <= cut]
        first_lost = pristine.batches[segment][len(whole)]

        with pytest.raises(CorruptSegmentError) as caught:
            _open(dest).close()
        assert caught.value.path == str(copies[segment]), context
        assert caught.value.offset == first_lost.base, context
        assert caught.value.position == (whole[-1].end if whole else 0), context
        assert _log_files(dest) == before, context


# --- damaged or stale index files -----------------------------------------------------


def _check_index_rebuilt(pristine: Pristine, dest: Path, segment: Path, context: str) -> None:
    with _open(dest) as log:
        assert log.recovery.indexes_rebuilt == 1, context
        assert log.recovery.dropped_bytes == 0, context
        assert _read_all(log) == _expected(pristine, len(pristine.records)), context
        # Point reads go through the index rather than walking from the segment start.
        for b in pristine.batches[segment]:
            for offset in range(b.base, b.next):
                got = log.read(offset, 1).tolist()
                assert got == [(offset, pristine.records[offset])], f"{context} at {offset}"
        assert log.verify() == len(pristine.records), context
    assert _index_of(dest / segment.name).read_bytes() == pristine.indexes[segment], context
    # Once rewritten, the index is trusted again.
    with _open(dest) as log:
        assert log.recovery.indexes_rebuilt == 0, context


def _damaged_indexes(pristine: Pristine, rng: random.Random) -> list[tuple[str, Path, bytes]]:
    cases = []
    for segment in pristine.sealed:
        good = pristine.indexes[segment]
        for _ in range(60):
            position, bit = rng.randrange(len(good)), rng.randrange(8)
            data = bytearray(good)
            data[position] ^= 1 << bit
            cases.append((f"flip byte={position} bit={bit}", segment, bytes(data)))
        for n in range(len(good)):
            cases.append((f"truncated to {n}", segment, good[:n]))
        cases.append(("one byte appended", segment, good + b"\0"))
        cases.append(("zeros", segment, bytes(len(good))))
        cases.append(("random garbage", segment, rng.randbytes(len(good))))
        cases.append(("short garbage", segment, rng.randbytes(rng.randrange(1, 48))))
        cases.append(("long garbage", segment, rng.randbytes(rng.randrange(49, 4096))))
        for other in pristine.sealed:
            if other != segment:
                cases.append((f"index of {other.name}", segment, pristine.indexes[other]))
    return cases


def test_damaged_index_is_rebuilt(pristine: Pristine, tmp_path: Path) -> None:
    rng = random.Random(SEED + 5)
    dest = tmp_path / "log"
    for case, (what, segment, data) in enumerate(_damaged_indexes(pristine, rng)):
        context = f"seed={SEED + 5} case={case} {segment.name}: {what}"
        copies = _restore(pristine, dest)
        _index_of(copies[segment]).write_bytes(data)
        _check_index_rebuilt(pristine, dest, segment, context)


def test_missing_index_is_rebuilt(pristine: Pristine, tmp_path: Path) -> None:
    dest = tmp_path / "log"
    for segment in pristine.sealed:
        copies = _restore(pristine, dest)
        _index_of(copies[segment]).unlink()
        _check_index_rebuilt(pristine, dest, segment, f"{segment.name} without index")


def _entries(index: bytes) -> list[tuple[int, int]]:
    (count,) = struct.unpack_from("<I", index, format.INDEX_ENTRY_COUNT_AT)
    body = index[format.INDEX_HEADER_BYTES:]
    assert len(body) == count * format.INDEX_ENTRY_BYTES
    return list(struct.iter_unpack("<II", body))


def test_well_formed_index_that_points_between_batches_is_rebuilt(
    pristine: Pristine, tmp_path: Path
) -> None:
    # A checksum only proves the index was written whole, not that it was written for
    # this segment's batches: its entries must be checked against the file too.
    dest = tmp_path / "log"
    for segment in pristine.sealed:
        base = int(segment.stem)
        end = pristine.batches[segment][-1].next
        size = len(pristine.data[segment])
        entries = _entries(pristine.indexes[segment])
        assert len(entries) >= 2
        # The first entry (offset 0 at byte 0) is right in every index; the others are not.
        variants = {
            "positions moved by 4 bytes":
                entries[:1] + [(rel, pos + 4) for rel, pos in entries[1:]],
            "offsets moved by one":
                entries[:1] + [(rel + 1, pos) for rel, pos in entries[1:]
                               if rel + 1 < end - base],
        }
        for what, stale in variants.items():
            context = f"{segment.name}: {what}"
            copies = _restore(pristine, dest)
            _index_of(copies[segment]).write_bytes(format.encode_index(base, end, size, stale))
            _check_index_rebuilt(pristine, dest, segment, context)


def _build_same_shape(path: Path, lengths: list[int], tail: int) -> list[bytes]:
    """A log whose first segment holds exactly one single-record batch per length."""
    records = [f"{i}:".encode().ljust(n, b"r") for i, n in enumerate(lengths)]
    records += [f"tail {i}".encode() for i in range(tail)]
    segment_bytes = sum(format.batch_bytes([n]) for n in lengths)
    with Log(path, fsync="never", segment_bytes_max=segment_bytes,
             index_interval_bytes=1) as log:
        for record in records:
            log.append(record)
    return records


def test_index_written_for_other_content_of_same_size_is_rebuilt(tmp_path: Path) -> None:
    # Same base offset, same record count, same byte size, batches in another order: the
    # header of the other log's index matches this file exactly, its entries do not.
    rng = random.Random(SEED + 6)
    lengths = [rng.randrange(8, 200) for _ in range(12)]
    while lengths == lengths[::-1]:
        lengths = [rng.randrange(8, 200) for _ in range(12)]
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    records = _build_same_shape(mine, lengths, tail=3)
    _build_same_shape(theirs, lengths[::-1], tail=3)
    first = mine / format.segment_file_name(0)
    assert first.stat().st_size == (theirs / first.name).stat().st_size
    assert len(_segment_paths(mine)) == 2
    assert _index_of(first).read_bytes() != _index_of(theirs / first.name).read_bytes()
    good_index = _index_of(first).read_bytes()

    shutil.copyfile(_index_of(theirs / first.name), _index_of(first))
    with Log(mine, fsync="never", segment_bytes_max=first.stat().st_size,
             index_interval_bytes=1) as log:
        rebuilt = log.recovery.indexes_rebuilt
        reads = []
        for offset in range(len(records)):
            try:
                reads.append(log.read(offset, 1).tolist())
            except CorruptSegmentError as exc:
                reads.append([(offset, f"CorruptSegmentError: {exc}".encode())])
    assert reads == [[(o, r)] for o, r in enumerate(records)]
    assert rebuilt == 1
    assert _index_of(first).read_bytes() == good_index
