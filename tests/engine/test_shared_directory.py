"""A data directory shared by the workers of one server: each opens it with
``shared=True`` while the server holds its lock, and each sees the queues the others made
and removed (engine/catalog.py reads the rows again when a lookup misses)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine import Broker
from engine.broker import lock_directory
from engine.errors import DataDirectoryLockedError, InvalidAttributeError


def test_workers_see_each_others_queues(tmp_path: Path) -> None:
    path = str(tmp_path)
    with Broker(path):  # made, with its receipt key, by the server before its workers
        pass
    held = lock_directory(path)
    try:
        with Broker(path, shared=True) as a, Broker(path, shared=True) as b:
            a.create_queue("jobs")
            b.create_queue("jobs-dlq")
            assert a.list_queues() == b.list_queues() == ["jobs", "jobs-dlq"]
            # A lookup of another's queue finds it: by name, by uid, as a dead-letter queue.
            uid = a.catalog.uid_of("jobs")
            assert uid is not None and b.catalog.name_of(uid) == "jobs"
            a.set_queue_attributes("jobs", dead_letter_queue="jobs-dlq", max_receive_count=2)
            assert b.dead_letter_sources("jobs-dlq") == ["jobs"]
            with pytest.raises(InvalidAttributeError):
                a.set_queue_attributes("jobs", dead_letter_queue="absent")
            b.get_queue("jobs-dlq").send(b"kept")
            a.set_queue_attributes("jobs", dead_letter_queue=None, max_receive_count=None)
            b.delete_queue("jobs-dlq")
            assert a.list_queues() == ["jobs"]
            assert a.catalog.get("jobs-dlq") is None
            # A copy is read again only when another process has committed since.
            assert not a.catalog.refresh()
            b.create_queue("other")
            assert a.catalog.refresh() and not a.catalog.refresh()
        # The server's lock was never the brokers' to take or release.
        with pytest.raises(DataDirectoryLockedError):
            Broker(path)
    finally:
        os.close(held)
    with Broker(path) as alone:
        assert alone.list_queues() == ["jobs", "other"]


def test_a_shared_broker_leaves_strays_to_the_server(tmp_path: Path) -> None:
    path = str(tmp_path)
    with Broker(path) as broker:
        broker.create_queue("q")
    stray = tmp_path / "queues" / "00000000000000ff"
    stray.mkdir()
    held = lock_directory(path)
    try:
        with Broker(path, shared=True):
            # Another worker may be making this queue right now: its row is not there yet.
            assert stray.exists()
    finally:
        os.close(held)
    with Broker(path) as broker:
        assert not stray.exists()
        assert [o.directory for o in broker.orphans()] != []
