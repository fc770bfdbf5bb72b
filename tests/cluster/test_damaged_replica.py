"""Damaged copies of a queue in a cluster. A follower keeps what precedes the damage, sets
the rest aside and is sent the rest again by its leader: it rejoins the ISR, and its copy
is the leader's, byte for byte. A node elected with a damaged copy hands over and is mended
as a follower. The only in-sync copy, damaged, waits for an operator's salvage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import botocore.exceptions
import pytest

from engine import format
from engine.log import Log
from tests.cluster.harness import ACCOUNT, cluster, read_log, state_digest
from tests.cluster.workload import create_queue
from tests.support.server import queue_dir

# Queue segments roll at 16 MiB (engine.queue.QUEUE_SEGMENT_BYTES): this many messages of
# BIG_BODY_BYTES fill one, so that the copy has a sealed segment before the damaged one.
BIG_BODY_BYTES = 1_000_000
BIG_MESSAGES = 17
SMALL_MESSAGES = 40


def _flip(segment: Path, where: Callable[[int], int]) -> bytes:
    """Flip one bit of the segment at where(its size); return its damaged bytes."""
    raw = bytearray(segment.read_bytes())
    raw[where(len(raw))] ^= 0x20
    segment.write_bytes(bytes(raw))
    return bytes(raw)


def test_a_damaged_follower_copy_keeps_what_precedes_the_damage(tmp_path: Path) -> None:
    """The follower keeps its sealed segment (same inode, same bytes) and the batches of
    the damaged one before the damage; the leader sends only the rest, and the mended
    copy is the leader's, byte for byte."""
    with cluster(tmp_path) as c:
        url = create_queue(c, "mended")
        leader = c.leader("mended")
        c.wait_isr("mended", 3)
        client = c.sqs(leader)
        for i in range(BIG_MESSAGES):
            client.send_message(QueueUrl=url, MessageBody=f"b{i:02d}" + "." * BIG_BODY_BYTES)
        for i in range(SMALL_MESSAGES):  # a batch each: damage among them has valid after
            client.send_message(QueueUrl=url, MessageBody=f"m{i:02d}")
        follower = next(n for n in c.replicas("mended") if n != leader)
        replicas = c.replicas("mended")
        c.node(follower).stop()
        directory = queue_dir(c.data_dir(follower), "mended")
        sealed, damaged = sorted((directory / "log").glob(f"*{format.LOG_SUFFIX}"))
        kept = (sealed.stat().st_ino, sealed.read_bytes())
        raw = _flip(damaged, lambda size: size - 2000)  # among the small messages' batches

        c.node(follower).start()
        c.wait_isr("mended", 3, timeout=30)
        for i in range(SMALL_MESSAGES, SMALL_MESSAGES + 10):
            client.send_message(QueueUrl=url, MessageBody=f"m{i:02d}")
        log = c.node(follower).log.read_text()
        assert "this follower's copy is damaged" in log, log[-3000:]

        c.stop_all()
        copies = {n: read_log(c.data_dir(n), "mended") for n in replicas}
        assert all(copy == copies[leader] for copy in copies.values())
        assert len({state_digest(c.data_dir(n), "mended") for n in replicas}) == 1
        # The sealed segment was never copied again: the very file, untouched.
        assert (sealed.stat().st_ino, sealed.read_bytes()) == kept
        [quarantine] = (directory / "quarantine").iterdir()
        report = json.loads((quarantine / "report.json").read_text())
        assert report["kept_segments"] == [sealed.name]
        assert report["cut_segment"]["name"] == damaged.name
        assert int(damaged.name.removesuffix(format.LOG_SUFFIX)) < report["refetched_from"]
        assert report["whole_because"] is None
        # The damaged segment was set aside as it was, not deleted.
        assert (quarantine / "log" / damaged.name).read_bytes() == raw
        assert f"kept records 0..{report['refetched_from'] - 1}," in log, log[-3000:]


def test_a_leader_elected_with_a_damaged_copy_hands_over_and_is_mended(tmp_path: Path) -> None:
    """The whole cluster stops at once (a power cut, say) and the node first in line to
    lead has a damaged copy: it leaves the ISR, an in-sync follower leads, and the node is
    copied again as a follower. Nothing acknowledged is lost."""
    with cluster(tmp_path) as c:
        url = create_queue(c, "handover")
        c.leader("handover")
        c.wait_isr("handover", 3)
        client = c.sqs(c.leader("handover"))
        sent = {f"m{i:02d}" for i in range(40)}
        for body in sorted(sent):
            client.send_message(QueueUrl=url, MessageBody=body)
        replicas = c.replicas("handover")
        first = replicas[0]
        for node in c.nodes:  # all at once: no node lives to shrink the ISR
            c.kill(node)
        directory = queue_dir(c.data_dir(first), "handover")
        [segment] = (directory / "log").glob(f"*{format.LOG_SUFFIX}")
        raw = _flip(segment, lambda size: size // 2)
        # first's node back first: it is first in line to lead, and must find out then.
        for node in sorted(c.nodes, key=lambda n: n != c.node_of(first)):
            c.restart(node)

        leader = c.leader("handover", timeout=60)
        assert leader != first
        c.wait_isr("handover", 3, timeout=60)  # first is back, copied again
        log = c.node(first).log.read_text()
        assert "this node's copy is damaged" in log, log[-3000:]
        client = c.sqs(leader)
        got: set[str] = set()
        while messages := client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                                 VisibilityTimeout=60).get("Messages", []):
            got |= {m["Body"] for m in messages}
        assert got == sent
        # Receives are shipped without waiting; a send is committed on the whole ISR, and
        # with it everything before it.
        client.send_message(QueueUrl=url, MessageBody="last")
        c.stop_all()
        copies = {n: read_log(c.data_dir(n), "handover") for n in replicas}
        assert all(copy == copies[leader] for copy in copies.values()), {
            n: len(copy) for n, copy in copies.items()}
        [kept] = (directory / "quarantine").iterdir()
        assert (kept / "log" / segment.name).read_bytes() == raw


# A node that leads again after each failed try says "leading in epoch" at each try: its
# own step-down names the partition again at once, so over STUCK_WATCH_S a loop would say
# it many times.
STUCK_WATCH_S = 3.0
STUCK_LEADS_MAX = 1


def _leads(text: str, queue: str) -> int:
    return text.count(f"queue {ACCOUNT}/{queue}: leading in epoch")


def test_the_only_in_sync_copy_damaged_waits_for_the_operators_salvage(
        tmp_path: Path) -> None:
    """The node whose copy is damaged holds the only in-sync copy: the others fell out of
    the ISR before the last messages were acknowledged (min_insync_replicas 1), so theirs
    lack them and must not replace it. It does not lead (no elect and step-down loop), the
    queue answers 503 and every other queue serves; once an operator salvages the copy,
    it leads again with every message outside the damaged batch, and the others copy it."""
    with cluster(tmp_path, extra=("--min-insync-replicas", "1")) as c:
        url = create_queue(c, "stuck")
        fine_url = create_queue(c, "fine")
        keeper = c.leader("stuck")
        c.wait_isr("stuck", 3)
        c.wait_isr("fine", 3)
        client = c.sqs(keeper)
        sent = [f"message-{i:03d}" for i in range(50)]
        for body in sent[:10]:
            client.send_message(QueueUrl=url, MessageBody=body)
        replicas = c.replicas("stuck")
        others = [n for n in replicas if n != keeper]
        for node in others:
            c.kill(node)
        c.wait_isr("stuck", 1)  # their leases ran out: the keeper alone is in sync
        for body in sent[10:]:  # a batch each, held by the keeper alone
            client.send_message(QueueUrl=url, MessageBody=body)
        c.kill(keeper)
        directory = queue_dir(c.data_dir(keeper), "stuck")
        pristine = tmp_path / "pristine"
        shutil.copytree(directory / "log", pristine)
        [segment] = (directory / "log").glob(f"*{format.LOG_SUFFIX}")
        [behind] = (queue_dir(c.data_dir(others[0]), "stuck") / "log").glob("*.log")
        # In what the keeper alone has.
        _flip(segment, lambda size: (behind.stat().st_size + size) // 2)
        log = c.node(keeper).log
        start = len(log.read_text())
        for node in c.nodes:
            c.restart(node)

        waiting = "it is the only in-sync copy: the queue waits for `conveyor log salvage`"
        deadline = time.monotonic() + 30
        while waiting not in log.read_text()[start:]:
            assert time.monotonic() < deadline, log.read_text()[start:][-3000:]
            time.sleep(0.1)
        time.sleep(STUCK_WATCH_S)
        since = log.read_text()[start:]
        leads = _leads(since, "stuck")
        assert leads <= STUCK_LEADS_MAX, f"led {leads} times:\n{since[-3000:]}"
        assert c.queue_state("stuck")["isr"] == [keeper]
        for node in c.nodes:  # refused with a 503, not a 500, wherever it is asked
            with pytest.raises(botocore.exceptions.ClientError) as refused:
                c.sqs(node).send_message(QueueUrl=url, MessageBody="refused")
            answer = refused.value.response
            assert answer["ResponseMetadata"]["HTTPStatusCode"] == 503, answer
            assert answer["Error"]["Code"] == "ServiceUnavailable", answer
            assert "it has no leader now" in answer["Error"]["Message"], answer
        fine = c.sqs(c.leader("fine"))
        fine.send_message(QueueUrl=fine_url, MessageBody="served")
        got = fine.receive_message(QueueUrl=fine_url, MaxNumberOfMessages=10)["Messages"]
        assert [m["Body"] for m in got] == ["served"]

        # The operator's acts: stop the node, salvage its data directory, start it.
        c.node(keeper).stop()
        salvaged = subprocess.run(
            [sys.executable, "-m", "server.cli", "log", "salvage", str(c.data_dir(keeper))],
            capture_output=True, text=True, timeout=120)
        assert salvaged.returncode == 0, salvaged.stdout + salvaged.stderr
        c.node(keeper).start()
        assert c.leader("stuck", timeout=30) == keeper
        c.wait_isr("stuck", 3, timeout=30)
        [quarantine] = (directory / "quarantine").iterdir()
        holes = json.loads((quarantine / "report.json").read_text())["holes"]
        assert holes, "the salvage wrote no hole"
        with Log(pristine, fsync="never", lock=False) as original:
            lost_records = [bytes(p) for first, end in holes
                            for _, p in original.read(first, end - first)]
        lost = {b for b in sent if any(b.encode() in r for r in lost_records)}
        assert len(lost) == 1, lost  # one damaged batch: one message
        client = c.sqs(keeper)
        got_bodies: set[str] = set()
        while messages := client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                                 VisibilityTimeout=60).get("Messages", []):
            got_bodies |= {m["Body"] for m in messages}
        assert got_bodies == set(sent) - lost
        client.send_message(QueueUrl=url, MessageBody="after")  # committed on all three
        c.stop_all()
        copies = {n: read_log(c.data_dir(n), "stuck") for n in replicas}
        assert all(copy == copies[keeper] for copy in copies.values())
        assert len({state_digest(c.data_dir(n), "stuck") for n in replicas}) == 1


def test_a_repaired_follower_leaves_the_isr_and_never_leads_short(tmp_path: Path) -> None:
    """A follower's copy is repaired short and its leader stops before sending the rest:
    the repaired copy left the ISR at once, so the other follower, which holds every
    record, leads, and nothing acknowledged is lost. (Were the short copy still in the
    ISR, it would be elected first, being first in line, and lead without them.)"""
    with cluster(tmp_path, proxies=True) as c:
        url = create_queue(c, "short")
        leader = c.leader("short")
        c.wait_isr("short", 3)
        client = c.sqs(leader)
        sent = {f"m{i:02d}" for i in range(SMALL_MESSAGES)}
        for body in sorted(sent):
            client.send_message(QueueUrl=url, MessageBody=body)
        # The follower first in line to lead once the leader is gone.
        short = next(n for n in c.queue_state("short")["isr"] if n != leader)
        # Killed and back within its lease: the leader never saw it gone, so it is still
        # in the ISR when it finds its copy damaged (the case the ISR must not keep).
        c.kill(short)
        directory = queue_dir(c.data_dir(short), "short")
        [segment] = (directory / "log").glob(f"*{format.LOG_SUFFIX}")
        _flip(segment, lambda size: size // 3)
        # What the leader sends this follower arrives late: the leader's OPEN starts the
        # repair, and the records it would send after are still on their way when it stops.
        c.proxies[short].delay(0.6)  # each way: the leader still gets a POSITION in 2 s
        c.node(short).start()
        deadline = time.monotonic() + 30
        while "this follower's copy is damaged" not in c.node(short).log.read_text():
            assert time.monotonic() < deadline, c.node(short).log.read_text()[-3000:]
            time.sleep(0.01)
        c.pause(leader)
        try:
            successor = c.leader("short", timeout=30, other_than=leader)
            c.proxies[short].heal()
            assert successor != short
            got: set[str] = set()
            client = c.sqs(successor)
            while messages := client.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60
            ).get("Messages", []):
                got |= {m["Body"] for m in messages}
            assert got == sent, sorted(sent - got)
            log = c.node(short).log.read_text()
            # Logged only when it was in the ISR and took itself out.
            assert "the repaired copy here left the ISR" in log, log[-3000:]
            assert "queue 000000000000/short: leading" not in log.split(
                "this follower's copy is damaged")[-1]
        finally:
            c.resume(leader)
