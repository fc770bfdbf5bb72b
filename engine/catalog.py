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

import dataclasses
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
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        # WAL with FULL sync: a committed create or delete survives power loss.
        self._db = sqlite.connect(path, SCHEMA)

    def _rows(self, where: str = "", args: tuple[Any, ...] = ()) -> list[Entry]:
        with self._lock, sqlite.reading(self.path):
            rows = self._db.execute(
                f"SELECT {TABLE.select()} FROM queues {where}", args).fetchall()
        return [_entry(sqlite.verified(self.path, TABLE.name, row)) for row in rows]

    def get(self, name: str) -> Entry | None:
        found = self._rows("WHERE name = ?", (name,))
        return found[0] if found else None

    def names(self, prefix: str = "") -> list[str]:
        # A literal, case-sensitive prefix (LIKE would fold case and treat _ and % as
        # wildcards).
        found = self._rows("WHERE substr(name, 1, ?) = ? ORDER BY name", (len(prefix), prefix))
        return [entry.name for entry in found]

    def entries(self) -> list[Entry]:
        return self._rows("ORDER BY name")

    def name_of(self, uid: int) -> str | None:
        """The name of the queue with this uid, if it still exists."""
        found = self._rows("WHERE uid = ?", (uid,))
        return found[0].name if found else None

    def uids(self) -> set[int]:
        return {entry.uid for entry in self._rows()}

    def add(self, name: str, uid: int, attributes: dict[str, Any], now_ms: int) -> None:
        self._put((name, uid, now_ms, now_ms, json.dumps(attributes, sort_keys=True)),
                  "INSERT")

    def update(self, name: str, attributes: dict[str, Any], now_ms: int) -> None:
        entry = self.get(name)
        if entry is not None:
            self._put((name, entry.uid, entry.created_ms, now_ms,
                       json.dumps(attributes, sort_keys=True)), "REPLACE")

    def _put(self, values: tuple[Any, ...], verb: str) -> None:
        with self._lock, sqlite.reading(self.path):
            sqlite.insert(self._db, TABLE, values, verb=verb)

    def remove(self, name: str) -> None:
        with self._lock, sqlite.reading(self.path):
            self._db.execute("DELETE FROM queues WHERE name = ?", (name,))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _entry(row: tuple[Any, ...]) -> Entry:
    name, uid, created_ms, modified_ms, attributes = row
    return Entry(name, uid, created_ms, modified_ms, json.loads(attributes))
