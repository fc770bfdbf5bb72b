"""Which queues a broker holds: a small SQLite database in the data directory.

SQLite, not a log: queues are created and deleted one at a time, and a broker with
10,000 queues must find one by name without reading the others. A queue's configuration
is stored twice, here for listing and in the queue's own log (its first record) for
replay; the log is the authority, and the broker copies it back here on open.

Every row carries a check (engine/sqlite.py): a flipped bit in a name or attributes is
refused as damage, never served as a queue that was not made.

Thread-safe: one connection behind a lock.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import threading
from typing import Any

from engine import sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
    name        TEXT PRIMARY KEY,
    uid         INTEGER NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL,
    modified_ms INTEGER NOT NULL,
    attributes  TEXT NOT NULL,
    row_check   INTEGER
) WITHOUT ROWID;
"""
TABLE = sqlite.Table("queues", ("name", "uid", "created_ms", "modified_ms", "attributes"))
SCHEMA = sqlite.Schema(_SCHEMA, (TABLE,))


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    uid: int
    created_ms: int
    modified_ms: int
    attributes: dict[str, Any]


class Catalog:
    """The table, and a copy of it in memory that every read is served from: the rows are
    verified once, when the catalog opens, and a broker lists its queues often (a cluster
    node on every change of its view), which must not cost a query and a check per queue.

    Most often one process opens a data directory's catalog (the broker's lock), so the
    copy cannot go stale. A server's workers share it (``shared``), each writing only the
    rows of the queues it owns: a lookup that misses, and a listing, first read the rows
    again if another process committed since (SQLite's data_version says so). A row
    found is current if this process owns its queue, and may be stale otherwise; what a
    worker reads of another's queue (that it exists, whether it is FIFO, its name by
    uid) does not change while the queue exists."""

    def __init__(self, path: str, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        # Two locks, so that a read waits for no fsync: _lock guards the copy in memory and
        # is held for a lookup at a time; _writing orders the writes to the database, each
        # a commit made durable, and the copy is changed only once its row is committed.
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        # WAL with FULL sync: a committed create or delete survives power loss.
        self._db = sqlite.connect(path, SCHEMA)
        self._rows: dict[str, tuple[Any, ...]] = {}
        """name -> (name, uid, created_ms, modified_ms, attributes as JSON text)"""
        self._uids: dict[int, str] = {}
        self._sorted: list[str] | None = None
        self._version = -1
        """SQLite's data_version when the copy was read."""
        try:
            self._read()
        except BaseException:
            self._db.close()
            raise

    def _read(self) -> None:
        """Read the rows into the copy, anew (``_writing`` held, or before any use)."""
        with sqlite.reading(self.path):
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            rows = self._db.execute(f"SELECT {TABLE.select()} FROM queues").fetchall()
        verified = [sqlite.verified(self.path, TABLE.name, row) for row in rows]
        with self._lock:
            self._rows = {values[0]: values for values in verified}
            self._uids = {values[1]: values[0] for values in verified}
            self._sorted = None
            self._version = version

    def refresh(self) -> bool:
        """Read the rows again if another process committed since they were read (a
        shared catalog only). Whether they were."""
        if not self.shared:
            return False
        with self._writing:
            with sqlite.reading(self.path):
                version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version:
                return False
            self._read()
            return True

    def _keep(self, values: tuple[Any, ...]) -> None:
        self._rows[values[0]] = values
        self._uids[values[1]] = values[0]
        self._sorted = None

    def get(self, name: str) -> Entry | None:
        values = self._row(name)
        return _entry(values) if values is not None else None

    def uid_of(self, name: str) -> int | None:
        """The queue's uid, if it exists (its attributes are not decoded)."""
        values = self._row(name)
        return None if values is None else int(values[1])

    def _row(self, name: str) -> tuple[Any, ...] | None:
        with self._lock:
            values = self._rows.get(name)
        if values is None and self.refresh():
            with self._lock:
                values = self._rows.get(name)
        return values

    def names(self, prefix: str = "") -> list[str]:
        """In name order; a literal, case-sensitive prefix."""
        self.refresh()
        with self._lock:
            if self._sorted is None:
                self._sorted = sorted(self._rows)
            ordered = self._sorted
        if not prefix:
            return list(ordered)
        at = bisect.bisect_left(ordered, prefix)
        found = []
        for name in itertools.islice(ordered, at, None):
            if not name.startswith(prefix):
                break
            found.append(name)
        return found

    def entries(self) -> list[Entry]:
        self.refresh()
        with self._lock:
            rows = [self._rows[name] for name in sorted(self._rows)]
        return [_entry(values) for values in rows]

    def name_of(self, uid: int) -> str | None:
        """The name of the queue with this uid, if it still exists."""
        with self._lock:
            name = self._uids.get(uid)
        if name is None and self.refresh():
            with self._lock:
                name = self._uids.get(uid)
        return name

    def uids(self) -> set[int]:
        with self._lock:
            return set(self._uids)

    def add(self, name: str, uid: int, attributes: dict[str, Any], now_ms: int) -> None:
        self._put((name, uid, now_ms, now_ms, json.dumps(attributes, sort_keys=True)),
                  "INSERT")

    def update(self, name: str, attributes: dict[str, Any], now_ms: int) -> None:
        with self._lock:
            values = self._rows.get(name)
        if values is not None:
            self._put((name, values[1], values[2], now_ms,
                       json.dumps(attributes, sort_keys=True)), "REPLACE")

    def _put(self, values: tuple[Any, ...], verb: str) -> None:
        with self._writing:
            with sqlite.reading(self.path):
                sqlite.insert(self._db, TABLE, values, verb=verb)
            with self._lock:
                self._keep(values)  # only once the row is committed

    def remove(self, name: str) -> None:
        with self._writing:
            with sqlite.reading(self.path):
                self._db.execute("DELETE FROM queues WHERE name = ?", (name,))
            with self._lock:
                values = self._rows.pop(name, None)
                if values is not None:
                    self._uids.pop(values[1], None)
                    self._sorted = None

    def close(self) -> None:
        with self._writing:
            self._db.close()


def _entry(row: tuple[Any, ...]) -> Entry:
    name, uid, created_ms, modified_ms, attributes = row
    return Entry(name, uid, created_ms, modified_ms, json.loads(attributes))
