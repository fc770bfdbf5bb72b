"""Which worker owns a partition: a function of the partition and the number of workers
alone, so that every worker computes the same answer with no exchange, and a restart
with another number reassigns partitions without moving a byte.

``owner = (p + xxh3(queue)) mod N`` for partition p of a queue: a queue of N partitions
(a standard queue's default under N workers) has one on each worker, and the queues of
one partition spread over the workers by their names' hashes.
"""

from __future__ import annotations

import dataclasses
import os

import xxhash

from engine.errors import QueueUnavailableError
from server.partitioned import partition_index, queue_of_partition


@dataclasses.dataclass(frozen=True)
class WorkerPlace:
    """Where one worker stands among its server's workers."""

    index: int
    count: int
    run_dir: str
    """The directory (mode 0700) of the workers' call sockets."""

    def socket_path(self, index: int) -> str:
        return os.path.join(self.run_dir, f"w{index}.sock")

    def owner(self, partition: str) -> int:
        return owner(partition, self.count)

    def owns(self, partition: str) -> bool:
        return owner(partition, self.count) == self.index


def owner(partition: str, workers: int) -> int:
    """The worker of ``workers`` that owns the partition (an engine queue's name)."""
    queue = queue_of_partition(partition)
    return (partition_index(partition) + xxhash.xxh3_64_intdigest(queue.encode())) % workers


class Ownership:
    """The engine's Leadership for a worker: it opens only the partitions it owns. A call
    for another's partition reaching it is a routing bug or a change of the worker count
    in flight; refused, it costs the client a retry, never two writers of one log."""

    def __init__(self, place: WorkerPlace) -> None:
        self.place = place

    def check(self, name: str) -> None:
        if not self.place.owns(name):
            raise QueueUnavailableError(
                name, f"worker {self.place.index} does not own it (worker "
                      f"{self.place.owner(name)} of {self.place.count} does)")

    def opened(self, core: object) -> None:
        pass

    def pinned(self, name: str) -> bool:
        return False
