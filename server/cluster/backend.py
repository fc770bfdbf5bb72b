"""The cluster's queue backend: each queue is one or more partitions, each a replicated
log with its own leader, placed on the nodes by the ring.

Making, changing and removing a queue goes through the cluster node (etcd transactions);
its messages go through :class:`~server.partitioned.PartitionedQueue`, whose router
(:class:`~server.cluster.calls.PartitionCalls`) makes each partition's engine call where
the partition is led.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from server.backend import QueueHandle
from server.errors import UnsupportedOperationError
from server.metadata import QueueRecord
from server.partitioned import PartitionedQueue, partition_names
from server.settings import REPLICATION_FACTOR, QueueSettings

if TYPE_CHECKING:
    from replication.node import ClusterNode
    from server.cluster.calls import PartitionCalls


class PartitionedBackend:
    def __init__(self, node: ClusterNode, calls: PartitionCalls) -> None:
        self.node = node
        self.calls = calls

    def check_supported(self, attributes: Mapping[str, Any], settings: QueueSettings) -> None:
        """Refuse what a cluster cannot do yet, rather than do it unsafely.

        Dead-letter moves run inside one node's engine, and a queue's DLQ may lead on
        another node; data keys are wrapped by each node's own master key, so a body
        sealed by one leader would not open on the next.
        """
        if attributes.get("dead_letter_queue"):
            raise UnsupportedOperationError("RedrivePolicy (a dead-letter queue) in a cluster")
        if settings.encrypted or attributes.get("encrypted"):
            raise UnsupportedOperationError("encryption at rest in a cluster")

    def queue(self, record: QueueRecord) -> QueueHandle:
        return PartitionedQueue(self.calls, record.engine_name, record.settings.partitions)

    async def create_queue(self, engine_name: str, attributes: dict[str, Any],
                           settings: QueueSettings) -> None:
        node = self.node
        await asyncio.gather(*(
            node.create_queue(partition, attributes, settings.replication_factor)
            for partition in partition_names(engine_name, settings.partitions)))

    async def update_queue(self, record: QueueRecord, changes: dict[str, Any],
                           extra: Mapping[str, str]) -> None:
        if changes:
            await self.queue(record).set_attributes(**changes)
        if REPLICATION_FACTOR in extra:
            factor = QueueSettings.of(extra).replication_factor
            node = self.node
            await asyncio.gather(*(node.set_replication_factor(partition, factor)
                                   for partition in _partitions(record)))

    async def delete_queue(self, record: QueueRecord,
                           forget: Callable[[], Awaitable[None]]) -> None:
        # The messages go first: if the record's delete then fails, the queue answers 503
        # until DeleteQueue is retried, whereas a partition left behind would bring its old
        # messages back to a queue made again under the name.
        node = self.node
        await asyncio.gather(*(node.delete_queue(partition)
                               for partition in _partitions(record)))
        await forget()

    async def dead_letter_sources(self, engine_name: str) -> list[str]:
        return []  # check_supported refuses dead-letter queues in a cluster


def _partitions(record: QueueRecord) -> list[str]:
    return partition_names(record.engine_name, record.settings.partitions)
