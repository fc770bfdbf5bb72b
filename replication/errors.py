"""Errors of the cluster layer: part of the one hierarchy rooted at EngineError."""

from __future__ import annotations

from engine.errors import EngineError


class ClusterError(EngineError):
    """Base for errors of replication and cluster control."""


class ControlUnavailableError(ClusterError):
    """etcd cannot be reached or did not answer in time."""


class HistoryCompactedError(ControlUnavailableError):
    """etcd no longer holds the revisions a watch was to resume from (compacted): what
    changed meanwhile can only be learnt by reading the whole state again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted its history up to revision {compact_revision}")
        self.compact_revision = compact_revision


class NotLeaderError(ClusterError):
    """This node does not lead the queue; ``leader_url`` is the node that does, if known."""

    def __init__(self, name: str, leader_url: str | None) -> None:
        where = f"; its leader is {leader_url}" if leader_url else "; it has no leader now"
        super().__init__(f"this node does not lead queue {name!r}{where}")
        self.name = name
        self.leader_url = leader_url


class ReplicationUnavailableError(ClusterError):
    """A write cannot be acknowledged safely: too few in-sync replicas, or fenced."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"queue {name!r} cannot acknowledge writes now: {reason}")
        self.name = name
        self.reason = reason


class NotEnoughReplicasError(ReplicationUnavailableError):
    """Fewer replicas are in sync than the partition's min_insync_replicas: a write would
    be acknowledged on fewer disks than promised, so it is refused (and not retried here:
    the replicas must come back, or live nodes replace them)."""


class NotEnoughReplicasAfterAppendError(NotEnoughReplicasError):
    """Too few replicas were in sync to acknowledge a write already made in the leader's
    log (the ISR shrank while it waited): its outcome is unknown, and it may take effect
    once replicas return, as after any lost answer. (NotEnoughReplicasError itself is
    raised before anything is written.)"""
