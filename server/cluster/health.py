"""/metrics of replication: how well each partition this node leads is replicated.

Each partition is reported by its leader alone, so summing over the cluster's nodes
counts each once. A partition is under-replicated while fewer replicas are in sync than
its replication factor asks (a node is down, or there are fewer nodes than that), and it
refuses writes while fewer are in sync than its min_insync_replicas.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily

from replication.node import ClusterNode
from server.metrics import Render


class ReplicationHealth:
    """A metrics source (server.metrics.Source) over the partitions a node leads."""

    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    def snapshot(self) -> Render:
        # The roles live on the event loop: their few numbers are copied here.
        rows = [(name, len(role.partition.isr), role.partition.rf, role.min_insync)
                for name, role in self._node.leading.items()]

        def render() -> Iterator[GaugeMetricFamily]:
            in_sync = GaugeMetricFamily(
                "conveyor_partition_in_sync_replicas",
                "In-sync replicas of a partition this node leads", labels=["partition"])
            factor = GaugeMetricFamily(
                "conveyor_partition_replication_factor",
                "Replicas a partition this node leads should have", labels=["partition"])
            under = GaugeMetricFamily(
                "conveyor_partition_under_replicated",
                "1 while fewer replicas are in sync than the replication factor",
                labels=["partition"])
            refusing = GaugeMetricFamily(
                "conveyor_partition_below_min_insync",
                "1 while fewer replicas are in sync than min_insync_replicas: writes are "
                "refused (503 NotEnoughReplicas)", labels=["partition"])
            for name, isr, rf, min_insync in rows:
                in_sync.add_metric([name], isr)
                factor.add_metric([name], rf)
                under.add_metric([name], int(isr < rf))
                refusing.add_metric([name], int(isr < min_insync))
            yield from (in_sync, factor, under, refusing)

        return render
