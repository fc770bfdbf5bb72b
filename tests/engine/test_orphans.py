"""Queue directories the catalog does not name are set aside, never deleted, and adopt back.

A lost or replaced catalog.sqlite3 (or one restored without its -wal) must not cost a
single queue: at open every unnamed directory moves, untouched, to orphaned/, and
``adopt_orphan`` brings it back with its messages, attributes and receipts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engine import Broker
from engine.errors import QueueNotFoundError
from engine.orphans import DELETED_SUFFIX, IDENTITY_FILE, ORPHANED_DIR, OrphanError

NO_MAINTENANCE_MS = 600_000
CATALOG = "catalog.sqlite3"


def open_broker(data: Path) -> Broker:
    return Broker(data, maintenance_interval_ms=NO_MAINTENANCE_MS)


def remove_catalog(data: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (data / f"{CATALOG}{suffix}").unlink(missing_ok=True)


def bodies(broker: Broker, name: str) -> list[bytes]:
    queue = broker.get_queue(name)
    got: list[bytes] = []
    while messages := queue.receive(max_messages=10, wait_seconds=0, visibility_timeout=600):
        got += [bytes(m.body) for m in messages]
        queue.delete_batch([m.receipt for m in messages])  # a FIFO group waits for it
    return sorted(got)


def make_queues(data: Path) -> dict[str, int]:
    """Two queues with messages (one FIFO, one with a dead-letter queue); their uids."""
    with open_broker(data) as broker:
        broker.create_queue("dead")
        jobs = broker.create_queue("jobs", visibility_timeout=45, max_receive_count=3,
                                   dead_letter_queue="dead")
        fifo = broker.create_queue("orders.fifo", fifo=True, content_based_dedup=True)
        for i in range(50):
            jobs.send(b"job %d" % i)
            fifo.send(b"order %d" % i, group_id=f"g{i % 3}")
        return {name: broker.catalog.get(name).uid  # type: ignore[union-attr]
                for name in ("dead", "jobs", "orders.fifo")}


def test_a_lost_catalog_sets_every_queue_aside_and_adopt_brings_each_back(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    uids = make_queues(data)
    remove_catalog(data)
    with open_broker(data) as broker:
        assert broker.list_queues() == []
        assert os.listdir(data / "queues") == []
        found = {o.directory: o for o in broker.orphans()}
        assert set(found) == {f"{uid:016x}" for uid in uids.values()}
        assert {o.name for o in found.values()} == set(uids)
        assert all(o.has_log and o.size_bytes > 0 for o in found.values())
        with pytest.raises(QueueNotFoundError):
            broker.get_queue("jobs")
        for name, uid in uids.items():
            assert broker.adopt_orphan(f"{uid:016x}") == name
        assert broker.orphans() == []
        assert sorted(broker.list_queues()) == sorted(uids)
        jobs = broker.get_queue("jobs")
        assert jobs.attributes.visibility_timeout == 45
        assert jobs.attributes.dead_letter_queue == "dead"
        assert broker.get_queue("orders.fifo").attributes.fifo
        assert bodies(broker, "jobs") == sorted(b"job %d" % i for i in range(50))
        assert bodies(broker, "orders.fifo") == sorted(b"order %d" % i for i in range(50))
    with open_broker(data) as broker:  # the adoption is durable, and nothing is set aside
        assert sorted(broker.list_queues()) == sorted(uids)
        assert broker.orphans() == []


def test_an_older_catalog_sets_aside_only_the_queues_it_does_not_know(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_broker(data) as broker:
        broker.create_queue("old").send(b"old message")
    saved = tmp_path / "catalog-backup"
    saved.mkdir()
    for name in os.listdir(data):
        if name.startswith(CATALOG):
            shutil.copy(data / name, saved / name)
    with open_broker(data) as broker:
        broker.create_queue("new").send(b"new message")
        new_uid = broker.catalog.get("new").uid  # type: ignore[union-attr]
    remove_catalog(data)
    for name in os.listdir(saved):
        shutil.copy(saved / name, data / name)
    with open_broker(data) as broker:
        assert broker.list_queues() == ["old"]
        assert [o.directory for o in broker.orphans()] == [f"{new_uid:016x}"]
        assert bodies(broker, "old") == [b"old message"]
        broker.adopt_orphan(f"{new_uid:016x}")
        assert bodies(broker, "new") == [b"new message"]


def test_a_directory_without_queue_json_needs_its_name(tmp_path: Path) -> None:
    """A queue made before queue.json existed: adopt asks for the name."""
    data = tmp_path / "data"
    uids = make_queues(data)
    directory = f"{uids['jobs']:016x}"
    (data / "queues" / directory / IDENTITY_FILE).unlink()
    remove_catalog(data)
    with open_broker(data) as broker:
        orphan = {o.directory: o for o in broker.orphans()}[directory]
        assert (orphan.uid, orphan.name) == (uids["jobs"], None)
        with pytest.raises(OrphanError, match="give the queue's name"):
            broker.adopt_orphan(directory)
        assert broker.adopt_orphan(directory, name="jobs") == "jobs"
        assert bodies(broker, "jobs") == sorted(b"job %d" % i for i in range(50))
        assert (data / "queues" / directory / IDENTITY_FILE).exists()


def test_adopt_refuses_and_changes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    uids = make_queues(data)
    remove_catalog(data)
    jobs_dir = f"{uids['jobs']:016x}"
    with open_broker(data) as broker:
        broker.create_queue("jobs")  # the name is taken meanwhile
        with pytest.raises(OrphanError, match="a queue named 'jobs' exists"):
            broker.adopt_orphan(jobs_dir)
        for bad in ("", "..", "../queues", "nothing-here"):
            with pytest.raises(OrphanError):
                broker.adopt_orphan(bad, name="x")
        # A damaged log is refused, and the directory stays where it is.
        dead_dir = f"{uids['dead']:016x}"
        segment = data / ORPHANED_DIR / dead_dir / "log" / f"{0:020d}.log"
        segment.write_bytes(b"\xff" * 64 + segment.read_bytes()[64:])
        with pytest.raises(OrphanError, match="does not open"):
            broker.adopt_orphan(dead_dir)
        assert (data / ORPHANED_DIR / dead_dir).is_dir()
        assert "dead" not in broker.list_queues()
        assert {o.directory for o in broker.orphans()} >= {jobs_dir, dead_dir}
        broker.discard_orphan(dead_dir)
        assert not (data / ORPHANED_DIR / dead_dir).exists()


def test_set_aside_queue_moves_a_queue_out_of_the_catalog(tmp_path: Path) -> None:
    data = tmp_path / "data"
    uids = make_queues(data)
    with open_broker(data) as broker:
        broker.get_queue("jobs").stats()  # open, so that setting it aside closes it
        place = broker.set_aside_queue("jobs", "no record owns it")
        assert place == f"{uids['jobs']:016x}"
        assert "jobs" not in broker.list_queues()
        assert broker.adopt_orphan(place) == "jobs"
        assert bodies(broker, "jobs") == sorted(b"job %d" % i for i in range(50))


def test_an_interrupted_delete_is_finished_and_nothing_else_removed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    uids = make_queues(data)
    deleted = data / "queues" / f"{uids['jobs']:016x}{DELETED_SUFFIX}"
    stray = data / "queues" / "not-a-queue"
    with open_broker(data) as broker:
        broker.catalog.remove("jobs")  # as delete_queue does, then "crash" before the rest
    os.rename(data / "queues" / f"{uids['jobs']:016x}", deleted)
    stray.mkdir()
    (stray / "precious").write_bytes(b"keep me")
    with open_broker(data) as broker:
        assert not deleted.exists()
        assert (data / ORPHANED_DIR / "not-a-queue" / "precious").read_bytes() == b"keep me"
        orphan = broker.orphans()[0]
        assert (orphan.directory, orphan.uid, orphan.has_log) == ("not-a-queue", None, False)
        with pytest.raises(OrphanError, match="uid"):
            broker.adopt_orphan("not-a-queue", name="x")
