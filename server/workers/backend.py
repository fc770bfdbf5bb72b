"""A worker's queue backend: each queue's partitions are spread over the server's
workers (server/workers/ownership.py), all in one shared data directory.

A call on a partition this worker owns is made in its own broker; one on another's goes
to that worker over its Unix socket (server/workers/mesh.py), which makes it in process.
Making and removing a queue asks each partition's owner to make or remove its own, so
that only an owner ever writes a partition's log or its row of the catalog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from engine import AsyncQueue, Broker
from engine.catalog import Catalog
from engine.errors import EngineError
from engine.records import Origin, Send
from server.backend import GuardedQueue, QueueHandle, catalog_uids, engine_call
from server.calls.codec import RESULTS
from server.calls.link import CALL_TIMEOUT_S
from server.errors import DependencyUnavailableError
from server.metadata import QueueRecord
from server.partitioned import (
    EnginePartitions,
    PartitionedQueue,
    partition_names,
    queue_of_partition,
)
from server.protection.breaker import Guard
from server.settings import QueueSettings
from server.workers.ownership import WorkerPlace
from server.workers.siblings import SIBLING_OPS

if TYPE_CHECKING:
    from server.workers.mesh import Mesh
    from server.workers.siblings import Siblings


ACCEPT_THREADS = 4
"""Threads that take in siblings' dead letters at once (each an open and an fsync)."""


class WorkerPartitions:
    """The router of this worker's queues (server/partitioned.py), and what the engine
    asks of partitions (engine.broker.Partitions)."""

    def __init__(self, place: WorkerPlace, guard: Guard) -> None:
        self.place = place
        self.guard = guard
        """The engine's bulkhead and breaker: local calls only. A sibling that fails
        must not open the circuit for the partitions this worker owns."""
        self.broker: Broker | None = None
        self.mesh: Mesh | None = None
        self.siblings: Siblings | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._naming = EnginePartitions()
        self._accepting = ThreadPoolExecutor(ACCEPT_THREADS,
                                             thread_name_prefix="conveyor-accept")
        """Where dead letters from siblings are taken in. Not the default executor: the
        sibling's move waits on a thread of that one, and two workers moving into each
        other's dead-letter queues would otherwise each wait for a thread the other
        holds."""

    def attach(self, broker: Broker, mesh: Mesh, siblings: Siblings) -> None:
        self.broker = broker
        self.mesh = mesh
        self.siblings = siblings
        self.loop = asyncio.get_running_loop()

    # -- the router ----------------------------------------------------------------------

    async def call(self, partition: str, op: str, *args: Any) -> Any:
        owner = self.place.owner(partition)
        if owner == self.place.index:
            return await self.local(partition, op, args)
        assert self.mesh is not None
        link = await self.mesh.link(owner)
        return RESULTS[op](await link.call(op, partition, args))

    async def local(self, partition: str, op: str, args: Sequence[Any]) -> Any:
        """A call on a partition this worker owns (its own, or a sibling's), or for its
        part of a view of the whole server."""
        broker = self.broker
        assert broker is not None and self.siblings is not None
        if op in SIBLING_OPS:
            return await self.siblings.local(op, partition, args)
        if op == "create_queue":
            return await asyncio.to_thread(_create, broker, partition, args[0])
        if op == "delete_queue":
            return await asyncio.to_thread(broker.delete_queue, partition)
        if op == "accept_moved":
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._accepting, broker.accept_moved,
                                              partition, args[0])
        return await engine_call(broker, self.guard, partition, op, args)

    async def partition_uids(self, names: list[str], fresh: bool = False) -> dict[int, int]:
        assert self.broker is not None
        if fresh:
            # The rows of another worker's partitions may be of a queue deleted since.
            await asyncio.to_thread(self.broker.catalog.refresh)
        return catalog_uids(self.broker.catalog, names)

    # One wait for the whole long poll: waits here end only with the poll, or when
    # another partition answers first (a remote one is cancelled then).
    wait_slice_s = float("inf")

    def nearest(self, partitions: list[str]) -> int | None:
        for i, partition in enumerate(partitions):
            if self.place.owns(partition):
                return i
        return None

    # -- the engine's Partitions ---------------------------------------------------------

    def dead_letter_partition(self, catalog: Catalog, target: str, group_id: str | None
                              ) -> str:
        return self._naming.dead_letter_partition(catalog, target, group_id)

    def queue_of(self, name: str) -> str:
        return queue_of_partition(name)

    def accept_elsewhere(self, name: str, entries: list[tuple[Origin, bytes, Send]]) -> bool:
        if self.place.owns(name):
            return False
        assert self.loop is not None
        # On an engine thread (a receive's move, or a queue's open): the call is made on
        # the event loop, and this thread waits for its answer. Any failure is the
        # engine's kind, so that the broker puts the messages back (cancel_moves) rather
        # than leave them marked as moving.
        future: Future[Any] | None = None
        try:
            future = asyncio.run_coroutine_threadsafe(
                self.call(name, "accept_moved", list(entries)), self.loop)
            future.result(CALL_TIMEOUT_S + 5)
        except EngineError:
            raise
        except Exception as exc:  # a timeout, a sibling's bug, the loop closed
            if future is not None:
                future.cancel()
            raise DependencyUnavailableError(
                f"worker {self.place.owner(name)}",
                f"dead letters could not be moved there: {exc or type(exc).__name__}"
            ) from exc
        return True

    def close(self) -> None:
        # Not waited for: a take-in still running fails against the closed broker.
        self._accepting.shutdown(wait=False, cancel_futures=True)


def _create(broker: Broker, name: str, attributes: dict[str, Any]) -> None:
    if broker.catalog.uid_of(name) is not None:
        # Left by a create whose record was never written, or a delete whose engine step
        # never ran, or a queue whose record was lost: set aside, not deleted (as on one
        # node, server/backend.py).
        broker.set_aside_queue(name, "replaced by a new queue of its name, no record owning it")
    broker.create_queue(name, **attributes)


class WorkerBackend:
    """Queues of partitions spread over the workers; a queue of one partition that this
    worker owns is called directly, as on a single node."""

    def __init__(self, partitions: WorkerPartitions, guard: Guard) -> None:
        self.partitions = partitions
        self.place = partitions.place
        self.guard = guard

    def check_supported(self, attributes: Mapping[str, Any], settings: QueueSettings) -> None:
        pass  # the workers do everything one node does

    def queue(self, record: QueueRecord) -> QueueHandle:
        count = record.settings.partitions
        if count == 1 and self.place.owns(record.engine_name):
            broker = self.partitions.broker
            assert broker is not None
            return GuardedQueue(AsyncQueue(broker, record.engine_name), self.guard)
        return PartitionedQueue(self.partitions, record.engine_name, count)

    async def create_queue(self, engine_name: str, attributes: dict[str, Any],
                           settings: QueueSettings) -> None:
        # Partition 0 last: until it exists the queue is not there for anyone who looks
        # (a dead-letter check, a FIFO dead letter's partition count).
        for name in reversed(partition_names(engine_name, settings.partitions)):
            await self.partitions.call(name, "create_queue", attributes)

    async def update_queue(self, record: QueueRecord, changes: dict[str, Any],
                           extra: Mapping[str, str]) -> None:
        if changes:
            await self.queue(record).set_attributes(**changes)

    async def delete_queue(self, record: QueueRecord,
                           forget: Callable[[], Awaitable[None]]) -> None:
        # The record first: a partition left behind is an orphan, set aside at the next
        # start of the server or by the next create of the name.
        await forget()
        for name in partition_names(record.engine_name, record.settings.partitions):
            await self.partitions.call(name, "delete_queue")

    async def dead_letter_sources(self, engine_name: str) -> list[str]:
        broker = self.partitions.broker
        assert broker is not None
        partitions = await asyncio.to_thread(broker.dead_letter_sources, engine_name)
        return sorted({queue_of_partition(name) for name in partitions})
