"""A follower whose copy of a queue is damaged sets it aside and is copied again by its
leader: it rejoins the ISR, and its copy is the leader's, byte for byte."""

from __future__ import annotations

from pathlib import Path

from engine import format
from tests.cluster.harness import cluster, read_log, state_digest
from tests.cluster.workload import create_queue
from tests.support.server import queue_dir


def test_a_damaged_follower_copy_is_set_aside_and_copied_again(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        url = create_queue(c, "mended")
        leader = c.leader("mended")
        c.wait_isr("mended", 3)
        client = c.sqs(leader)
        for i in range(40):  # a batch each: damage mid-file has valid batches after it
            client.send_message(QueueUrl=url, MessageBody=f"m{i:02d}")
        follower = next(n for n in c.nodes if n != leader)
        c.nodes[follower].stop()
        directory = queue_dir(c.root / follower, "mended")
        [segment] = (directory / "log").glob(f"*{format.LOG_SUFFIX}")
        raw = bytearray(segment.read_bytes())
        raw[len(raw) // 2] ^= 0x20
        segment.write_bytes(bytes(raw))

        c.nodes[follower].start()
        c.wait_isr("mended", 3, timeout=30)
        for i in range(40, 50):
            client.send_message(QueueUrl=url, MessageBody=f"m{i:02d}")
        log = c.nodes[follower].log.read_text()
        assert "this follower's copy is damaged" in log, log[-3000:]

        c.stop_all()
        copies = {n: read_log(c.root / n, "mended") for n in c.nodes}
        assert all(copy == copies[leader] for copy in copies.values())
        assert len({state_digest(c.root / n, "mended") for n in c.nodes}) == 1
        # The damaged copy was set aside, not deleted.
        [kept] = (directory / "quarantine").iterdir()
        assert (kept / "log" / segment.name).read_bytes() == bytes(raw)


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
        first = c.queue_state("handover")["replicas"][0]
        for node in c.nodes:  # all at once: no node lives to shrink the ISR
            c.kill(node)
        directory = queue_dir(c.root / first, "handover")
        [segment] = (directory / "log").glob(f"*{format.LOG_SUFFIX}")
        raw = bytearray(segment.read_bytes())
        raw[len(raw) // 2] ^= 0x20
        segment.write_bytes(bytes(raw))
        for node in c.nodes:
            c.restart(node)

        leader = c.leader("handover", timeout=60)
        assert leader != first
        c.wait_isr("handover", 3, timeout=60)  # first is back, copied again
        log = c.nodes[first].log.read_text()
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
        copies = {n: read_log(c.root / n, "handover") for n in c.nodes}
        assert all(copy == copies[leader] for copy in copies.values()), {
            n: len(copy) for n, copy in copies.items()}
        [kept] = (directory / "quarantine").iterdir()
        assert (kept / "log" / segment.name).read_bytes() == bytes(raw)
