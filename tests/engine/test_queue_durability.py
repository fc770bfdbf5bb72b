"""A queue's state is a function of its durable log: replay, time, crashes and disk use.

- A copy of an open data directory is a log prefix; replaying it gives exactly the state
  the running broker had when the copy was taken.
- Visibility, delay, retention and FIFO deduplication follow the broker's clock alone.
- Killing a process at any moment loses no acknowledged send and resurrects no
  acknowledged delete.
- The disk a queue uses follows its live messages, not everything ever sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import engine.queue as engine_queue
from engine import Broker, ManualClock, Queue, SendEntry
from engine.errors import EngineError, MessageNotInflightError, ReceiptInvalidError
from engine.snapshot import compress_snapshot

SEED = 52_817
ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("queue_crash_child.py")
# No background maintenance: the copies of a directory below are taken while the broker
# is open, and a snapshot running meanwhile would delete segments mid-copy. (Snapshots
# still happen, in the foreground, after sends and deletes.)
NO_MAINTENANCE_MS = 3_600_000
# Kill rounds, each at a random moment (about 1.4 s apiece): `make test` runs the first
# half of the seeded schedule, `make faults` all of it.
KILL_ROUNDS = 7
KILL_ROUNDS_LONG = 14


def _broker(path: Path, clock: ManualClock, fsync: str = "always") -> Broker:
    return Broker(path, fsync=fsync, clock=clock, segment_bytes_max=32 * 1024,
                  snapshot_bytes=16 * 1024, maintenance_interval_ms=NO_MAINTENANCE_MS)


def _dir_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


# --- a. deterministic replay ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CopyPoint:
    path: Path
    now_ms: int
    digests: dict[str, str]
    step: int


def _run_step(rng: random.Random, queue: Queue, clock: ManualClock, receipts: list[str],
              serial: list[int]) -> None:
    """One random operation; errors that stale or expired receipts may draw are fine."""
    op = rng.choices(["send", "batch", "receive", "delete", "delete_batch", "visibility",
                      "purge", "advance"], weights=[15, 15, 25, 15, 5, 10, 1, 14])[0]
    serial[0] += 1
    body = b"body-%d-" % serial[0] + rng.randbytes(rng.randrange(200))
    if op == "send":
        queue.send(body, delay_seconds=rng.choice([None, 0, 0, 1, 7]))
    elif op == "batch":
        results = queue.send_batch([SendEntry(body + b"%d" % i, rng.choice([None, 0, 3]))
                                    for i in range(rng.randint(1, 10))])
        assert not any(isinstance(r, EngineError) for r in results), results
    elif op == "receive":
        visibility = rng.choice([None, 0, 2, 10, 45])
        for message in queue.receive(rng.randint(1, 10), wait_seconds=0,
                                     visibility_timeout=visibility):
            receipts.append(message.receipt)
    elif op == "delete" and receipts:
        with contextlib.suppress(ReceiptInvalidError):
            queue.delete(rng.choice(receipts))
    elif op == "delete_batch" and receipts:
        chosen = rng.sample(receipts, min(len(receipts), rng.randint(1, 10)))
        queue.delete_batch(chosen)
    elif op == "visibility" and receipts:
        with contextlib.suppress(ReceiptInvalidError, MessageNotInflightError):
            queue.change_visibility(rng.choice(receipts), rng.choice([0, 0, 5, 60]))
    elif op == "purge":
        queue.purge()
    elif op == "advance":
        clock.advance(rng.choice([0.001, 0.5, 1, 3, 10, 30, 61]))
    del receipts[:-200]


def test_a_copy_of_an_open_directory_replays_to_the_digest_reported_then(
        tmp_path: Path) -> None:
    rng = random.Random(SEED)
    clock = ManualClock()
    data = tmp_path / "data"
    broker = _broker(data, clock)
    names = ["work", "other"]
    queues = {
        "work": broker.create_queue("work", visibility_timeout=20, retention_seconds=120),
        "other": broker.create_queue("other", delay_seconds=2),
    }
    receipts: dict[str, list[str]] = {name: [] for name in names}
    serial = [0]
    copies: list[CopyPoint] = []
    steps = 2000
    copy_at = set(rng.sample(range(20, steps), 11)) | {steps - 1}
    for step in range(steps):
        # The second queue sees a fifth of the traffic: the copies hold two logs that
        # are at different points.
        name = "other" if rng.random() < 0.2 else "work"
        _run_step(rng, queues[name], clock, receipts[name], serial)
        if step in copy_at:
            for queue in queues.values():
                queue.stats()  # a flush point: expiry due at this time is written now
            digests = {name: queues[name].digest() for name in names}
            path = tmp_path / f"copy-{step}"
            shutil.copytree(data, path)
            copies.append(CopyPoint(path, clock.now_ms(), digests, step))
    stats = queues["work"].stats()
    final = {name: queues[name].digest() for name in names}
    broker.close()

    # Guard against a workload that never got anywhere.
    assert stats.received > 100 and stats.deleted > 20 and stats.expired > 0, stats
    assert len({c.digests["work"] for c in copies}) > len(copies) // 2, "the digest stood still"

    for copy in copies:
        context = f"copy after step {copy.step}"
        # Two brokers on two copies of the same copy, open at once: each replays alone.
        replicas = [tmp_path / f"replay-{copy.step}-{i}" for i in range(2)]
        for replica in replicas:
            shutil.copytree(copy.path, replica)
        brokers = [_broker(r, ManualClock(copy.now_ms)) for r in replicas]
        try:
            for name in names:
                got = [b.get_queue(name).digest() for b in brokers]
                assert got == [copy.digests[name]] * 2, f"{context} queue {name}"
        finally:
            for b in brokers:
                b.close()
        # And the state a replay ends in survives a clean close (a snapshot) and reopen.
        with _broker(replicas[0], ManualClock(copy.now_ms)) as reopened:
            for name in names:
                assert reopened.get_queue(name).digest() == copy.digests[name], context

    with _broker(data, ManualClock(clock.now_ms())) as reopened:
        for name in names:
            assert reopened.get_queue(name).digest() == final[name], name


# --- b. time comes from the injected clock --------------------------------------------


@pytest.fixture
def clocked(tmp_path: Path) -> Iterator[tuple[Broker, ManualClock]]:
    clock = ManualClock()
    broker = _broker(tmp_path / "data", clock)
    yield broker, clock
    broker.close()


def test_visibility_timeout_follows_the_clock(clocked: tuple[Broker, ManualClock]) -> None:
    broker, clock = clocked
    queue = broker.create_queue("vis", visibility_timeout=30)
    queue.send(b"one")
    first = queue.receive(wait_seconds=0)
    assert [m.body for m in first] == [b"one"]
    assert first[0].receive_count == 1
    clock.advance(29.999)
    assert queue.receive(wait_seconds=0) == []
    assert (queue.stats().visible, queue.stats().in_flight) == (0, 1)
    clock.advance(0.001)
    assert (queue.stats().visible, queue.stats().in_flight) == (1, 0)
    second = queue.receive(wait_seconds=0, visibility_timeout=5)
    assert [(m.body, m.receive_count) for m in second] == [(b"one", 2)]
    with pytest.raises(ReceiptInvalidError):
        queue.delete(first[0].receipt)
    # A lease shortened to nothing makes the message visible without the clock moving.
    queue.change_visibility(second[0].receipt, 0)
    third = queue.receive(wait_seconds=0, visibility_timeout=5)
    assert [(m.body, m.receive_count) for m in third] == [(b"one", 3)]
    clock.advance(5)
    with pytest.raises(MessageNotInflightError):
        queue.change_visibility(third[0].receipt, 10)
    queue.delete(third[0].receipt)
    assert queue.receive(wait_seconds=0) == []
    assert queue.stats().deleted == 1


def test_delay_follows_the_clock(clocked: tuple[Broker, ManualClock]) -> None:
    broker, clock = clocked
    queue = broker.create_queue("delay", delay_seconds=10)
    queue.send(b"queue default")
    queue.send(b"own delay", delay_seconds=3)
    queue.send(b"no delay", delay_seconds=0)
    assert [m.body for m in queue.receive(10, wait_seconds=0)] == [b"no delay"]
    stats = queue.stats()
    assert (stats.visible, stats.in_flight, stats.delayed) == (0, 1, 2)
    clock.advance(2.999)
    assert queue.receive(10, wait_seconds=0) == []
    clock.advance(0.001)
    assert [m.body for m in queue.receive(10, wait_seconds=0)] == [b"own delay"]
    clock.advance(6.999)
    assert queue.receive(10, wait_seconds=0) == []
    clock.advance(0.001)
    assert [m.body for m in queue.receive(10, wait_seconds=0)] == [b"queue default"]


def test_retention_follows_the_clock(clocked: tuple[Broker, ManualClock]) -> None:
    broker, clock = clocked
    queue = broker.create_queue("retention", retention_seconds=60, visibility_timeout=600)
    queue.send(b"leased")
    queue.send(b"delayed", delay_seconds=90)
    leased = queue.receive(wait_seconds=0)
    assert [m.body for m in leased] == [b"leased"]
    clock.advance(30)
    queue.send(b"younger")
    clock.advance(29.999)
    stats = queue.stats()
    assert (stats.visible, stats.in_flight, stats.delayed, stats.expired) == (1, 1, 1, 0)
    clock.advance(0.001)
    # Retention counts from the send, whatever the message is doing: leased and delayed
    # messages go too.
    stats = queue.stats()
    assert (stats.visible, stats.in_flight, stats.delayed, stats.expired) == (1, 0, 0, 2)
    queue.delete(leased[0].receipt)  # already gone: nothing to do, and no error
    with pytest.raises(MessageNotInflightError):
        queue.change_visibility(leased[0].receipt, 10)
    clock.advance(31)
    assert queue.receive(10, wait_seconds=0) == []
    stats = queue.stats()
    assert (stats.visible, stats.expired, stats.deleted) == (0, 3, 0), stats

    queue.send(b"last")
    clock.advance(61)
    assert queue.receive(10, wait_seconds=0) == []
    assert queue.stats().expired == 4


def test_fifo_deduplication_window_follows_the_clock(clocked: tuple[Broker, ManualClock]) -> None:
    broker, clock = clocked
    queue = broker.create_queue("x.fifo", fifo=True, content_based_dedup=True)
    first = queue.send(b"same", group_id="g")
    assert not first.duplicate
    # Deleting the message does not end the window: deduplication is about the send.
    [message] = queue.receive(wait_seconds=0)
    queue.delete(message.receipt)
    clock.advance(299)
    again = queue.send(b"same", group_id="g")
    assert again.duplicate and again.message_id == first.message_id
    assert queue.send(b"other", group_id="g").duplicate is False
    assert queue.stats().sent == 2
    clock.advance(2)  # 301 s after the first send
    third = queue.send(b"same", group_id="g")
    assert not third.duplicate and third.message_id != first.message_id
    # One group: the two messages come in the order they were sent.
    assert [m.body for m in queue.receive(10, wait_seconds=0)] == [b"other", b"same"]
    assert queue.stats().sent == 3


# --- c. SIGKILL at random moments --------------------------------------------------------


@dataclasses.dataclass
class ChildRun:
    lines: list[tuple[str, str]]
    returncode: int
    stderr: str


def _run_child(path: Path, run: int, seed: int, delay: float) -> ChildRun:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, str(CHILD), str(path), str(run), str(seed)]
    lines: list[bytes] = []
    first = threading.Event()

    def read(stream: IO[bytes]) -> None:
        for line in stream:
            lines.append(line)
            first.set()
        first.set()

    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env) as proc:
        reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
        reader.start()
        first.wait(60)
        # The clock starts at the first acknowledgement, so the kill lands among sends,
        # receives, deletes and snapshots rather than in interpreter start-up.
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        reader.join(60)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
    # The kill may have cut the last line short: only whole lines count.
    whole = [line.decode() for line in lines if line.endswith(b"\n")]
    parsed = [(line[0], line[2:-1]) for line in whole]
    return ChildRun(parsed, proc.returncode, stderr)


def test_acknowledged_sends_and_deletes_survive_sigkill(tmp_path: Path) -> None:
    _sends_and_deletes_survive_sigkill(tmp_path, KILL_ROUNDS)


@pytest.mark.faults
def test_acknowledged_sends_and_deletes_survive_many_sigkills(tmp_path: Path) -> None:
    _sends_and_deletes_survive_sigkill(tmp_path, KILL_ROUNDS_LONG)


def _sends_and_deletes_survive_sigkill(tmp_path: Path, rounds: int) -> None:
    rng = random.Random(SEED + 1)
    path = tmp_path / "data"
    sent: set[str] = set()          # acknowledged sends
    deleted: set[str] = set()       # acknowledged deletes
    unsettled: set[str] = set()     # deletes the kill interrupted: either outcome is fine
    receives: dict[str, int] = {}
    violations: list[str] = []
    for run in range(rounds):
        delay = rng.uniform(0.2, 1.5)
        result = _run_child(path, run, rng.randrange(1 << 32), delay)
        context = f"run {run} (killed {delay:.2f}s after its first line)"
        assert result.returncode == -signal.SIGKILL, (
            f"{context}: the child exited with {result.returncode}:\n{result.stderr}")
        assert result.lines, f"{context}: the child printed nothing:\n{result.stderr}"
        deleting: set[str] = set()  # the delete batch in progress
        previous = ""
        for tag, body in result.lines:
            if tag == "S":
                sent.add(body)
            elif tag == "R":
                if body in deleted:
                    violations.append(f"{context}: {body} received after its delete")
                receives[body] = receives.get(body, 0) + 1
            elif tag == "X":
                if previous != "X":
                    assert not deleting, f"{context}: a delete batch was left unanswered"
                deleting.add(body)
            elif tag == "D":
                assert body in deleting, f"{context}: {body} deleted unasked"
                deleting.remove(body)
                deleted.add(body)
            else:
                raise AssertionError(f"{context}: unexpected line {tag} {body}")
            previous = tag
        unsettled |= deleting

    # The last leases (1 s) must run out before the drain can see those messages.
    time.sleep(1.5)
    drained: list[str] = []
    with Broker(path, fsync="always") as broker:
        queue = broker.get_queue("crash")
        empty = 0
        while empty < 2:
            batch = queue.receive(10, wait_seconds=0, visibility_timeout=600)
            empty = 0 if batch else empty + 1
            drained.extend(m.body.decode() for m in batch)
        stats = queue.stats()
    remaining = set(drained)

    duplicates = sum(n - 1 for n in receives.values() if n > 1)
    summary = (f"{rounds} runs: {len(sent)} sends and {len(deleted)} deletes acknowledged, "
               f"{len(unsettled)} deletes interrupted, {duplicates} redeliveries, "
               f"{len(drained)} left in the queue")
    print(summary)
    assert not violations, f"{summary}\n" + "\n".join(violations[:20])
    assert len(drained) == len(remaining), (
        f"{summary}: the drain delivered a message twice under a 600 s lease")
    resurrected = sorted(remaining & deleted)
    assert not resurrected, f"{summary}: deleted but still in the queue: {resurrected[:20]}"
    lost = sorted(sent - remaining - deleted - unsettled)
    assert not lost, f"{summary}: acknowledged sends lost: {lost[:20]}"
    # Unacknowledged sends may have survived, but nothing a child did not write.
    strangers = [b for b in drained if not re.fullmatch(r"\d+\.\d+-\d", b)
                 or int(b.split(".")[0]) >= rounds]
    assert not strangers, f"{summary}: bodies no child sent: {strangers[:20]}"
    assert stats.in_flight == len(drained) and stats.visible == 0, stats
    # Guard against a test that passes because nothing happened.
    # (500 sends and 200 deletes over the whole schedule.)
    assert len(sent) >= 500 * rounds // KILL_ROUNDS_LONG and \
        len(deleted) >= 200 * rounds // KILL_ROUNDS_LONG, summary


# --- d. disk use follows live messages -------------------------------------------------


def test_disk_use_follows_live_messages_not_history(tmp_path: Path) -> None:
    messages = 1_000_000
    body = b"x" * 1024
    data = tmp_path / "data"
    with Broker(data, fsync="never", clock=ManualClock()) as broker:
        queue = broker.create_queue("churn")
        entries = [SendEntry(body)] * 10
        started = time.perf_counter()
        for i in range(messages // 10):
            results = queue.send_batch(entries)
            received = queue.receive(10, wait_seconds=0)
            assert len(received) == 10, (i, results, received)
            errors = queue.delete_batch([m.receipt for m in received])
            assert errors == [None] * 10, (i, errors)
        elapsed = time.perf_counter() - started
        stats = queue.stats()
        used = _dir_bytes(data)
    print(f"{messages} messages sent, received and deleted in {elapsed:.1f} s "
          f"({messages / elapsed:,.0f} messages/s); data directory {used / 2**20:.1f} MiB")
    assert (stats.sent, stats.deleted, stats.visible, stats.in_flight) == (
        messages, messages, 0, 0), stats
    assert used < 64 * 2**20, f"{used / 2**20:.1f} MiB on disk for an empty queue"


def _work_during_a_compression(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               whole_under_lock: bool) -> bool:
    """Whether a send, a receive and a delete on a queue complete while a snapshot of
    it is being compressed. The snapshot lets the log go below its oldest live message
    (the first segments, of messages deleted before it) and keeps the segment that holds
    it, though that one is no longer the active one; a copy of the queue's files
    taken then, as a crash would leave them, reopens from that snapshot with every
    message it should hold, bodies included."""
    compressing, release = threading.Event(), threading.Event()

    def slow_compress(parts: list[bytes], end: int) -> bytes:
        compressing.set()
        assert release.wait(10)
        return compress_snapshot(parts, end)

    monkeypatch.setattr(engine_queue, "compress_snapshot", slow_compress)
    if whole_under_lock:  # the control: the rule before, the lock held throughout
        def locked(core: engine_queue.QueueCore, force: bool = False) -> bool:
            if not force and not core.snapshot_due():
                return False
            with core._lock:
                return core._snapshot()
        monkeypatch.setattr(engine_queue.QueueCore, "maybe_snapshot", locked)
    with Broker(tmp_path / "data", fsync="always", segment_bytes_max=16 * 1024) as broker:
        queue = broker.create_queue("q")
        for _ in range(10):  # a few segments of messages, sent and deleted
            queue.send_batch([b"old %d" % i + b"." * 200 for i in range(10)])
            queue.delete_batch([m.receipt for m in queue.receive(10)])
        queue.send_batch([b"before %d" % i for i in range(10)])
        for k in range(10):  # these put the bodies above in a segment behind the active one
            queue.send_batch([b"filler %d" % (10 * k + i) + b"." * 200 for i in range(10)])
        core = broker._core_of("q")
        end = core.log.next_offset
        outcome: dict[str, Any] = {}
        snapshot = threading.Thread(
            target=lambda: outcome.update(taken=core.maybe_snapshot(force=True)))
        snapshot.start()
        assert compressing.wait(10)
        done = threading.Event()

        def work() -> None:
            queue.send(b"during")
            received = queue.receive(3)
            queue.delete_batch([m.receipt for m in received])
            outcome["received"] = sorted(m.body for m in received)
            done.set()

        worker = threading.Thread(target=work)
        worker.start()
        went_on = done.wait(1 if whole_under_lock else 10)
        release.set()
        snapshot.join()
        worker.join()
        assert outcome["taken"] is True and done.is_set()
        assert core.log.first_offset > 0  # the deleted messages' segments went
        shutil.copytree(tmp_path / "data", tmp_path / "crashed")
    with Broker(tmp_path / "crashed", fsync="always") as broker:
        assert broker._core_of("q")._snapshot_offset == end
        queue = broker.get_queue("q")
        left: list[bytes] = []
        while batch := queue.receive(10):
            left.extend(m.body for m in batch)
    held = ({b"before %d" % i for i in range(10)} | {b"during"}
            | {b"filler %d" % i + b"." * 200 for i in range(100)})
    assert sorted(left) == sorted(held - set(outcome["received"]))
    return went_on


def test_sends_and_receives_go_on_while_a_snapshot_compresses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _work_during_a_compression(tmp_path, monkeypatch, whole_under_lock=False)


def test_control_a_snapshot_under_the_lock_throughout_holds_them_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _work_during_a_compression(tmp_path, monkeypatch, whole_under_lock=True)
