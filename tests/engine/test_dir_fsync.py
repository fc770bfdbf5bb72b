"""Every create, rename and unlink of a file the engine reads back is followed by an fsync
of its directory before the call that made it returns.

A unit check, not a power-loss test: os.open, os.fsync, os.rename, os.replace, os.unlink,
os.mkdir and os.link are wrapped (they still do their work, on real files) to record, in
order, each change to a directory and each fsync of one. Files the engine never trusts
after a crash are left out: ``*.tmp`` (deleted on open), ``*.index`` (checked on load,
rebuilt when missing) and ``LOCK``. SQLite's own files are outside Python's os module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import Broker
from engine._queue import State
from engine.log import Log
from engine.queue import SNAPSHOT_FILE
from engine.repair import set_aside_replica
from engine.snapshot import encode_snapshot
from replication.follower import Replica

NO_MAINTENANCE_MS = 600_000
UNTRUSTED_SUFFIXES = (".tmp", ".index")
UNTRUSTED_NAMES = ("LOCK",)


class DirectorySpy:
    """Records ("change", directory, name) and ("fsync", directory, "") events."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.unsynced: list[str] = []
        self._dir_fds: dict[int, str] = {}
        real = {name: getattr(os, name) for name in
                ("open", "fsync", "close", "rename", "replace", "unlink", "mkdir", "link")}

        def spy_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
            existed = dir_fd is None and os.path.lexists(path)
            fd: int = real["open"](path, flags, mode, dir_fd=dir_fd)
            if dir_fd is None:
                if flags & os.O_DIRECTORY:
                    self._dir_fds[fd] = os.path.abspath(path)
                elif flags & os.O_CREAT and not existed:
                    self._change(path)
            return fd

        def spy_fsync(fd: Any) -> None:
            real["fsync"](fd)
            if fd in self._dir_fds:
                self.events.append(("fsync", self._dir_fds[fd], ""))

        def spy_close(fd: int) -> None:
            self._dir_fds.pop(fd, None)
            real["close"](fd)

        def two_paths(name: str) -> Callable[..., None]:
            def spy(source: Any, target: Any, **kwargs: Any) -> None:
                real[name](source, target, **kwargs)
                if not kwargs:
                    self._change(source)
                    self._change(target)
            return spy

        def one_path(name: str) -> Callable[..., None]:
            def spy(path: Any, *args: Any, dir_fd: Any = None, **kwargs: Any) -> None:
                real[name](path, *args, dir_fd=dir_fd, **kwargs)
                if dir_fd is None:  # shutil.rmtree of a directory already renamed away
                    self._change(path)
            return spy

        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(os, "fsync", spy_fsync)
        monkeypatch.setattr(os, "close", spy_close)
        for name in ("rename", "replace", "link"):
            monkeypatch.setattr(os, name, two_paths(name))
        for name in ("unlink", "mkdir"):
            monkeypatch.setattr(os, name, one_path(name))

    def _change(self, path: Any) -> None:
        full = os.path.abspath(os.fspath(path))
        name = os.path.basename(full)
        if name.endswith(UNTRUSTED_SUFFIXES) or name in UNTRUSTED_NAMES:
            return
        self.events.append(("change", os.path.dirname(full), name))

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Note, when the block ends, each change in it that no fsync of its directory
        followed (all steps run, so that a failure lists every gap)."""
        start = len(self.events)
        yield
        events = self.events[start:]
        assert any(kind == "change" for kind, _, _ in events), f"{what}: changed nothing"
        self.unsynced += [f"{what}: {os.path.join(directory, name)}"
                          for i, (kind, directory, name) in enumerate(events)
                          if kind == "change" and ("fsync", directory, "") not in events[i + 1:]]

    def check(self) -> None:
        assert not self.unsynced, "changed with no directory fsync after:\n" + "\n".join(
            self.unsynced)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> DirectorySpy:
    return DirectorySpy(monkeypatch)


def test_a_queues_life_fsyncs_every_directory_it_changes(tmp_path: Path,
                                                         spy: DirectorySpy) -> None:
    data = tmp_path / "data"
    with spy.step("opening a new data directory"):
        broker = Broker(data, maintenance_interval_ms=NO_MAINTENANCE_MS,
                        segment_bytes_max=16 * 1024)
    try:
        with spy.step("creating a queue"):
            queue = broker.create_queue("jobs")
        with spy.step("sending until segments roll"):
            for i in range(40):
                queue.send_batch([b"%d" % i + b"." * 1000] * 2)
        core = broker._core_of("jobs")
        assert core.log.segment_count > 2
        with spy.step("a snapshot, and the segments it lets go"):
            while messages := queue.receive(max_messages=10, wait_seconds=0):
                queue.delete_batch([m.receipt for m in messages])
            assert core.maybe_snapshot(force=True)
        with spy.step("a cluster replica's directory"):
            broker.adopt_queue("replica", 77, {})
        with spy.step("deleting a queue"):
            broker.delete_queue("jobs")
    finally:
        broker.close()
    spy.check()


def test_a_followers_cut_fsyncs_the_snapshots_removal(tmp_path: Path,
                                                      spy: DirectorySpy) -> None:
    directory = tmp_path / "replica"
    with Log(directory / "log", segment_bytes_max=4096) as log:
        for i in range(50):
            log.append_batch([b"%d" % i * 100])
    # A snapshot this node took while it led, past the cut: it must go with the records.
    (directory / SNAPSHOT_FILE).write_bytes(encode_snapshot(State(False), 30))
    replica = Replica("q", 1, str(directory), "always")
    try:
        with spy.step("cutting a divergent suffix"):
            replica.truncate(10)
        assert not (directory / SNAPSHOT_FILE).exists()
    finally:
        replica.close()
    spy.check()


def test_mending_a_followers_copy_fsyncs_every_directory(tmp_path: Path,
                                                        spy: DirectorySpy) -> None:
    for case, keep_prefix in (("prefix", True), ("whole", False)):
        directory = tmp_path / case
        with Log(directory / "log", segment_bytes_max=4096) as log:
            for i in range(50):
                log.append_batch([b"%d" % i * 100])
        (directory / SNAPSHOT_FILE).write_bytes(b"a snapshot taken while this node led")
        segment = sorted((directory / "log").glob("*.log"))[1]
        data = bytearray(segment.read_bytes())
        data[len(data) // 2] ^= 0x20
        segment.write_bytes(bytes(data))
        with spy.step(f"setting a follower's damaged copy aside ({case})"):
            repair = set_aside_replica(str(directory), keep_prefix)
        assert bool(repair.refetched_from) is keep_prefix
    spy.check()


def test_setting_aside_and_adopting_fsync_both_directories(tmp_path: Path,
                                                           spy: DirectorySpy) -> None:
    data = tmp_path / "data"
    with Broker(data, maintenance_interval_ms=NO_MAINTENANCE_MS) as broker:
        broker.create_queue("jobs").send(b"x")
        with spy.step("setting a queue aside"):
            place = broker.set_aside_queue("jobs", "a test")
        with spy.step("adopting it back"):
            broker.adopt_orphan(place)
    spy.check()


def test_the_master_key_file_is_made_durable(tmp_path: Path, spy: DirectorySpy) -> None:
    from server.protection import masterkey

    with spy.step("creating the master key"):
        masterkey.load_or_create(str(tmp_path / masterkey.FILE_NAME))
    spy.check()
