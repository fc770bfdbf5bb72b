"""The power-loss file system itself: what survives a power loss, and what does not.

The durability tests trust PowerFS to drop exactly what was not synced. A file system
that kept too much would let a missing fsync pass; one that dropped too much would fail
correct code. Each case writes through the mount, cuts the power, remounts and looks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.powerfs import PowerFS, fuse_unavailable, sync_dir

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None,
                                reason=fuse_unavailable() or "")


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PowerFS]:
    # One daemon for the module, power-cycled by each case: a mount costs a process start.
    with PowerFS(tmp_path_factory.mktemp("powerfs")) as mounted:
        yield mounted


@pytest.fixture
def root(fs: PowerFS, request: pytest.FixtureRequest) -> Path:
    """A fresh directory for one case, itself durable."""
    path = fs.mountpoint / str(request.node.name)
    path.mkdir()
    sync_dir(fs.mountpoint)
    return path


def write(path: Path, data: bytes, sync: bool = False, datasync: bool = False,
          flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
        if datasync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def power_cycle(fs: PowerFS) -> dict[str, int]:
    lost = fs.lose_power()
    fs.remount()
    return lost


def test_a_write_without_fsync_is_lost(fs: PowerFS, root: Path) -> None:
    write(root / "f", b"durable", sync=True)
    sync_dir(root)
    write(root / "f", b"-lost", flags=os.O_WRONLY | os.O_APPEND)
    assert (root / "f").read_bytes() == b"durable-lost"  # the page cache has it
    lost = power_cycle(fs)
    assert (root / "f").read_bytes() == b"durable"
    assert lost["files_with_unsynced_data"] == 1 and lost["unsynced_bytes"] == 5


@pytest.mark.parametrize("how", ["fsync", "fdatasync"])
def test_a_write_with_fsync_or_fdatasync_is_kept(fs: PowerFS, root: Path, how: str) -> None:
    write(root / "f", b"abc", sync=how == "fsync", datasync=how == "fdatasync")
    sync_dir(root)
    fd = os.open(root / "f", os.O_WRONLY)
    try:
        os.pwrite(fd, b"XY", 1)
        os.pwrite(fd, b"tail", 10)  # past the end: a hole of zeros
        (os.fsync if how == "fsync" else os.fdatasync)(fd)
        os.pwrite(fd, b"lost", 0)
    finally:
        os.close(fd)
    power_cycle(fs)
    assert (root / "f").read_bytes() == b"aXY" + bytes(7) + b"tail"


def test_a_truncate_is_durable_only_with_fsync(fs: PowerFS, root: Path) -> None:
    write(root / "kept", b"0123456789", sync=True)
    write(root / "cut", b"0123456789", sync=True)
    sync_dir(root)
    os.truncate(root / "kept", 4)
    fd = os.open(root / "cut", os.O_WRONLY)
    try:
        os.ftruncate(fd, 4)
        os.fsync(fd)
    finally:
        os.close(fd)
    power_cycle(fs)
    assert (root / "kept").read_bytes() == b"0123456789"
    assert (root / "cut").read_bytes() == b"0123"


def test_a_create_without_directory_fsync_is_lost(fs: PowerFS, root: Path) -> None:
    # Even with its data fsync'd: the file has no durable name.
    write(root / "f", b"synced data", sync=True)
    os.mkdir(root / "d")
    lost = power_cycle(fs)
    assert os.listdir(root) == []
    assert lost["unsynced_entries"] == 2


def test_a_create_with_directory_fsync_keeps_only_synced_data(fs: PowerFS, root: Path
                                                               ) -> None:
    write(root / "empty", b"never synced")
    write(root / "full", b"synced", sync=True)
    sync_dir(root)
    power_cycle(fs)
    assert sorted(os.listdir(root)) == ["empty", "full"]
    assert (root / "empty").read_bytes() == b""
    assert (root / "full").read_bytes() == b"synced"


def test_a_new_directory_needs_its_parent_synced_and_its_own(fs: PowerFS, root: Path
                                                             ) -> None:
    # The pattern of a queue's directory: mkdir a/, a file in a/b/ synced with b/.
    os.makedirs(root / "a" / "b")
    write(root / "a" / "b" / "f", b"x", sync=True)
    sync_dir(root / "a" / "b")
    sync_dir(root)
    power_cycle(fs)
    # a/ survives, but its entry b/ was never synced: b and f are gone.
    assert os.listdir(root) == ["a"]
    assert os.listdir(root / "a") == []

    os.makedirs(root / "a" / "b")
    write(root / "a" / "b" / "f", b"x", sync=True)
    sync_dir(root / "a" / "b")
    sync_dir(root / "a")
    power_cycle(fs)
    assert (root / "a" / "b" / "f").read_bytes() == b"x"


def test_a_rename_without_directory_fsync_is_undone(fs: PowerFS, root: Path) -> None:
    write(root / "snapshot", b"old", sync=True)
    sync_dir(root)
    write(root / "snapshot.tmp", b"new", sync=True)
    os.replace(root / "snapshot.tmp", root / "snapshot")
    assert (root / "snapshot").read_bytes() == b"new"
    power_cycle(fs)
    assert os.listdir(root) == ["snapshot"]
    assert (root / "snapshot").read_bytes() == b"old"


def test_a_rename_with_directory_fsync_is_atomic(fs: PowerFS, root: Path) -> None:
    # tmp, fsync, rename, fsync dir: the way the engine writes snapshots.
    write(root / "snapshot", b"old", sync=True)
    sync_dir(root)
    write(root / "snapshot.tmp", b"new", sync=True)
    os.replace(root / "snapshot.tmp", root / "snapshot")
    sync_dir(root)
    power_cycle(fs)
    assert os.listdir(root) == ["snapshot"]
    assert (root / "snapshot").read_bytes() == b"new"


def test_a_rename_keeps_the_unsynced_data_of_the_file_lost(fs: PowerFS, root: Path) -> None:
    # A rename makes the name durable (with the dir fsync), never the bytes.
    write(root / "tmp", b"not synced")
    os.replace(root / "tmp", root / "final")
    sync_dir(root)
    power_cycle(fs)
    assert os.listdir(root) == ["final"]
    assert (root / "final").read_bytes() == b""


def test_a_rename_across_directories_is_durable_in_each_separately(fs: PowerFS, root: Path
                                                                    ) -> None:
    os.mkdir(root / "a")
    os.mkdir(root / "b")
    write(root / "a" / "f", b"data", sync=True)
    sync_dir(root / "a")
    sync_dir(root)
    os.rename(root / "a" / "f", root / "b" / "f")
    sync_dir(root / "b")  # only the target: the source still names it after a loss
    power_cycle(fs)
    assert (root / "a" / "f").read_bytes() == b"data"
    assert (root / "b" / "f").read_bytes() == b"data"


def test_an_unlink_without_directory_fsync_is_undone(fs: PowerFS, root: Path) -> None:
    write(root / "gone", b"x", sync=True)
    write(root / "back", b"y", sync=True)
    sync_dir(root)
    os.unlink(root / "gone")
    os.unlink(root / "back")
    os.mkdir(root / "d")
    os.rmdir(root / "d")
    sync_dir(root)
    write(root / "new", b"", sync=True)
    os.unlink(root / "new")
    power_cycle(fs)
    assert os.listdir(root) == []

    write(root / "back", b"y", sync=True)
    sync_dir(root)
    os.unlink(root / "back")
    power_cycle(fs)
    assert (root / "back").read_bytes() == b"y"


def test_an_open_unlinked_file_still_works_and_its_sync_reaches_the_old_name(
        fs: PowerFS, root: Path) -> None:
    # The durable name is still there until the directory is synced, and an fsync through
    # a descriptor opened before the unlink updates what that name holds.
    write(root / "f", b"one", sync=True)
    sync_dir(root)
    fd = os.open(root / "f", os.O_RDWR)
    try:
        os.unlink(root / "f")
        os.pwrite(fd, b"two", 0)
        os.ftruncate(fd, 2)
        os.fsync(fd)
        assert os.pread(fd, 10, 0) == b"tw"
    finally:
        os.close(fd)
    power_cycle(fs)
    assert (root / "f").read_bytes() == b"tw"


def test_hard_links_and_modes(fs: PowerFS, root: Path) -> None:
    write(root / "tmp", b"key", sync=True)
    os.link(root / "tmp", root / "key")
    os.unlink(root / "tmp")
    os.chmod(root / "key", 0o600)
    fd = os.open(root / "key", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_dir(root)
    power_cycle(fs)
    assert os.listdir(root) == ["key"]
    assert (root / "key").read_bytes() == b"key"
    assert (root / "key").stat().st_mode & 0o777 == 0o600


def test_refusals_are_the_usual_errors(fs: PowerFS, root: Path) -> None:
    os.mkdir(root / "d")
    write(root / "d" / "f", b"")
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: os.rmdir(root / "d"), errno.ENOTEMPTY),
        (lambda: os.mkdir(root / "d"), errno.EEXIST),
        (lambda: os.unlink(root / "d"), errno.EISDIR),
        (lambda: os.rename(root / "d", root / "d" / "inside"), errno.EINVAL),
        (lambda: os.open(root / "missing", os.O_RDONLY), errno.ENOENT),
        (lambda: os.open(root / "d" / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY),
         errno.EEXIST),
        (lambda: os.symlink("f", root / "link"), errno.ENOSYS),
    ]
    for call, code in cases:
        with pytest.raises(OSError) as raised:
            call()
        assert raised.value.errno == code, (call, raised.value)


def test_sqlite_in_wal_mode_keeps_committed_rows(fs: PowerFS, root: Path) -> None:
    # The engine's catalog and the server's metadata are SQLite (WAL, synchronous=FULL).
    db = sqlite3.connect(root / "db.sqlite3", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (x INTEGER)")
        for x in range(20):
            db.execute("INSERT INTO t VALUES (?)", (x,))
        lost = power_cycle(fs)
    finally:
        with contextlib.suppress(sqlite3.Error):
            db.close()
    db = sqlite3.connect(root / "db.sqlite3")
    try:
        assert [x for (x,) in db.execute("SELECT x FROM t ORDER BY x")] == list(range(20))
    finally:
        db.close()
    assert lost["files_with_unsynced_data"] >= 1  # the shared-memory index, at least


def test_after_a_power_loss_everything_fails_until_remounted(fs: PowerFS, root: Path) -> None:
    write(root / "f", b"x", sync=True)
    fd = os.open(root / "f", os.O_RDWR)
    try:
        fs.lose_power()
        with pytest.raises(OSError) as raised:
            os.write(fd, b"y")
        assert raised.value.errno == errno.EIO
        with pytest.raises(OSError) as raised:
            os.fsync(fd)
        assert raised.value.errno == errno.EIO
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    fs.remount()
    assert fs.stats()["dead"] is False
    assert os.listdir(root) == []


# --- against a slow, obviously right model ----------------------------------------------

DIRS = ("", "d")
NAMES = ("a", "b", "c")


class Reference:
    """Two directories of files, each with a current and a synced state, as dicts."""

    def __init__(self) -> None:
        self.data: dict[int, bytes] = {}
        self.synced: dict[int, bytes] = {}
        self.entries: dict[str, dict[str, int]] = {d: {} for d in DIRS}
        self.synced_entries: dict[str, dict[str, int]] = {d: {} for d in DIRS}
        self._next = 0

    def create(self, d: str, name: str) -> None:
        self._next += 1
        self.data[self._next] = self.synced[self._next] = b""
        self.entries[d][name] = self._next

    def power_cycle(self) -> None:
        # What survives: each synced name, with its inode's synced bytes; a file under
        # two durable names becomes two files.
        synced, self.data, self.synced = self.synced, {}, {}
        for d in DIRS:
            kept = self.synced_entries[d]
            self.entries[d], self.synced_entries[d] = {}, {}
            for name, ino in kept.items():
                self._next += 1
                self.data[self._next] = self.synced[self._next] = synced[ino]
                self.entries[d][name] = self.synced_entries[d][name] = self._next

    def view(self) -> dict[str, bytes]:
        return {f"{d}/{n}": self.data[i] for d in DIRS for n, i in self.entries[d].items()}


def test_random_operations_match_a_reference_model(fs: PowerFS, root: Path) -> None:
    # Seeded, not Hypothesis: each power cycle remounts, and a fixed walk keeps it quick.
    rng = random.Random(20_417)
    (root / "d").mkdir()
    sync_dir(root)
    ref = Reference()
    cycles = 0
    for step in range(250):
        d = rng.choice(DIRS)
        name = rng.choice(NAMES)
        path = root / d / name
        ino = ref.entries[d].get(name)
        op = rng.choices(["create", "write", "truncate", "fsync", "fsyncdir", "rename",
                          "unlink", "power"], weights=[6, 10, 3, 6, 5, 5, 3, 2])[0]
        if op == "create" and ino is None:
            write(path, b"")
            ref.create(d, name)
        elif op == "write" and ino is not None:
            offset = rng.randrange(len(ref.data[ino]) + 3)
            chunk = rng.randbytes(rng.randint(1, 5))
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, chunk, offset)
            finally:
                os.close(fd)
            old = ref.data[ino].ljust(offset, b"\0")
            ref.data[ino] = old[:offset] + chunk + old[offset + len(chunk):]
        elif op == "truncate" and ino is not None:
            length = rng.randrange(len(ref.data[ino]) + 3)
            os.truncate(path, length)
            ref.data[ino] = ref.data[ino][:length].ljust(length, b"\0")
        elif op == "fsync" and ino is not None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            ref.synced[ino] = ref.data[ino]
        elif op == "fsyncdir":
            sync_dir(root / d)
            ref.synced_entries[d] = dict(ref.entries[d])
        elif op == "rename" and ino is not None:
            d2, name2 = rng.choice(DIRS), rng.choice(NAMES)
            os.rename(path, root / d2 / name2)
            if (d2, name2) != (d, name):
                del ref.entries[d][name]
                ref.entries[d2][name2] = ino
        elif op == "unlink" and ino is not None:
            os.unlink(path)
            del ref.entries[d][name]
        elif op == "power":
            power_cycle(fs)
            ref.power_cycle()
            cycles += 1
        seen = {f"{dd}/{n}": (root / dd / n).read_bytes()
                for dd in DIRS for n in os.listdir(root / dd) if n != "d"}
        assert seen == ref.view(), f"step {step}: {op} {d}/{name}"
    assert cycles >= 5
