"""Durability of the whole server process: SIGKILL under load, and graceful SIGTERM.

These run real processes: the server (`conveyor serve`), and for the kill test a separate
boto3 workload (sqs_workload.py) that keeps sending, receiving and deleting while the
server is killed and restarted under it on the same data directory and port.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.config import SHUTDOWN_GRACE_S
from tests.support.clients import metrics
from tests.support.server import Server

WORKLOAD = Path(__file__).with_name("sqs_workload.py")
# Kills in `make test`: enough that restarts follow restarts under a workload that
# reconnects; `make faults` runs the long schedule.
KILLS = 5
KILLS_LONG = 12
VISIBILITY_S = 2
ENGINE_CALLS = ("conveyor_dependency_calls_in_flight", (("dependency", "engine"),))


def events(log: Path) -> list[tuple[str, str, float | None]]:
    parsed = []
    for line in log.read_text().splitlines():
        kind, body, *rest = line.split(" ")
        parsed.append((kind, body, float(rest[0]) if rest else None))
    return parsed


def acknowledged_sends(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.startswith("S "))


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def drain(sqs: Any, url: str) -> list[str]:
    """Every body left in the queue, each received once (the long visibility keeps what
    was received hidden for the rest of the drain)."""
    bodies: list[str] = []
    empty = 0
    deadline = time.monotonic() + 120
    while empty < 3 and time.monotonic() < deadline:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                  VisibilityTimeout=600).get("Messages", [])
        bodies += [m["Body"] for m in got]
        empty = 0 if got else empty + 1
    return bodies


def test_sigkill_under_load_loses_nothing_acknowledged(server: Server, tmp_path: Path) -> None:
    _sigkill_under_load(server, tmp_path, KILLS)


@pytest.mark.faults
def test_many_sigkills_under_load_lose_nothing_acknowledged(server: Server,
                                                            tmp_path: Path) -> None:
    _sigkill_under_load(server, tmp_path, KILLS_LONG)


def _sigkill_under_load(server: Server, tmp_path: Path, kill_rounds: int) -> None:
    seed = int(os.environ.get("CONVEYOR_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"seed {seed} (CONVEYOR_CRASH_SEED reproduces the kill schedule)")

    def kill_and_restart() -> None:
        server.kill()
        time.sleep(rng.uniform(0, 0.3))  # the workload meets refused connections
        server.start()

    _under_load(server, tmp_path, seed, kill_rounds, rng, kill_and_restart)


def _under_load(server: Server, tmp_path: Path, seed: int, kill_rounds: int,
                rng: random.Random, kill: Callable[[], None],
                producers: int = 1) -> None:
    """Run the boto3 workload, call kill() kill_rounds times under it, then check its
    history against what the queue holds: nothing acknowledged lost, nothing deleted
    delivered again."""
    url = server.sqs().create_queue(
        QueueName="crash", Attributes={"VisibilityTimeout": str(VISIBILITY_S)})["QueueUrl"]
    log = tmp_path / "workload.log"
    errors_log = tmp_path / "workload.err"
    with open(log, "wb") as out, open(errors_log, "wb") as err:
        workload = subprocess.Popen(
            [sys.executable, str(WORKLOAD), server.url, url, "--seed", str(seed),
             "--producers", str(producers)],
            stdin=subprocess.PIPE, stdout=out, stderr=err)
    try:
        wait_for(lambda: acknowledged_sends(log) >= 50, 60, "the workload to get going")
        kills = 0
        for _ in range(kill_rounds):
            time.sleep(rng.uniform(0.2, 1.2))
            kill()
            kills += 1
        sends_at_last_restart = acknowledged_sends(log)
        # The workload must make progress against the last restarted server, not just
        # survive: its clients reconnect on their own.
        wait_for(lambda: acknowledged_sends(log) > sends_at_last_restart + 20, 30,
                 "sends acknowledged after the last restart")
        assert workload.poll() is None, f"the workload died: {errors_log.read_text()}"
    finally:
        assert workload.stdin is not None
        workload.stdin.close()
        code = workload.wait(timeout=60)
    summary = errors_log.read_text()
    assert code == 0, f"the workload ended badly ({code}): {summary}"

    time.sleep(VISIBILITY_S + 1)  # every lease the workload left open runs out
    sqs = server.sqs()
    drained = drain(sqs, url)
    left = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]

    sent: set[str] = set()
    tried: set[str] = set()
    deleted: dict[str, float] = {}
    receives: list[tuple[str, float]] = []
    for kind, body, at in events(log):
        if kind == "S":
            sent.add(body)
        elif kind == "T":
            tried.add(body)
        elif kind == "D":
            assert at is not None
            deleted.setdefault(body, at)
        elif kind == "R":
            assert at is not None
            receives.append((body, at))
    received_count = collections.Counter(body for body, _ in receives)
    drained_set = set(drained)

    # A delete whose answer a kill swallowed may have happened: only a message nobody
    # tried to delete is known to be lost when it is missing.
    lost = sorted(sent - tried - drained_set)
    maybe_deleted = tried - set(deleted)
    resurrected = sorted({body for body, started in receives
                          if body in deleted and started > deleted[body]}
                         | (drained_set & set(deleted)))
    redelivered = {body: n for body, n in received_count.items() if n > 1}
    redelivered_to_drain = drained_set & set(received_count)
    unacknowledged_but_stored = (set(received_count) | drained_set) - sent
    print(f"kills {kills}; acknowledged sends {len(sent)}, acknowledged deletes "
          f"{len(deleted)}, receives {len(receives)}, drained {len(drained)}")
    print(f"duplicates: {len(redelivered)} bodies received more than once "
          f"({sum(redelivered.values()) - len(redelivered)} extra deliveries), "
          f"{len(redelivered_to_drain)} received by the workload and again in the drain; "
          f"{len(unacknowledged_but_stored)} sends stored though their ack was lost; "
          f"{len(maybe_deleted)} deletes unanswered, of which {len(maybe_deleted - drained_set)}"
          f" took effect")
    print(f"workload errors: {summary.strip()}")

    assert kills == kill_rounds
    # The work needed to prove anything grows with the kills: 200 sends and 100 deletes
    # over the long schedule.
    assert len(sent) >= 200 * min(kill_rounds, KILLS_LONG) // KILLS_LONG and \
        len(deleted) >= 100 * min(kill_rounds, KILLS_LONG) // KILLS_LONG, \
        "too little work to prove anything"
    assert not lost, f"{len(lost)} acknowledged sends lost, e.g. {lost[:10]}"
    assert not resurrected, (
        f"{len(resurrected)} bodies delivered after their delete was acknowledged, "
        f"e.g. {resurrected[:10]}")
    assert len(drained) == len(drained_set), "the drain received a body twice"
    assert left["ApproximateNumberOfMessages"] == "0"
    assert left["ApproximateNumberOfMessagesDelayed"] == "0"
    assert left["ApproximateNumberOfMessagesNotVisible"] == str(len(drained))


def test_sigterm_flushes_everything_even_without_fsync(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", fsync="never")
    try:
        sqs = server.sqs()
        url = sqs.create_queue(QueueName="graceful",
                               Attributes={"VisibilityTimeout": "13"},
                               tags={"kept": "yes"})["QueueUrl"]
        sent = set()
        for i in range(100):
            sqs.send_message(QueueUrl=url, MessageBody=f"single-{i}")
            sent.add(f"single-{i}")
        for batch in range(20):
            entries = [{"Id": f"e{i}", "MessageBody": f"batch-{batch}-{i}"} for i in range(10)]
            result = sqs.send_message_batch(QueueUrl=url, Entries=entries)
            assert len(result["Successful"]) == 10
            sent |= {e["MessageBody"] for e in entries}
        # Deletes must be as durable as sends: a deleted message must not come back.
        deleted = set()
        in_flight = set()
        while len(deleted) < 50:
            for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                         VisibilityTimeout=1).get("Messages", []):
                if len(deleted) < 50:
                    sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
                    deleted.add(m["Body"])
                else:
                    in_flight.add(m["Body"])  # received, never deleted: must come back

        started = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=SHUTDOWN_GRACE_S + 30)
        took = time.monotonic() - started
        print(f"SIGTERM with {len(sent)} sent, {len(deleted)} deleted: exit {code} "
              f"after {took:.2f} s")
        assert code == 0, server.log.read_text()[-3000:]
        assert took < SHUTDOWN_GRACE_S

        server.start()
        time.sleep(1.5)  # the in-flight leases (1 s) run out
        drained = drain(sqs, url)
        assert len(drained) == len(set(drained))
        assert set(drained) == sent - deleted, (
            f"missing {sorted(sent - deleted - set(drained))[:10]}, "
            f"resurrected {sorted(set(drained) & deleted)[:10]}")
        assert in_flight <= set(drained)
        attributes = sqs.get_queue_attributes(QueueUrl=url,
                                              AttributeNames=["VisibilityTimeout"])
        assert attributes["Attributes"]["VisibilityTimeout"] == "13"
        assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"kept": "yes"}
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


def test_long_poll_in_flight_during_sigterm_gets_an_answer(tmp_path: Path) -> None:
    # Documented: a graceful stop lets requests in flight finish, and a long poll lasts at
    # most 20 s, inside the 25 s grace. So a poll is answered, not reset; one on an empty
    # queue runs its full wait, and one whose message turns visible meanwhile gets it.
    server = Server(tmp_path / "data", fsync="never")
    try:
        sqs = server.sqs()
        empty = sqs.create_queue(QueueName="empty")["QueueUrl"]
        delayed = sqs.create_queue(QueueName="delayed")["QueueUrl"]
        sqs.send_message(QueueUrl=delayed, MessageBody="arrives during shutdown",
                         DelaySeconds=2)
        answers: dict[str, Any] = {}

        def poll(name: str, url: str, wait: int) -> None:
            client = server.sqs(read_timeout=60)
            started = time.monotonic()
            try:
                got = client.receive_message(QueueUrl=url, WaitTimeSeconds=wait,
                                             VisibilityTimeout=1)
                answers[name] = (got["ResponseMetadata"]["HTTPStatusCode"],
                                 [m["Body"] for m in got.get("Messages", [])])
            except Exception as exc:
                answers[name] = exc
            answers[f"{name} seconds"] = round(time.monotonic() - started, 2)

        polls = [threading.Thread(target=poll, args=("empty", empty, 6)),
                 threading.Thread(target=poll, args=("delayed", delayed, 15))]
        for thread in polls:
            thread.start()
        # Both polls are waiting in the server (a fixed sleep may end before a loaded
        # machine has even sent them).
        wait_for(lambda: metrics(server).get(ENGINE_CALLS) == 2, 20,
                 "both long polls to wait in the engine")
        started = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=SHUTDOWN_GRACE_S + 30)
        took = time.monotonic() - started
        for thread in polls:
            thread.join(timeout=30)
        print(f"SIGTERM during long polls: exit {code} after {took:.2f} s; {answers}")

        assert code == 0, server.log.read_text()[-3000:]
        assert took < SHUTDOWN_GRACE_S
        assert answers["empty"] == (200, []), answers
        assert answers["delayed"] == (200, ["arrives during shutdown"]), answers
        assert answers["delayed seconds"] < 5, "the poll must be woken, not run out"

        # The poll's receive was not a delete: after its 1 s lease the message is back.
        server.start()
        time.sleep(1.2)
        got = sqs.receive_message(QueueUrl=delayed, WaitTimeSeconds=2).get("Messages", [])
        assert [m["Body"] for m in got] == ["arrives during shutdown"]
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


WORKER_KILLS = 10


def test_sigkill_of_one_worker_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """--workers 2: one worker at a time is killed under the workload, ten times; the
    supervisor restarts it. Nothing acknowledged is lost, nothing deleted comes back, and
    the other worker goes on taking sends while the killed one is down."""
    server = Server(tmp_path / "data", workers=2)
    seed = int(os.environ.get("CONVEYOR_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"seed {seed} (CONVEYOR_CRASH_SEED reproduces the kill schedule)")
    log = tmp_path / "workload.log"
    served_while_down: list[int] = []

    def kill_one_worker() -> None:
        assert server.process is not None
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        workers = [int(pid) for pid in children.read_text().split()]
        assert len(workers) == 2, workers
        victim = rng.choice(workers)
        before = acknowledged_sends(log)
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.3)  # down: restarted after a pause, then it starts up again
        served_while_down.append(acknowledged_sends(log) - before)
        wait_for(lambda: len(children.read_text().split()) == 2
                 and victim not in [int(p) for p in children.read_text().split()],
                 30, "the supervisor to restart the worker")
        wait_for(lambda: _ready(server), 30, "the restarted worker to serve")

    try:
        _under_load(server, tmp_path, seed, WORKER_KILLS, rng, kill_one_worker,
                    producers=2)
        print(f"sends acknowledged in the 0.3 s after each kill: {served_while_down}")
        assert sum(1 for n in served_while_down if n > 0) >= WORKER_KILLS // 2, \
            f"the surviving worker stalled while the other was down: {served_while_down}"
        assert "restarting it" in server.log.read_text()
    finally:
        server.kill()


def _ready(server: Server) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(server.url + "/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False



def test_restarts_with_other_worker_counts_under_load_lose_nothing(tmp_path: Path) -> None:
    """Killed under the workload and started again with 1, 3, then 2 workers: partitions
    pass to other owners, and nothing acknowledged is lost or delivered after its
    delete."""
    server = Server(tmp_path / "data", workers=2)
    seed = int(os.environ.get("CONVEYOR_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    counts = iter((1, 3, 2))

    def restart_with_other_workers() -> None:
        server.kill()
        server.workers = next(counts)
        server.start()

    try:
        _under_load(server, tmp_path, seed, 3, rng, restart_with_other_workers,
                    producers=2)
    finally:
        server.kill()
