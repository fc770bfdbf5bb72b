"""Queue operations shared by every protocol the server speaks.

The SQS protocols and the native API parse their requests into calls on
:class:`QueueService` and format what it returns; nothing here knows about HTTP, nor
whether the server is one node or a cluster: a queue's messages are reached through the
:class:`~server.backend.QueueBackend` it was given. Queues are named by (account, name);
the engine queue behind one is ``account/name``.

The metadata service is the authority on which queues exist; the backend holds their
messages. A queue is created in the backend first and recorded in the metadata second.
Every read-modify-write of a queue's record (create, attribute and tag changes,
permissions, delete) holds the queue's lock, so two concurrent changes never lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any, TypeVar

from engine import Message, QueueAttributes, QueueStats
from engine.errors import (
    EngineError,
    InvalidAttributeError,
    InvalidParameterError,
    QueueExistsError,
    QueueNotFoundError,
)
from engine.limits import FIFO_SUFFIX, check_queue_name
from engine.results import SendEntry, SendResult
from server.backend import QueueBackend, QueueHandle
from server.config import (
    LIST_PAGE_MAX,
    PURGE_INTERVAL_S,
    TAG_KEY_CHARS_MAX,
    TAG_VALUE_CHARS_MAX,
    TAGS_MAX,
)
from server.errors import PurgeInProgressError, ThrottledError
from server.metadata import CachedMetadata, QueueRecord
from server.moves import MoveTasks
from server.protection import authz
from server.protection.ratelimit import Rate, SharedLimiter
from server.sealing import Sealer
from server.settings import PARTITIONS, QueueSettings, check_settings

if TYPE_CHECKING:
    from server.workers.shared import KeyedFileLocks

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclasses.dataclass(frozen=True)
class QueueView:
    """What reading a queue returns: its record, engine attributes and live counts."""

    record: QueueRecord
    attributes: QueueAttributes
    stats: QueueStats


_PURGE_RATE = Rate(1 / PURGE_INTERVAL_S, 1)


class _KeyedLocks:
    """An asyncio lock per key, kept only while a task holds or awaits it; with
    ``across``, also held across the server's processes (its workers)."""

    def __init__(self, across: KeyedFileLocks | None = None) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._across = across

    @contextlib.asynccontextmanager
    async def hold(self, key: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                if self._across is None:
                    yield
                else:
                    async with self._across.hold(key):
                        yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class QueueService:
    def __init__(self, backend: QueueBackend, metadata: CachedMetadata, sealer: Sealer,
                 queue_rate: Rate | None = None, standard_partitions: int = 1,
                 queue_locks: KeyedFileLocks | None = None,
                 purges: SharedLimiter | None = None) -> None:
        self.backend = backend
        self.standard_partitions = standard_partitions
        """Partitions of a standard queue made without ConveyorPartitions: one per worker
        (it promises no order, and each worker then takes the sends it receives)."""
        self.metadata = metadata
        self.sealer = sealer
        self.queue_rate = queue_rate
        """The server's per-queue rate limit, which a queue's ConveyorRateLimit may only
        tighten."""
        self.moves = MoveTasks(self)
        self._purged: dict[str, float] = {}
        self.purges = purges
        """With workers, the purges of every queue, server-wide (a queue's last purge
        time would otherwise be one worker's to know)."""
        self._locks = _KeyedLocks(queue_locks)
        """One per queue, held around every read-modify-write of its record."""

    async def close(self) -> None:
        self.moves.close()

    # -- queues --------------------------------------------------------------------------

    async def create_queue(self, account: str, name: str, attributes: dict[str, Any],
                           extra: dict[str, str], tags: dict[str, str]) -> QueueRecord:
        """Create a queue, or return it if it exists with the same attributes."""
        check_tags(tags)
        _check_extra(extra, None, self.queue_rate)
        _same_account(account, attributes)
        # Attributes first: the name's rules depend on whether the queue is FIFO.
        check_queue_name(name, QueueAttributes.from_dict(attributes).fifo)
        settings = QueueSettings.of(extra)
        self.backend.check_supported(attributes, settings)
        # One create of a name at a time: storage that no record owns is then known to be
        # no other create's work in progress. (The lock is this process's, per name; the
        # record is read once, under it.)
        async with self._locks.hold((account, name)):
            existing = await self.metadata.get(account, name)
            if existing is None:
                stored = dict(extra)
                if (PARTITIONS not in stored and self.standard_partitions > 1
                        and not QueueAttributes.from_dict(attributes).fifo):
                    # Kept in the record: partitions are fixed, whatever the workers later.
                    stored[PARTITIONS] = str(self.standard_partitions)
                    settings = QueueSettings.of(stored)
                await self.backend.create_queue(f"{account}/{name}", attributes, settings)
                now = _now_ms()
                record = QueueRecord(account, name, now, now, dict(tags), stored)
                await self.metadata.put(record)
                return record
        current = (await self.backend.queue(existing).attributes()).to_dict()
        wanted = QueueAttributes.from_dict(attributes).to_dict()
        differing = [k for k, v in wanted.items() if current[k] != v]
        differing += [k for k, v in extra.items() if existing.extra.get(k) != v]
        if differing:
            raise QueueExistsError(name, differing)
        return existing

    async def record(self, account: str, name: str) -> QueueRecord:
        check_queue_name(name, name.endswith(FIFO_SUFFIX) if isinstance(name, str) else False)
        record = await self.metadata.get(account, name)
        if record is None:
            raise QueueNotFoundError(name)
        return record

    async def queue(self, account: str, name: str) -> QueueHandle:
        """The engine queue behind (account, name): the path every message takes."""
        record = self.metadata.cached(account, name) or await self.record(account, name)
        return self.backend.queue(record)

    async def view(self, account: str, name: str) -> QueueView:
        record = await self.record(account, name)
        queue = self.backend.queue(record)
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
        async with self._locks.hold((account, name)):
            record = await self.record(account, name)
            _check_extra(extra, record.extra, self.queue_rate)
            _same_account(account, changes)
            self.backend.check_supported(changes, QueueSettings.of(extra))
            await self._update(record, changes, extra)
        return await self.view(account, name)

    async def add_permission(self, account: str, name: str, region: str, label: str,
                             accounts: list[str], actions: list[str]) -> None:
        """Grant ``actions`` on the queue to ``accounts``, as a policy statement ``label``."""
        async with self._locks.hold((account, name)):
            record = await self.record(account, name)
            policy = authz.add_permission(record.extra.get("Policy"), region, account, name,
                                          label, accounts, actions)
            await self._update(record, {}, {"Policy": policy})

    async def remove_permission(self, account: str, name: str, label: str) -> None:
        async with self._locks.hold((account, name)):
            record = await self.record(account, name)
            policy = authz.remove_permission(record.extra.get("Policy"), label)
            await self._update(record, {}, {"Policy": policy})

    async def _update(self, record: QueueRecord, changes: dict[str, Any],
                      extra: dict[str, str]) -> None:
        """Apply checked changes to a queue and its record (the queue's lock held)."""
        await self.backend.update_queue(record, changes, extra)
        if extra or changes:
            merged = {k: v for k, v in {**record.extra, **extra}.items() if v != ""}
            await self.metadata.put(dataclasses.replace(record, extra=merged,
                                                        modified_ms=_now_ms()))

    async def delete_queue(self, account: str, name: str) -> None:
        async with self._locks.hold((account, name)):
            record = await self.record(account, name)
            await self.backend.delete_queue(record,
                                            lambda: self.metadata.delete(account, name))
        self._purged.pop(record.engine_name, None)

    async def tag(self, account: str, name: str, tags: dict[str, str]) -> None:
        async with self._locks.hold((account, name)):
            record = await self.record(account, name)
            merged = {**record.tags, **check_tags(tags)}
            check_tags(merged)
            await self.metadata.put(dataclasses.replace(record, tags=merged))

    async def untag(self, account: str, name: str, keys: Sequence[str]) -> None:
        async with self._locks.hold((account, name)):
            record = await self.record(account, name)
            remaining = {k: v for k, v in record.tags.items() if k not in set(keys)}
            await self.metadata.put(dataclasses.replace(record, tags=remaining))

    async def dead_letter_sources(self, account: str, name: str) -> list[tuple[str, str]]:
        """(account, name) of the queues whose dead-letter queue this one is."""
        record = await self.record(account, name)
        sources = await self.backend.dead_letter_sources(record.engine_name)
        return [tuple(source.split("/", 1)) for source in sources]  # type: ignore[misc]

    # -- messages ------------------------------------------------------------------------
    # Batch calls take entries already refused while parsing (an EngineError in the
    # entry's place): the others go to the engine as one batch, and each refusal comes
    # back in its place among the results.

    async def send(self, account: str, name: str, entries: Sequence[SendEntry | EngineError]
                   ) -> list[SendResult | EngineError]:
        record = self.metadata.cached(account, name) or await self.record(account, name)
        return await self.send_to(record, entries)

    async def send_to(self, record: QueueRecord, entries: Sequence[SendEntry | EngineError]
                      ) -> list[SendResult | EngineError]:
        queue = self.backend.queue(record)
        if not record.settings.encrypted:
            return await each_valid(self.sealer.screen(entries), queue.send_batch)

        async def seal_and_send(valid: list[SendEntry]) -> list[SendResult | EngineError]:
            sealed = self.sealer.seal(record.engine_name, await queue.attributes(), valid)
            return await queue.send_batch(sealed)

        return await each_valid(self.sealer.screen(entries), seal_and_send)

    async def receive(self, account: str, name: str, max_messages: int,
                      wait_seconds: int | None, visibility_timeout: int | None
                      ) -> list[Message]:
        queue = await self.queue(account, name)
        return self.sealer.open(queue.name, await queue.receive(
            max_messages, wait_seconds, visibility_timeout))

    async def delete(self, account: str, name: str, receipts: Sequence[str | EngineError]
                     ) -> list[EngineError | None]:
        queue = await self.queue(account, name)
        return await each_valid(receipts, queue.delete_batch)

    async def change_visibility(self, account: str, name: str,
                                entries: Sequence[tuple[str, int] | EngineError]
                                ) -> list[EngineError | None]:
        queue = await self.queue(account, name)
        return await each_valid(entries, queue.change_visibility_batch)

    async def purge(self, account: str, name: str) -> None:
        if self.purges is not None:
            # Workers: one purge a minute for the whole server, in the shared buckets; a
            # queue made again under the name is another key (its creation time).
            record = await self.record(account, name)
            try:
                self.purges.check(f"{record.engine_name}@{record.created_ms}", _PURGE_RATE,
                                  name)
            except ThrottledError as exc:
                raise PurgeInProgressError(name, exc.retry_after_s) from None
            await self.backend.queue(record).purge()
            return
        queue = await self.queue(account, name)
        last = self._purged.get(queue.name)
        now = time.monotonic()
        if last is not None and now - last < PURGE_INTERVAL_S:
            raise PurgeInProgressError(name, PURGE_INTERVAL_S - (now - last))
        await queue.purge()
        self._purged[queue.name] = now


async def each_valid(items: Sequence[_T | EngineError],
                     call: Callable[[list[_T]], Awaitable[list[_R]]]
                     ) -> list[_R | EngineError]:
    """``call`` on the items that are not refusals, as one batch (none: no call), and its
    results in the items' order, each refusal in its item's place."""
    if not any(map(isinstance, items, repeat(EngineError))):  # the usual case, at C speed
        return await call(list(items))  # type: ignore[arg-type, return-value]
    valid = [item for item in items if not isinstance(item, EngineError)]
    results = iter(await call(valid) if valid else ())
    return [item if isinstance(item, EngineError) else next(results) for item in items]


def _check_extra(extra: Mapping[str, str], existing: Mapping[str, str] | None,
                 queue_rate: Rate | None) -> None:
    """Values of the queue attributes the FrontEnd enforces, checked before any is kept
    (``existing``: the queue's attributes when it is changed, None when it is created;
    ``queue_rate``: the server's per-queue rate limit)."""
    if extra.get("Policy"):
        authz.parse(extra["Policy"])  # with SQS's limits: bytes, statements, principals
    check_settings(extra, existing, queue_rate)


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
