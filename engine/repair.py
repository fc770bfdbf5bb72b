"""Damage in a log, a queue or a data directory: finding it, and salvaging what is left.

Opening a log never repairs damage. It cuts a torn tail (a write that never finished) and
refuses anything else with CorruptSegmentError or CorruptSnapshotError, leaving the files as
they are. What to do then is an operator's decision, made with the two functions here
(``conveyor log verify`` and ``conveyor log salvage``):

- :func:`survey` reads every segment, sealed index and snapshot under a path and lists
  every damaged range (file, bytes, offsets lost, reason). It changes nothing.
- :func:`salvage` rewrites each damaged segment from its valid batches, putting a *hole*
  (batches of empty records, one per lost offset) where records were lost, so that every
  surviving record keeps its offset and a queue's snapshot still points at the right
  records. The originals go to ``quarantine/<time>/`` (linked there before the rewritten
  file replaces them by rename): nothing is ever deleted. Messages of a queue whose SEND
  record fell in a hole are expired, since their bodies are gone.

A cluster follower's copy is its leader's log, so its damage needs no operator:
:func:`set_aside_replica` keeps the records before the first damage, moves the rest to a
quarantine the same way, and the leader sends the rest again (replication.node).

Survey and salvage take the lock the writer takes (the log's ``LOCK``, or a queue's data
directory's), so neither runs on a log that a process holds open; set_aside_replica runs
inside the node that holds it. docs/OPERATIONS.md ("Damage and repair") is the operator's
guide; docs/FORMAT.md ("Torn tail or damage") draws the rule that tells damage from a torn
write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import itertools
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, Literal

from engine import files, format
from engine import records as rec
from engine._segment import Segment
from engine.broker import lock_directory as _lock_data_dir
from engine.catalog import Catalog
from engine.errors import CorruptSnapshotError, EngineError, SalvageRefusedError
from engine.files import fsync_dir, make_dirs
from engine.log import Log, _index_path, _lock_directory, segment_bases
from engine.queue import QUEUE_SEGMENT_BYTES, SNAPSHOT_FILE, read_snapshot, replay

Progress = Callable[[int, int], None]
"""Told (bytes done, bytes in all) as work goes on; the total may grow once."""

QUARANTINE_DIR = "quarantine"
REPORT_FILE = "report.json"
# Holes are written as batches of at most this many empty records (4 bytes each), and
# never larger than the largest batch the segment already held, which its log accepted.
HOLE_RECORDS_PER_BATCH_MAX = 65536
# An EXPIRE record names at most this many messages (its count is a u16).
EXPIRE_SEQS_MAX = 0xFFFF
# Progress is reported about this often, in bytes.
PROGRESS_STEP_BYTES = 1 << 20
# A survey reads with the loosest limits any log may have: a batch's checksum, not a
# configured limit, tells what the log wrote from damage.
_PROBE_LIMIT = format.SEGMENT_BYTES_MAX_CAP
_CATALOG_FILE = "catalog.sqlite3"
_QUEUES_DIR = "queues"
_LOG_DIR = "log"


# --- what a survey finds -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Damage:
    """One damaged range of one file.

    Records at offsets ``first_offset .. next_offset - 1`` are lost (None for a snapshot,
    which holds no records); bytes ``start .. end - 1`` of the file are bad.
    """

    path: str
    start: int
    end: int
    first_offset: int | None
    next_offset: int | None
    reason: str

    def describe(self) -> str:
        if self.first_offset is None or self.next_offset is None:
            return f"corrupt snapshot {self.path}: {self.reason}"
        lost = self.next_offset - self.first_offset
        records = ("no record lost" if not lost else f"record {self.first_offset} lost"
                   if lost == 1 else f"records {self.first_offset}..{self.next_offset - 1} lost")
        return (f"corrupt segment {self.path} bytes {self.start}..{self.end} "
                f"({records}): {self.reason}")


@dataclasses.dataclass(frozen=True)
class Run:
    """Consecutive bytes of a segment: valid batches (reason None) or a damaged range."""

    start: int
    end: int
    first_offset: int
    next_offset: int
    reason: str | None


@dataclasses.dataclass
class SegmentSurvey:
    path: str
    base_offset: int
    size: int
    runs: list[Run]
    end_offset: int
    """Offset after its last record once salvaged (holes included; a torn tail is not)."""
    damaged: bool = False


@dataclasses.dataclass
class LogSurvey:
    """One log: a plain log directory, or a queue's log with its snapshot."""

    log_dir: str
    queue_dir: str | None = None
    queue_name: str | None = None
    segments: list[SegmentSurvey] = dataclasses.field(default_factory=list)
    damage: list[Damage] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    records: int = 0
    snapshot_offset: int | None = None
    snapshot_damaged: bool = False
    refusal: str | None = None
    """Why a salvage could not leave this log usable, if it could not."""

    @property
    def label(self) -> str:
        if self.queue_dir is None:
            return self.log_dir
        name = f"queue {self.queue_name!r}" if self.queue_name else "queue"
        return f"{name} ({self.queue_dir})"

    def to_json(self) -> dict[str, Any]:
        return {
            "log": self.log_dir, "queue_dir": self.queue_dir, "queue": self.queue_name,
            "records": self.records, "segments": len(self.segments),
            "snapshot_offset": self.snapshot_offset,
            "damage": [dataclasses.asdict(d) | {"text": d.describe()} for d in self.damage],
            "notes": self.notes, "salvage_refused": self.refusal,
        }


@dataclasses.dataclass
class Survey:
    path: str
    kind: Literal["log", "queue", "data"]
    logs: list[LogSurvey]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def damage(self) -> list[Damage]:
        return [d for log in self.logs for d in log.damage]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "damaged": bool(self.damage),
                "logs": [log.to_json() for log in self.logs], "notes": self.notes}


@dataclasses.dataclass
class LogSalvage:
    """What a salvage did to one log."""

    log: LogSurvey
    quarantine: str
    rewritten: list[str]
    holes: list[tuple[int, int]]
    """Offset ranges ``[first, next)`` that now hold empty records in place of lost ones."""
    expired: list[int]
    """Seqs of queue messages expired because their SEND record was lost."""
    snapshot_quarantined: bool

    def to_json(self) -> dict[str, Any]:
        return {"log": self.log.log_dir, "queue_dir": self.log.queue_dir,
                "queue": self.log.queue_name, "quarantine": self.quarantine,
                "rewritten": self.rewritten, "holes": self.holes,
                "expired_messages": len(self.expired),
                "snapshot_quarantined": self.snapshot_quarantined,
                "damage": [d.describe() for d in self.log.damage]}


@dataclasses.dataclass
class Salvage:
    survey: Survey
    logs: list[LogSalvage]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.survey.path, "salvaged": [s.to_json() for s in self.logs],
                "survey": self.survey.to_json()}


# --- entry points ---------------------------------------------------------------------------


def survey(path: str | os.PathLike[str], progress: Progress | None = None) -> Survey:
    """Every damaged range under path: a log directory, a queue directory or a data
    directory. Reads everything and changes nothing.

    Raises LogLockedError or DataDirectoryLockedError if a process holds it open.
    """
    target = _Target.of(os.fspath(path))
    with target.locked():
        return _survey(target, _Meter(progress))


def salvage(path: str | os.PathLike[str], progress: Progress | None = None) -> Salvage:
    """Repair every damaged log under path as the module docstring says; return what
    was done. A path without damage is left as it is.

    Raises SalvageRefusedError, having changed nothing, if some log cannot be left
    usable; LogLockedError or DataDirectoryLockedError if a process holds it open.
    """
    target = _Target.of(os.fspath(path))
    meter = _Meter(progress)
    with target.locked():
        found = _survey(target, meter)
        damaged = [log for log in found.logs if log.damage]
        for log in damaged:
            if log.refusal is not None:
                raise SalvageRefusedError(log.queue_dir or log.log_dir, log.refusal)
        meter.grow(sum(s.size for log in damaged for s in log.segments if s.damaged))
        return Salvage(found, [_salvage_log(log, meter) for log in damaged])


# --- what a path is -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Target:
    """A path resolved: its kind, and the directory whose lock its writer holds."""

    path: str
    kind: Literal["log", "queue", "data"]
    lock_dir: str

    @classmethod
    def of(cls, path: str) -> _Target:
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        if (os.path.isdir(os.path.join(path, _QUEUES_DIR))
                and os.path.isfile(os.path.join(path, _CATALOG_FILE))):
            return cls(path, "data", path)
        if os.path.basename(os.path.dirname(path)) == _QUEUES_DIR and os.path.isdir(
                os.path.join(path, _LOG_DIR)):
            return cls(path, "queue", os.path.dirname(os.path.dirname(path)))
        queue_dir = os.path.dirname(path)
        if (os.path.basename(path) == _LOG_DIR
                and os.path.basename(os.path.dirname(queue_dir)) == _QUEUES_DIR):
            # A queue's log named directly: its snapshot belongs to the survey too.
            return cls(queue_dir, "queue", os.path.dirname(os.path.dirname(queue_dir)))
        return cls(path, "log", path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        # A queue's log has no lock of its own: its broker locks the data directory.
        fd = (_lock_directory(self.lock_dir) if self.kind == "log"
              else _lock_data_dir(self.lock_dir))
        try:
            yield
        finally:
            os.close(fd)

    def logs(self, notes: list[str]) -> list[tuple[str, str | None, str | None]]:
        """(log directory, queue directory, queue name) of every log it holds."""
        if self.kind == "log":
            return [(self.path, None, None)]
        names = _queue_names(self.lock_dir)
        if self.kind == "queue":
            return [(os.path.join(self.path, _LOG_DIR), self.path,
                     names.get(os.path.basename(self.path)))]
        root = os.path.join(self.path, _QUEUES_DIR)
        found: list[tuple[str, str | None, str | None]] = []
        for entry in sorted(os.listdir(root)):
            directory = os.path.join(root, entry)
            if entry not in names:
                notes.append(f"{directory}: no queue in the catalog owns it (the remains of "
                             "an interrupted create or delete, or a queue whose entry was "
                             "lost: moved to orphaned/ when the broker opens); not checked")
            elif os.path.isdir(os.path.join(directory, _LOG_DIR)):
                found.append((os.path.join(directory, _LOG_DIR), directory, names[entry]))
        return found


def _queue_names(data_dir: str) -> dict[str, str]:
    """Queue names by directory name (the uid in 16 hex digits), from the catalog."""
    path = os.path.join(data_dir, _CATALOG_FILE)
    if not os.path.isfile(path):
        return {}
    catalog = Catalog(path)
    try:
        return {f"{e.uid:016x}": e.name for e in catalog.entries()}
    finally:
        catalog.close()


# --- surveying ------------------------------------------------------------------------------


class _Meter:
    """Progress in bytes, reported every PROGRESS_STEP_BYTES."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self.done = 0
        self.total = 0
        self._told = 0

    def grow(self, n: int) -> None:
        self.total += n
        self._tell()

    def add(self, n: int) -> None:
        self.done += n
        if self.done - self._told >= PROGRESS_STEP_BYTES or self.done >= self.total:
            self._tell()

    def _tell(self) -> None:
        self._told = self.done
        if self._progress is not None:
            self._progress(self.done, self.total)


def _survey(target: _Target, meter: _Meter) -> Survey:
    notes: list[str] = []
    logs = target.logs(notes)
    meter.grow(sum(_segments_bytes(log_dir) for log_dir, _, _ in logs))
    found = Survey(target.path, target.kind, [], notes)
    for log_dir, queue_dir, name in logs:
        found.logs.append(_survey_log(LogSurvey(log_dir, queue_dir, name), meter))
    return found


def _segments_bytes(log_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(log_dir, format.segment_file_name(base)))
               for base in segment_bases(log_dir))


def _probe(path: str, base: int) -> Segment:
    return Segment(path, base, writable=False, record_bytes_max=_PROBE_LIMIT,
                   batch_bytes_max=_PROBE_LIMIT, segment_bytes_max=_PROBE_LIMIT,
                   index_interval_bytes=format.INDEX_INTERVAL_BYTES, flush_bytes=0)


def _survey_log(found: LogSurvey, meter: _Meter) -> LogSurvey:
    floor = _survey_snapshot(found) if found.queue_dir is not None else 0
    bases = segment_bases(found.log_dir)
    for base, next_base in itertools.pairwise([*bases, None]):
        assert base is not None
        found.segments.append(_survey_segment(found, base, next_base, floor))
        meter.add(found.segments[-1].size)
    if found.queue_dir is not None:
        _check_queue_log(found, bases)
    return found


def _survey_snapshot(found: LogSurvey) -> int:
    """Check a queue's snapshot; return the offset below which records were durable."""
    assert found.queue_dir is not None
    path = os.path.join(found.queue_dir, SNAPSHOT_FILE)
    try:
        snapshot = read_snapshot(found.queue_dir)
    except CorruptSnapshotError as exc:
        found.snapshot_damaged = True
        found.damage.append(Damage(path, exc.position, os.path.getsize(path), None, None,
                                   exc.reason))
        return 0
    if snapshot is None:
        return 0
    found.snapshot_offset = snapshot[1]
    return snapshot[1]


def _survey_segment(found: LogSurvey, base: int, next_base: int | None,
                    floor: int) -> SegmentSurvey:
    path = os.path.join(found.log_dir, format.segment_file_name(base))
    probe = _probe(path, base)
    try:
        runs = [Run(*run) for run in probe.survey()]
    finally:
        probe.close()
    segment = SegmentSurvey(path, base, os.path.getsize(path), runs, base)
    for run in runs:
        if run.reason is None:
            found.records += run.next_offset - run.first_offset
            segment.end_offset = run.next_offset
            continue
        # Nothing valid after it in this file: in the last segment, and not among the
        # records a snapshot shows were durable, that is a torn tail, not damage.
        tail = run.end == segment.size and run.next_offset == run.first_offset
        if tail and next_base is None and run.first_offset >= floor:
            found.notes.append(
                f"{path}: torn tail of {run.end - run.start} bytes from byte {run.start} "
                f"({run.reason}): a write that never finished, cut when the log is next "
                "opened")
            continue
        lost_to = run.next_offset
        reason = run.reason
        if tail:
            lost_to = max(run.first_offset, floor if next_base is None else next_base)
            if next_base is None:
                reason += (f", and the snapshot shows records below offset {floor} were "
                           "made durable")
        found.damage.append(Damage(path, run.start, run.end, run.first_offset, lost_to,
                                   reason))
        segment.damaged = True
        segment.end_offset = lost_to
    if next_base is not None:
        _check_seam(found, segment, next_base)
    return segment


def _check_seam(found: LogSurvey, segment: SegmentSurvey, next_base: int) -> None:
    """A sealed segment must end exactly where the next one begins."""
    end = segment.end_offset
    if end < next_base:
        found.damage.append(Damage(
            segment.path, segment.size, segment.size, end, next_base,
            f"the segment ends at offset {end} but the next one starts at {next_base}"))
        segment.damaged = True
        segment.end_offset = next_base
    elif end > next_base:
        found.damage.append(Damage(
            segment.path, segment.size, segment.size, next_base, next_base,
            f"the segment holds offsets up to {end}, past the start of the next one "
            f"({next_base})"))
        found.refusal = (f"{segment.path} overlaps the next segment: which copy of offsets "
                         f"{next_base}..{end - 1} is right is not something to guess")
    elif not segment.damaged:
        _check_index(found, segment, next_base)


def _check_index(found: LogSurvey, segment: SegmentSurvey, next_base: int) -> None:
    index = _index_path(segment.path)
    try:
        with open(index, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        found.notes.append(f"{index}: missing; rebuilt from the segment at the next open")
        return
    probe = _probe(segment.path, segment.base_offset)
    try:
        if not probe.load_index(data, next_base):
            found.notes.append(f"{index}: does not describe its segment; rebuilt from the "
                               "segment at the next open")
    finally:
        probe.close()


def _check_queue_log(found: LogSurvey, bases: list[int]) -> None:
    if not bases:
        found.refusal = "the queue's log has no segment at all"
        return
    last = found.segments[-1]
    if found.snapshot_offset is not None and last.end_offset < found.snapshot_offset:
        found.damage.append(Damage(
            last.path, last.size, last.size, last.end_offset, found.snapshot_offset,
            f"the log ends at offset {last.end_offset}, before its snapshot's "
            f"{found.snapshot_offset}: records the snapshot counts on are missing"))
        last.damaged = True
        last.end_offset = found.snapshot_offset
    if found.snapshot_damaged and bases[0] > 0:
        found.refusal = (
            f"its snapshot is damaged and the log no longer starts at offset 0 (records "
            f"below {bases[0]} were deleted once a snapshot held their effect), so the "
            "queue's state cannot be rebuilt: restore the queue directory from a backup")


# --- salvaging ------------------------------------------------------------------------------


def _salvage_log(found: LogSurvey, meter: _Meter) -> LogSalvage:
    root = found.queue_dir or found.log_dir
    quarantine = _new_quarantine(root)
    segments_to = (os.path.join(quarantine, _LOG_DIR) if found.queue_dir is not None
                   else quarantine)
    os.makedirs(segments_to, exist_ok=True)
    fsync_dir(os.path.dirname(quarantine))
    holes: list[tuple[int, int]] = []
    rewritten = []
    for segment in found.segments:
        if segment.damaged:
            holes += _rewrite(found.log_dir, segment, segments_to, meter)
            rewritten.append(segment.path)
    snapshot_quarantined = False
    if found.snapshot_damaged:
        assert found.queue_dir is not None
        os.rename(os.path.join(found.queue_dir, SNAPSHOT_FILE),
                  os.path.join(quarantine, SNAPSHOT_FILE))
        fsync_dir(quarantine)
        fsync_dir(found.queue_dir)
        snapshot_quarantined = True
    expired = _expire_lost(found, holes) if found.queue_dir is not None else []
    done = LogSalvage(found, quarantine, rewritten, holes, expired, snapshot_quarantined)
    _write_report(quarantine, done)
    return done


def _new_quarantine(root: str) -> str:
    """A new ``quarantine/<time>/`` under root, its directory entries durable: what is
    moved into it must not vanish with them at a power cut."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    parent = os.path.join(root, QUARANTINE_DIR)
    if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
        fsync_dir(root)
    for n in itertools.count(1):
        path = os.path.join(parent, stamp if n == 1 else f"{stamp}-{n}")
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
            fsync_dir(parent)
            return path
    raise AssertionError("unreachable")


def _rewrite(log_dir: str, segment: SegmentSurvey, quarantine: str,
             meter: _Meter) -> list[tuple[int, int]]:
    """Replace a damaged segment by its valid batches and holes; return the holes.

    The original is linked into the quarantine before the new file replaces it by
    rename, so at every moment one complete version is in place and both are kept.
    """
    tmp = segment.path + ".salvage.tmp"  # a leftover .tmp is removed when the log opens
    holes: list[tuple[int, int]] = []
    with open(segment.path, "rb") as src, open(tmp, "wb") as out:
        hole_records = _hole_records_per_batch(src, segment)
        header: bytes | None = None
        expected = segment.base_offset
        for run in segment.runs:
            if run.reason is None:
                header = _copy_run(src, out, run, meter) or header
                expected = run.next_offset
                continue
            tail = run.end == segment.size and run.next_offset == run.first_offset
            fill_to = segment.end_offset if tail else run.next_offset
            if fill_to > expected:
                stamp = header or _header_at(src, run.end, segment.size)
                _write_hole(out, expected, fill_to, stamp, hole_records)
                holes.append((expected, fill_to))
                expected = fill_to
            meter.add(run.end - run.start)
        if expected < segment.end_offset:
            _write_hole(out, expected, segment.end_offset, header, hole_records)
            holes.append((expected, segment.end_offset))
        out.flush()
        os.fsync(out.fileno())
    _check_rewritten(tmp, segment)
    _keep(segment.path, os.path.join(quarantine, os.path.basename(segment.path)))
    index = _index_path(segment.path)
    if os.path.exists(index):
        os.rename(index, os.path.join(quarantine, os.path.basename(index)))
    fsync_dir(quarantine)
    os.replace(tmp, segment.path)
    fsync_dir(log_dir)
    return holes


def _hole_records_per_batch(src: IO[bytes], segment: SegmentSurvey) -> int:
    """Empty records per hole batch: as large as the segment's largest valid batch (which
    its log accepted, whatever its batch_bytes_max), else one record per batch."""
    largest = format.BATCH_HEADER_BYTES + format.RECORD_LENGTH_BYTES
    for run in segment.runs:
        if run.reason is not None:
            continue
        pos = run.start
        while pos < run.end:
            src.seek(pos)
            total = _batch_bytes(src.read(format.BATCH_HEADER_BYTES))
            largest = max(largest, total)
            pos += total
    fits = (largest - format.BATCH_HEADER_BYTES) // format.RECORD_LENGTH_BYTES
    return max(1, min(HOLE_RECORDS_PER_BATCH_MAX, fits))


def _batch_bytes(header: bytes) -> int:
    return format.BATCH_HEADER_BYTES + format.decode_batch_header(header).payload_bytes


def _copy_run(src: IO[bytes], out: IO[bytes], run: Run, meter: _Meter) -> bytes | None:
    """Copy a run of valid batches as they are; return the last one's header."""
    src.seek(run.start)
    pos = run.start
    header = None
    while pos < run.end:
        header = src.read(format.BATCH_HEADER_BYTES)
        body = src.read(_batch_bytes(header) - format.BATCH_HEADER_BYTES)
        out.write(header)
        out.write(body)
        pos += len(header) + len(body)
        meter.add(len(header) + len(body))
    return header


def _header_at(src: IO[bytes], pos: int, size: int) -> bytes | None:
    if pos + format.BATCH_HEADER_BYTES > size:
        return None
    src.seek(pos)
    return src.read(format.BATCH_HEADER_BYTES)


def _write_hole(out: IO[bytes], first: int, end: int, near: bytes | None,
                per_batch: int) -> None:
    """Batches of empty records for offsets [first, end), stamped with the epoch and time
    of a neighbouring batch (so a cluster's epoch history reads as before)."""
    epoch, timestamp_ms = 0, int(time.time() * 1000)
    if near is not None:
        header = format.decode_batch_header(near)
        epoch, timestamp_ms = header.epoch, header.timestamp_ms
    while first < end:
        n = min(per_batch, end - first)
        out.write(format.encode_batch([b""] * n, first, timestamp_ms, epoch))
        first += n


def _check_rewritten(tmp: str, segment: SegmentSurvey) -> None:
    """The new file must be one run of valid batches covering exactly its offsets."""
    probe = _probe(tmp, segment.base_offset)
    try:
        runs = [Run(*run) for run in probe.survey()]
    finally:
        probe.close()
    size = os.path.getsize(tmp)
    good = (not runs and segment.end_offset == segment.base_offset) or runs == [
        Run(0, size, segment.base_offset, segment.end_offset, None)]
    if not good:
        raise SalvageRefusedError(segment.path, f"its rewritten copy {tmp} does not verify "
                                  f"({runs[:3]}); the original was left in place")


def _keep(path: str, dest: str) -> None:
    """Put path's content at dest without removing path: a hard link, else a copy."""
    try:
        os.link(path, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
            raise
        shutil.copyfile(path, dest)
        with open(dest, "rb") as f:
            os.fsync(f.fileno())


def _expire_lost(found: LogSurvey, holes: list[tuple[int, int]]) -> list[int]:
    """Expire the queue's messages whose SEND record fell in a hole: their bodies are
    gone. Appends EXPIRE records; returns their seqs."""
    assert found.queue_dir is not None
    if not holes:
        return []
    snapshot = read_snapshot(found.queue_dir)
    with Log(found.log_dir, fsync="always", lock=False, segment_bytes_max=QUEUE_SEGMENT_BYTES,
             durable_floor=snapshot[1] if snapshot else 0) as log:
        state, _ = replay(log, snapshot)
        lost = sorted({seq for first, end in holes for seq in state.stored_in(first, end)})
        if lost:
            # The queue's own latest time, not this machine's clock: a record's time moves
            # the queue's clock forward, and retention and timeouts run on it.
            now = int(state.last_time)
            # The epoch of the log's last batch, not 0: a cluster's replicas compare logs
            # by the epochs their batches carry, and an epoch going back would read as a
            # history this log never had.
            log.epoch = _last_epoch(log)
            for at in range(0, len(lost), EXPIRE_SEQS_MAX):
                chunk = lost[at : at + EXPIRE_SEQS_MAX]
                log.append(rec.encode_seqs(format.QREC_EXPIRE, now, chunk), wait=False)
            log.flush()
    return lost


def _last_epoch(log: Log) -> int:
    if log.next_offset <= log.first_offset:
        return 0
    data = log.read_raw(log.next_offset - 1, format.BATCH_HEADER_BYTES)
    (epoch,) = struct.unpack_from("<Q", data, format.BATCH_EPOCH_AT)
    return int(epoch)


def _write_report(quarantine: str, done: LogSalvage) -> None:
    report = done.to_json() | {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "expired_seqs": done.expired,
    }
    path = os.path.join(quarantine, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(quarantine)


# --- a data directory's databases -------------------------------------------------------------


def set_aside_database(data_dir: str, file_name: str) -> str:
    """Move a damaged SQLite database of a data directory (with its -wal and -shm) into
    ``quarantine/<time>/``; return the quarantine. Nothing is deleted; what to do next
    depends on the database (docs/OPERATIONS.md, "A damaged database").

    Raises DataDirectoryLockedError while a server holds the directory, FileNotFoundError
    if there is no such database.
    """
    source = os.path.join(data_dir, file_name)
    if os.path.basename(file_name) != file_name or not file_name.endswith(".sqlite3"):
        raise FileNotFoundError(errno.ENOENT, "not a database of the data directory", source)
    fd = _lock_data_dir(data_dir)
    try:
        if not os.path.isfile(source):
            raise FileNotFoundError(errno.ENOENT, "no such database", source)
        quarantine = _new_quarantine(data_dir)
        for suffix in ("", "-wal", "-shm"):
            if os.path.lexists(source + suffix):
                os.rename(source + suffix, os.path.join(quarantine, file_name + suffix))
        fsync_dir(quarantine)
        fsync_dir(data_dir)
        with open(os.path.join(quarantine, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump({"set_aside": file_name, "reason": "an operator's set-aside of a "
                       "damaged database"}, f)
            f.write("\n")
        return quarantine
    finally:
        os.close(fd)


# --- a cluster follower's copy ----------------------------------------------------------------


MENDING_FILE = "mending"
"""In a follower's queue directory from the moment :func:`set_aside_replica` starts (or a
replica starts over empty, replication.follower.Replica.truncate) until the node has left
the partition's ISR: its copy may lack records it had acknowledged, so it must neither
lead nor stay counted in sync (replication/node.py). Its content is for people (JSON:
why, when)."""


def mark_mending(queue_dir: str, why: str) -> None:
    """Write :data:`MENDING_FILE`, durably, before a copy loses records it acknowledged."""
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    files.write_file(os.path.join(queue_dir, MENDING_FILE), json.dumps(
        {"since": stamp, "why": why}).encode() + b"\n")


def is_mending(queue_dir: str) -> bool:
    return os.path.exists(os.path.join(queue_dir, MENDING_FILE))


def mended(queue_dir: str) -> None:
    """The node left the ISR with its repaired copy: the usual rule lets it back in once it
    holds what the ISR has committed."""
    files.remove(os.path.join(queue_dir, MENDING_FILE))


@dataclasses.dataclass(frozen=True)
class ReplicaRepair:
    """What :func:`set_aside_replica` did to a follower's damaged copy of a queue."""

    quarantine: str
    refetched_from: int
    """Records below this offset were kept in place; the leader copies the rest. 0: the
    whole copy was set aside."""
    whole_because: str | None
    """Why nothing was kept, if nothing was."""

    def describe(self) -> str:
        if self.whole_because is not None:
            return (f"set aside whole in {self.quarantine} ({self.whole_because}); the leader "
                    "copies the queue again from offset 0")
        return (f"kept records 0..{self.refetched_from - 1}, set the rest aside in "
                f"{self.quarantine}; the leader copies the queue again from offset "
                f"{self.refetched_from}")


@dataclasses.dataclass(frozen=True)
class _Cut:
    """Where a replica's log is cut: segments[index] keeps its first ``keep_bytes``."""

    index: int
    keep_bytes: int
    end_offset: int


def set_aside_replica(queue_dir: str, keep_prefix: bool = True) -> ReplicaRepair:
    """Set aside a cluster follower's damaged copy of a queue, keeping the valid records
    before its first damage; return what was done.

    A follower's copy is its leader's log byte for byte, from offset 0 (a replica keeps its
    whole log), so nothing is lost: the leader copies the queue again from the copy's new
    end, through the usual position and divergence exchange (replication.follower). What
    leaves the log goes to ``quarantine/<time>/`` with a ``report.json``, as a salvage's
    does; nothing is deleted:

    - the segments after the one holding the first damage are moved there whole;
    - the damaged segment is linked there as it was, and the live copy is rewritten with
      only its batches before the damage;
    - the snapshot (which only a node that led the queue has) is moved there if it is
      damaged or describes records past the kept end; the kept log starts at offset 0, so
      replay needs no snapshot.

    The whole copy (its ``log/`` and ``snapshot``) is set aside instead, leaving an empty
    ``log/``, when keep_prefix is False, when nothing valid comes before the damage, when
    the survey cannot place the damage or refuses the log, or when the log does not start
    at offset 0. Not for a leader's or a single node's queue, whose log may be the only
    copy: those are salvaged by an operator.

    Before anything moves, :data:`MENDING_FILE` is written (durably): a copy that lost
    records must not lead, even after a crash part-way through.

    The caller holds the data directory (its broker) and has the queue's log closed.
    """
    mark_mending(queue_dir, "this follower's copy was damaged and is being repaired from "
                            "its leader")
    found = LogSurvey(os.path.join(queue_dir, _LOG_DIR), queue_dir)
    why: str | None = "asked to" if not keep_prefix else None
    cut: _Cut | None = None
    if why is None:
        try:
            found = _survey_log(found, _Meter(None))
        except (EngineError, OSError) as exc:
            why = f"the survey failed: {exc}"
        else:
            plan = _replica_cut(found)
            cut, why = (plan, None) if isinstance(plan, _Cut) else (None, plan)
    if cut is not None:
        try:
            return _keep_prefix(queue_dir, found, cut)
        except SalvageRefusedError as exc:
            # What it moved so far is in its quarantine; the rest joins another.
            why = f"the kept part did not verify: {exc}"
    return _set_aside_whole(queue_dir, found, why or "no cut")


def _replica_cut(found: LogSurvey) -> _Cut | str:
    """Where to cut a replica's log to keep everything before its first damage, or why
    it cannot be cut."""
    if found.refusal is not None:
        return found.refusal
    if not found.segments or found.segments[0].base_offset != 0:
        return "the log does not start at offset 0, as a replica's must"
    paths = [segment.path for segment in found.segments]
    # In the order the survey met them: the first is the earliest in the log.
    first = next((d for d in found.damage if d.first_offset is not None), None)
    if first is None or first.path not in paths:
        return "the survey found no damaged segment"
    assert first.first_offset is not None
    if first.first_offset == 0:
        return "nothing valid comes before the damage"
    return _Cut(paths.index(first.path), first.start, first.first_offset)


def _keep_prefix(queue_dir: str, found: LogSurvey, cut: _Cut) -> ReplicaRepair:
    quarantine = _new_quarantine(queue_dir)
    segments_to = os.path.join(quarantine, _LOG_DIR)
    os.mkdir(segments_to)
    fsync_dir(quarantine)
    segments = found.segments
    damaged = segments[cut.index]
    rewrite = cut.keep_bytes < damaged.size
    snapshot = os.path.join(queue_dir, SNAPSHOT_FILE)
    snapshot_goes = os.path.exists(snapshot) and (
        found.snapshot_damaged or (found.snapshot_offset or 0) > cut.end_offset)
    name = os.path.basename
    # The report comes first: should this be interrupted, it says what was under way.
    _write_replica_report(quarantine, found, cut.end_offset, None, {
        "kept_segments": [name(s.path) for s in segments[:cut.index]] + (
            [] if rewrite else [name(damaged.path)]),
        "cut_segment": {"name": name(damaged.path), "kept_bytes": cut.keep_bytes,
                        "size": damaged.size} if rewrite else None,
        "moved_segments": [name(s.path) for s in segments[cut.index + 1:]],
        "snapshot": "quarantined" if snapshot_goes else (
            "kept" if os.path.exists(snapshot) else "none"),
    })
    if snapshot_goes:
        # First, as Replica.truncate does: a crash part-way must not leave a snapshot
        # describing records the log no longer has.
        files.rename(snapshot, os.path.join(quarantine, SNAPSHOT_FILE))
    # The newest first, so that the live log stays a run of whole segments from offset 0.
    for segment in reversed(segments[cut.index + 1:]):
        _move_index(segment.path, segments_to)
        files.rename(segment.path, os.path.join(segments_to, name(segment.path)))
    if rewrite:
        _cut_segment(found.log_dir, damaged, cut, segments_to)
    return ReplicaRepair(quarantine, cut.end_offset, None)


def _cut_segment(log_dir: str, segment: SegmentSurvey, cut: _Cut, quarantine: str) -> None:
    """Replace a damaged segment by its batches before the damage. The original is linked
    into the quarantine before the cut copy replaces it by rename, as in _rewrite."""
    tmp = segment.path + ".cut.tmp"  # a leftover .tmp is removed when the log opens
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with open(segment.path, "rb") as src:
            left = cut.keep_bytes
            while left:
                chunk = src.read(min(left, PROGRESS_STEP_BYTES))
                if not chunk:
                    raise SalvageRefusedError(segment.path, "it shrank while being cut")
                files.write_all(fd, chunk, tmp)
                left -= len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    _check_rewritten(tmp, dataclasses.replace(segment, end_offset=cut.end_offset))
    _keep(segment.path, os.path.join(quarantine, os.path.basename(segment.path)))
    _move_index(segment.path, quarantine)
    fsync_dir(quarantine)
    os.replace(tmp, segment.path)
    fsync_dir(log_dir)


def _move_index(segment_path: str, quarantine: str) -> None:
    index = _index_path(segment_path)
    with contextlib.suppress(FileNotFoundError):
        os.rename(index, os.path.join(quarantine, os.path.basename(index)))


def _set_aside_whole(queue_dir: str, found: LogSurvey, why: str) -> ReplicaRepair:
    quarantine = _new_quarantine(queue_dir)
    _write_replica_report(quarantine, found, 0, why, {
        "kept_segments": [], "cut_segment": None, "moved_segments": [_LOG_DIR],
        "snapshot": "quarantined" if os.path.exists(os.path.join(queue_dir, SNAPSHOT_FILE))
        else "none"})
    for name in (_LOG_DIR, SNAPSHOT_FILE):
        source = os.path.join(queue_dir, name)
        if os.path.lexists(source):
            os.rename(source, os.path.join(quarantine, name))
    fsync_dir(quarantine)
    fsync_dir(queue_dir)
    make_dirs(os.path.join(queue_dir, _LOG_DIR))
    return ReplicaRepair(quarantine, 0, why)


def _write_replica_report(quarantine: str, found: LogSurvey, refetched_from: int,
                          whole_because: str | None, layout: dict[str, Any]) -> None:
    report = {
        "set_aside": "a cluster follower's damaged copy; its leader copies the rest again",
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "queue_dir": found.queue_dir,
        "refetched_from": refetched_from,
        "whole_because": whole_because,
        **layout,
        "damage": [d.describe() for d in found.damage],
    }
    files.write_file(os.path.join(quarantine, REPORT_FILE),
                     (json.dumps(report, indent=2) + "\n").encode())
