"""Engine log throughput against same-run baselines (records/s in bench/report.py).

Every benchmark sets ``extra_info["records"]``: records handled per measured call. Write
benchmarks run a fixed number of rounds so that engine and baseline write the same volume
(about 100 MB for 1 KiB records), each starting from a synced page cache (conftest.py).
Each engine benchmark sits next to its baseline so that both see the same machine state.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
from queuelib import FifoDiskQueue

from bench.baselines import FramedWriter, framed_read, raw_durable_write
from engine import Log

SIZES = [100, 1024]
BATCH = 100
# Rounds per write benchmark: 100 records a round, so 1,000 rounds of 1 KiB is ~100 MB.
WRITE_ROUNDS = 1000
DURABLE_ROUNDS = 400


def payloads(size: int, n: int) -> list[bytes]:
    return [(b"%08d" % i).ljust(size, b".") for i in range(n)]


def measure_writes(benchmark, fn, *args) -> None:
    benchmark.extra_info["records"] = BATCH
    benchmark.pedantic(fn, args=args, rounds=WRITE_ROUNDS, warmup_rounds=50)


# --- buffered appends ----------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_append_batch_never(benchmark, scratch: str, size: int) -> None:
    """Log.append_batch of 100 records, fsync="never" (buffered, like the baseline)."""
    with Log(os.path.join(scratch, "log"), fsync="never") as log:
        measure_writes(benchmark, log.append_batch, payloads(size, BATCH))


@pytest.mark.parametrize("size", SIZES)
def test_baseline_framed_writer(benchmark, scratch: str, size: int) -> None:
    """Baseline: struct header + buffered write per record, 100 records per call."""
    writer = FramedWriter(os.path.join(scratch, "plain"))
    measure_writes(benchmark, writer.append_batch, payloads(size, BATCH))
    writer.close()


@pytest.mark.parametrize("size", SIZES)
def test_baseline_queuelib_push(benchmark, scratch: str, size: int) -> None:
    """Peer: queuelib FifoDiskQueue.push, 100 records per call."""
    queue = FifoDiskQueue(os.path.join(scratch, "queuelib"))
    push = queue.push

    def run(records: list[bytes]) -> None:
        for record in records:
            push(record)

    measure_writes(benchmark, run, payloads(size, BATCH))
    queue.close()


@pytest.mark.parametrize("size", SIZES)
def test_append_one_never(benchmark, scratch: str, size: int) -> None:
    """Log.append of one record per call, fsync="never"; 100 calls per measurement."""
    with Log(os.path.join(scratch, "log"), fsync="never") as log:
        append = log.append

        def run(records: list[bytes]) -> None:
            for record in records:
                append(record)

        measure_writes(benchmark, run, payloads(size, BATCH))


# --- durable appends -----------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_append_batch_always(benchmark, scratch: str, size: int) -> None:
    """Log.append_batch of 100 records, fsync="always": returns after fdatasync."""
    with Log(os.path.join(scratch, "log"), fsync="always") as log:
        benchmark.extra_info["records"] = BATCH
        benchmark.pedantic(log.append_batch, args=(payloads(size, BATCH),),
                           rounds=DURABLE_ROUNDS, warmup_rounds=20)


@pytest.mark.parametrize("size", SIZES)
def test_baseline_write_fdatasync(benchmark, scratch: str, size: int) -> None:
    """Baseline: one os.write of the same 100 records' bytes, then fdatasync."""
    chunk = b"".join(payloads(size, BATCH))
    fd = os.open(os.path.join(scratch, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    benchmark.extra_info["records"] = BATCH
    benchmark.pedantic(raw_durable_write, args=(fd, chunk), rounds=DURABLE_ROUNDS,
                       warmup_rounds=20)
    os.close(fd)


@pytest.mark.parametrize("size", SIZES)
def test_always_interleaved_with_raw(benchmark, scratch: str, size: int) -> None:
    """Log.append_batch (fsync="always") and a raw write+fdatasync, alternating.

    fsync latency drifts by tens of percent over seconds on a shared disk, so separate
    benchmarks run a minute apart can disagree about the ratio by more than the engine's
    own overhead. Alternating the two calls gives both the same conditions. The timed
    function is the pair; extra_info holds each side's mean.
    """
    records = payloads(size, BATCH)
    chunk = b"".join(records)
    fd = os.open(os.path.join(scratch, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    engine_s: list[float] = []
    raw_s: list[float] = []
    with Log(os.path.join(scratch, "log"), fsync="always") as log:

        def pair() -> None:
            started = time.perf_counter()
            log.append_batch(records)
            middle = time.perf_counter()
            raw_durable_write(fd, chunk)
            raw_s.append(time.perf_counter() - middle)
            engine_s.append(middle - started)

        benchmark.pedantic(pair, rounds=DURABLE_ROUNDS, warmup_rounds=20)
    os.close(fd)
    benchmark.extra_info["records"] = BATCH
    benchmark.extra_info["engine_mean_s"] = statistics.fmean(engine_s[20:])
    benchmark.extra_info["raw_mean_s"] = statistics.fmean(raw_s[20:])


# --- reads ---------------------------------------------------------------------------

READ_RECORDS = 100_000


def filled_log(path: str, size: int) -> Log:
    log = Log(path, fsync="never")
    for _ in range(READ_RECORDS // BATCH):
        log.append_batch(payloads(size, BATCH))
    return log


@pytest.mark.parametrize("size", SIZES)
def test_read_view(benchmark, scratch: str, size: int) -> None:
    """Log.read of 100 records per call (the Records view, payloads not touched)."""
    with filled_log(os.path.join(scratch, "log"), size) as log:
        state = {"offset": 0}

        def run() -> None:
            records = log.read(state["offset"], BATCH)
            state["offset"] = records.next_offset % READ_RECORDS

        benchmark.extra_info["records"] = BATCH
        benchmark(run)


@pytest.mark.parametrize("size", SIZES)
def test_read_iterate(benchmark, scratch: str, size: int) -> None:
    """Log.read of 100 records per call, then a memoryview of every payload."""
    with filled_log(os.path.join(scratch, "log"), size) as log:
        state = {"offset": 0}

        def run() -> int:
            records = log.read(state["offset"], BATCH)
            state["offset"] = records.next_offset % READ_RECORDS
            total = 0
            for _, payload in records:
                total += len(payload)
            return total

        benchmark.extra_info["records"] = BATCH
        benchmark(run)


@pytest.mark.parametrize("size", SIZES)
def test_baseline_framed_read(benchmark, scratch: str, size: int) -> None:
    """Baseline: pread a framed file and slice 100 records per call, touching each."""
    path = os.path.join(scratch, "plain")
    writer = FramedWriter(path)
    for _ in range(READ_RECORDS // BATCH):
        writer.append_batch(payloads(size, BATCH))
    writer.close()
    state = {"pos": 0}
    fd = os.open(path, os.O_RDONLY)
    chunk = (8 + 4 + size) * BATCH
    end = os.fstat(fd).st_size

    def run() -> int:
        # pread, as a log reading by position must; then decode and touch every record.
        data = os.pread(fd, chunk, state["pos"])
        _, records = framed_read(data, 0, BATCH)
        state["pos"] = (state["pos"] + chunk) % end
        return sum(len(r) for r in records)

    benchmark.extra_info["records"] = BATCH
    benchmark(run)
    os.close(fd)


@pytest.mark.parametrize("size", SIZES)
def test_baseline_queuelib_pop(benchmark, scratch: str, size: int) -> None:
    """Peer: queuelib FifoDiskQueue.pop, 100 records per call (refilled when empty)."""
    queue = FifoDiskQueue(os.path.join(scratch, "queuelib"))
    records = payloads(size, BATCH)
    for _ in range(READ_RECORDS // BATCH):
        for record in records:
            queue.push(record)
    pop = queue.pop

    def run() -> None:
        if len(queue) < BATCH:
            for record in records:
                queue.push(record)
        for _ in range(BATCH):
            pop()

    benchmark.extra_info["records"] = BATCH
    benchmark(run)
    queue.close()
