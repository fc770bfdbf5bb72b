"""The members of a cluster, and the servers they run in.

A member is a node of the cluster: what holds copies, leads and follows. A server of one
process is one member, its id the node id it was given. A server of workers
(`conveyor serve --cluster --workers N`) is N members, ``NODE_ID/w0`` to
``NODE_ID/w{N-1}``, which share its disk and its power: against the failures that
replication is for, two copies on one server are one. So the ring places at most one copy
of a partition on a server, and a write counts servers, not members, toward
min_insync_replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine._ring import HashRing

MEMBER_SEPARATOR = "/"
"""Between a server's node id and its worker's: ``n1/w0`` is worker 0 of the server
``n1`` (`conveyor serve --cluster --workers N`). A node id given to the server has none."""


def host_of(member: str) -> str:
    """The server (so, the host) a member belongs to: a node id up to MEMBER_SEPARATOR."""
    return member.split(MEMBER_SEPARATOR, 1)[0]


def one_per_host(preference: list[str], count: int) -> list[str]:
    """Up to count members of preference, in its order, the first of each server only
    (see the module docstring): a queue's replication factor is capped by servers, as it
    was by nodes."""
    first: list[str] = []
    seen: set[str] = set()
    for member in preference:
        if host_of(member) not in seen and len(first) < count:
            seen.add(host_of(member))
            first.append(member)
    return first


def ring_placement(ring: HashRing, name: str, rf: int, members: list[str]) -> list[str]:
    """The replicas of a queue on the ring over members, in preference order: the first
    rf members clockwise from the queue's point, one per server (one_per_host)."""
    hosts = servers(members)
    count = min(rf, hosts)
    if not count:
        return []
    if hosts == len(members):
        return list(ring.preference_list(name, count))
    return one_per_host(ring.preference_list(name, len(members)), count)


def rebalance_target(placed: list[str], replicas: Sequence[str], rf: int) -> list[str]:
    """Where a partition's copies belong: placed (the ring's, one per server), topped up
    to as many as it has (up to rf) with copies it has on other servers. A gone node's
    copy is kept until the ring has a server to replace it (replication.leader,
    _rebalance, says why), but never as a second copy on a server in placed: a server's
    worker that the ring replaced by another of its workers is let go."""
    target = list(placed)
    wanted = min(rf, max(len(replicas), len(target)))
    if len(target) < wanted:
        taken = {host_of(m) for m in target}
        target += one_per_host([r for r in replicas if host_of(r) not in taken],
                               wanted - len(target))
    return target


def servers(members: Iterable[str]) -> int:
    """How many servers the members run in."""
    return len({host_of(m) for m in members})
