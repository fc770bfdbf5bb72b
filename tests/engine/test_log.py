"""engine.Log: every public call and every error it can raise."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import FsyncPolicy, Log, format
from engine import log as engine_log
from engine.errors import (
    ConfigError,
    EngineError,
    InvalidBatchError,
    LogClosedError,
    LogFailedError,
    LogLockedError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
)
from engine.log import READ_RECORDS_MAX, TRUNCATE_ROLL_BYTES


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "log")


def segment_files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".log"))


def wait_until(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


# --- configuration -------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["always", "never", "interval:1", "interval:60000"])
def test_fsync_policy_round_trips(spec: str) -> None:
    assert str(FsyncPolicy.parse(spec)) == spec


@pytest.mark.parametrize(
    "spec", ["sometimes", "interval:", "interval:0", "interval:-5", "interval:x", "", "ALWAYS"]
)
def test_bad_fsync_policy_is_a_config_error(path: str, spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        Log(path, fsync=spec)
    assert info.value.name == "fsync"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"segment_bytes_max": 10},
        {"segment_bytes_max": 2**31},
        {"record_bytes_max": 0},
        {"batch_bytes_max": 1 << 20, "record_bytes_max": 2 << 20},
        {"compression": "gzip"},
        {"flush_interval_ms": 0},
        {"segment_bytes_max": True},
    ],
)
def test_bad_limits_are_config_errors(path: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Log(path, **kwargs)  # type: ignore[arg-type]


def test_new_log_is_empty(path: str) -> None:
    with Log(path) as log:
        assert (log.first_offset, log.next_offset, log.durable_offset) == (0, 0, 0)
        assert len(log.read(0)) == 0
        assert log.recovery.dropped_bytes == 0
    assert segment_files(path) == [format.segment_file_name(0)]


def test_a_second_writer_is_refused(path: str) -> None:
    with Log(path), pytest.raises(LogLockedError) as info:
        Log(path)
    assert info.value.path == path
    with Log(path):  # the lock goes with the first log
        pass


def test_errors_share_one_root() -> None:
    for error in (ConfigError, InvalidBatchError, LogClosedError, LogFailedError,
                  LogLockedError, OffsetOutOfRangeError, RecordTooLargeError):
        assert issubclass(error, EngineError)


# --- appending and reading -----------------------------------------------------------


def test_offsets_are_consecutive_across_calls(path: str) -> None:
    with Log(path, fsync="never") as log:
        assert log.append(b"a") == 0
        assert log.append_batch([b"b", b"c", b"d"]) == 1
        assert log.append(bytearray(b"e")) == 4
        assert log.append_batch([memoryview(b"xfx")[1:2]]) == 5
        assert log.next_offset == 6
        assert log.read(0, 10).tolist() == [
            (0, b"a"), (1, b"b"), (2, b"c"), (3, b"d"), (4, b"e"), (5, b"f")
        ]


def test_records_view(path: str) -> None:
    with Log(path, fsync="never") as log:
        log.append_batch([b"zero", b"one", b"two"])
        records = log.read(1, 10)
    assert len(records) == 2
    assert records.first_offset == 1
    assert records.next_offset == 3
    assert records[0][0] == 1 and bytes(records[0][1]) == b"one"
    assert bytes(records[-1][1]) == b"two"
    assert isinstance(records.payload(0), memoryview)
    assert [o for o, _ in records] == [1, 2] == list(records.offsets())
    assert [bytes(p) for p in records.payloads()] == [b"one", b"two"]
    assert records.payload_bytes == 6
    with pytest.raises(IndexError):
        records[2]
    with pytest.raises(IndexError):
        records[-3]
    # The views own their memory: the log being closed does not affect them.
    assert bytes(records[1][1]) == b"two"


def test_read_limits(path: str) -> None:
    with Log(path, fsync="never") as log:
        for i in range(10):
            log.append_batch([b"%02d" % i + b"-" + bytes([65 + j]) * 100 for j in range(10)])
        assert len(log.read(0, 5)) == 5
        assert len(log.read(3, 1)) == 1
        middle = log.read(37, 25)
        assert [o for o, _ in middle] == list(range(37, 62))
        assert bytes(middle[0][1]).startswith(b"03-H")
        # max_bytes stops after the batch that crosses it; at least one batch is taken.
        assert len(log.read(0, 100, max_bytes=1)) == 10
        assert len(log.read(0, 100, max_bytes=1500)) == 20
        assert len(log.read(0, READ_RECORDS_MAX * 2)) == 100


def test_read_out_of_range(path: str) -> None:
    with Log(path, fsync="never") as log:
        log.append_batch([b"a", b"b"])
        assert len(log.read(2)) == 0
        with pytest.raises(OffsetOutOfRangeError) as info:
            log.read(3)
        assert (info.value.offset, info.value.first_offset, info.value.next_offset) == (3, 0, 2)
        assert isinstance(info.value, IndexError)


def test_non_bytes_records_are_refused(path: str) -> None:
    with Log(path, fsync="never") as log:
        with pytest.raises(TypeError):
            log.append("text")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            log.append_batch([b"ok", "text"])  # type: ignore[list-item]
        with pytest.raises(ValueError):
            log.append_batch([])
        assert log.next_offset == 0


def test_oversized_records_and_batches_change_nothing(path: str) -> None:
    with Log(path, fsync="never", record_bytes_max=1000, batch_bytes_max=4096) as log:
        log.append(b"kept")
        with pytest.raises(RecordTooLargeError) as info:
            log.append(b"x" * 1001)
        assert (info.value.what, info.value.size, info.value.limit) == ("record", 1001, 1000)
        with pytest.raises(RecordTooLargeError) as batch_info:
            log.append_batch([b"y" * 1000] * 5)
        assert batch_info.value.what == "batch"
        assert log.append(b"x" * 1000) == 1
        assert log.read(0, 10).tolist() == [(0, b"kept"), (1, b"x" * 1000)]


def test_segments_roll_at_the_limit_and_reads_cross_them(path: str) -> None:
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        for i in range(300):
            log.append_batch([b"%04d" % i, b"." * 60])
        assert log.segment_count == len(segment_files(path)) > 5
        for name in segment_files(path):
            assert os.path.getsize(os.path.join(path, name)) <= 4096
        records = log.read(0, 600)
        assert len(records) == 600
        assert bytes(records[598][1]) == b"0299"
        assert sum(1 for _ in log.iter_records()) == 600


def test_reopen_restores_everything(path: str) -> None:
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        for i in range(500):
            log.append(b"record %d" % i)
        expected = log.read(0, 1000).tolist()
    with Log(path, segment_bytes_max=4096) as log:
        assert log.next_offset == 500
        assert log.read(0, 1000).tolist() == expected
        assert log.recovery.dropped_bytes == 0
        assert log.recovery.indexes_rebuilt == 0
        assert log.append(b"more") == 500


def test_compression_round_trips_and_survives_reopen_without_it(path: str) -> None:
    records = [b"%d " % i * 30 for i in range(200)]
    with Log(path, fsync="never", compression="zstd", segment_bytes_max=8192) as log:
        for start in range(0, 200, 20):
            log.append_batch(records[start : start + 20])
        assert log.size_bytes < len(b"".join(records))
        assert [bytes(p) for _, p in log.read(5, 200)] == records[5:]
    with Log(path, fsync="never") as log:
        assert [bytes(p) for _, p in log.read(0, 200)] == records
        assert log.verify() == 200


def test_compressed_logs_read_at_once_from_many_threads(tmp_path: Path) -> None:
    """Decompression contexts are per thread and shared by every log: readers of several
    logs in several threads at once each get their own records, whole."""
    logs = []
    for n in range(4):
        log = Log(os.path.join(tmp_path, str(n)), fsync="never", compression="zstd")
        for start in range(0, 400, 40):
            log.append_batch([b"log %d record %d " % (n, i) * 20
                              for i in range(start, start + 40)])
        logs.append(log)
    wrong: list[str] = []

    def reader(k: int) -> None:
        for round_ in range(30):
            log = logs[(k + round_) % len(logs)]
            n = logs.index(log)
            got = [bytes(p) for _, p in log.read(0, 400)]
            if got != [b"log %d record %d " % (n, i) * 20 for i in range(400)]:
                wrong.append(f"thread {k} round {round_}")

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    assert wrong == []


def test_an_idle_written_through_log_gives_its_write_buffer_back(path: str) -> None:
    """A node keeps thousands of logs open: one that writes each batch through (fsync
    always or interval) holds no write buffer between batches, and one that writes behind
    gives it back once a flush finds nothing new."""
    import tracemalloc

    tracemalloc.start()
    try:
        for fsync in ("always", "interval:60000", "never"):
            with Log(os.path.join(path, fsync.partition(":")[0]), fsync=fsync,
                     flush_interval_ms=60_000) as log:
                log.append_batch([b"x" * 100] * 10)
                log.flush()
                before = tracemalloc.get_traced_memory()[0]
                log.append_batch([b"y" * 1000] * 20)  # a 20 KB batch: the buffer grows
                log.flush()
                if fsync == "never":
                    # The background flush (its timer's tick), twice: the second finds
                    # nothing new.
                    log.tick()
                    log.tick()
                after = tracemalloc.get_traced_memory()[0]
                # What stays is bookkeeping (the index, counters), not a 20 KB buffer.
                assert after - before < 4096, (fsync, after - before)
                assert [bytes(p) for _, p in log.read(10, 30)] == [b"y" * 1000] * 20
    finally:
        tracemalloc.stop()


def test_epoch_is_stamped_on_batches(path: str) -> None:
    with Log(path, fsync="never") as log:
        log.append(b"a")
        log.epoch = 9
        log.append(b"b")
        raw = log.read_raw(0)
    first = format.decode_batch_header(raw)
    second = format.decode_batch_header(raw[format.BATCH_HEADER_BYTES + 5 :])
    assert (first.epoch, second.epoch) == (0, 9)


def test_on_append_is_told_after_every_kind_of_append(path: str, tmp_path: Path) -> None:
    """A cluster leader ships new records when told so, whoever appended them."""
    seen: list[int] = []
    with Log(path, fsync="never") as log:
        log.on_append = lambda: seen.append(log.next_offset)
        log.append(b"a")
        log.append_batch([b"b", b"c"])
        with Log(str(tmp_path / "copy"), fsync="never") as copy:
            copy.on_append = lambda: seen.append(-copy.next_offset)
            copy.append_raw(log.read_raw(0))
    # Told once the records are there: a reader woken by it finds them.
    assert seen == [1, 3, -3]


# --- durability ----------------------------------------------------------------------


def file_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in segment_files(path))


def test_never_buffers_until_flush(path: str) -> None:
    with Log(path, fsync="never", flush_interval_ms=60_000) as log:
        log.append(b"x" * 100)
        assert file_bytes(path) == 0
        assert log.durable_offset == 0
        assert bytes(log.read(0)[0][1]) == b"x" * 100  # served from the buffer
        log.flush()
        assert file_bytes(path) == log.size_bytes > 0
        assert log.durable_offset == 1


def test_never_writes_out_on_its_interval(path: str) -> None:
    with Log(path, fsync="never", flush_interval_ms=20) as log:
        log.append(b"x" * 100)
        assert wait_until(lambda: file_bytes(path) == log.size_bytes)


def test_never_writes_out_by_size(path: str) -> None:
    with Log(path, fsync="never", buffer_bytes=4096, flush_interval_ms=60_000) as log:
        for _ in range(100):
            log.append(b"y" * 100)
        assert file_bytes(path) > 8000


def test_interval_syncs_in_the_background(path: str) -> None:
    with Log(path, fsync="interval:20") as log:
        log.append(b"a")
        assert file_bytes(path) > 0  # written at once, fsync'd later
        assert wait_until(lambda: log.durable_offset == 1)
        assert log.sync_count >= 1


def test_always_is_durable_on_return(path: str) -> None:
    with Log(path, fsync="always") as log:
        for i in range(5):
            log.append(b"a")
            assert log.durable_offset == i + 1
        log.append_batch([b"b", b"c"])
        assert log.durable_offset == 7


def test_always_without_wait_then_wait_durable(path: str) -> None:
    with Log(path, fsync="always") as log:
        first = log.append_batch([b"a", b"b"], wait=False)
        log.wait_durable(first + 2)
        assert log.durable_offset >= 2
        with pytest.raises(OffsetOutOfRangeError):
            log.wait_durable(10)


# A disk's fdatasync, for the group-commit tests: on tmpfs the real one is nearly free, so
# each round would end before another thread appends, and nothing would be shared.
SLOW_SYNC_S = 0.005


@pytest.fixture
def slow_fdatasync(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        time.sleep(SLOW_SYNC_S)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)


@pytest.mark.usefixtures("slow_fdatasync")
def test_group_commit_shares_fsyncs_between_threads(path: str) -> None:
    threads, per_thread = 8, 40
    with Log(path, fsync="always") as log:

        def work() -> None:
            for _ in range(per_thread):
                log.append(b"z" * 50)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert log.durable_offset == log.next_offset == threads * per_thread
        # One fsync per append would be 320; while one runs, the other seven threads
        # append and wait, so the next covers about seven.
        assert log.sync_count <= threads * per_thread // 2, log.sync_count


@pytest.mark.usefixtures("slow_fdatasync")
def test_appends_one_after_another_share_no_fsync(path: str) -> None:
    """The control of the test above: with nobody to share with, each append is its own
    fsync, so a count that low there is sharing, not the counter or the slow sync."""
    with Log(path, fsync="always") as log:
        for _ in range(40):
            log.append(b"z" * 50)
        assert log.sync_count == 40


def test_durable_future_and_async_append(path: str) -> None:
    with Log(path, fsync="always") as log:
        first = log.append_batch([b"a"], wait=False)
        log.durable_future(first + 1).result(timeout=5)
        assert log.durable_offset >= 1
        assert log.durable_future(0).done()

        async def produce() -> list[int]:
            return list(await asyncio.gather(
                *(log.append_batch_async([b"%d" % i]) for i in range(50))
            ))

        offsets = asyncio.run(produce())
        assert sorted(offsets) == list(range(1, 51))
        assert log.durable_offset == 51
        assert log.sync_count < 50


def test_wait_durable_times_out_only_when_it_must(path: str) -> None:
    with Log(path, fsync="always") as log:
        log.append(b"a", wait=False)
        log.wait_durable(1, timeout=5)  # it syncs itself: no timeout


# --- raw batches ---------------------------------------------------------------------


def test_raw_batches_copy_a_log_byte_for_byte(tmp_path: Path) -> None:
    source, copy = str(tmp_path / "a"), str(tmp_path / "b")
    with Log(source, fsync="never", segment_bytes_max=4096) as a, Log(
        copy, fsync="never", segment_bytes_max=4096
    ) as b:
        for i in range(200):
            a.append_batch([b"%d" % i] * (1 + i % 4))
        offset = 0
        while offset < a.next_offset:
            offset = b.append_raw(a.read_raw(offset, 1000))
        assert b.next_offset == a.next_offset
    assert segment_files(source) == segment_files(copy)
    for name in segment_files(source):
        assert Path(source, name).read_bytes() == Path(copy, name).read_bytes()


def test_raw_batches_stay_within_max_bytes(tmp_path: Path) -> None:
    """A leader ships read_raw's answer in one frame of a fixed size: the batches must not
    run past max_bytes (the first alone may, if it is larger). The segment's own read
    stops once its batches reach the limit, so the last one used to run past it."""
    batch = 1000
    with Log(str(tmp_path), fsync="never") as log:
        for i in range(20):
            log.append_batch([b"%02d" % i + b"." * (batch - 60)])
        size = len(log.read_raw(0, 1))  # the first batch alone, whatever it costs
        assert format.decode_batch_header(log.read_raw(0, 1)).record_count == 1
        for limit in (size, 2 * size - 1, 2 * size, 4 * size + 1, 7 * size + size // 2):
            raw = log.read_raw(3, limit)
            assert len(raw) == size * (limit // size), limit
        assert len(log.read_raw(0, size * 100)) == size * 20


@pytest.mark.parametrize("damage", ["base", "checksum", "truncated", "magic", "count"])
def test_bad_raw_batches_are_refused(path: str, damage: str) -> None:
    good = bytearray(format.encode_batch([b"abc", b"de"], 1, 5))
    if damage == "base":
        good = bytearray(format.encode_batch([b"abc", b"de"], 7, 5))
    elif damage == "checksum":
        good[-1] ^= 1
    elif damage == "truncated":
        good = good[:-1]
    elif damage == "magic":
        good[0] = ord("X")
    elif damage == "count":
        # A record area that disagrees with its count, under a valid checksum.
        good = bytearray(format.encode_batch([b"abc", b"de"], 1, 5))
        good[format.BATCH_RECORD_COUNT_AT] = 3
        checksum = format.batch_checksum(good).to_bytes(8, "little")
        good[format.BATCH_CHECKSUM_AT : format.BATCH_CHECKSUM_AT + 8] = checksum
    with Log(path, fsync="never") as log:
        log.append(b"first")
        with pytest.raises(InvalidBatchError):
            log.append_raw(bytes(good))
        assert log.next_offset == 1
        assert log.read(0, 10).tolist() == [(0, b"first")]


# --- truncation ----------------------------------------------------------------------


def fill(log: Log, batches: int) -> None:
    for i in range(batches):
        log.append_batch([b"%05d" % i, b"-" * 80])


def test_truncate_before_deletes_whole_segments_only(path: str) -> None:
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        fill(log, 200)
        before = segment_files(path)
        first = log.truncate_before(150)
        assert 0 < first <= 150
        assert log.first_offset == first
        assert len(segment_files(path)) < len(before)
        assert bytes(log.read(150)[0][1]) == b"00075"
        with pytest.raises(OffsetOutOfRangeError):
            log.read(first - 1)
        assert log.truncate_before(0) == first  # never moves backwards
    with Log(path, segment_bytes_max=4096) as log:
        assert log.first_offset == first
        assert not [n for n in os.listdir(path) if n.endswith(".index")
                    and n.replace(".index", ".log") not in os.listdir(path)]


def test_truncate_before_everything_empties_the_log(path: str) -> None:
    with Log(path, fsync="never", segment_bytes_max=1 << 20) as log:
        fill(log, 2 * TRUNCATE_ROLL_BYTES // 100)
        end = log.next_offset
        assert log.truncate_before(end) == end
        assert log.first_offset == log.next_offset == end
        assert log.size_bytes == 0
        assert log.append(b"again") == end
    with Log(path) as log:
        assert log.read(end).tolist() == [(end, b"again")]


def test_truncate_before_keeps_a_small_active_segment(path: str) -> None:
    # Rolling costs two fsyncs, so a little dead data is kept rather than rolled away.
    with Log(path, fsync="never") as log:
        fill(log, 10)
        assert log.truncate_before(log.next_offset) == 0
        assert log.size_bytes < TRUNCATE_ROLL_BYTES


def test_truncate_after_drops_a_suffix(path: str) -> None:
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        fill(log, 100)  # batches of two records: 0-1, 2-3, ...
        assert log.truncate_after(1000) == 200
        assert log.truncate_after(151) == 150  # the batch holding 151 goes whole
        assert log.next_offset == 150
        assert log.append(b"new") == 150
        assert log.truncate_after(60) == 60
        expected = log.read(0, 100).tolist()
        assert len(expected) == 60
        with pytest.raises(OffsetOutOfRangeError):
            log.read(61)
    with Log(path, segment_bytes_max=4096) as log:
        assert log.next_offset == 60
        assert log.read(0, 100).tolist() == expected


def test_truncate_after_below_first_offset_is_refused(path: str) -> None:
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        fill(log, 200)
        first = log.truncate_before(300)
        with pytest.raises(OffsetOutOfRangeError):
            log.truncate_after(first - 1)
        assert log.truncate_after(first) == first
        assert log.next_offset == first


def test_restart_at_empties_the_log_at_an_offset_and_survives_reopen(path: str) -> None:
    with Log(path, fsync="always", segment_bytes_max=4096) as log:
        fill(log, 200)
        assert log.segment_count > 1
        log.restart_at(5000)
        assert (log.first_offset, log.next_offset, log.durable_offset) == (5000, 5000, 5000)
        assert log.size_bytes == 0
        assert segment_files(path) == [format.segment_file_name(5000)]
        with pytest.raises(OffsetOutOfRangeError):
            log.read(4999)
        assert log.append(b"after") == 5000
    with Log(path, segment_bytes_max=4096) as log:
        assert (log.first_offset, log.next_offset) == (5000, 5001)
        assert log.read(5000).tolist() == [(5000, b"after")]
        log.restart_at(7)  # below the old start too: it is a new log
        assert (log.first_offset, log.next_offset) == (7, 7)
    with Log(path, segment_bytes_max=4096) as log:
        assert (log.first_offset, log.next_offset) == (7, 7)


def test_a_crash_part_way_through_restart_at_leaves_a_prefix_that_opens(path: str) -> None:
    with Log(path, fsync="always", segment_bytes_max=4096) as log:
        fill(log, 200)
        whole = log.read(0, 1000).tolist()
    # What restart_at has done when it stops after removing the newest segments.
    for name in segment_files(path)[-2:]:
        os.unlink(os.path.join(path, name))
    with Log(path, segment_bytes_max=4096) as log:
        assert log.first_offset == 0
        assert log.read(0, 1000).tolist() == whole[:log.next_offset]


def test_approx_bytes_is_exact_over_whole_segments(path: str) -> None:
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        fill(log, 300)
        log.flush()
        assert log.approx_bytes(0, log.next_offset) == log.size_bytes
        assert log.approx_bytes(5, 5) == 0
        half = log.approx_bytes(0, log.next_offset // 2)
        assert 0.3 * log.size_bytes < half < 0.7 * log.size_bytes
        assert log.approx_bytes(log.next_offset, log.next_offset + 100) == 0


# --- recovery ------------------------------------------------------------------------


def test_torn_tail_is_cut_and_reported(path: str) -> None:
    with Log(path, fsync="never") as log:
        log.append_batch([b"a", b"b"])
        log.append(b"c")
        good = log.size_bytes
    last = os.path.join(path, segment_files(path)[-1])
    with open(last, "ab") as f:
        f.write(b"\x00" * 10)
    with Log(path) as log:
        assert log.recovery.dropped_bytes == 10
        assert log.recovery.segment == last
        assert log.next_offset == 3
        assert os.path.getsize(last) == good


def test_an_open_after_this_process_closed_the_log_synced_owes_no_fsync(path: str) -> None:
    with Log(path, fsync="never") as log:
        # The first open in a process fsyncs: a crash may have left unsynced bytes.
        assert not log.recovery.fsync_skipped
        log.append(b"a")  # buffered: the close writes it and fsyncs
    with Log(path) as log:
        assert log.recovery.fsync_skipped
        assert log.read(0, 10).tolist() == [(0, b"a")]
        log.append(b"b")
    with Log(path) as log:  # every synced close counts again
        assert log.recovery.fsync_skipped
        assert log.next_offset == 2


def _skipped_after(path: str, change: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Close a log synced, change its active segment as named, reopen: was the fsync
    skipped?"""
    with Log(path, fsync="never") as log:
        log.append_batch([b"x" * 100] * 10)
    active = os.path.join(path, segment_files(path)[-1])
    if change == "replaced":  # the same bytes and times in another file
        shutil.copy2(active, active + ".copy")
        os.replace(active + ".copy", active)
    elif change == "restored":  # deleted, then copied back with its times
        shutil.copy2(active, path + ".saved")
        os.unlink(active)
        shutil.copy2(path + ".saved", active)
    elif change == "touched":
        st = os.stat(active)
        os.utime(active, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "forgotten":  # more logs closed since than the registry keeps
        monkeypatch.setattr(engine_log, "CLOSED_SYNCED_MAX", 1)
        with Log(path + "-other"):
            pass
    with Log(path) as log:
        assert log.next_offset == 10
        return log.recovery.fsync_skipped


@pytest.mark.parametrize("change", ["replaced", "restored", "touched", "forgotten"])
def test_an_open_fsyncs_a_segment_changed_since_this_process_closed_it(
        path: str, change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _skipped_after(path, change, monkeypatch)


@pytest.mark.parametrize("change", ["replaced", "restored", "touched"])
def test_control_a_close_remembered_by_name_and_size_skips_the_fsync_it_owes(
        path: str, change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: with only the segment's name and size in the rule, the test
    above cannot tell a changed segment from the one this process closed."""
    def name_and_size(p: str) -> tuple[str, int, int, int, int, int]:
        return os.path.basename(p), 0, 0, os.stat(p).st_size, 0, 0

    monkeypatch.setattr(engine_log, "_identity", name_and_size)
    assert _skipped_after(path, change, monkeypatch)


def test_a_close_before_a_sealed_segment_is_synced_vouches_for_nothing(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under "never", a sealed segment is fsync'd in the background; a cut can make it
    # the active segment again before that sync has run.
    held: list[Callable[[], object]] = []
    monkeypatch.setattr(engine_log.background, "submit", held.append)
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        while log.segment_count < 2:
            log.append(b"x" * 500)
        assert held
    with Log(path) as log:
        assert not log.recovery.fsync_skipped
    # The control: the same close once the sealed segment's sync has run vouches.
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        while log.segment_count < 3:
            log.append(b"x" * 500)
        for sync in held:
            sync()
    with Log(path) as log:
        assert log.recovery.fsync_skipped


def test_missing_index_is_rebuilt_and_rewritten(path: str) -> None:
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        fill(log, 100)
        expected = log.read(0, 300).tolist()
    index = os.path.join(path, format.segment_file_name(0, format.INDEX_SUFFIX))
    os.unlink(index)
    Path(path, "junk.tmp").write_bytes(b"leftover")
    Path(path, format.segment_file_name(999_999, ".index")).write_bytes(b"orphan")
    with Log(path, segment_bytes_max=4096) as log:
        assert log.recovery.indexes_rebuilt == 1
        assert os.path.exists(index)
        assert log.read(0, 300).tolist() == expected
    assert not Path(path, "junk.tmp").exists()
    assert not Path(path, format.segment_file_name(999_999, ".index")).exists()


# --- lifecycle -----------------------------------------------------------------------


def test_closed_log_refuses_everything(path: str) -> None:
    log = Log(path)
    log.append(b"a")
    log.close()
    log.close()  # idempotent
    assert log.closed
    for call in (lambda: log.append(b"b"), lambda: log.read(0), lambda: log.append_batch([b"c"]),
                 lambda: log.truncate_before(0), lambda: log.flush()):
        with pytest.raises(LogClosedError):
            call()
    assert log.durable_future(5).exception(timeout=1) is not None


def test_release_handles_then_use_again(path: str) -> None:
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        fill(log, 100)
        log.release_handles()
        assert log.read(0, 5).tolist()[0] == (0, b"00000")
        log.append(b"after")
        assert log.read(200).tolist() == [(200, b"after")]


def test_open_descriptors_stay_bounded(path: str) -> None:
    def held() -> int:
        # This log's descriptors only: the process may open or close others meanwhile.
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(path + os.sep):
                    count += 1
        return count

    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        fill(log, 1000)
        for offset in range(0, 2000, 50):
            log.read(offset, 1)
        # Under fsync "never" a rolled segment's fsync runs in the background on a
        # duplicate descriptor, closed when it is done: wait for those.
        assert wait_until(lambda: held() <= 4), held()  # LOCK, active, 2 sealed at most
        log.release_handles()
        assert wait_until(lambda: held() == 1), held()  # LOCK


# --- fail-stop on a real full disk ----------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[str]:
    """A 64 KiB tmpfs, so that writes fail with ENOSPC from the real kernel."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {done.stderr.decode().strip()}")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_failed_write_stops_the_log(tiny_disk: str) -> None:
    log = Log(os.path.join(tiny_disk, "log"), fsync="always")
    acknowledged = 0
    with pytest.raises(LogFailedError) as info:
        for _ in range(1000):
            log.append(b"x" * 1000)
            acknowledged += 1
    assert isinstance(info.value.cause, OSError)
    assert log.failed
    # Fail-stop: later writes are refused outright, even ones that would fit.
    with pytest.raises(LogFailedError):
        log.append(b"y")
    with pytest.raises(LogFailedError):
        log.flush()
    log.close()
    # Reopening recovers what really reached the disk: everything acknowledged.
    with Log(os.path.join(tiny_disk, "log"), fsync="never") as reopened:
        assert not reopened.recovery.fsync_skipped  # its close vouched for nothing
        assert reopened.next_offset >= acknowledged
        assert [bytes(p) for _, p in reopened.read(0, acknowledged)] == [b"x" * 1000] * (
            acknowledged
        )


def test_durable_async_wakes_every_waiter_of_a_loop_once_durable(path: str) -> None:
    with Log(path, fsync="always") as log:

        async def many() -> tuple[int, int]:
            offsets = [log.append(b"m", wait=False) for _ in range(200)]
            await asyncio.gather(*(log.durable_async(o + 1) for o in offsets))
            return log.durable_offset, log.sync_count

        durable, syncs = asyncio.run(many())
        assert durable == 200
        assert syncs < 200  # the waiters shared fsyncs


def test_durable_async_after_close(path: str) -> None:
    log = Log(path, fsync="always")

    async def run() -> None:
        offset = log.append(b"x", wait=False)
        pending = log.durable_async(offset + 1)
        log.close()  # close fsyncs everything: the pending waiter is satisfied, not failed
        await pending
        # Waiting on a closed log for something not yet durable is an error, not a hang.
        with pytest.raises(LogClosedError):
            await log.durable_async(offset + 2)

    asyncio.run(run())


def test_durable_async_already_durable_is_done_at_once(path: str) -> None:
    with Log(path, fsync="always") as log:
        log.append(b"x")

        async def check() -> bool:
            return log.durable_async(1).done()

        assert asyncio.run(check())
