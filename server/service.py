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
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from engine import AsyncBroker, AsyncQueue, Message, QueueAttributes, QueueStats
from engine.errors import EngineError, InvalidParameterError, QueueExistsError, QueueNotFoundError
from engine.limits import FIFO_SUFFIX, check_queue_name
from engine.results import SendEntry, SendResult
from server.config import (
    LIST_PAGE_MAX,
    PURGE_INTERVAL_S,
    TAG_KEY_CHARS_MAX,
    TAG_VALUE_CHARS_MAX,
    TAGS_MAX,
)
from server.errors import PurgeInProgressError, TaskNotFoundError
from server.metadata import CachedMetadata, QueueRecord

_log = logging.getLogger("conveyor.service")

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


class QueueService:
    def __init__(self, broker: AsyncBroker, metadata: CachedMetadata) -> None:
        self.broker = broker
        self.metadata = metadata
        self._purged: dict[str, float] = {}
        self._tasks: dict[str, MoveTask] = {}

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Remove engine queues that no metadata record owns (an interrupted create)."""
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
        # Attributes first: the name's rules depend on whether the queue is FIFO.
        check_queue_name(name, QueueAttributes.from_dict(attributes).fifo)
        existing = await self.metadata.get(account, name)
        if existing is not None:
            queue = await self.broker.get_queue(existing.engine_name)
            current = (await queue.attributes()).to_dict()
            wanted = QueueAttributes.from_dict(attributes).to_dict()
            differing = [k for k, v in wanted.items() if current[k] != v]
            differing += [k for k, v in extra.items() if existing.extra.get(k) != v]
            if differing:
                raise QueueExistsError(name, differing)
            return existing
        engine_name = f"{account}/{name}"
        await self.broker.create_queue(engine_name, **attributes)
        now = _now_ms()
        record = QueueRecord(account, name, now, now, dict(tags), dict(extra))
        await self.metadata.put(record)
        return record

    async def record(self, account: str, name: str) -> QueueRecord:
        check_queue_name(name, name.endswith(FIFO_SUFFIX) if isinstance(name, str) else False)
        record = await self.metadata.get(account, name)
        if record is None:
            raise QueueNotFoundError(name)
        return record

    async def queue(self, account: str, name: str) -> AsyncQueue:
        """The engine queue behind (account, name): the path every message takes."""
        record = self.metadata.cached(account, name) or await self.record(account, name)
        return AsyncQueue(self.broker.broker, record.engine_name)

    async def view(self, account: str, name: str) -> QueueView:
        record = await self.record(account, name)
        queue = AsyncQueue(self.broker.broker, record.engine_name)
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
        if changes:
            await self.broker.set_queue_attributes(record.engine_name, **changes)
        if extra or changes:
            merged = {**record.extra, **extra}
            merged = {k: v for k, v in merged.items() if v != ""}
            record = dataclasses.replace(record, extra=merged, modified_ms=_now_ms())
            await self.metadata.put(record)
        return await self.view(account, name)

    async def delete_queue(self, account: str, name: str) -> None:
        record = await self.record(account, name)
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
        return await (await self.queue(account, name)).send_batch(entries)

    async def receive(self, account: str, name: str, max_messages: int,
                      wait_seconds: int | None, visibility_timeout: int | None
                      ) -> list[Message]:
        queue = await self.queue(account, name)
        return await queue.receive(max_messages, wait_seconds, visibility_timeout)

    async def delete(self, account: str, name: str, receipts: Sequence[str]
                     ) -> list[EngineError | None]:
        return await (await self.queue(account, name)).delete_batch(receipts)

    async def change_visibility(self, account: str, name: str,
                                entries: Sequence[tuple[str, int]]) -> list[EngineError | None]:
        return await (await self.queue(account, name)).change_visibility_batch(entries)

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
                batch = await source.receive(10, 0, MOVE_VISIBILITY_S)
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
                    [result] = await AsyncQueue(self.broker.broker, target).send_batch([
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

    async def cancel_move(self, handle: str) -> MoveTask:
        task = self._tasks.get(handle)
        if task is None:
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
