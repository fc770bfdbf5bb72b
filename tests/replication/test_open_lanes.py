"""Which threads open a node's copy of a queue: light opens share one thread, heavy ones
(a long replay, or one whose length is not known) have their own (replication/node.py)."""

from __future__ import annotations

from pathlib import Path

from engine import Log
from replication.node import HEAVY_OPEN_BYTES, open_is_heavy


def test_a_new_copy_opens_light_and_one_already_on_disk_heavy() -> None:
    assert not open_is_heavy(None, on_disk=False)  # a queue being created
    assert open_is_heavy(None, on_disk=True)  # after a restart: its log is not measured


def test_a_followed_copy_opens_light_until_its_log_is_long(tmp_path: Path) -> None:
    with Log(tmp_path / "log", fsync="never") as log:
        assert not open_is_heavy(log, on_disk=True)
        log.append(b"x" * 1000)
        assert not open_is_heavy(log, on_disk=True)
        body = b"x" * (1 << 20)
        while log.size_bytes < HEAVY_OPEN_BYTES:
            log.append(body)
        assert open_is_heavy(log, on_disk=True)


def test_a_followed_copy_whose_log_follows_a_snapshot_opens_heavy(tmp_path: Path) -> None:
    # Installed from a snapshot: the log starts past 0, and the snapshot's size is unknown.
    with Log(tmp_path / "log", fsync="never") as log:
        log.restart_at(1000)
        assert log.size_bytes < HEAVY_OPEN_BYTES
        assert open_is_heavy(log, on_disk=True)
