"""Bit flips anywhere in a log's or a queue's files, through the public API.

Each case flips bits of a fresh copy of a pristine log (engine.Log) or data directory
(engine.Broker) at random places: sealed segments, the active segment, sparse indexes and
the queue's snapshot. Whatever happens, three things must hold:

- never a record (or a message body) that was not written;
- never a silent cut of valid data after damage: opening loses records only by the
  torn-tail rule (a bad final batch of the active segment, not covered by a snapshot);
- every refusal is an EngineError naming the damaged file, and a refused open changes no
  byte on disk.

Refused cases are then salvaged (engine.repair), and the salvaged copy must hold every
surviving record at its offset, empty records exactly in the holes it reports, and a
queue whose messages are the ones written less the ones it reports as expired.

`make test` runs LOG_CASES + QUEUE_CASES seeded cases (a few seconds); `make faults` runs
the ones marked ``faults``, FAULT_LOG_CASES + FAULT_QUEUE_CASES more, from other seeds.
The negative controls switch on the old rule (engine.log.LEGACY_CUT_AT_ANY_BAD_BATCH) and
show the same checker reporting a silent cut.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given

from engine import Broker, ManualClock, Queue, format, log, repair
from engine import records as rec
from engine._queue import message_id_of
from engine.errors import (
    CorruptDataError,
    EngineError,
    SalvageRefusedError,
)
from engine.log import Log
from engine.snapshot import decode_snapshot

SEED = 7_300_021
LOG_CASES = 1000
QUEUE_CASES = 100
FAULT_LOG_CASES = 20_000
FAULT_QUEUE_CASES = 2_000
SEGMENT_BYTES = 4096
INDEX_INTERVAL = 512
QUEUE_SEGMENT_BYTES = 2048
NO_MAINTENANCE_MS = 3_600_000
TWELVE_HOURS = 12 * 60 * 60


@dataclasses.dataclass(frozen=True)
class Batch:
    start: int
    end: int
    base: int
    count: int


@dataclasses.dataclass(frozen=True)
class Flip:
    name: str  # a file of the pristine directory, relative to it
    position: int
    bit: int

    def __str__(self) -> str:
        return f"{self.name}@{self.position}.{self.bit}"


def _batches(data: bytes, base: int) -> list[Batch]:
    """Batch boundaries of an intact segment, from the header layout alone."""
    out, pos = [], 0
    while pos < len(data):
        header = format.decode_batch_header(data[pos : pos + format.BATCH_HEADER_BYTES])
        end = pos + format.BATCH_HEADER_BYTES + header.payload_bytes
        out.append(Batch(pos, end, header.base_offset, header.record_count))
        pos = end
    return out


def _files(root: Path) -> dict[str, bytes]:
    """Every segment, index and snapshot file under root, by relative name."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (p.suffix in (format.LOG_SUFFIX, format.INDEX_SUFFIX)
                                or p.name == "snapshot")}


def _restore(pristine: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(pristine, dest, copy_function=shutil.copyfile)


def _damage(dest: Path, flips: list[Flip]) -> dict[str, bytes]:
    for flip in flips:
        path = dest / flip.name
        data = bytearray(path.read_bytes())
        data[flip.position] ^= 1 << flip.bit
        path.write_bytes(data)
    return _files(dest)


def _unchanged_or_appended(before: dict[str, bytes], after: dict[str, bytes]) -> list[str]:
    """Files that a refused operation cut, rewrote or removed (appends are allowed: a
    receive may lease before it finds a body damaged)."""
    return [name for name, data in before.items()
            if name not in after or not after[name].startswith(data)]


def _in_batch(batch: Batch, flips: list[Flip], name: str) -> bool:
    return any(f.name == name and batch.start <= f.position < batch.end for f in flips)


def _pick(rng: random.Random, files: dict[str, bytes], groups: list[list[str]]) -> Flip:
    """A random bit of a random file of a random group (so that small groups, such as
    the active segment or the snapshot, get their share)."""
    name = rng.choice(rng.choice([g for g in groups if g]))
    return Flip(name, rng.randrange(len(files[name])), rng.randrange(8))


# --- engine.Log -----------------------------------------------------------------------


class PristineLog:
    """The log every case copies. A plain class: hypothesis prints a dataclass argument
    field by field, and the records are long."""

    def __init__(self, path: Path, records: list[bytes], files: dict[str, bytes]) -> None:
        self.path = path
        self.records = records
        self.files = files
        segments = [n for n in files if n.endswith(format.LOG_SUFFIX)]
        self.active = segments[-1]
        self.active_batches = _batches(files[self.active], int(Path(self.active).stem))
        indexes = [n for n in files if n.endswith(format.INDEX_SUFFIX)]
        self.groups = [[self.active], segments[:-1], indexes]

    def __repr__(self) -> str:
        return f"<PristineLog {self.path} {len(self.records)} records>"


def _open_log(path: Path) -> Log:
    return Log(path, fsync="never", segment_bytes_max=SEGMENT_BYTES,
               index_interval_bytes=INDEX_INTERVAL)


@pytest.fixture(scope="module")
def pristine_log(tmp_path_factory: pytest.TempPathFactory) -> PristineLog:
    path = tmp_path_factory.mktemp("pristine-log")
    rng = random.Random(SEED)
    records: list[bytes] = []
    with _open_log(path) as opened:
        # Three sealed segments and a well-filled active one: many batches after a flip.
        while True:
            batch = [f"{len(records) + i}:".encode() + rng.randbytes(rng.randrange(60))
                     for i in range(rng.choice([1, 1, 2, 3]))]
            opened.append_batch(batch)
            records += batch
            if opened.segment_count >= 4:
                opened.flush()
                if max(path.glob("*.log")).stat().st_size >= SEGMENT_BYTES * 3 // 4:
                    break
    return PristineLog(path, records, _files(path))


def _read_everything(opened: Log) -> tuple[list[tuple[int, bytes]], list[int]]:
    """Every record, and the offsets whose read raised CorruptSegmentError."""
    got: list[tuple[int, bytes]] = []
    unreadable: list[int] = []
    offset = opened.first_offset
    while offset < opened.next_offset:
        try:
            records = opened.read(offset, 1000)
        except CorruptDataError:
            unreadable.append(offset)
            offset += 1
            continue
        got += records.tolist()
        offset = records.next_offset
    return got, unreadable


def check_log_case(pristine: PristineLog, dest: Path, flips: list[Flip]) -> tuple[str, list[str]]:
    """Damage a copy, open it, read it all, and salvage it if refused.

    Returns the outcome and every rule it broke (an empty list when it broke none).
    """
    _restore(pristine.path, dest)
    before = _damage(dest, flips)
    wrong: list[str] = []
    try:
        opened = _open_log(dest)
    except EngineError as exc:
        if not isinstance(exc, CorruptDataError) or not exc.path.startswith(str(dest)):
            wrong.append(f"refused with {exc!r}, which names no damaged file")
        if changed := _unchanged_or_appended(before, _files(dest)):
            wrong.append(f"a refused open changed {changed}")
        return "refused", wrong + check_log_salvage(pristine, dest, flips)
    except Exception as exc:
        return "crashed", [f"open raised {exc!r}, not an EngineError"]
    with opened:
        try:
            got, unreadable = _read_everything(opened)
        except Exception as exc:
            return "crashed", [f"a read raised {exc!r}, not an EngineError"]
        next_offset = opened.next_offset
    wrong += [f"offset {o} read as a record that was not written"
              for o, payload in got if payload != pristine.records[o]]
    if next_offset != len(pristine.records) and next_offset != _torn_cut(pristine, flips):
        wrong.append(f"silent cut: opened with next_offset {next_offset} of "
                     f"{len(pristine.records)}")
    if unreadable and not any(f.name.endswith(format.LOG_SUFFIX) for f in flips):
        wrong.append(f"offsets {unreadable[:5]} unreadable with no segment damaged")
    return ("torn tail cut" if next_offset < len(pristine.records) else
            "read refused" if unreadable else "intact"), wrong


def _torn_cut(pristine: PristineLog, flips: list[Flip]) -> int | None:
    """Where the torn-tail rule may cut the damaged copy: at the first damaged batch of
    the active segment, if every batch after it is damaged too (nothing valid follows)."""
    damaged = [_in_batch(b, flips, pristine.active) for b in pristine.active_batches]
    if True not in damaged:
        return None
    first = damaged.index(True)
    return pristine.active_batches[first].base if all(damaged[first:]) else None


def _torn_suffix(pristine: PristineLog, flips: list[Flip]) -> int | None:
    """Where a salvaged copy may end: before the run of damaged batches that ends the
    active segment (once the damage before it is repaired, that run is a torn tail)."""
    damaged = [_in_batch(b, flips, pristine.active) for b in pristine.active_batches]
    first = len(damaged)
    while first and damaged[first - 1]:
        first -= 1
    return pristine.active_batches[first].base if first < len(damaged) else None


def check_log_salvage(pristine: PristineLog, dest: Path, flips: list[Flip]) -> list[str]:
    try:
        done = repair.salvage(dest)
    except SalvageRefusedError:
        return []
    holes = [h for s in done.logs for h in s.holes]
    wrong = []
    with _open_log(dest) as opened:
        got, unreadable = _read_everything(opened)
        if unreadable:
            wrong.append(f"salvaged log still unreadable at {unreadable[:5]}")
        for offset, payload in got:
            in_hole = any(first <= offset < end for first, end in holes)
            if payload != (b"" if in_hole else pristine.records[offset]):
                wrong.append(f"salvaged log holds a record that was not written at {offset}")
        if opened.next_offset not in (len(pristine.records), _torn_suffix(pristine, flips)):
            wrong.append(f"salvage cut valid records: next_offset {opened.next_offset}")
    if repair.survey(dest).damage:
        wrong.append("a salvaged log still has damage")
    return wrong


def _log_cases(pristine: PristineLog, seed: int, n: int) -> Iterator[list[Flip]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield [_pick(rng, pristine.files, pristine.groups)]


def _run_log_cases(pristine: PristineLog, dest: Path, seed: int, n: int) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for case, flips in enumerate(_log_cases(pristine, seed, n)):
        outcome, wrong = check_log_case(pristine, dest, flips)
        assert not wrong, f"seed={seed} case={case} flips={[str(f) for f in flips]}: {wrong}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def test_log_bit_flips_never_invent_or_silently_cut_records(
        pristine_log: PristineLog, tmp_path: Path) -> None:
    outcomes = _run_log_cases(pristine_log, tmp_path / "log", SEED + 1, LOG_CASES)
    # Every way a flip can end must have been seen.
    assert set(outcomes) == {"refused", "torn tail cut", "read refused", "intact"}, outcomes


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 30), st.integers(0, 7)),
                min_size=1, max_size=4))
def test_log_several_flips_at_once(pristine_log: PristineLog, tmp_path_factory:
                                   pytest.TempPathFactory, raw: list[tuple[int, int, int]]
                                   ) -> None:
    flips = []
    for group, where, bit in raw:
        names = pristine_log.groups[group]
        name = names[where % len(names)]
        flips.append(Flip(name, where % len(pristine_log.files[name]), bit))
    flips = list(dict.fromkeys(flips))  # the same bit flipped twice is no damage at all
    dest = tmp_path_factory.mktemp("several") / "log"
    outcome, wrong = check_log_case(pristine_log, dest, flips)
    assert not wrong, (outcome, [str(f) for f in flips], wrong)


def test_negative_control_old_rule_cuts_valid_records_silently(
        pristine_log: PristineLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "LEGACY_CUT_AT_ANY_BAD_BATCH", True)
    caught = []
    for flips in _log_cases(pristine_log, SEED + 1, 100):
        _, wrong = check_log_case(pristine_log, tmp_path / "log", flips)
        caught += [w for w in wrong if w.startswith("silent cut")]
    assert caught, "the checker missed the old rule's silent cuts"


@pytest.mark.faults
def test_log_bit_flips_many(pristine_log: PristineLog, tmp_path: Path) -> None:
    outcomes = _run_log_cases(pristine_log, tmp_path / "log", SEED + 2, FAULT_LOG_CASES)
    assert "refused" in outcomes and "torn tail cut" in outcomes, outcomes


# --- engine.Broker and its queues -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PristineQueue:
    path: Path  # the data directory
    now_ms: int
    sent: dict[str, bytes]  # every message ever sent, by id
    live: dict[str, bytes]  # what a drain of the pristine copy receives
    live_torn: dict[str, bytes] | None  # the same with the active segment's final batch cut
    files: dict[str, bytes]
    active: str
    final: Batch
    snapshot_offset: int
    uid: int
    groups: list[list[str]]
    send_offsets: dict[str, int]  # where each live message's SEND record is in the log


def _broker(path: Path, clock: ManualClock) -> Broker:
    return Broker(path, fsync="always", clock=clock, segment_bytes_max=QUEUE_SEGMENT_BYTES,
                  snapshot_bytes=1 << 30, maintenance_interval_ms=NO_MAINTENANCE_MS)


def _drain(queue: Queue) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    while batch := queue.receive(max_messages=10, visibility_timeout=TWELVE_HOURS):
        got.update((m.message_id, m.body) for m in batch)
    return got


def _drain_copy(pristine: Path, dest: Path, now_ms: int, cut: tuple[str, int] | None = None
                ) -> dict[str, bytes]:
    _restore(pristine, dest)
    if cut is not None:
        os.truncate(dest / cut[0], cut[1])
    with _broker(dest, ManualClock(now_ms)) as broker:
        return _drain(broker.get_queue("q"))


def _build_queue(path: Path, scratch: Path, seed: int, after_snapshot: bool) -> PristineQueue:
    """A queue with sent, received and deleted messages, a snapshot part-way, and (when
    after_snapshot) records after it, copied as a crash would leave them."""
    rng = random.Random(seed)
    clock = ManualClock()
    data = scratch / "data"
    sent: dict[str, bytes] = {}
    broker = _broker(data, clock)
    queue = broker.create_queue("q")
    uid = broker.catalog.get("q").uid

    def work(rounds: int) -> None:
        for _ in range(rounds):
            bodies = [b"m%d-" % len(sent) + rng.randbytes(rng.randrange(80))
                      for _ in range(rng.choice([1, 1, 3]))]
            for body, result in zip(bodies, queue.send_batch(bodies), strict=True):
                assert not isinstance(result, EngineError)
                sent[result.message_id] = body
            if rng.random() < 0.4:
                for message in queue.receive(max_messages=3):
                    if rng.random() < 0.6:
                        queue.delete(message.receipt)
            clock.advance(1)

    work(40)
    broker._core_of("q").maybe_snapshot(force=True)
    if after_snapshot:
        work(15)
        shutil.copytree(data, path)  # the broker is open: a crash-consistent copy
        broker.close()
    else:
        broker.close()  # a clean close snapshots at the end of the log
        shutil.copytree(data, path)
    now_ms = clock.now_ms() + 3600 * 1000  # every lease has run out; nothing has expired
    files = _files(path)
    queue_dir = f"queues/{uid:016x}"
    segments = [n for n in files if n.endswith(format.LOG_SUFFIX)]
    active = segments[-1]
    final = _batches(files[active], int(Path(active).stem))[-1]
    _, snapshot_offset = decode_snapshot(files[f"{queue_dir}/snapshot"])
    live = _drain_copy(path, scratch / "drain", now_ms)
    live_torn = (_drain_copy(path, scratch / "drain", now_ms, (active, final.start))
                 if final.base >= snapshot_offset else None)
    indexes = [n for n in files if n.endswith(format.INDEX_SUFFIX)]
    _restore(path, scratch / "read")
    with Log(scratch / "read" / queue_dir / "log", lock=False) as opened:
        send_offsets = {message_id_of(uid, record.seq): offset
                        for offset, payload in opened.iter_records()
                        if isinstance(record := rec.decode(payload), rec.SendMeta)}
    return PristineQueue(path, now_ms, sent, live, live_torn, files, active, final,
                         snapshot_offset, uid,
                         [[active], segments[:-1], [f"{queue_dir}/snapshot"], indexes],
                         send_offsets)


@pytest.fixture(scope="module", params=["clean close", "crash after snapshot"])
def pristine_queue(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                   ) -> PristineQueue:
    after = request.param == "crash after snapshot"
    pristine = _build_queue(tmp_path_factory.mktemp("pristine-queue") / "data",
                            tmp_path_factory.mktemp("scratch"), SEED + 10 + after, after)
    assert len(pristine.groups[1]) >= 2, "the queue needs sealed segments"
    assert (pristine.live_torn is not None) == after
    return pristine


def check_queue_case(pristine: PristineQueue, dest: Path, flips: list[Flip]
                     ) -> tuple[str, list[str]]:
    _restore(pristine.path, dest)
    before = _damage(dest, flips)
    wrong: list[str] = []
    refusal: EngineError | None = None
    try:
        with _broker(dest, ManualClock(pristine.now_ms)) as broker:
            try:
                got = _drain(broker.get_queue("q"))
            except EngineError as exc:
                refusal = exc
            after = _files(dest)  # before a close snapshots and deletes what is dead
    except Exception as exc:
        return "crashed", [f"raised {exc!r}, not an EngineError"]
    if refusal is not None:
        damage = refusal if isinstance(refusal, CorruptDataError) else refusal.__cause__
        if not isinstance(damage, CorruptDataError) or not damage.path.startswith(str(dest)):
            wrong.append(f"refused with {refusal!r}, which names no damaged file")
        if changed := _unchanged_or_appended(before, after):
            wrong.append(f"a refusal cut or rewrote {changed}")
        return "refused", wrong + check_queue_salvage(pristine, dest)
    wrong += [f"message {i} delivered with a body that was not sent"
              for i, body in got.items() if pristine.sent.get(i) != body]
    torn = (pristine.live_torn is not None and _in_batch(pristine.final, flips, pristine.active)
            and not any(f.name == pristine.active and f.position < pristine.final.start
                        for f in flips))
    # An index is derived and rewritten when suspect; a torn tail is cut; nothing else.
    kept = {name: data for name, data in before.items()
            if not name.endswith(format.INDEX_SUFFIX) and not (torn and name == pristine.active)}
    if changed := _unchanged_or_appended(kept, after):
        wrong.append(f"opening cut or rewrote {changed}")
    if got == pristine.live:
        return "intact", wrong
    if torn and got == pristine.live_torn:
        return "torn tail cut", wrong
    lost = len(set(pristine.live) - set(got))
    return "lost", [*wrong, f"silent cut: {lost} messages lost, "
                            f"{len(set(got) - set(pristine.live))} unexpected"]


def check_queue_salvage(pristine: PristineQueue, dest: Path) -> list[str]:
    try:
        done = repair.salvage(dest)
    except SalvageRefusedError:
        return []
    expired = {message_id_of(pristine.uid, seq) for s in done.logs for seq in s.expired}
    # A SEND lost in a hole after the snapshot was never in the state to be expired.
    holes = [h for s in done.logs for h in s.holes]
    expired |= {i for i, offset in pristine.send_offsets.items()
                if any(first <= offset < end for first, end in holes)}
    # Later than the leases the refused drain took before it met the damage.
    with _broker(dest, ManualClock(pristine.now_ms + (TWELVE_HOURS + 60) * 1000)) as broker:
        got = _drain(broker.get_queue("q"))
    wrong = [f"salvaged queue delivered {i} with a body that was not sent"
             for i, body in got.items() if pristine.sent.get(i) != body]
    if missing := set(pristine.live) - set(got) - expired:
        wrong.append(f"salvage lost {len(missing)} messages it does not report expired")
    return wrong


def _queue_cases(pristine: PristineQueue, seed: int, n: int) -> Iterator[list[Flip]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield [_pick(rng, pristine.files, pristine.groups)]


def _run_queue_cases(pristine: PristineQueue, dest: Path, seed: int, n: int
                     ) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for case, flips in enumerate(_queue_cases(pristine, seed, n)):
        outcome, wrong = check_queue_case(pristine, dest, flips)
        assert not wrong, f"seed={seed} case={case} flips={[str(f) for f in flips]}: {wrong}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def test_queue_bit_flips_never_deliver_unsent_or_silently_lose_messages(
        pristine_queue: PristineQueue, tmp_path: Path) -> None:
    outcomes = _run_queue_cases(pristine_queue, tmp_path / "data", SEED + 20, QUEUE_CASES)
    assert "refused" in outcomes and "intact" in outcomes, outcomes


def test_negative_control_old_rule_cuts_queue_logs(
        pristine_queue: PristineQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old rule cut the active segment at its first bad batch. After a crash (records
    # past the snapshot) that loses messages silently; after a clean close (the snapshot
    # at the log's end) the queue refuses to open, but only once its log is already cut.
    monkeypatch.setattr(log, "LEGACY_CUT_AT_ANY_BAD_BATCH", True)
    symptom = "silent cut" if pristine_queue.live_torn is not None else "a refusal cut"
    rng = random.Random(SEED + 21)
    caught = []
    for _ in range(40):
        flip = Flip(pristine_queue.active,
                    rng.randrange(pristine_queue.final.start), rng.randrange(8))
        _, wrong = check_queue_case(pristine_queue, tmp_path / "data", [flip])
        caught += [w for w in wrong if w.startswith(symptom)]
    assert caught, f"the checker missed the old rule's {symptom!r}"


@pytest.mark.faults
def test_queue_bit_flips_many(pristine_queue: PristineQueue, tmp_path: Path) -> None:
    outcomes = _run_queue_cases(pristine_queue, tmp_path / "data", SEED + 22,
                                FAULT_QUEUE_CASES)
    assert "refused" in outcomes, outcomes
