"""A follower's install of a snapshot, killed (SIGKILL) after each of its steps, and the
cut of a replica whose log starts past 0 (replication.follower.Replica.truncate).

After a kill at any step the replica opens (finishing the install, engine/install.py)
holding either its old state or the installed one - never a mix, never a log without the
snapshot it needs. The negative control installs without the journal and in the wrong
order (engine.install.UNORDERED): the same check must catch it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine import Broker
from engine.errors import LogError
from engine.install import EPOCHS_FILE, INCOMING_FILE, JOURNAL_FILE, read_epochs
from engine.queue import SNAPSHOT_FILE, read_snapshot, replay
from engine.repair import MENDING_FILE
from engine.snapshot import log_floor, snapshot_offset, state_digest
from replication.follower import Replica
from replication.history import batch_end

STEPS = ["incoming", "journal", "snapshot", "log", "epochs", "done", "none"]
ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Source:
    """A leader's queue after churn: its snapshot, the log from the oldest live body,
    and its state's digest; and an old copy of another state (the follower's)."""

    snapshot: Path
    offset: int
    log_from: int
    tail: bytes
    digest: str
    old_dir: Path
    old_digest: str


def _queue_dir(broker: Broker, name: str) -> Path:
    return Path(broker.queue_dir(name))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    root = tmp_path_factory.mktemp("source")
    with Broker(root / "leader", fsync="never") as broker:
        queue = broker.create_queue("q")
        for i in range(40):
            for j in range(5):
                queue.send(b"%d-%d." % (i, j) + b"x" * 500)
            for message in queue.receive(max_messages=4, wait_seconds=0):
                queue.delete(message.receipt)
        core = broker._core_of("q")
        assert core.maybe_snapshot(force=True)
        directory = _queue_dir(broker, "q")
        offset = snapshot_offset(str(directory / SNAPSHOT_FILE))
        with open(directory / SNAPSHOT_FILE, "rb") as f:
            log_from = log_floor(f.read())[1]
        assert offset is not None and 0 < log_from < offset
        queue.send(b"tail")
        tail, at = [], log_from
        while at < core.log.next_offset:
            chunk = core.log.read_raw(at, 1 << 20)
            tail.append(chunk)
            at = batch_end(chunk)
        digest = core.digest()
        snapshot = root / "shipped"
        shutil.copyfile(directory / SNAPSHOT_FILE, snapshot)
    with Broker(root / "follower", fsync="always") as broker:
        queue = broker.create_queue("q")
        queue.send(b"old")
        old_digest = broker._core_of("q").digest()
        old_dir = _queue_dir(broker, "q")
    return Source(snapshot, offset, log_from, b"".join(tail), digest, old_dir, old_digest)


def _install_in_child(source: Source, directory: Path, step: str, unordered: bool) -> int:
    return subprocess.run(
        [sys.executable, "-m", "tests.replication.install_child", str(directory),
         str(source.snapshot), str(source.offset), str(source.log_from),
         json.dumps([[0, 0]]), step, "1" if unordered else "0"],
        cwd=ROOT, timeout=60, check=False).returncode


def _state_after_reopen(source: Source, directory: Path) -> str:
    """Open the replica as the node would after the crash; give the leader's tail to an
    installed copy (as APPENDs would); then the queue's state, as a QueueCore replays it:
    "old" or "installed". Raises if the copy is neither."""
    replica = Replica("q", 1, str(directory), "always")
    try:
        assert not (directory / JOURNAL_FILE).exists()
        assert not (directory / INCOMING_FILE).exists()
        log = replica.log
        installed = log.first_offset > 0
        if installed:
            assert log.first_offset == source.log_from
            assert read_epochs(str(directory)) == [(0, 0)]
            if log.next_offset == log.first_offset:
                log.append_raw(source.tail)
        state, _ = replay(log, read_snapshot(str(directory)))
    finally:
        replica.close()
    digest = state_digest(state)
    if installed:
        assert digest == source.digest, "installed, yet not the leader's state"
        return "installed"
    assert digest == source.old_digest, "neither the old state nor the installed one"
    return "old"


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_of_an_install_leaves_the_old_state_or_the_new(
        source: Source, tmp_path: Path, step: str) -> None:
    directory = tmp_path / "q"
    shutil.copytree(source.old_dir, directory)
    code = _install_in_child(source, directory, step, unordered=False)
    assert code == (0 if step == "none" else -signal.SIGKILL)
    expected = "old" if step == "incoming" else "installed"
    assert _state_after_reopen(source, directory) == expected


def test_negative_control_an_unordered_install_is_caught(source: Source,
                                                         tmp_path: Path) -> None:
    """The log goes before the snapshot is in place, and no journal says what was meant:
    killed between the two, the copy holds neither state."""
    directory = tmp_path / "q"
    shutil.copytree(source.old_dir, directory)
    assert _install_in_child(source, directory, "log", unordered=True) == -signal.SIGKILL
    with pytest.raises((AssertionError, LogError)):
        _state_after_reopen(source, directory)


# --- a cut of a replica installed from a snapshot -----------------------------------------


def _installed_replica(source: Source, directory: Path) -> Replica:
    shutil.copytree(source.old_dir, directory)
    assert _install_in_child(source, directory, "none", unordered=False) == 0
    replica = Replica("q", 1, str(directory), "always")
    replica.log.append_raw(source.tail)
    return replica


def test_a_cut_above_the_snapshot_keeps_it(source: Source, tmp_path: Path) -> None:
    replica = _installed_replica(source, tmp_path / "q")
    try:
        end = replica.truncate(replica.log.next_offset - 1)  # the "tail" record goes
        assert end == replica.log.next_offset >= source.offset
        assert snapshot_offset(str(tmp_path / "q" / SNAPSHOT_FILE)) == source.offset
        assert replica.log.first_offset == source.log_from
        assert not replica.started_over
        state, _ = replay(replica.log, read_snapshot(replica.directory))
        assert len(state)  # the state rebuilds: snapshot + log from the oldest body
    finally:
        replica.close()


def test_a_cut_below_a_snapshot_the_copy_needs_starts_it_over(source: Source,
                                                              tmp_path: Path) -> None:
    """The node led after its install and took a snapshot past the cut: without it the
    state at the cut cannot be rebuilt from a log that starts past 0. The copy starts over
    empty (marked mending: it leaves the ISR) rather than keep a log it cannot replay."""
    directory = tmp_path / "q"
    replica = _installed_replica(source, directory)
    try:
        cut = source.offset - 1  # below the snapshot, above the log's start
        assert source.log_from <= cut
        end = replica.truncate(cut)
        assert end == 0 and replica.started_over
        assert (replica.log.first_offset, replica.log.next_offset) == (0, 0)
        assert not (directory / SNAPSHOT_FILE).exists()
        assert not (directory / EPOCHS_FILE).exists()
        assert (directory / MENDING_FILE).exists()
        assert replica.history.entries == []
    finally:
        replica.close()
    # What it holds now opens as an empty replica, ready to be sent the queue again.
    replica = Replica("q", 1, str(directory), "always")
    assert (replica.log.first_offset, replica.log.next_offset) == (0, 0)
    replica.close()


def test_negative_control_the_old_cut_leaves_a_copy_that_cannot_replay(
        source: Source, tmp_path: Path) -> None:
    """The rule before: drop the snapshot, cut the log. On a log that starts past 0 the
    copy then has no way to its state."""
    directory = tmp_path / "q"
    replica = _installed_replica(source, directory)
    try:
        os.unlink(directory / SNAPSHOT_FILE)
        replica.log.truncate_after(source.offset - 1)
        with pytest.raises(LogError, match="no snapshot"):
            replay(replica.log, read_snapshot(str(directory)))
    finally:
        replica.close()
