"""Where the ring places a queue's copies when a cluster's servers run workers, each a
member of its own (`conveyor serve --cluster --workers N`)."""

from __future__ import annotations

from engine._ring import HashRing
from replication.members import host_of, rebalance_target, ring_placement

NAMES = [f"000000000000/queue-{i}" for i in range(500)]


def _ring(members: list[str]) -> HashRing:
    ring = HashRing()
    for member in sorted(members):
        ring.add(member)
    return ring


def _members(servers: int, workers: int) -> list[str]:
    return [f"n{s}/w{w}" for s in range(servers) for w in range(workers)]


def test_a_server_holds_at_most_one_copy_of_a_queue() -> None:
    members = _members(3, 4)
    ring = _ring(members)
    for name in NAMES:
        replicas = ring_placement(ring, name, 3, members)
        assert len(replicas) == 3
        assert len({host_of(r) for r in replicas}) == 3, (name, replicas)
    # The control: the ring's own preference list puts two copies on one server for
    # some of these queues, which the rule above must have kept apart.
    doubled = [n for n in NAMES
               if len({host_of(r) for r in ring.preference_list(n, 3)}) < 3]
    assert len(doubled) > 100


def test_the_copies_are_capped_by_servers_not_by_members() -> None:
    members = _members(2, 3)
    ring = _ring(members)
    for name in NAMES:
        replicas = ring_placement(ring, name, 3, members)
        assert sorted(host_of(r) for r in replicas) == ["n0", "n1"], replicas


def test_the_copies_of_a_queue_spread_over_every_worker() -> None:
    """Leadership follows the first replica: each worker of each server leads a share."""
    members = _members(3, 2)
    ring = _ring(members)
    firsts = [ring_placement(ring, name, 3, members)[0] for name in NAMES]
    for member in members:
        assert firsts.count(member) > len(NAMES) / len(members) / 2, member


def test_without_workers_the_placement_is_the_rings() -> None:
    """Node ids of servers of one process: the placement is what it was."""
    members = ["a", "b", "c", "d"]
    ring = _ring(members)
    for name in NAMES:
        assert ring_placement(ring, name, 3, members) == ring.preference_list(name, 3)


def test_a_rebalance_keeps_a_gone_servers_copy_but_never_a_second_on_one_server() -> None:
    """Server c is gone and server a's first worker on the ring is now w3 (a restart with
    more workers): the ring places a/w3 and b/w1 only. The copy on gone c is kept (the
    factor is not lowered silently), a/w1 is let go for a/w3."""
    replicas = ("a/w1", "b/w1", "c/w0")
    target = rebalance_target(["a/w3", "b/w1"], replicas, 3)
    assert target == ["a/w3", "b/w1", "c/w0"]


def test_a_rebalance_with_the_servers_there_are_moves_nothing() -> None:
    assert rebalance_target(["a/w0", "b/w1", "c/w0"], ("c/w0", "a/w0", "b/w1"), 3) == [
        "a/w0", "b/w1", "c/w0"]
    # Without workers: the ring's, topped up with the gone node's copy, as before.
    assert rebalance_target(["a", "b"], ("a", "b", "c"), 3) == ["a", "b", "c"]
