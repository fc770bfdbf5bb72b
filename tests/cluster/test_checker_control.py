"""The history checker's negative controls: it must see loss where loss is possible.

Durability is weakened on purpose, in two ways, each beside the same run with it intact:

- fsync: every node of a cluster is killed at once under load, then restarted. With
  fsync=always an acknowledged send is on every in-sync replica's disk, and nothing is
  lost. With fsync=never, followers acknowledge what is still in their write buffers, so
  the last moments' acknowledged sends die with the processes: the checker has to report
  them.
- replication: both followers' links are cut, so the leader is alone in the ISR, and then
  the leader is lost for good (killed, never restarted). Only an operator can bring the
  queue back, by writing the followers into the ISR in etcd (an unclean election: the
  cluster never elects outside the ISR by itself). With --min-insync-replicas 1 the leader
  acknowledged sends alone, which no follower has: the checker has to report them. With
  the default of 2 it acknowledged nothing alone, and nothing is lost.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.cluster.harness import ACCOUNT, Cluster, cluster
from tests.cluster.workload import IN_DOUBT_PER_FAULT, Workload, create_queue, drain
from tests.support.consistency import History, Report, check
from tests.support.etcd import EtcdServer, kv_get, kv_put

ATTEMPTS = 3
ALONE_S = 2
"""How long the leader runs alone in the ISR, taking writes or refusing them."""


def _kill_all_under_load(root: Path, fsync: str) -> Report:
    with cluster(root, fsync=fsync) as c:
        url = create_queue(c, "control")
        history = History()
        with Workload(c, url, history, consume=False) as load:
            time.sleep(2)
            for node in c.nodes.values():
                node.signal_all(signal.SIGKILL)  # with workers, each of them
            assert load.sent_ok > 0
        for node in c.nodes.values():
            node.process.wait()  # type: ignore[union-attr]
        for node_id in c.nodes:
            c.restart(node_id)
        c.leader("control")
        drain(c, url, history)
        return check(history)


@pytest.mark.faults  # the counterpart of the controls; every cluster test checks this too
def test_nothing_lost_with_fsync(tmp_path: Path) -> None:
    report = _kill_all_under_load(tmp_path, "always")
    assert report.ok, str(report)
    assert report.in_doubt_within(IN_DOUBT_PER_FAULT), str(report)


def test_checker_reports_loss_without_fsync(tmp_path: Path) -> None:
    reports = []
    for attempt in range(ATTEMPTS):
        report = _kill_all_under_load(tmp_path / f"attempt{attempt}", "never")
        reports.append(report)
        if report.lost:
            print(f"\nfsync=never, all nodes killed: {report.summary()}")
            return
    pytest.fail("the checker saw no loss in any attempt: "
                + "; ".join(r.summary() for r in reports))


def force_isr(c: Cluster, queue: str, isr: list[str]) -> None:
    """Write the queue's ISR in etcd, as an operator forcing an unclean election would."""
    assert isinstance(c.etcd, EtcdServer)
    key = f"/conveyor/partitions/{ACCOUNT}/{queue}".encode()
    stored = kv_get(c.etcd, key)
    assert stored is not None, f"no partition record for {queue}"
    kv_put(c.etcd, key, json.dumps(json.loads(stored) | {"isr": isr},
                                   sort_keys=True).encode())


def _lose_the_lone_leader(root: Path, min_insync: int) -> tuple[Report, set[str]]:
    """Cut both followers, let the leader run alone, kill it for good, elect a follower by
    hand, and drain: the verdict, and the bodies acknowledged while the leader was alone."""
    with cluster(root, proxies=True, lease_ttl=3,
                 extra=("--min-insync-replicas", str(min_insync))) as c:
        url = create_queue(c, "alone")
        leader = c.leader("alone")
        followers = sorted(n for n in c.replicas("alone") if n != leader)
        c.wait_isr("alone", 3)
        history = History()
        # Sends go to the leader itself: a forwarded one would cross a follower's node.
        with Workload(c, url, history, nodes=[leader], consume=False) as load:
            deadline = time.monotonic() + 30
            while load.sent_ok < 100:
                assert time.monotonic() < deadline, "no sends acknowledged with all in sync"
                time.sleep(0.05)
            cut_at = len(history.events)
            for follower in followers:
                c.proxies[follower].cut()
            assert c.wait_isr("alone", 1) == [leader]
            time.sleep(ALONE_S)
            c.kill(leader)  # lost for good, its disk with it: it never comes back
        # Acknowledged since the cut: only the leader can hold what came after the ISR
        # shrank (the view the test reads may show the shrink late, so count from the cut).
        acked_alone = {e.body for e in history.events[cut_at:] if e.kind == "ack"}
        for follower in followers:
            c.proxies[follower].heal()
        force_isr(c, "alone", followers)
        assert c.leader("alone", other_than=leader) in followers
        drain(c, url, history)
        return check(history), acked_alone


@pytest.mark.faults  # what it shows, test_links shows too: nothing acknowledged alone
def test_replicas_in_sync_lose_nothing_when_the_lone_leader_is_lost(tmp_path: Path) -> None:
    report, acked_since_cut = _lose_the_lone_leader(tmp_path, min_insync=2)
    # Any send acknowledged after the cut was replicated before it.
    print(f"\nmin-insync-replicas 2, lone leader lost: {len(acked_since_cut)} sends "
          f"acknowledged after the cut; {report.summary()}")
    assert report.ok, str(report)


def test_checker_reports_loss_when_the_lone_leader_acknowledged_alone(
        tmp_path: Path) -> None:
    report, acked_alone = _lose_the_lone_leader(tmp_path, min_insync=1)
    print(f"\nmin-insync-replicas 1, lone leader lost: {len(acked_alone)} sends acknowledged "
          f"alone; {report.summary()}")
    assert acked_alone, "the leader acknowledged nothing alone: the control tests nothing"
    assert report.lost, f"the checker saw no loss: {report}"
    # What is lost is what only the lost leader held.
    unexplained = sorted(set(report.lost) - acked_alone)
    assert not unexplained, (f"{len(unexplained)} lost, yet acknowledged before the "
                             f"followers were cut: {unexplained[:10]}")
