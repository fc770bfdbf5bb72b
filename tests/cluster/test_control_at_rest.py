"""A cluster at rest asks nothing of etcd: each node's view follows a watch, and nothing
reads the whole state again, or changes anything, while nothing happens.

Counted on etcd's side (its gRPC counters), not timed. Before the watch, each node read
the whole state every 0.2 s: some 45 reads in this test's quiet 3 s.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

from tests.cluster.harness import cluster
from tests.cluster.workload import create_queue
from tests.support.etcd import EtcdServer

QUEUES = 6
QUIET_S = 3.0
SETTLE_S = 1.5


def _calls(etcd: EtcdServer) -> dict[str, int]:
    """etcd's count of gRPC calls started, by method."""
    with urllib.request.urlopen(f"http://{etcd.endpoint}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {m: int(float(n)) for m, n in re.findall(
        r'^grpc_server_started_total\{grpc_method="(\w+)",[^}]*\} (\S+)$', text, re.M)}


def test_a_cluster_at_rest_reads_and_writes_nothing_in_etcd(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        assert isinstance(c.etcd, EtcdServer)
        for i in range(QUEUES):
            create_queue(c, f"rest-{i}", node=f"n{i % 3}")
        for i in range(QUEUES):
            c.wait_isr(f"rest-{i}", 3)
        time.sleep(SETTLE_S)
        before = _calls(c.etcd)
        time.sleep(QUIET_S)
        after = _calls(c.etcd)
        moved = {m: after[m] - before.get(m, 0) for m in after if after[m] != before.get(m, 0)}
        # Lease refreshes go on (a stream each); nothing else does.
        assert set(moved) <= {"LeaseKeepAlive"}, moved


def test_a_create_reads_etcd_once_and_followers_accept_from_their_view(
        tmp_path: Path) -> None:
    """CreateQueue reads the queue's record once; each follower answers its new leader's
    OPEN from its watched view (the view applies the epoch's revision first). Before, the
    create read the record twice and each follower read etcd twice per OPEN: 6 reads a
    queue at RF=3, which at thousands of queues made creation and failover wait on etcd."""
    with cluster(tmp_path) as c:
        assert isinstance(c.etcd, EtcdServer)
        create_queue(c, "warm", node="n0")
        c.wait_isr("warm", 3)
        time.sleep(SETTLE_S)
        before = _calls(c.etcd)
        for i in range(QUEUES * 2):
            create_queue(c, f"new-{i}", node=f"n{i % 3}")
        for i in range(QUEUES * 2):
            c.wait_isr(f"new-{i}", 3)
        reads = _calls(c.etcd).get("Range", 0) - before.get("Range", 0)
        assert reads <= QUEUES * 2 + 2, reads
