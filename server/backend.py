"""Where a queue's messages live: the one seam between the queue service and the engine.

:class:`~server.service.QueueService` asks a :class:`QueueBackend` for a queue's handle
and makes its engine calls there; it never asks whether it runs on one node or in a
cluster. That is answered once, where the server is assembled (server/deployment.py):

- :class:`LocalBackend`: each queue is one or more partitions (server/partitioned.py),
  each an engine queue of this process's broker;
- :class:`server.cluster.backend.PartitionedBackend`: each queue is one or more
  partitions, each a replicated log led on some node of the cluster, called in process
  where this node leads it and over the inter-node port where another does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from engine import AsyncBroker, AsyncQueue, Broker, Message, QueueAttributes, QueueStats
from engine.catalog import Catalog
from engine.errors import EngineError
from engine.results import SendEntry, SendResult
from server.metadata import MetadataStore, QueueRecord
from server.partitioned import PartitionedQueue, partition_names, queue_of_partition
from server.protection.breaker import Guard
from server.settings import PARTITIONS, QueueSettings

_log = logging.getLogger("conveyor.service")


class QueueHandle(Protocol):
    """One queue's engine calls, as :class:`engine.AsyncQueue` has them."""

    @property
    def name(self) -> str: ...
    async def attributes(self) -> QueueAttributes: ...
    async def set_attributes(self, **changes: Any) -> QueueAttributes: ...
    async def stats(self) -> QueueStats: ...
    async def purge(self) -> None: ...
    async def send_batch(self, entries: list[SendEntry]) -> list[SendResult | EngineError]: ...
    async def receive(self, max_messages: int = 1, wait_seconds: int | None = None,
                      visibility_timeout: int | None = None) -> list[Message]: ...
    async def delete_batch(self, receipts: list[str]) -> list[EngineError | None]: ...
    async def change_visibility_batch(self, entries: list[tuple[str, int]]
                                      ) -> list[EngineError | None]: ...


class QueueBackend(Protocol):
    """Where queues are made, found and removed. The service has checked every argument
    and holds the queue's lock around create, update and delete."""

    def check_supported(self, attributes: Mapping[str, Any], settings: QueueSettings) -> None:
        """Refuse (UnsupportedOperationError) what this backend cannot do safely."""

    def queue(self, record: QueueRecord) -> QueueHandle:
        """The handle of the queue the record names: no I/O."""

    async def create_queue(self, engine_name: str, attributes: dict[str, Any],
                           settings: QueueSettings) -> None:
        """Make the queue's storage; the service then writes its record."""

    async def update_queue(self, record: QueueRecord, changes: dict[str, Any],
                           extra: Mapping[str, str]) -> None:
        """Apply changed engine attributes and server settings (``extra``, as given)."""

    async def delete_queue(self, record: QueueRecord,
                           forget: Callable[[], Awaitable[None]]) -> None:
        """Remove the queue's storage, and its record with ``forget``, in whichever order
        leaves nothing reachable if the process dies between the two."""

    async def dead_letter_sources(self, engine_name: str) -> list[str]:
        """Engine names of the queues whose dead-letter queue this one is."""


class LocalBackend:
    """Every queue is one or more partitions, each an engine queue in this process's
    broker, their calls behind the engine's guard (bulkhead and circuit breaker)."""

    def __init__(self, broker: AsyncBroker, guard: Guard) -> None:
        self.broker = broker
        self.guard = guard
        self.partitions = LocalPartitions(broker, guard)

    async def reconcile(self, store: MetadataStore) -> None:
        """Make the records and the engine's queues agree, before the first request.

        - A record from before partitions were kept on one node asks for several but has
          one engine queue: its ConveyorPartitions is set to the one it has, so that what
          the queue reports is what it is (its messages are all there, in that one).
        - Engine queues that no record owns are moved to orphaned/ (engine/orphans.py).
          One may be a create interrupted between its two steps, or a queue whose record
          was lost (a metadata.sqlite3 deleted, replaced or restored without its -wal):
          nothing here can tell which, so none is deleted. This process is the store's
          only writer, so none is a create under way.
        """
        engine_queues = set(await self.broker.list_queues())
        owned: set[str] = set()
        for record in await store.all_records():
            names = partition_names(record.engine_name, record.settings.partitions)
            if len(names) > 1 and names[1] not in engine_queues:
                _log.warning("queue %s was made with %d partitions by a release that kept "
                             "one on a single node; its ConveyorPartitions is now 1",
                             record.engine_name, len(names))
                await store.put(dataclasses.replace(
                    record, extra={**record.extra, PARTITIONS: "1"}))
                names = names[:1]
            owned.update(names)
        for name in sorted(engine_queues - owned):
            await asyncio.to_thread(self.broker.broker.set_aside_queue, name,
                                    "no queue record owns it")

    def check_supported(self, attributes: Mapping[str, Any], settings: QueueSettings) -> None:
        pass  # one node does everything the service accepts

    def queue(self, record: QueueRecord) -> QueueHandle:
        if record.settings.partitions == 1:
            return GuardedQueue(AsyncQueue(self.broker.broker, record.engine_name), self.guard)
        return PartitionedQueue(self.partitions, record.engine_name, record.settings.partitions)

    async def create_queue(self, engine_name: str, attributes: dict[str, Any],
                           settings: QueueSettings) -> None:
        names = partition_names(engine_name, settings.partitions)
        for name in names:
            if self.broker.broker.catalog.uid_of(name) is not None:
                # Left by a create whose record was never written, or a delete whose
                # engine step never ran (the metadata store failed in between), or a
                # queue whose record was lost. Nobody can reach it; reusing it would
                # refuse other attributes as "exists" and bring back a deleted queue's
                # messages. Which it is cannot be told here, so it is set aside, not
                # deleted.
                await asyncio.to_thread(
                    self.broker.broker.set_aside_queue, name,
                    "replaced by a new queue of its name, no record owning it")
        # Partition 0 last: until it exists the queue is not there for anyone who looks
        # (a dead-letter check, a FIFO dead letter's partition count).
        for name in reversed(names):
            await self.broker.create_queue(name, **attributes)

    async def update_queue(self, record: QueueRecord, changes: dict[str, Any],
                           extra: Mapping[str, str]) -> None:
        for name in _partitions(record) if changes else ():
            await self.broker.set_queue_attributes(name, **changes)

    async def delete_queue(self, record: QueueRecord,
                           forget: Callable[[], Awaitable[None]]) -> None:
        # The record first: an engine queue left behind is an orphan, set aside at the next
        # start or by the next create of the name.
        await forget()
        for name in _partitions(record):
            await self.broker.delete_queue(name)

    async def dead_letter_sources(self, engine_name: str) -> list[str]:
        partitions = await asyncio.to_thread(self.broker.broker.dead_letter_sources,
                                             engine_name)
        return sorted({queue_of_partition(name) for name in partitions})


def _partitions(record: QueueRecord) -> list[str]:
    return partition_names(record.engine_name, record.settings.partitions)


class LocalPartitions:
    """The router of queues of several partitions (server/partitioned.py) on one node:
    every partition is an engine queue of this process's broker."""

    def __init__(self, broker: AsyncBroker, guard: Guard) -> None:
        self.broker = broker.broker
        self.guard = guard

    async def call(self, partition: str, op: str, *args: Any) -> Any:
        return await engine_call(self.broker, self.guard, partition, op, args)

    # One wait for the whole long poll: waits here end only with the poll, or when
    # another partition answers first (a remote one is cancelled then).
    wait_slice_s = float("inf")

    def nearest(self, partitions: list[str]) -> int | None:
        return None  # all are here: they take turns

    async def partition_uids(self, names: list[str], fresh: bool = False) -> dict[int, int]:
        # This process is the catalog's only writer: its view is always current.
        return catalog_uids(self.broker.catalog, names)


async def engine_call(broker: Broker, guard: Guard, partition: str, op: str,
                      args: Sequence[Any]) -> Any:
    """``AsyncQueue(partition).<op>(*args)`` in this process's broker, behind the engine's
    guard: a partition call made where the partition is served (``set_attributes``
    takes its changes as one dict)."""
    queue = AsyncQueue(broker, partition)
    if op == "set_attributes":
        return await guard.run(queue.set_attributes, **args[0])
    return await guard.run(getattr(queue, op), *args)


def catalog_uids(catalog: Catalog, names: list[str]) -> dict[int, int]:
    """uid -> index in names, for the engine queues of names that the catalog holds."""
    found: dict[int, int] = {}
    for i, name in enumerate(names):
        uid = catalog.uid_of(name)
        if uid is not None:
            found[uid] = i
    return found


class GuardedQueue:
    """An engine queue whose calls pass the engine's guard.

    Each method returns the guard's coroutine rather than awaiting it in one of its own:
    one coroutine frame fewer on the message path, for the same awaitable."""

    __slots__ = ("_guard", "_queue", "name")

    def __init__(self, queue: AsyncQueue, guard: Guard) -> None:
        self._queue = queue
        self._guard = guard
        self.name = queue.name

    def attributes(self) -> Coroutine[Any, Any, QueueAttributes]:
        return self._guard.run(self._queue.attributes)

    def set_attributes(self, **changes: Any) -> Coroutine[Any, Any, QueueAttributes]:
        return self._guard.run(self._queue.set_attributes, **changes)

    def stats(self) -> Coroutine[Any, Any, QueueStats]:
        return self._guard.run(self._queue.stats)

    def purge(self) -> Coroutine[Any, Any, None]:
        return self._guard.run(self._queue.purge)

    def send_batch(self, entries: list[SendEntry]
                   ) -> Coroutine[Any, Any, list[SendResult | EngineError]]:
        return self._guard.run(self._queue.send_batch, entries)

    def receive(self, max_messages: int = 1, wait_seconds: int | None = None,
                visibility_timeout: int | None = None) -> Coroutine[Any, Any, list[Message]]:
        return self._guard.run(self._queue.receive, max_messages, wait_seconds,
                               visibility_timeout)

    def delete_batch(self, receipts: list[str]
                     ) -> Coroutine[Any, Any, list[EngineError | None]]:
        return self._guard.run(self._queue.delete_batch, receipts)

    def change_visibility_batch(self, entries: list[tuple[str, int]]
                                ) -> Coroutine[Any, Any, list[EngineError | None]]:
        return self._guard.run(self._queue.change_visibility_batch, entries)
