"""The metadata service: which queues exist, for whom, and what else is known of them.

A queue's record holds what the SQS protocol knows beyond the engine's queue: its owner
account, creation and modification times, tags, and the SQS attributes that do not change
how messages flow (Policy, KmsMasterKeyId, RedriveAllowPolicy ...). The engine holds the
messages and the attributes that shape them.

:class:`MetadataStore` is the interface; :class:`SQLiteMetadataStore` is the single-node
store and a cluster store replaces it. :class:`CachedMetadata` fronts either with an
in-process cache, so that the path of a send reads no store at all. SQLite calls run on a
thread of their own (a bulkhead), so a slow metadata write never stalls the event loop.
Every row carries a check (engine/sqlite.py): a damaged record is refused, never served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from engine import sqlite
from server.config import METADATA_LOCK_WAIT_S
from server.errors import DependencyUnavailableError
from server.protection import authz
from server.protection.breaker import Bulkhead, CircuitBreaker, Guard
from server.settings import QueueSettings

if TYPE_CHECKING:
    from server.workers.shared import Generation


@dataclasses.dataclass(frozen=True)
class QueueRecord:
    account: str
    name: str
    created_ms: int
    modified_ms: int
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict[str, str] = dataclasses.field(default_factory=dict)
    """SQS attributes the engine does not use (Policy, KmsMasterKeyId, ...), as strings."""

    @property
    def engine_name(self) -> str:
        """The name of the engine queue that holds the messages: namespaced by account."""
        return f"{self.account}/{self.name}"

    @functools.cached_property
    def settings(self) -> QueueSettings:
        """The attributes among extra that the server acts on, parsed once per record."""
        return QueueSettings.of(self.extra)

    @functools.cached_property
    def policy(self) -> authz.CompiledPolicy | None:
        """The queue's Policy compiled for this queue, once per record (a change of the
        policy is a new record): cross-account requests never parse or match it again."""
        return authz.compile_policy(self.extra.get("Policy"), self.account, self.name)


class MetadataStore(Protocol):
    async def get(self, account: str, name: str) -> QueueRecord | None: ...
    async def put(self, record: QueueRecord) -> None: ...
    async def delete(self, account: str, name: str) -> None: ...
    async def names(self, account: str, prefix: str, after: str, limit: int) -> list[str]: ...
    async def all_records(self) -> list[QueueRecord]: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
    account     TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    modified_ms INTEGER NOT NULL,
    tags        TEXT NOT NULL,
    extra       TEXT NOT NULL,
    row_check   INTEGER,
    PRIMARY KEY (account, name)
) WITHOUT ROWID;
"""
TABLE = sqlite.Table("queues", ("account", "name", "created_ms", "modified_ms", "tags",
                                 "extra"), key_columns=2)
SCHEMA = sqlite.Schema(_SCHEMA, (TABLE,))


class SQLiteMetadataStore:
    """Queue records in a SQLite file (WAL, synchronous=FULL), on one thread of its own."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="conveyor-metadata")
        try:
            self._db = self._pool.submit(
                sqlite.connect, path, SCHEMA, timeout=METADATA_LOCK_WAIT_S
            ).result()
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    async def _run(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        loop = asyncio.get_running_loop()

        def run() -> list[tuple[Any, ...]]:
            with sqlite.reading(self.path):
                return self._db.execute(sql, args).fetchall()

        try:
            return await loop.run_in_executor(self._pool, run)
        except sqlite3.OperationalError as exc:
            # Locked by another process, disk full, I/O error: the store failed, not the
            # request. Unavailable (503, and counted by the breaker), not an internal error.
            raise DependencyUnavailableError("metadata store", str(exc)) from exc

    async def _records(self, where: str, args: tuple[Any, ...]) -> list[QueueRecord]:
        rows = await self._run(f"SELECT {TABLE.select()} FROM queues {where}", args)
        return [_record(sqlite.verified(self.path, TABLE.name, row)) for row in rows]

    async def get(self, account: str, name: str) -> QueueRecord | None:
        found = await self._records("WHERE account = ? AND name = ?", (account, name))
        return found[0] if found else None

    async def put(self, record: QueueRecord) -> None:
        values = (record.account, record.name, record.created_ms, record.modified_ms,
                  json.dumps(record.tags, sort_keys=True),
                  json.dumps(record.extra, sort_keys=True))
        await self._run(
            f"INSERT OR REPLACE INTO queues ({TABLE.select()}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*values, sqlite.row_check(TABLE.name, values)))

    async def delete(self, account: str, name: str) -> None:
        await self._run("DELETE FROM queues WHERE account = ? AND name = ?", (account, name))

    async def names(self, account: str, prefix: str, after: str, limit: int) -> list[str]:
        # A literal, case-sensitive prefix, in name order after a page's last name.
        found = await self._records(
            "WHERE account = ? AND substr(name, 1, ?) = ? AND name > ? ORDER BY name LIMIT ?",
            (account, len(prefix), prefix, after, limit))
        return [record.name for record in found]

    async def all_records(self) -> list[QueueRecord]:
        return await self._records("", ())

    async def ping(self) -> None:
        await self._run("SELECT 1", ())

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._db.close)
        self._pool.shutdown(wait=True)


def _record(row: tuple[Any, ...]) -> QueueRecord:
    account, name, created_ms, modified_ms, tags, extra = row
    return QueueRecord(account, name, created_ms, modified_ms, json.loads(tags),
                       json.loads(extra))


class CachedMetadata:
    """A store behind an in-process cache of records, updated on every write through it.

    Single node: this process is the only writer, so the cache is never stale. A
    server's workers share one store: each bumps a shared ``generation`` after it writes,
    and a worker that finds it changed forgets its whole cache before the lookup (writes
    are rare; lookups read the counter from shared memory, no system call). A cluster
    store invalidates it from its watch (``invalidate``). Every call to the store goes
    through ``guard`` (a bulkhead and circuit breaker): while the store is slow or down,
    requests that need it fail fast with 503, and requests served from the cache, which
    is every message operation on a queue already used, do not wait at all.
    """

    def __init__(self, store: MetadataStore, guard: Guard | None = None,
                 generation: Generation | None = None) -> None:
        self.store = store
        self.guard = guard or Guard(Bulkhead("metadata", 64, 1.0),
                                    CircuitBreaker("metadata"))
        self._cache: dict[tuple[str, str], QueueRecord] = {}
        self._generation = generation
        self._seen = generation.value() if generation is not None else 0

    def _check_generation(self) -> None:
        generation = self._generation
        if generation is not None and (now := generation.value()) != self._seen:
            self._cache.clear()
            self._seen = now

    async def get(self, account: str, name: str) -> QueueRecord | None:
        self._check_generation()
        key = (account, name)
        try:
            return self._cache[key]
        except KeyError:
            seen = self._seen
            record = await self.guard.run(self.store.get, account, name)
            # Absent names are not kept: any caller can make them up. Nor is a record read
            # while another worker wrote: it may be from before that write.
            if record is not None and (self._generation is None
                                       or self._generation.value() == seen):
                self._cache[key] = record
            return record

    def cached(self, account: str, name: str) -> QueueRecord | None:
        """The record if it is cached; None if absent or not cached (no I/O)."""
        self._check_generation()
        return self._cache.get((account, name))

    async def put(self, record: QueueRecord) -> None:
        # Forget first: if the write times out it may still land, and the next read must
        # ask the store rather than trust the old record.
        self._cache.pop((record.account, record.name), None)
        try:
            await self.guard.run(self.store.put, record)
        finally:
            self._bump()
        self._cache[(record.account, record.name)] = record

    async def delete(self, account: str, name: str) -> None:
        self._cache.pop((account, name), None)
        try:
            await self.guard.run(self.store.delete, account, name)
        finally:
            self._bump()

    def _bump(self) -> None:
        """Tell the other workers (a write that failed may still have landed)."""
        if self._generation is not None:
            self._generation.bump()

    async def names(self, account: str, prefix: str, after: str, limit: int) -> list[str]:
        return await self.guard.run(self.store.names, account, prefix, after, limit)

    async def ping(self) -> None:
        await self.guard.run(self.store.ping)

    def invalidate(self, account: str, name: str) -> None:
        self._cache.pop((account, name), None)

    def clear(self) -> None:
        """Forget every record (a cluster watch that may have missed changes)."""
        self._cache.clear()
