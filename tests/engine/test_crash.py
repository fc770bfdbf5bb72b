"""SIGKILL a writer at random moments: whatever an append acknowledged must survive.

A child process (crash_child.py) appends with fsync="always" and prints each range only
after the append call returned. The parent kills it at a random moment, reopens the same
directory (running crash recovery) and checks every acknowledged record, then lets the
next child carry on from there. Payloads are derived from a key stored in the record, so
every surviving record can be checked, acknowledged or not.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from engine.log import Log
from tests.engine.crash_child import key_of, payload

SEED = 7031
CHILD = Path(__file__).with_name("crash_child.py")
ROOT = Path(__file__).resolve().parents[2]
# Generous: only an engine that hangs on open would get near it.
START_TIMEOUT_S = 30.0
# Kill rounds of the single-threaded writer: `make test` runs the first half of the seeded
# schedule, `make faults` all of it.
ROUNDS = 12
ROUNDS_LONG = 24


@dataclasses.dataclass(frozen=True)
class Ack:
    first: int
    end: int
    tag: str
    n0: int

    def expected(self) -> list[tuple[int, bytes]]:
        return [(self.first + i, payload(f"{self.tag}.{self.n0 + i}"))
                for i in range(self.end - self.first)]


@dataclasses.dataclass(frozen=True)
class Round:
    opened_at: int
    acks: list[Ack]
    stdout: bytes


def _read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from an unbuffered pipe, read bytewise so nothing after it is consumed."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([stream], [], [], remaining)
        if ready:
            byte = os.read(stream.fileno(), 1)
            if not byte:
                break
            line += byte
    return line


def _crash_child(path: Path, segment_bytes_max: int, seed: int, threads: int,
                 delay: float) -> Round:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, str(CHILD), str(path), str(segment_bytes_max), str(seed),
            str(threads)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                          env=env) as proc:
        assert proc.stdout is not None
        first_line = _read_line(proc.stdout, START_TIMEOUT_S)
        # The clock starts once the log is open, so the kill lands among the appends.
        if first_line.endswith(b"\n"):
            time.sleep(delay)
        proc.kill()
        rest, err = proc.communicate(timeout=60)
    out = first_line + rest
    assert proc.returncode == -signal.SIGKILL, (
        f"child exited with {proc.returncode} before it was killed:\n{err.decode()}")
    assert first_line.startswith(b"open "), f"child never opened the log:\n{err.decode()}"
    # The kill may have cut the last line short: only whole lines were acknowledged.
    lines = out.split(b"\n")[:-1]
    acks = []
    for line in lines[1:]:
        first, end, tag, n0 = line.decode().split()
        acks.append(Ack(int(first), int(end), tag, int(n0)))
    return Round(int(lines[0].split()[1]), acks, out)


def _check_log(log: Log, acks: list[Ack], context: str) -> None:
    stored = []
    offset = log.first_offset
    while offset < log.next_offset:
        records = log.read(offset, 10_000, 4 << 20)
        assert len(records) > 0, context
        stored.extend(records.tolist())
        offset = records.next_offset
    assert [o for o, _ in stored] == list(range(log.next_offset)), context
    for offset, record in stored:
        # Acknowledged or not, a record that survived must be one the child wrote whole.
        assert record == payload(key_of(record)), f"{context} offset={offset}"
    for ack in acks:
        assert ack.end <= log.next_offset, f"{context} lost {ack}"
        assert stored[ack.first : ack.end] == ack.expected(), f"{context} {ack}"
    assert log.verify() == log.next_offset, context


def _segments(path: Path) -> int:
    return sum(1 for p in path.iterdir() if p.suffix == ".log")


def test_acknowledged_appends_survive_sigkill(tmp_path: Path) -> None:
    _appends_survive_sigkill(tmp_path, ROUNDS)


@pytest.mark.faults
def test_acknowledged_appends_survive_many_sigkills(tmp_path: Path) -> None:
    _appends_survive_sigkill(tmp_path, ROUNDS_LONG)


def _appends_survive_sigkill(tmp_path: Path, rounds: int) -> None:
    rng = random.Random(SEED)
    path = tmp_path / "log"
    acks: list[Ack] = []
    acked_end = 0
    recovered_next = 0
    rolled = 0
    for round_no in range(rounds):
        segment_bytes_max = rng.choice([4096, 4096, 16384, 1 << 20])
        delay = rng.uniform(0.05, 0.4)
        child_seed = rng.randrange(1 << 32)
        context = (f"seed={SEED} round={round_no} segment_bytes_max={segment_bytes_max} "
                   f"delay={delay:.3f}")
        segments_before = _segments(path) if path.exists() else 0
        result = _crash_child(path, segment_bytes_max, child_seed, 1, delay)
        context += f" child stdout tail={result.stdout[-200:]!r}"

        # The child must find exactly what the last recovery left: nothing acknowledged
        # is lost and no offset is handed out twice.
        assert result.opened_at == recovered_next, context
        assert result.opened_at >= acked_end, context
        expected_first = result.opened_at
        for ack in result.acks:
            assert (ack.first, ack.tag, ack.n0) == (expected_first, "o", ack.first), context
            assert ack.end > ack.first, context
            expected_first = ack.end
        acks.extend(result.acks)
        if result.acks:
            acked_end = result.acks[-1].end

        with Log(path, fsync="always", segment_bytes_max=segment_bytes_max) as log:
            assert log.next_offset >= acked_end, context
            _check_log(log, acks, context)
            recovered_next = log.next_offset
        rolled += _segments(path) > segments_before

    # Guard against a test that passes because nothing happened (kept loose for slow disks).
    # (100 appends and 3 rolls over the whole schedule.)
    assert len(acks) >= 100 * rounds // ROUNDS_LONG, f"only {len(acks)} appends acknowledged"
    assert rolled >= 3 * rounds // ROUNDS_LONG, f"segments rolled in only {rolled} rounds"


def test_acknowledged_appends_from_many_threads_survive_sigkill(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    path = tmp_path / "log"
    acks: list[Ack] = []
    acked_end = 0
    recovered_next = 0
    for round_no in range(10):
        segment_bytes_max = rng.choice([4096, 8192, 65536])
        delay = rng.uniform(0.05, 0.4)
        child_seed = rng.randrange(1 << 32)
        context = (f"seed={SEED + 1} round={round_no} segment_bytes_max={segment_bytes_max} "
                   f"delay={delay:.3f}")
        result = _crash_child(path, segment_bytes_max, child_seed, 4, delay)

        assert result.opened_at == recovered_next, context
        assert result.opened_at >= acked_end, context
        ranges = sorted((a.first, a.end) for a in result.acks)
        for (_, end), (first, _) in itertools.pairwise(ranges):
            assert end <= first, f"{context} overlapping acknowledgements"
        assert all(first >= result.opened_at for first, _ in ranges), context
        acks.extend(result.acks)
        if ranges:
            acked_end = max(end for _, end in ranges)

        with Log(path, fsync="always", segment_bytes_max=segment_bytes_max) as log:
            assert log.next_offset >= acked_end, context
            _check_log(log, acks, context)
            recovered_next = log.next_offset

    assert len(acks) >= 50, f"only {len(acks)} appends acknowledged"
