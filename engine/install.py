"""A queue's state installed from a snapshot in place of its log (a cluster replica).

A cluster follower that is new, or far behind, is sent its leader's snapshot of the
queue's state at offset S rather than every record before S (replication.leader). It
installs it in steps that a crash (kill -9, power loss) may stop anywhere:

1. ``snapshot.incoming``: the snapshot's bytes as they arrive (``Incoming``), fsync'd and
   checked (checksum, offset S) once whole. A crash here leaves the queue as it was.
2. ``installing``: a journal, written whole (tmp, fsync, rename, fsync dir), naming S,
   L, the epoch history before L, and whether a snapshot goes in. From here the install
   is finished, never undone: the old log may be going already.
3. ``snapshot.incoming`` replaces ``snapshot`` (rename, fsync dir);
4. the log starts over, empty, at L <= S (``Log.restart_at``): the state holds where each
   live message's body is in the log, and the oldest is at L, so the leader sends the log
   from L (replication.leader); until it reaches S the queue cannot open here (replay
   refuses a snapshot ahead of its log), and the replica is out of the ISR meanwhile;
5. ``epochs`` holds the epoch history before L (written whole): the batches that carried
   it are gone, and replication compares histories (replication.history);
6. the journal is removed (fsync dir).

Whoever opens the queue directory next - a replica, or a QueueCore if the node leads -
calls ``finish`` first: with a journal there, steps 3-6 are done again (each is
idempotent, and the log directory is emptied by name, without opening it); without one,
a stray ``snapshot.incoming`` is removed and nothing else changes. So an open never sees
the old log with the new snapshot, nor a log that starts past 0 without its snapshot.

The same journal, with no snapshot and offset 0, starts a replica over empty when it can
no longer rebuild its state (replication.follower.Replica.truncate). Files drawn in
docs/FORMAT.md, "Snapshot install".

Not thread-safe; the caller owns the queue directory (one writer per partition).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Sequence

from engine import files
from engine import format as fmt
from engine.errors import CorruptDataError, CorruptSnapshotError
from engine.log import Log, segment_bases
from engine.snapshot import check_snapshot

SNAPSHOT_FILE = "snapshot"
"""The queue's snapshot (engine.queue reads it; engine.snapshot draws it)."""
INCOMING_FILE = "snapshot.incoming"
JOURNAL_FILE = "installing"
EPOCHS_FILE = "epochs"
LOG_DIR = "log"

History = Sequence[tuple[int, int]]

CRASH_AT: str | None = None
"""Test-only: the process kills itself (SIGKILL) right after this step ("incoming",
"journal", "snapshot", "log", "epochs", "done"), as kill -9 would stop it there."""
UNORDERED = False
"""Test-only, the negative control of the ordering: no journal, and the log goes before
the snapshot is in place - a crash between leaves a log that starts at S with nothing to
rebuild the state from."""


def _step(name: str) -> None:
    if name == CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


class Incoming:
    """A snapshot being received, in ``snapshot.incoming``: bytes in order, then sealed."""

    def __init__(self, directory: str, total: int) -> None:
        self.path = os.path.join(directory, INCOMING_FILE)
        self.total = total
        self.received = 0
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        files.write_all(self._fd, data, self.path)
        self.received += len(data)

    def seal(self) -> None:
        """Make what was received durable (the install checks it next)."""
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """The stream ended before the install: the file goes - unless the install's
        journal is written, which finishes with it (``finish``)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not os.path.exists(os.path.join(os.path.dirname(self.path), JOURNAL_FILE)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def install(directory: str, log: Log, offset: int, log_from: int, history: History
            ) -> None:
    """Put the sealed ``snapshot.incoming`` (the state at offset) in place of log, whose
    every record goes: it starts over, empty, at log_from; history is the epoch history
    before log_from. Durable on return. Raises CorruptSnapshotError, changing nothing, if
    the file is not a whole snapshot at offset."""
    incoming = os.path.join(directory, INCOMING_FILE)
    with open(incoming, "rb") as f:
        data = f.read()
    at = check_snapshot(data, incoming)
    if at != offset:
        raise CorruptSnapshotError(incoming, f"holds the state at {at}, not at {offset}")
    del data
    _step("incoming")
    if UNORDERED:
        log.restart_at(log_from)
        _step("log")
        files.rename(incoming, os.path.join(directory, SNAPSHOT_FILE))
        _write_epochs(directory, history)
        return
    _write_journal(directory, offset, log_from, True, history)
    _step("journal")
    _apply(directory, offset, log_from, True, history, log)


def start_over(directory: str, log: Log) -> None:
    """Empty the replica: no snapshot, no epochs, the log empty at offset 0 (journaled as
    an install, so a crash part-way is finished by the next open)."""
    _write_journal(directory, 0, 0, False, ())
    _step("journal")
    _apply(directory, 0, 0, False, (), log)


def finish(directory: str, *, fsync: str, segment_bytes_max: int) -> bool:
    """Finish an install a crash interrupted (True if there was one). Called before the
    queue's snapshot and log are opened. Raises CorruptDataError for a journal that does
    not decode, or a snapshot that is not the one it names: the directory is then left as
    it is, for an operator."""
    path = os.path.join(directory, JOURNAL_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, INCOMING_FILE))  # never installed
        return False
    try:
        journal = json.loads(raw)
        offset, with_snapshot = int(journal["offset"]), bool(journal["snapshot"])
        log_from = int(journal["log_from"])
        history = [(int(e), int(o)) for e, o in journal["epochs"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptDataError(f"install journal {path} does not decode: {exc}", path, 0,
                               str(exc)) from exc
    if with_snapshot:
        snapshot = os.path.join(directory, SNAPSHOT_FILE)
        if not os.path.exists(os.path.join(directory, INCOMING_FILE)):
            # Step 3 was done: the snapshot in place must be the one the journal names.
            with open(snapshot, "rb") as f:
                at = check_snapshot(f.read(), snapshot)
            if at != offset:
                raise CorruptSnapshotError(snapshot, f"holds the state at {at}, but the "
                                           f"install journal names {offset}")
    log_path = os.path.join(directory, LOG_DIR)
    # The old log may be part-way through going: its files go by name, newest first,
    # without opening it (what is left of it may not open as a log).
    for base in reversed(segment_bases(log_path) if os.path.isdir(log_path) else []):
        for suffix in (fmt.INDEX_SUFFIX, fmt.LOG_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(log_path, fmt.segment_file_name(base, suffix)))
    files.make_dirs(log_path)
    files.fsync_dir(log_path)
    log = Log(log_path, fsync=fsync, lock=False, segment_bytes_max=segment_bytes_max)
    try:
        _apply(directory, offset, log_from, with_snapshot, history, log)
    finally:
        log.close()
    return True


def read_epochs(directory: str) -> list[tuple[int, int]]:
    """The epoch history before the log's first offset, as an install left it ([]: none)."""
    path = os.path.join(directory, EPOCHS_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    try:
        return [(int(e), int(o)) for e, o in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise CorruptDataError(f"epoch history {path} does not decode: {exc}", path, 0,
                               str(exc)) from exc


def _write_journal(directory: str, offset: int, log_from: int, with_snapshot: bool,
                   history: History) -> None:
    files.write_file(os.path.join(directory, JOURNAL_FILE), json.dumps(
        {"offset": offset, "log_from": log_from, "snapshot": with_snapshot,
         "epochs": [list(entry) for entry in history]}).encode() + b"\n")


def _write_epochs(directory: str, history: History) -> None:
    path = os.path.join(directory, EPOCHS_FILE)
    if history:
        files.write_file(path, json.dumps([list(entry) for entry in history]).encode())
    else:
        files.remove(path)


def _apply(directory: str, offset: int, log_from: int, with_snapshot: bool,
           history: History, log: Log) -> None:
    """Steps 3-6: each may have been done already."""
    incoming = os.path.join(directory, INCOMING_FILE)
    snapshot = os.path.join(directory, SNAPSHOT_FILE)
    if with_snapshot:
        if os.path.exists(incoming):
            files.rename(incoming, snapshot)
    else:
        files.remove(incoming)
        files.remove(snapshot)
    _step("snapshot")
    if log.first_offset != log_from or log.next_offset != log_from:
        log.restart_at(log_from)
    _step("log")
    _write_epochs(directory, history)
    _step("epochs")
    files.remove(os.path.join(directory, JOURNAL_FILE))
    _step("done")
