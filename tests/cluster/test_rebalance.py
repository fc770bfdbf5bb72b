"""Rebalancing: a node that joins or leaves moves the replicas the ring says, and only
those; a moved queue's data is copied before its old replicas let go, so nothing
acknowledged is lost on the way."""

from __future__ import annotations

import itertools
import re
import time
import urllib.request
from pathlib import Path

import botocore.exceptions

from engine import HashRing
from tests.cluster.harness import ACCOUNT, Cluster, cluster, local_queues
from tests.cluster.workload import CLIENT, IN_DOUBT_PER_FAULT, create_queue, drain
from tests.support.consistency import History, check

QUEUES = [f"r{i}" for i in range(8)]
RF = 2


def ring_replicas(queue: str, members: list[str]) -> set[str]:
    """The ring's replicas over members: the first RF in its order, one per node."""
    ring = HashRing()
    for member in sorted(members):
        ring.add(member)
    replicas: dict[str, str] = {}
    for member in ring.preference_list(f"{ACCOUNT}/{queue}", len(members)):
        replicas.setdefault(member.split("/")[0], member)
    return set(list(replicas.values())[:RF])


def placed(c: Cluster, nodes: list[str], timeout: float = 90) -> None:
    """Wait until every queue's replicas, all in sync, are the ring's over the members of
    nodes."""
    members = c.members(nodes)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queues = c.state()["queues"]
        none: dict[str, object] = {"replicas": [], "isr": [], "leader": None}
        if all(set(queues.get(f"{ACCOUNT}/{q}", none)["replicas"]) == ring_replicas(q, members)
               and set(queues.get(f"{ACCOUNT}/{q}", none)["isr"]) == ring_replicas(q, members)
               and queues.get(f"{ACCOUNT}/{q}", none)["leader"] in ring_replicas(q, members)
               for q in QUEUES):
            return
        time.sleep(0.2)
    raise TimeoutError(f"replicas never matched the ring over {nodes}: {c.state()['queues']}")


def send(c: Cluster, urls: dict[str, str], history: History, tag: str) -> None:
    client = c.sqs(c.live()[0], **CLIENT)
    for queue, url in urls.items():
        for i in range(10):
            body = f"{tag}-{queue}-{i}"
            history.send_attempted(body)
            history.send_acked(body, client.send_message(QueueUrl=url,
                                                         MessageBody=body)["MessageId"])


def test_join_and_leave_move_only_what_the_ring_moves(tmp_path: Path) -> None:
    with cluster(tmp_path, extra=("--replication-factor", str(RF),
                                  "--node-gone-after", "3")) as c:
        urls = {q: create_queue(c, q) for q in QUEUES}
        three, four = ["n0", "n1", "n2"], ["n0", "n1", "n2", "n3"]
        moving = [q for q in QUEUES if ring_replicas(q, c.members(three))
                  != ring_replicas(q, c.members(four))]
        assert moving and len(moving) < len(QUEUES), "the queue names test nothing"
        placed(c, three)
        history = History()
        send(c, urls, history, "before")

        # A queue's own replication factor, at creation and changed later.
        own = create_queue(c, "own", attributes={"ConveyorReplicationFactor": "1"})
        c.leader("own")  # every node's view of the cluster has it
        assert len(c.queue_state("own")["replicas"]) == 1
        c.sqs("n1").set_queue_attributes(QueueUrl=own,
                                         Attributes={"ConveyorReplicationFactor": "3"})
        assert c.wait_isr("own", 3, timeout=60)
        assert c.sqs("n2").get_queue_attributes(
            QueueUrl=own, AttributeNames=["ConveyorReplicationFactor"]
        )["Attributes"] == {"ConveyorReplicationFactor": "3"}

        c.add_node("n3")
        placed(c, four)
        send(c, urls, history, "joined")
        c.kill("n3")  # for good: after --node-gone-after its replicas move back
        placed(c, three)
        send(c, urls, history, "left")
        deadline = time.monotonic() + 30
        while sorted(c.node_of(m) for m in c.replicas("own")) != three:  # n3's copy moves
            assert time.monotonic() < deadline, c.queue_state("own")
            time.sleep(0.2)
        owners = c.replicas("own")
        for url in urls.values():
            drain(c, url, history)
        report = check(history)
        assert report.ok, f"{report}\n{c.logs()}"
        assert report.in_doubt_within(IN_DOUBT_PER_FAULT), str(report)
        assert report.sends_acked == 3 * 10 * len(QUEUES)

        # Each node holds copies of exactly the queues it is a replica of.
        c.stop_all()
        for member in c.members(three):
            expected = {f"{ACCOUNT}/{q}" for q in QUEUES
                        if member in ring_replicas(q, c.members(three))}
            own = {f"{ACCOUNT}/own"} if member in owners else set()
            assert local_queues(c.data_dir(member)) == expected | own, member


def test_with_two_of_three_nodes_gone_writes_wait_for_a_replica(tmp_path: Path) -> None:
    """min_insync_replicas is a promise: once the two followers have been gone past
    --node-gone-after there are no live nodes to replace them, so the replicas stay as
    they were, the partition is under-replicated, and every send is refused (503
    NotEnoughReplicas) until a node comes back. The old rule shrank the replicas to the
    live node and acknowledged writes on one disk."""
    gone_s = 2
    with cluster(tmp_path, extra=("--node-gone-after", str(gone_s))) as c:
        url = create_queue(c, "promise")
        name = f"{ACCOUNT}/promise"
        leader = c.leader("promise")
        c.wait_isr("promise", 3)
        history = History()
        client = c.sqs(leader, **CLIENT)
        send(c, {"promise": url}, history, "before")
        replicas = c.replicas("promise")
        others = [n for n in replicas if n != leader]
        for node in others:
            c.kill(node)
        # The followers' leases run out (3 s), then node_gone_s, then a rebalance (1 s).
        deadline = time.monotonic() + 3 + gone_s + 4
        refused = 0
        never_written: set[str] = set()
        for attempt in itertools.count():
            if time.monotonic() > deadline:
                break
            body = f"during-{attempt}"
            history.send_attempted(body)
            try:
                reply = client.send_message(QueueUrl=url, MessageBody=body)
            except botocore.exceptions.ClientError as exc:
                history.send_failed(body, str(exc))
                status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
                code = exc.response["Error"]["Code"]
                if code == "NotEnoughReplicas":  # refused before it was written
                    assert status == 503
                    refused += 1
                    never_written.add(body)
                time.sleep(0.2)
                continue
            history.send_acked(body, reply["MessageId"])
            raise AssertionError(f"acknowledged with {others} gone: {c.state(leader)}")
        assert refused > 0
        state = c.state(leader)
        assert set(state["queues"][name]["replicas"]) == set(replicas), state
        assert state["queues"][name]["isr"] == [leader]
        assert state["leading"][name]["under_replicated"] is True
        with urllib.request.urlopen(c.node(leader).url + "/metrics") as reply:
            metrics = reply.read().decode()
        for gauge in ("below_min_insync", "under_replicated"):
            # Labelled with the worker too on a server of workers.
            assert re.search(f'conveyor_partition_{gauge}{{(worker="[0-9]+",)?'
                             f'partition="{name}"}} 1.0', metrics), gauge

        # A node comes back: it catches up, and writes are acknowledged again.
        c.restart(others[0])
        c.wait_isr("promise", 2, timeout=30)
        send(c, {"promise": url}, history, "after")
        drain(c, url, history)
        report = check(history)
        assert report.ok, f"{report}\n{c.logs()}"
        assert report.sends_acked == 20
        # Refused before they were written: none of them took effect later. (A send the
        # ISR shrank under is NotEnoughReplicasAfterAppend: its outcome is unknown.)
        assert not [e.body for e in history.events
                    if e.kind == "receive" and e.body in never_written]
