"""Queue operations shared by every protocol the server speaks.

The SQS protocols and the native API parse their requests into calls on
:class:`QueueService` and format what it returns; nothing here knows about HTTP. Queues
are named by (account, name); the engine queue behind one is ``account/name``.

The metadata service is the authority on which queues exist; the engine holds their
messages. A queue is created in the engine first and recorded in the metadata second, and
deleted in the reverse order, so a crash between the two leaves at worst an engine queue
nobody can reach, which :meth:`QueueService.start` removes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from engine import AsyncBroker, AsyncQueue, Message, QueueAttributes, QueueStats
from engine.errors import (
    EngineError,
    InvalidAttributeError,
    InvalidMessageContentsError,
    InvalidParameterError,
    QueueExistsError,
    QueueNotFoundError,
)
from engine.limits import FIFO_SUFFIX, check_queue_name
from engine.results import SendEntry, SendResult
from server.cluster.partitions import (
    PartitionedQueue,
    check_partitions,
    partition_count,
    queue_partitions,
)
from server.config import (
    LIST_PAGE_MAX,
    PURGE_INTERVAL_S,
    REPLICATION_FACTOR_MAX,
    TAG_KEY_CHARS_MAX,
    TAG_VALUE_CHARS_MAX,
    TAGS_MAX,
)
from server.errors import PurgeInProgressError, TaskNotFoundError, UnsupportedOperationError
from server.metadata import CachedMetadata, QueueRecord
from server.protection import authz
from server.protection.breaker import Guard
from server.protection.ratelimit import parse_rate
from server.protection.sse import ENVELOPE_OVERHEAD, Keyring, SealError, is_sealed

if TYPE_CHECKING:
    from replication.node import ClusterNode
    from server.cluster.calls import PartitionCalls

# Queue attribute (SQS name) that overrides the server's per-queue rate limit.
RATE_LIMIT_ATTRIBUTE = "ConveyorRateLimit"
REPLICATION_FACTOR_ATTRIBUTE = "ConveyorReplicationFactor"

_log = logging.getLogger("conveyor.service")
_P = ParamSpec("_P")
_T = TypeVar("_T")

# A redrive moves at most this many messages per second unless the caller says fewer.
MOVE_RATE_MAX = 500
MOVE_VISIBILITY_S = 30


@dataclasses.dataclass(frozen=True)
class QueueView:
    """What reading a queue returns: its record, engine attributes and live counts."""

    record: QueueRecord
    attributes: QueueAttributes
    stats: QueueStats


@dataclasses.dataclass
class MoveTask:
    """A redrive of messages out of a dead-letter queue (SQS StartMessageMoveTask)."""

    handle: str
    source: str  # engine name of the dead-letter queue
    destination: str | None  # engine name, or None for each message's original queue
    rate: int
    started_ms: int
    status: str = "RUNNING"
    moved: int = 0
    to_move: int = 0
    failure: str | None = None
    runner: asyncio.Task[None] | None = None


class _KeyedLocks:
    """An asyncio lock per key, kept only while a task holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class QueueService:
    def __init__(self, broker: AsyncBroker, metadata: CachedMetadata, keyring: Keyring,
                 backend: Guard, cluster: ClusterNode | None = None,
                 calls: PartitionCalls | None = None) -> None:
        self.broker = broker
        self.cluster = cluster
        """None on a single node; else queues are placed, led and deleted through it."""
        self.calls = calls
        """With cluster: engine calls on partitions, made where each is led."""
        self.metadata = metadata
        self.keyring = keyring
        self.backend = backend
        """Bulkhead and breaker around the engine calls of the message path."""
        self.unopened = 0
        """Sealed messages that failed to open (tampered or damaged), since start."""
        self._purged: dict[str, float] = {}
        self._tasks: dict[str, MoveTask] = {}
        self._creating = _KeyedLocks()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Remove engine queues that no metadata record owns (an interrupted create)."""
        if self.cluster is not None:
            return  # the cluster node drops local queues that etcd no longer has
        store = self.metadata.store
        records = await store.all_records()  # type: ignore[attr-defined]
        owned = {r.engine_name for r in records}
        for name in await self.broker.list_queues():
            if name not in owned:
                _log.warning("deleting engine queue %s: no queue record owns it", name)
                await self.broker.delete_queue(name)

    async def close(self) -> None:
        for task in self._tasks.values():
            if task.runner is not None:
                task.runner.cancel()

    # -- queues --------------------------------------------------------------------------

    async def create_queue(self, account: str, name: str, attributes: dict[str, Any],
                           extra: dict[str, str], tags: dict[str, str]) -> QueueRecord:
        """Create a queue, or return it if it exists with the same attributes."""
        check_tags(tags)
        check_extra(extra)
        check_partitions(extra, None)
        _same_account(account, attributes)
        # Attributes first: the name's rules depend on whether the queue is FIFO.
        check_queue_name(name, QueueAttributes.from_dict(attributes).fifo)
        self._check_clusterable(attributes, extra)
        existing = await self.metadata.get(account, name)
        if existing is not None:
            queue = (self._queue_of(existing) if self.cluster
                     else await self.broker.get_queue(existing.engine_name))
            current = (await queue.attributes()).to_dict()
            wanted = QueueAttributes.from_dict(attributes).to_dict()
            differing = [k for k, v in wanted.items() if current[k] != v]
            differing += [k for k, v in extra.items() if existing.extra.get(k) != v]
            if differing:
                raise QueueExistsError(name, differing)
            return existing
        # One create of a name at a time: an engine queue that no record owns is then
        # known to be no other create's work in progress.
        async with self._creating.hold((account, name)):
            record = await self.metadata.get(account, name)
            if record is not None:  # made while this create waited its turn
                return await self.create_queue(account, name, attributes, extra, tags)
            engine_name = f"{account}/{name}"
            if self.cluster is not None:
                cluster = self.cluster
                await asyncio.gather(*(
                    cluster.create_queue(partition, attributes, replication_factor(extra))
                    for partition in queue_partitions(engine_name, extra)))
                now = _now_ms()
                record = QueueRecord(account, name, now, now, dict(tags), dict(extra))
                await self.metadata.put(record)
                return record
            if engine_name in await self.broker.list_queues(engine_name):
                # Left by a create whose record was never written, or a delete whose
                # engine step never ran (the metadata store failed in between). Nobody
                # can reach it; reusing it would refuse other attributes as "exists" and
                # bring back a deleted queue's messages.
                _log.warning("replacing engine queue %s: no queue record owns it",
                             engine_name)
                await self.broker.delete_queue(engine_name)
            await self.broker.create_queue(engine_name, **attributes)
            now = _now_ms()
            record = QueueRecord(account, name, now, now, dict(tags), dict(extra))
            await self.metadata.put(record)
            return record

    def _check_clusterable(self, attributes: Mapping[str, Any],
                           extra: Mapping[str, str]) -> None:
        """Refuse what a cluster cannot do yet, rather than do it unsafely.

        Dead-letter moves run inside one node's engine, and a queue's DLQ may lead on
        another node; data keys are wrapped by each node's own master key, so a body
        sealed by one leader would not open on the next.
        """
        if self.cluster is None:
            return
        if attributes.get("dead_letter_queue"):
            raise UnsupportedOperationError("RedrivePolicy (a dead-letter queue) in a cluster")
        if sse_enabled(extra) or attributes.get("encrypted"):
            raise UnsupportedOperationError("encryption at rest in a cluster")

    async def record(self, account: str, name: str) -> QueueRecord:
        check_queue_name(name, name.endswith(FIFO_SUFFIX) if isinstance(name, str) else False)
        record = await self.metadata.get(account, name)
        if record is None:
            raise QueueNotFoundError(name)
        return record

    async def queue(self, account: str, name: str) -> AsyncQueue | PartitionedQueue:
        """The engine queue behind (account, name): the path every message takes."""
        record = self.metadata.cached(account, name) or await self.record(account, name)
        return self._queue_of(record)

    def _queue_of(self, record: QueueRecord) -> AsyncQueue | PartitionedQueue:
        if self.cluster is None:
            return AsyncQueue(self.broker.broker, record.engine_name)
        assert self.calls is not None
        return PartitionedQueue(self.calls, self.cluster, record.engine_name,
                                partition_count(record.extra))

    async def _run(self, fn: Callable[_P, Awaitable[_T]], /,
                   *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """An engine call on a queue: behind the engine's guard on a single node; in a
        cluster the guard is on each partition's call where it is made."""
        if self.cluster is None:
            return await self.backend.run(fn, *args, **kwargs)
        return await fn(*args, **kwargs)

    async def view(self, account: str, name: str) -> QueueView:
        record = await self.record(account, name)
        queue = self._queue_of(record)
        return QueueView(record, await queue.attributes(), await queue.stats())

    async def list_queues(self, account: str, prefix: str = "", limit: int = LIST_PAGE_MAX,
                          after: str = "") -> tuple[list[str], str | None]:
        """A page of queue names in name order, and the token for the next page."""
        limit = min(max(limit, 1), LIST_PAGE_MAX)
        for value, parameter in ((prefix, "prefix"), (after, "after")):
            if not isinstance(value, str) or not value.isascii():
                # Names are ASCII, so a non-ASCII prefix or token matches nothing.
                raise InvalidParameterError(parameter, value, "must be ASCII text")
        names = await self.metadata.names(account, prefix, after, limit + 1)
        if len(names) > limit:
            return names[:limit], names[limit - 1]
        return names, None

    async def set_attributes(self, account: str, name: str, changes: dict[str, Any],
                             extra: dict[str, str]) -> QueueView:
        record = await self.record(account, name)
        check_extra(extra)
        check_partitions(extra, record.extra)
        _same_account(account, changes)
        self._check_clusterable(changes, extra)
        if changes:
            if self.cluster is None:
                await self.broker.set_queue_attributes(record.engine_name, **changes)
            else:
                await self._queue_of(record).set_attributes(**changes)
        factor = replication_factor(extra)
        if self.cluster is not None and REPLICATION_FACTOR_ATTRIBUTE in extra:
            cluster = self.cluster
            await asyncio.gather(*(
                cluster.set_replication_factor(partition, factor)
                for partition in queue_partitions(record.engine_name, record.extra)))
        if extra or changes:
            merged = {**record.extra, **extra}
            merged = {k: v for k, v in merged.items() if v != ""}
            record = dataclasses.replace(record, extra=merged, modified_ms=_now_ms())
            await self.metadata.put(record)
        return await self.view(account, name)

    async def delete_queue(self, account: str, name: str) -> None:
        record = await self.record(account, name)
        if self.cluster is not None:
            # The messages go first: if the record's delete then fails, the queue answers
            # 503 until DeleteQueue is retried, whereas a partition left behind would
            # bring its old messages back to a queue made again under the name.
            cluster = self.cluster
            await asyncio.gather(*(
                cluster.delete_queue(partition)
                for partition in queue_partitions(record.engine_name, record.extra)))
            await self.metadata.delete(account, name)
        else:
            await self.metadata.delete(account, name)
            await self.broker.delete_queue(record.engine_name)
        self._purged.pop(record.engine_name, None)

    async def tag(self, account: str, name: str, tags: dict[str, str]) -> None:
        record = await self.record(account, name)
        merged = {**record.tags, **check_tags(tags)}
        check_tags(merged)
        await self.metadata.put(dataclasses.replace(record, tags=merged))

    async def untag(self, account: str, name: str, keys: Sequence[str]) -> None:
        record = await self.record(account, name)
        remaining = {k: v for k, v in record.tags.items() if k not in set(keys)}
        await self.metadata.put(dataclasses.replace(record, tags=remaining))

    async def dead_letter_sources(self, account: str, name: str) -> list[tuple[str, str]]:
        """(account, name) of the queues whose dead-letter queue this one is."""
        record = await self.record(account, name)
        sources = await asyncio.to_thread(self.broker.broker.dead_letter_sources,
                                          record.engine_name)
        return [tuple(source.split("/", 1)) for source in sorted(sources)]  # type: ignore[misc]

    # -- messages ------------------------------------------------------------------------

    async def send(self, account: str, name: str, entries: Sequence[SendEntry]
                   ) -> list[SendResult | EngineError]:
        record = self.metadata.cached(account, name) or await self.record(account, name)
        return await self._send(record, entries)

    async def _send(self, record: QueueRecord, entries: Sequence[SendEntry]
                    ) -> list[SendResult | EngineError]:
        queue = self._queue_of(record)
        encrypted = sse_enabled(record.extra)
        if not encrypted and not any(is_sealed(e.body) for e in entries):
            return await self._run(queue.send_batch, entries)  # nothing to seal
        refused: dict[int, EngineError] = {}
        prepared: list[SendEntry] = []
        for i, entry in enumerate(entries):
            if is_sealed(entry.body):
                # Only the server writes envelopes: one from a client would be opened,
                # and fail, on its way back out.
                refused[i] = InvalidMessageContentsError(
                    "body", entry.body[:4], "may not begin with the bytes 00 43 56 45, which "
                    "mark a body the server encrypted")
            else:
                prepared.append(entry)
        if encrypted and prepared:
            prepared = self._seal(record.engine_name, await queue.attributes(), prepared)
        results = iter(await self._run(queue.send_batch, prepared) if prepared else [])
        return [refused[i] if i in refused else next(results) for i in range(len(entries))]

    def _seal(self, queue_id: str, attributes: QueueAttributes,
              entries: list[SendEntry]) -> list[SendEntry]:
        """The entries with their bodies sealed, under ids chosen here because the seal
        binds them; content-based deduplication keys on the plaintext, as the client
        expects, through a keyed digest (a plain SHA-256 stored beside the envelope would
        let a reader of the files confirm a guessed body)."""
        ids = _message_ids(len(entries))
        envelopes = self.keyring.seal_many(
            queue_id, [(ids[i], e.body) for i, e in enumerate(entries)])
        content_dedup = attributes.fifo and attributes.content_based_dedup
        # Built field by field: NamedTuple._replace costs more than the encryption here.
        return [SendEntry(envelopes[i], e.delay_seconds, e.attributes, e.group_id,
                          self.keyring.dedup_key(queue_id, e.body)
                          if e.dedup_id is None and content_dedup else e.dedup_id,
                          e.sender, e.system_attributes, ids[i], ENVELOPE_OVERHEAD)
                for i, e in enumerate(entries)]

    def _open(self, queue_name: str, messages: list[Message]) -> list[Message]:
        """Messages with sealed bodies opened; one that does not open is reported and left
        in flight (its visibility timeout returns it, and a redrive policy moves it to
        the dead-letter queue), never returned with a wrong body."""
        if not any(is_sealed(m.body) for m in messages):
            return messages
        opened = []
        for m in messages:
            if is_sealed(m.body):
                sealed_for = (m.dead_letter_source if isinstance(m.dead_letter_source, str)
                              else queue_name)
                try:
                    m = m._replace(body=self.keyring.open(
                        sealed_for, bytes.fromhex(m.message_id.replace("-", "")), m.body))
                except SealError as exc:
                    self.unopened += 1
                    _log.error("message %s of queue %s does not open, skipped: %s",
                               m.message_id, queue_name, exc)
                    continue
            opened.append(m)
        return opened

    async def receive(self, account: str, name: str, max_messages: int,
                      wait_seconds: int | None, visibility_timeout: int | None
                      ) -> list[Message]:
        queue = await self.queue(account, name)
        return self._open(queue.name, await self._run(
            queue.receive, max_messages, wait_seconds, visibility_timeout))

    async def delete(self, account: str, name: str, receipts: Sequence[str]
                     ) -> list[EngineError | None]:
        return await self._run((await self.queue(account, name)).delete_batch, receipts)

    async def change_visibility(self, account: str, name: str,
                                entries: Sequence[tuple[str, int]]) -> list[EngineError | None]:
        return await self._run(
            (await self.queue(account, name)).change_visibility_batch, entries)

    async def purge(self, account: str, name: str) -> None:
        queue = await self.queue(account, name)
        last = self._purged.get(queue.name)
        now = time.monotonic()
        if last is not None and now - last < PURGE_INTERVAL_S:
            raise PurgeInProgressError(name, PURGE_INTERVAL_S - (now - last))
        await queue.purge()
        self._purged[queue.name] = now

    # -- message move tasks (dead-letter redrive) ------------------------------------------

    async def start_move(self, source: tuple[str, str], destination: tuple[str, str] | None,
                         rate: int | None) -> str:
        source_record = await self.record(*source)
        if not await self.dead_letter_sources(*source):
            raise InvalidParameterError("SourceArn", source[1],
                                        "is not a dead-letter queue of any queue")
        for task in self._tasks.values():
            if task.source == source_record.engine_name and task.status == "RUNNING":
                raise InvalidParameterError("SourceArn", source[1],
                                            "already has a message move task running")
        destination_name = None
        if destination is not None:
            destination_name = (await self.record(*destination)).engine_name
        if rate is not None and not 1 <= rate <= MOVE_RATE_MAX:
            raise InvalidParameterError("MaxNumberOfMessagesPerSecond", rate,
                                        f"must be 1..{MOVE_RATE_MAX}")
        handle = base64.urlsafe_b64encode(json.dumps(
            {"task": uuid.uuid4().hex, "source": source_record.engine_name}).encode()).decode()
        stats = await AsyncQueue(self.broker.broker, source_record.engine_name).stats()
        task = MoveTask(handle, source_record.engine_name, destination_name,
                        rate or MOVE_RATE_MAX, _now_ms(), to_move=stats.visible)
        task.runner = asyncio.create_task(self._run_move(task))
        self._tasks[handle] = task
        return handle

    async def _run_move(self, task: MoveTask) -> None:
        source = AsyncQueue(self.broker.broker, task.source)
        try:
            while task.status == "RUNNING":
                started = time.monotonic()
                batch = self._open(task.source,
                                   await source.receive(10, 0, MOVE_VISIBILITY_S))
                if not batch:
                    task.status = "COMPLETED"
                    return
                for message in batch:
                    target = task.destination or message.dead_letter_source
                    if not isinstance(target, str):
                        raise QueueNotFoundError("original source queue")
                    # A fresh deduplication id: the original one may still be inside the
                    # destination's window, which would drop the message as a duplicate.
                    dedup = (f"redrive-{message.message_id}"
                             if message.group_id is not None else None)
                    owner, _, target_name = target.partition("/")
                    [result] = await self._send(await self.record(owner, target_name), [
                        SendEntry(message.body, attributes=message.attributes or None,
                                  group_id=message.group_id, dedup_id=dedup,
                                  sender=message.sender,
                                  system_attributes=message.system_attributes or None)])
                    if isinstance(result, EngineError):
                        # The destination refused it: it stays in the dead-letter queue.
                        await source.change_visibility(message.receipt, 0)
                        raise result
                    await source.delete(message.receipt)
                    task.moved += 1
                # Stay under the requested rate.
                await asyncio.sleep(max(0.0, len(batch) / task.rate
                                        - (time.monotonic() - started)))
            task.status = "CANCELLED"
        except asyncio.CancelledError:
            task.status = "CANCELLED"
            raise
        except EngineError as exc:
            task.status = "FAILED"
            task.failure = str(exc)
            _log.warning("message move task from %s failed: %s", task.source, exc)

    def list_moves(self, source_engine_name: str, limit: int) -> list[MoveTask]:
        tasks = [t for t in self._tasks.values() if t.source == source_engine_name]
        return sorted(tasks, key=lambda t: t.started_ms, reverse=True)[:limit]

    async def cancel_move(self, handle: str, account: str) -> MoveTask:
        task = self._tasks.get(handle)
        if task is None or not task.source.startswith(f"{account}/"):
            raise TaskNotFoundError("the message move task")
        if task.status != "RUNNING":
            raise InvalidParameterError("TaskHandle", handle, f"the task is {task.status}")
        task.status = "CANCELLING"
        if task.runner is not None:
            task.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task.runner
        task.status = "CANCELLED"
        return task


def _message_ids(count: int) -> list[bytes]:
    """``count`` random version-4 UUIDs as bytes, from one read of the random source."""
    data = bytearray(os.urandom(16 * count))
    for at in range(0, len(data), 16):
        data[at + 6] = (data[at + 6] & 0x0F) | 0x40  # version 4
        data[at + 8] = (data[at + 8] & 0x3F) | 0x80  # RFC 4122 variant
    return [bytes(data[at:at + 16]) for at in range(0, len(data), 16)]


def sse_enabled(extra: Mapping[str, str]) -> bool:
    """Server-side encryption is on: SQS-managed, or a KMS key id given (served by the
    server's own keyring; the id is kept only to be reported back)."""
    return extra.get("SqsManagedSseEnabled") == "true" or bool(extra.get("KmsMasterKeyId"))


def check_extra(extra: Mapping[str, str]) -> None:
    """Values of the queue attributes the FrontEnd enforces, checked before any is kept."""
    if extra.get("Policy"):
        authz.parse(extra["Policy"])
    if extra.get(RATE_LIMIT_ATTRIBUTE):
        parse_rate(extra[RATE_LIMIT_ATTRIBUTE], RATE_LIMIT_ATTRIBUTE)
    factor = extra.get(REPLICATION_FACTOR_ATTRIBUTE)
    if factor and replication_factor(extra) is None:
        raise InvalidAttributeError(REPLICATION_FACTOR_ATTRIBUTE, factor,
                                    f"must be a whole number from 1 to {REPLICATION_FACTOR_MAX}")
    sse = extra.get("SqsManagedSseEnabled")
    if sse is not None and sse not in ("true", "false", ""):
        raise InvalidAttributeError("SqsManagedSseEnabled", sse, "must be true or false")
    if sse == "true" and extra.get("KmsMasterKeyId"):
        raise InvalidAttributeError("SqsManagedSseEnabled", sse,
                                    "cannot be set together with KmsMasterKeyId")


def replication_factor(extra: Mapping[str, str]) -> int | None:
    """The queue's ConveyorReplicationFactor, if set and valid."""
    value = extra.get(REPLICATION_FACTOR_ATTRIBUTE, "")
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= REPLICATION_FACTOR_MAX:
        return None
    return int(value)


def _same_account(account: str, attributes: Mapping[str, Any]) -> None:
    # A dead-letter queue of another account would let a redrive write into a queue its
    # owner never granted anything on.
    dead_letter = attributes.get("dead_letter_queue")
    if isinstance(dead_letter, str) and not dead_letter.startswith(f"{account}/"):
        raise InvalidAttributeError("RedrivePolicy", dead_letter,
                                    "the dead-letter queue must belong to the same account")


def check_tags(tags: Mapping[str, object]) -> dict[str, str]:
    """Tags as SQS limits them: at most 50, keys 1..128 and values 0..256 characters."""
    if len(tags) > TAGS_MAX:
        raise InvalidParameterError("tags", len(tags), f"a queue has at most {TAGS_MAX}")
    for key, value in tags.items():
        if not isinstance(key, str) or not 1 <= len(key) <= TAG_KEY_CHARS_MAX:
            raise InvalidParameterError("tags", key,
                                        f"a tag key is 1..{TAG_KEY_CHARS_MAX} characters")
        if not isinstance(value, str) or len(value) > TAG_VALUE_CHARS_MAX:
            raise InvalidParameterError("tags", value,
                                        f"a tag value is 0..{TAG_VALUE_CHARS_MAX} characters")
    return dict(tags)  # type: ignore[arg-type]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
