"""Which queues a broker holds: a small SQLite database in the data directory.

SQLite, not a log: queues are created and deleted one at a time, and a broker with
10,000 queues must find one by name without reading the others. A queue's configuration
is stored twice, here for listing and in the queue's own log (its first record) for
replay; the log is the authority, and the broker copies it back here on open.

Thread-safe: one connection behind a lock.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
    name        TEXT PRIMARY KEY,
    uid         INTEGER NOT NULL UNIQUE,
    created_ms  INTEGER NOT NULL,
    modified_ms INTEGER NOT NULL,
    attributes  TEXT NOT NULL
) WITHOUT ROWID;
"""


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    uid: int
    created_ms: int
    modified_ms: int
    attributes: dict[str, Any]


class Catalog:
    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # WAL with FULL sync: a committed create or delete survives power loss.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def get(self, name: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT name, uid, created_ms, modified_ms, attributes FROM queues "
                "WHERE name = ?", (name,)).fetchone()
        return _entry(row) if row else None

    def names(self, prefix: str = "") -> list[str]:
        # A literal, case-sensitive prefix (LIKE would fold case and treat _ and % as
        # wildcards).
        with self._lock:
            rows = self._db.execute(
                "SELECT name FROM queues WHERE substr(name, 1, ?) = ? ORDER BY name",
                (len(prefix), prefix)).fetchall()
        return [row[0] for row in rows]

    def entries(self) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, uid, created_ms, modified_ms, attributes FROM queues "
                "ORDER BY name").fetchall()
        return [_entry(row) for row in rows]

    def name_of(self, uid: int) -> str | None:
        """The name of the queue with this uid, if it still exists."""
        with self._lock:
            row = self._db.execute("SELECT name FROM queues WHERE uid = ?", (uid,)).fetchone()
        return row[0] if row else None

    def uids(self) -> set[int]:
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT uid FROM queues")}

    def add(self, name: str, uid: int, attributes: dict[str, Any], now_ms: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO queues (name, uid, created_ms, modified_ms, attributes) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, uid, now_ms, now_ms, json.dumps(attributes, sort_keys=True)))

    def update(self, name: str, attributes: dict[str, Any], now_ms: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE queues SET attributes = ?, modified_ms = ? WHERE name = ?",
                (json.dumps(attributes, sort_keys=True), now_ms, name))

    def remove(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM queues WHERE name = ?", (name,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _entry(row: tuple[Any, ...]) -> Entry:
    name, uid, created_ms, modified_ms, attributes = row
    return Entry(name, uid, created_ms, modified_ms, json.loads(attributes))
