"""A full disk, on a real filesystem that fills (a small tmpfs, tests/support/disk.py).

Every write is whole or refused: a short write is carried on or raises, a snapshot cut
short never replaces the last good one, and ENOSPC stops the queue (StorageFullError) as
a failed fsync does. Nothing acknowledged is lost, and the queue is whole again once space
is freed and it is reopened.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import Broker, Queue, SendEntry, files
from engine.errors import QueueUnavailableError, StorageFullError
from engine.files import write_all, write_file
from engine.queue import SNAPSHOT_FILE
from engine.snapshot import encode_snapshot
from tests.support.disk import PAGE_BYTES, ballast, fill, free_bytes, tmpfs

MiB = 1 << 20
# Room left when the snapshot is taken: less than the snapshot, so its write comes up short.
SLACK_BYTES = 4 * PAGE_BYTES
NO_MAINTENANCE_MS = 600_000


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", 8 * MiB) as mounted:
        yield mounted


def test_write_all_carries_on_after_a_short_write_then_raises_enospc(disk: Path) -> None:
    fill(disk, leave_bytes=2 * PAGE_BYTES)
    path = disk / "file"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as caught:
            write_all(fd, b"x" * (16 * PAGE_BYTES), str(path))
        # The first write came up short (two pages fitted); the second found no room.
        assert os.fstat(fd).st_size == 2 * PAGE_BYTES
    finally:
        os.close(fd)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(path)


def test_write_file_on_a_full_disk_keeps_the_old_file_and_frees_its_temporary(
        disk: Path) -> None:
    path = disk / "state"
    path.write_bytes(b"the good copy")
    fill(disk, leave_bytes=2 * PAGE_BYTES)
    with pytest.raises(OSError) as caught:
        write_file(str(path), b"y" * (16 * PAGE_BYTES))
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"the good copy"
    assert not Path(f"{path}{files.TMP_SUFFIX}").exists()
    assert free_bytes(disk) >= 2 * PAGE_BYTES  # the partial temporary gave its room back


# --- a queue's snapshot --------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    refused: BaseException | None
    """What the snapshot on the full disk raised."""
    snapshot_kept: bool
    """The last good snapshot is still the one in place."""
    segments_kept: bool
    reopen_error: BaseException | None
    lost: int
    """Acknowledged messages not there after reopening."""


def send(queue: Queue, count: int) -> set[bytes]:
    """Messages with random dedup ids, which make the snapshot large (its dedup window
    keeps them for five minutes)."""
    bodies = set()
    for _ in range(count // 10):
        batch = [os.urandom(8).hex().encode() for _ in range(10)]
        results = queue.send_batch([SendEntry(b, dedup_id=os.urandom(16).hex()) for b in batch])
        assert not [r for r in results if isinstance(r, Exception)]
        bodies.update(batch)
    return bodies


def drain(queue: Queue) -> set[bytes]:
    got: set[bytes] = set()
    while messages := queue.receive(max_messages=10, wait_seconds=0, visibility_timeout=600):
        got.update(bytes(m.body) for m in messages)
    return got


def snapshot_on_a_full_disk(disk: Path) -> Outcome:
    data = disk / "data"
    with Broker(data, maintenance_interval_ms=NO_MAINTENANCE_MS) as broker:
        queue = broker.create_queue("jobs")
        sent = send(queue, 1000)
        core = broker._core_of("jobs")
        snapshot = Path(core.directory, SNAPSHOT_FILE)
        assert core.maybe_snapshot(force=True)
        good = snapshot.read_bytes()
        # 4,000 more: the snapshot, their ids in its window, is about 106 KiB, well past
        # the 64 KiB it must pass (2,000 came to 64-65 KiB, at the edge of it, since the
        # snapshot stopped keeping every message's dedup id).
        sent |= send(queue, 4000)
        assert len(encode_snapshot(core.state, core.log.next_offset)) > 4 * SLACK_BYTES
        segments = sorted(os.listdir(core.log.path))
        ballast = fill(disk, leave_bytes=SLACK_BYTES)
        refused = None
        try:
            core.maybe_snapshot(force=True)
        except QueueUnavailableError as exc:
            refused = exc
        kept = snapshot.read_bytes() == good
        segments_kept = sorted(os.listdir(core.log.path)) == segments
    ballast.unlink()
    reopen_error = None
    got: set[bytes] = set()
    try:
        with Broker(data, maintenance_interval_ms=NO_MAINTENANCE_MS) as broker:
            got = drain(broker.get_queue("jobs"))
    except Exception as exc:  # the old, unchecked write: a damaged snapshot fails the open
        reopen_error = exc
    return Outcome(refused, kept, segments_kept, reopen_error, len(sent - got))


def test_a_snapshot_cut_short_by_a_full_disk_replaces_nothing(disk: Path) -> None:
    outcome = snapshot_on_a_full_disk(disk)
    assert isinstance(outcome.refused, StorageFullError), outcome
    assert outcome.snapshot_kept and outcome.segments_kept, outcome
    assert outcome.reopen_error is None and outcome.lost == 0, outcome
    assert not list(disk.glob(f"data/queues/*/{SNAPSHOT_FILE}{files.TMP_SUFFIX}"))


def test_negative_control_an_unchecked_snapshot_write_is_caught(
        disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run with the old rule (one os.write, its count ignored) fails the checks
    above: the short snapshot is renamed into place and the queue does not reopen."""

    def unchecked(fd: int, data: files.Buffer, path: str) -> None:
        os.write(fd, data)

    monkeypatch.setattr(files, "write_all", unchecked)
    outcome = snapshot_on_a_full_disk(disk)
    assert outcome.refused is None and not outcome.snapshot_kept, outcome
    assert outcome.reopen_error is not None, outcome


# --- a queue's log -------------------------------------------------------------------------


def test_a_full_disk_stops_the_queue_and_loses_nothing_acknowledged(disk: Path) -> None:
    data = disk / "data"
    reserve = ballast(disk / "reserve", 256 * 1024)  # what the operator frees later
    acked: set[bytes] = set()
    with Broker(data, maintenance_interval_ms=NO_MAINTENANCE_MS) as broker:
        queue = broker.create_queue("jobs")
        refusal = None
        for i in range(10_000):
            body = b"%08d" % i + os.urandom(8 * 1024)
            try:
                queue.send(body)
            except QueueUnavailableError as exc:
                refusal = exc
                break
            acked.add(body)
        assert isinstance(refusal, StorageFullError), refusal
        assert "No space left" in str(refusal)
        # Fail-stop: everything is refused, reads too, until the queue is reopened.
        assert broker._core_of("jobs").log.failed
        for call in (lambda: queue.send(b"small"), lambda: queue.receive(), queue.stats):
            with pytest.raises(StorageFullError):
                call()
    reserve.unlink()
    with Broker(data, maintenance_interval_ms=NO_MAINTENANCE_MS) as broker:
        queue = broker.get_queue("jobs")
        got = drain(queue)
        assert not acked - got
        assert len(got - acked) <= 1  # at most the refused send, had its batch been whole
        queue.send(b"after the restart")
        assert [bytes(m.body) for m in queue.receive(wait_seconds=0)] == [b"after the restart"]
