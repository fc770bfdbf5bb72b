"""etcd is itself a cluster: losing the member a node talks to must not stop the node."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.cluster.harness import cluster
from tests.cluster.workload import create_queue
from tests.support.etcd import EtcdCluster


# Hung is the slower twin (calls time out rather than fail at once): under `make faults`.
@pytest.mark.parametrize("failure", ["killed", pytest.param("hung", marks=pytest.mark.faults)])
def test_nodes_move_to_another_etcd_member_when_theirs_fails(tmp_path: Path,
                                                            failure: str) -> None:
    """Killed: the connection is reset and calls fail at once. Hung (SIGSTOP): calls time
    out after 2 s, which the lease (TTL 5 s, the default) must outlast."""
    with cluster(tmp_path, etcd_members=3, lease_ttl=5) as c:
        assert isinstance(c.etcd, EtcdCluster)
        url = create_queue(c, "steady")
        leader = c.leader("steady")
        client = c.sqs("n1", connect_timeout=2, read_timeout=15)
        client.send_message(QueueUrl=url, MessageBody="before")
        # Every node connected to the first member that answered: the first one.
        member = c.etcd.members[0]
        if failure == "killed":
            member.kill()
        else:
            assert member.process is not None
            member.process.send_signal(signal.SIGSTOP)
        killed_at = time.monotonic()
        acked, failures = 0, 0
        first_ack_after: float | None = None
        while time.monotonic() - killed_at < 12:
            try:
                client.send_message(QueueUrl=url, MessageBody=f"after-{acked}")
            except Exception:
                failures += 1
                time.sleep(0.1)
                continue
            acked += 1
            if first_ack_after is None:
                first_ack_after = time.monotonic() - killed_at
            time.sleep(0.05)
        print(f"\netcd member {failure}: first acknowledged send in "
              f"{first_ack_after} s, {acked} acknowledged, {failures} refused")
        assert first_ack_after is not None and acked > 20, c.logs()
        # The nodes kept their leases (a failover of etcd is not a failover of Conveyor):
        # the leader is the one from before, and every node still counts as alive.
        state = c.state("n2")
        assert state["lease_valid"] and set(state["nodes"]) == set(c.members()), state
        assert c.leader("steady") == leader
        for node in c.nodes:
            assert c.state(node)["lease_valid"], node
        got = 0
        while client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                     WaitTimeSeconds=1).get("Messages"):
            got += 1
        assert got > 0
        if failure == "hung":
            assert member.process is not None
            member.process.send_signal(signal.SIGCONT)
