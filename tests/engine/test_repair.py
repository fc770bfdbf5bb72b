"""engine.repair.set_aside_replica: a cluster follower's damaged copy keeps every record
before its first damage in place, and sets the rest aside for its leader to copy again.

Each case damages real files the way a disk would (a flipped bit, a lost segment) and
checks what stayed (the same inode, the same bytes), what went to the quarantine, and that
the log then opens ending exactly where the report says the leader copies from. The whole
set-aside (``keep_prefix=False``, the rule before this one) is the negative control: the
same checks catch it refetching records that were valid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from engine import Broker, Log, ManualClock, format
from engine.errors import CorruptSegmentError
from engine.queue import SNAPSHOT_FILE, read_snapshot, replay
from engine.repair import REPORT_FILE, ReplicaRepair, set_aside_replica

SEGMENT_BYTES = 4096
RECORDS = 120


def _replica(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """A follower's copy of a queue: log/ of several segments, one record per batch."""
    directory = tmp_path / "queue"
    records = [b"record %03d " % i + b"." * 100 for i in range(RECORDS)]
    with Log(directory / "log", fsync="never", lock=False,
             segment_bytes_max=SEGMENT_BYTES) as log:
        for record in records:
            log.append(record, wait=False)
    return directory, records


def _segments(directory: Path) -> list[Path]:
    return sorted((directory / "log").glob(f"*{format.LOG_SUFFIX}"))


def _flip(path: Path, position: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x20
    path.write_bytes(bytes(data))
    return bytes(data)


def _report(repair: ReplicaRepair) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((Path(repair.quarantine) / REPORT_FILE).read_text())
    return report


def _opened(directory: Path) -> list[bytes]:
    """Every record of the mended copy: it must open, as the follower's log does."""
    with Log(directory / "log", fsync="never", lock=False,
             segment_bytes_max=SEGMENT_BYTES) as log:
        assert log.first_offset == 0
        return [bytes(payload) for _, payload in log.iter_records()]


def refetched_valid_records(directory: Path, repair: ReplicaRepair,
                            kept: dict[Path, tuple[int, bytes]], valid_below: int) -> list[str]:
    """What a repair got wrong: a kept segment replaced (another inode, other bytes), or
    valid records below the first damage given up for the leader to send again."""
    wrong = [f"{path.name} was replaced" for path, (inode, data) in kept.items()
             if not path.exists() or path.stat().st_ino != inode or path.read_bytes() != data]
    if repair.refetched_from != valid_below:
        wrong.append(f"refetched from {repair.refetched_from}, not from the first damage "
                     f"at {valid_below}")
    return wrong


def _sealed(paths: list[Path]) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_ino, p.read_bytes()) for p in paths}


def _first_offset_of(segment: Path) -> int:
    return int(segment.name.removesuffix(format.LOG_SUFFIX))


def test_damage_mid_log_keeps_the_segments_before_it_and_the_batches_before_it(
        tmp_path: Path) -> None:
    directory, records = _replica(tmp_path)
    segments = _segments(directory)
    assert len(segments) >= 4
    before = _sealed(segments[:2])
    damaged = segments[2]
    original = damaged.read_bytes()
    at = len(original) // 2
    raw = _flip(damaged, at)
    with pytest.raises(CorruptSegmentError) as refused:
        _opened(directory)
    first_lost = refused.value.offset
    assert first_lost > _first_offset_of(damaged)

    repair = set_aside_replica(str(directory))

    assert repair.whole_because is None
    assert refetched_valid_records(directory, repair, before, first_lost) == []
    assert _opened(directory) == records[:first_lost]
    # The live copy of the damaged segment is its bytes before the damage; the original,
    # and every later segment, are in the quarantine as they were.
    assert damaged.read_bytes() == original[:refused.value.position]
    quarantined = Path(repair.quarantine) / "log"
    assert (quarantined / damaged.name).read_bytes() == raw
    for later in segments[3:]:
        assert not later.exists() and (quarantined / later.name).is_file()
    report = _report(repair)
    assert report["refetched_from"] == first_lost and report["whole_because"] is None
    assert report["kept_segments"] == [s.name for s in segments[:2]]
    assert report["cut_segment"] == {"name": damaged.name,
                                     "kept_bytes": refused.value.position,
                                     "size": len(raw)}
    assert report["moved_segments"] == [s.name for s in segments[3:]]
    assert report["snapshot"] == "none"
    assert "checksum mismatch" in report["damage"][0]


def test_damage_in_the_first_segment_keeps_the_batches_before_it(tmp_path: Path) -> None:
    directory, records = _replica(tmp_path)
    first, second = _segments(directory)[:2]
    _flip(first, first.stat().st_size // 2)

    repair = set_aside_replica(str(directory))

    assert 0 < repair.refetched_from < _first_offset_of(second)
    assert _segments(directory) == [first]
    assert _opened(directory) == records[:repair.refetched_from]


def test_a_lost_segment_keeps_the_ones_before_it_whole(tmp_path: Path) -> None:
    directory, records = _replica(tmp_path)
    segments = _segments(directory)
    before = _sealed(segments[:2])
    gone = segments[2]
    gone.rename(tmp_path / gone.name)  # as if the file system lost it

    repair = set_aside_replica(str(directory))

    assert refetched_valid_records(directory, repair, before,
                                   _first_offset_of(gone)) == []
    report = _report(repair)
    assert report["cut_segment"] is None
    assert report["kept_segments"] == [s.name for s in segments[:2]]
    assert _opened(directory) == records[:_first_offset_of(gone)]


def test_damage_at_offset_0_sets_the_whole_copy_aside(tmp_path: Path) -> None:
    directory, _ = _replica(tmp_path)
    segments = _segments(directory)
    _flip(segments[0], format.BATCH_HEADER_BYTES + 2)

    repair = set_aside_replica(str(directory))

    assert repair.refetched_from == 0
    assert repair.whole_because == "nothing valid comes before the damage"
    assert _report(repair)["moved_segments"] == ["log"]
    assert sorted(p.name for p in (Path(repair.quarantine) / "log").glob("*.log")) == [
        s.name for s in segments]
    assert _opened(directory) == []


def test_a_log_that_does_not_start_at_0_is_set_aside_whole(tmp_path: Path) -> None:
    directory, _ = _replica(tmp_path)
    segments = _segments(directory)
    segments[0].rename(tmp_path / segments[0].name)
    _flip(segments[2], segments[2].stat().st_size // 2)

    repair = set_aside_replica(str(directory))

    assert repair.refetched_from == 0
    assert repair.whole_because is not None and "offset 0" in repair.whole_because


def test_negative_control_the_whole_set_aside_refetches_valid_records(
        tmp_path: Path) -> None:
    """The rule before this one (everything set aside) fails the check the cases above
    pass: the sealed segments before the damage are gone from the live log, and the
    leader would send every record again."""
    directory, _ = _replica(tmp_path)
    segments = _segments(directory)
    before = _sealed(segments[:2])
    _flip(segments[2], segments[2].stat().st_size // 2)
    with pytest.raises(CorruptSegmentError) as refused:
        _opened(directory)

    repair = set_aside_replica(str(directory), keep_prefix=False)

    wrong = refetched_valid_records(directory, repair, before, refused.value.offset)
    assert wrong == [f"{segments[0].name} was replaced", f"{segments[1].name} was replaced",
                     f"refetched from 0, not from the first damage at {refused.value.offset}"]
    assert repair.whole_because == "asked to"


# -- a copy with a snapshot (a node that once led the queue) ---------------------------------


def _queue_with_snapshot(tmp_path: Path, early: bool) -> tuple[Path, int]:
    """A queue copy whose snapshot was taken after 10 sends (early) or at the end; return
    its directory and the snapshot's offset."""
    data, clock = tmp_path / "data", ManualClock()
    with Broker(data, fsync="never", clock=clock, segment_bytes_max=SEGMENT_BYTES) as broker:
        queue = broker.create_queue("jobs")
        uid = broker.catalog.get("jobs").uid
        for i in range(10):
            queue.send(b"m%02d " % i + b"." * 200)
    directory = data / "queues" / f"{uid:016x}"
    snapshot = (directory / SNAPSHOT_FILE).read_bytes()
    with Broker(data, fsync="never", clock=clock, segment_bytes_max=SEGMENT_BYTES) as broker:
        for i in range(10, 60):
            broker.get_queue("jobs").send(b"m%02d " % i + b"." * 200)
    if early:
        (directory / SNAPSHOT_FILE).write_bytes(snapshot)
    found = read_snapshot(str(directory))
    assert found is not None
    return directory, found[1]


@pytest.mark.parametrize("early", [True, False], ids=["before-the-damage", "after-it"])
def test_a_snapshot_past_the_kept_end_is_set_aside_with_the_rest(tmp_path: Path,
                                                                 early: bool) -> None:
    directory, snapshot_offset = _queue_with_snapshot(tmp_path, early)
    segments = _segments(directory)
    damaged = segments[-2]
    _flip(damaged, damaged.stat().st_size // 2)

    repair = set_aside_replica(str(directory))

    assert repair.refetched_from > 0
    assert (snapshot_offset <= repair.refetched_from) is early
    report = _report(repair)
    assert report["snapshot"] == ("kept" if early else "quarantined")
    assert (directory / SNAPSHOT_FILE).exists() is early
    assert (Path(repair.quarantine) / SNAPSHOT_FILE).exists() is not early
    # The kept copy replays: with its snapshot, or from offset 0 without one.
    with Log(directory / "log", fsync="never", lock=False) as log:
        assert log.next_offset == repair.refetched_from
        state, _ = replay(log, read_snapshot(str(directory)))
    assert 10 <= len(state) < 60


def test_a_damaged_snapshot_is_set_aside_and_the_log_kept(tmp_path: Path) -> None:
    directory, _ = _queue_with_snapshot(tmp_path, early=True)
    _flip(directory / SNAPSHOT_FILE, 20)
    damaged = _segments(directory)[-2]
    _flip(damaged, damaged.stat().st_size // 2)

    repair = set_aside_replica(str(directory))

    assert repair.refetched_from > 0
    assert _report(repair)["snapshot"] == "quarantined"
    assert not (directory / SNAPSHOT_FILE).exists()
    assert os.path.exists(os.path.join(repair.quarantine, SNAPSHOT_FILE))


# -- a salvage's own records ------------------------------------------------------------------


def test_a_salvage_writes_its_expiries_in_the_logs_last_epoch(tmp_path: Path) -> None:
    """The EXPIRE records a salvage appends carry the epoch of the log's last batch: a
    cluster's replicas compare logs by epoch, and an epoch going back to 0 would read as a
    history the log never had."""
    from engine import repair

    data = tmp_path / "data"
    with Broker(data, fsync="never", segment_bytes_max=SEGMENT_BYTES) as broker:
        queue = broker.create_queue("jobs")
        broker._core_of("jobs").log.epoch = 7  # as a cluster leader in epoch 7 stamps them
        uid = broker.catalog.get("jobs").uid
        for i in range(30):
            queue.send(b"m%02d " % i + b"." * 200)
    directory = data / "queues" / f"{uid:016x}"
    segment = _segments(directory)[-1]
    _flip(segment, segment.stat().st_size // 2)
    done = repair.salvage(str(data))
    [salvaged] = done.logs
    assert salvaged.expired, "the damage should have cost a message"
    with Log(directory / "log", lock=False) as log:
        last = log.read_raw(log.next_offset - 1)
    assert int.from_bytes(last[format.BATCH_EPOCH_AT:format.BATCH_EPOCH_AT + 8], "little") == 7
