"""Snapshot shipping between real nodes: a replica whose copy is gone (a disk replaced) is
sent the leader's snapshot and the log after it, not the queue's whole history, while the
queue keeps serving; the installed copy then leads, and nothing acknowledged is lost."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tests.cluster.harness import cluster, state_digest
from tests.cluster.workload import CLIENT, IN_DOUBT_PER_FAULT, Workload, create_queue, drain
from tests.support.consistency import History, check
from tests.support.server import queue_dir

# Bodies big enough that a few dozen sends pass the leader's snapshot interval
# (engine.queue.SNAPSHOT_BYTES, 8 MiB): the churned log is then far past the size the
# leader ships a snapshot in place of (replication.leader.SNAPSHOT_SHIP_LOG_BYTES_MIN).
CHURN_BODY = "c" * 200_000
CHURN_MESSAGES = 48
INSTALLED = re.compile(r"installed a snapshot of the state at offset (\d+) \((\d+) bytes\); "
                       r"the log starts over at (\d+)")


def wait_for(what: str, condition: Callable[[], object], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def test_a_wiped_replica_is_sent_the_snapshot_and_tail_then_leads(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        url = create_queue(c, "shipped")
        leader = c.leader("shipped")
        c.wait_isr("shipped", 3)
        follower, other = (n for n in c.replicas("shipped") if n != leader)
        client = c.sqs(leader, **CLIENT)
        history = History()
        # Churn: each big message sent, received and deleted. The log grows past the
        # snapshot interval; the state stays small.
        for _ in range(CHURN_MESSAGES):
            client.send_message(QueueUrl=url, MessageBody=CHURN_BODY)
            for m in client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                            VisibilityTimeout=30).get("Messages", []):
                client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        leader_queue = queue_dir(c.data_dir(leader), "shipped")
        assert (leader_queue / "snapshot").exists(), "the churn took no snapshot"

        # The follower's disk is replaced: it dies, and comes back with no copy, at once
        # (still in the ISR: the leader takes it out before it sends the snapshot).
        c.kill(follower)
        copy = queue_dir(c.data_dir(follower), "shipped")
        shutil.rmtree(copy)
        with Workload(c, url, history, nodes=[leader, other]) as load:
            c.restart(follower)
            restarted = load.sent_ok
            wait_for("the follower installs the snapshot",
                     lambda: INSTALLED.search(c.node(follower).log.read_text()))
            installed = load.sent_ok
            c.wait_isr("shipped", 3)
            time.sleep(0.5)  # the queue serves on, the new copy in the ISR
        # Sends were acknowledged from the restart on, and after the install. (The install
        # can be over before the next send is answered: that it stalls nothing is shown by
        # sends going on, not by one landing inside it.)
        assert load.sent_ok > installed >= restarted, (restarted, installed, load.sent_ok)
        leader_log = c.node(leader).log.read_text()
        assert f"{follower} installed the snapshot at" in leader_log, leader_log[-3000:]
        found = INSTALLED.search(c.node(follower).log.read_text())
        assert found is not None
        offset, log_from = int(found[1]), int(found[3])
        assert 0 < log_from <= offset
        # Only the log after the snapshot's oldest body was shipped, not the churn.
        assert (copy / "snapshot").exists()
        assert sum(p.stat().st_size for p in (copy / "log").iterdir()) < \
            sum(p.stat().st_size for p in (leader_queue / "log").iterdir()) // 4

        # The leader dies and the other follower stops answering: only the installed copy
        # can lead. The other comes back once it does (min_insync_replicas is 2): the
        # drain's deletes are committed on both.
        c.pause(other)
        c.kill(leader)
        assert c.leader("shipped", timeout=30, other_than=leader) == follower
        c.resume(other)
        c.wait_isr("shipped", 2)
        drain(c, url, history)
        report = check(history)
        assert report.ok, f"{report}\n{c.logs()}"
        assert report.in_doubt_within(2 * IN_DOUBT_PER_FAULT), str(report)
        c.stop_all()
        # The two live copies replay to one state (the dead leader's may hold an
        # uncommitted suffix, cut when it comes back).
        digests = {n: state_digest(c.data_dir(n), "shipped") for n in (follower, other)}
        assert len(set(digests.values())) == 1, digests
