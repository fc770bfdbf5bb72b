"""SQLite databases whose damage is found, not served: one open and one row check for all.

Conveyor keeps small tables in SQLite: the broker's catalog, the server's queue records,
access keys and data keys. SQLite checks its own structure (``PRAGMA integrity_check``)
but not the values in a row: a flipped bit in a queue's name or attributes, in a key's
revocation time or in a data key's reserved nonce count is read back as if it had been
written. So every row carries a check column, ``row_check``: an xxh3-64 of the table name
and the row's other values (drawn in docs/FORMAT.md, "Checked SQLite rows").

- :func:`connect` opens a database (WAL, synchronous=FULL, as every store here wants),
  runs ``integrity_check`` and verifies every row of the named tables. A database made
  before the check column existed gets it, filled in from the rows as they are (they were
  trusted until then; the upgrade is logged).
- :func:`verified` checks one row read back; every read of a full row goes through it.
- SQLite's own reports of damage (SQLITE_CORRUPT, SQLITE_NOTADB) become the same error.

Damage raises :class:`~engine.errors.CorruptDatabaseError` naming the file and the row,
and nothing is changed: repair (a backup, or rebuilding the catalog from the queues' own
files) is an operator's act, described in docs/OPERATIONS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import xxhash

from engine.errors import CorruptDatabaseError

_log = logging.getLogger("conveyor.sqlite")

CHECK_COLUMN = "row_check"
# integrity_check stops after this many problems; one is enough to refuse the file.
_INTEGRITY_ERRORS_MAX = 8
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
# Damage that SQLite or the module reports only in words: text that is not UTF-8 (every
# value written here is), and a header naming a file format that none wrote.
_DAMAGE_MESSAGES = ("Could not decode to UTF-8", "unsupported file format")
# The rule before row checks: rows served as read. Only the negative controls of
# tests/engine/test_database_faults.py set it.
LEGACY_UNCHECKED_ROWS = False


@dataclasses.dataclass(frozen=True)
class Table:
    """A checked table: its columns in check order, key columns first, without
    row_check."""

    name: str
    columns: tuple[str, ...]
    key_columns: int = 1
    upgraded_columns: int = 0
    """How many of the last columns an upgrade of an older store adds (ALTER TABLE ADD
    COLUMN, so they come last): a table may lack them, and row_check, until it opens."""

    def select(self) -> str:
        """The column list that :func:`verified` reads."""
        return f"{', '.join(self.columns)}, {CHECK_COLUMN}"


@dataclasses.dataclass(frozen=True)
class Schema:
    """A database's CREATE statements and its checked tables."""

    sql: str
    tables: tuple[Table, ...]

    @functools.cached_property
    def layout(self) -> dict[tuple[str, str], object]:
        """What sqlite_master must hold once the statements ran: each index's SQL and
        each table's columns (SQLite keeps an ALTERed table's text, so tables are
        compared by column)."""
        db = sqlite3.connect(":memory:")
        try:
            db.executescript(self.sql)
            return _layout(db)
        finally:
            db.close()


def row_check(table: str, values: Sequence[Any]) -> int:
    """The check value of a row: xxh3-64 of ``[table, *values]`` as compact JSON (bytes as
    hex), as a signed 64-bit integer (SQLite's INTEGER)."""
    encoded = json.dumps([table, *(v.hex() if isinstance(v, bytes) else v for v in values)],
                         separators=(",", ":"), ensure_ascii=False).encode()
    digest = xxhash.xxh3_64_intdigest(encoded)
    return digest - (1 << 64) if digest >= 1 << 63 else digest


def verified(path: str, table: str, row: Sequence[Any]) -> tuple[Any, ...]:
    """A row read as ``(*values, row_check)``: its values, or CorruptDatabaseError."""
    *values, stored = row
    if stored != row_check(table, values) and not LEGACY_UNCHECKED_ROWS:
        raise CorruptDatabaseError(path, f"a row of table {table} (key {values[0]!r}) "
                                         "fails its check")
    return tuple(values)


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite reported the file as damaged (rather than busy, full or absent), or
    Python's module could not decode a TEXT value it read (every value written here is
    valid UTF-8), or the header's format numbers are wrong."""
    return (getattr(exc, "sqlite_errorcode", None) in _DAMAGE_CODES
            or str(exc).startswith(_DAMAGE_MESSAGES))


@contextmanager
def reading(path: str) -> Iterator[None]:
    """Turn SQLite's own reports of damage inside the block into CorruptDatabaseError."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise CorruptDatabaseError(path, str(exc)) from exc
        raise
    except UnicodeDecodeError as exc:  # text in SQLite's own schema, read by the module
        raise CorruptDatabaseError(path, f"undecodable text: {exc}") from exc


def connect(path: str, schema: Schema, *, check_rows: bool = True,
            timeout: float = 5.0) -> sqlite3.Connection:
    """Open (or make) a checked database, verifying it whole: SQLite's structure, that
    its tables and indexes are the schema's, then every row (a store that must upgrade
    its tables first says check_rows=False and calls :func:`check_tables` after).

    Raises CorruptDatabaseError if any of these checks fails.
    """
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                             timeout=timeout)
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise CorruptDatabaseError(path, str(exc)) from exc
        raise
    try:
        with reading(path):
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            found = [row[0] for row in db.execute(
                f"PRAGMA integrity_check({_INTEGRITY_ERRORS_MAX})")]
            if found != ["ok"]:
                raise CorruptDatabaseError(path, "; ".join(map(str, found)))
            # Only now: a table whose name a flip changed would otherwise be made again,
            # empty, beside it.
            _check_names(db, path, schema)
            db.executescript(schema.sql)
            if check_rows:
                check_tables(db, path, schema)
    except BaseException:
        db.close()
        raise
    return db


def check_tables(db: sqlite3.Connection, path: str, schema: Schema) -> None:
    """Verify each table's columns and every row, first giving a table made before row
    checks its check column (filled in from its rows as they are). Outside a
    transaction."""
    check_columns(db, path, schema)
    with reading(path):
        for table in schema.tables:
            _add_checks(db, path, table)
            _verify_all(db, path, table)


def _layout(db: sqlite3.Connection) -> dict[tuple[str, str], object]:
    found: dict[tuple[str, str], object] = {}
    for kind, name, sql in db.execute("SELECT type, name, sql FROM sqlite_master"):
        if kind == "table":
            quoted = name.replace('"', '""')  # a flip may have made any name
            found[(kind, name)] = tuple(
                tuple(row[1:]) for row in db.execute(f'PRAGMA table_info("{quoted}")'))
        else:
            found[(kind, name)] = sql
    return found


def _check_names(db: sqlite3.Connection, path: str, schema: Schema) -> None:
    """Every table and index in the file is one the schema makes, and every index is
    as made (a file with none is new)."""
    found = _layout(db)
    for key, value in found.items():
        if key not in schema.layout:
            raise CorruptDatabaseError(path, f"it holds a {key[0]} {key[1]!r} that this "
                                             "schema does not make")
        if key[0] != "table" and value != schema.layout[key]:
            raise CorruptDatabaseError(path, f"its {key[0]} {key[1]!r} is not as made")


def check_columns(db: sqlite3.Connection, path: str, schema: Schema) -> None:
    """Each table's columns are the schema's, or a store's before its upgrades (the
    schema's less the last ``upgraded_columns`` and row_check)."""
    with reading(path):
        found = _layout(db)
    for table in schema.tables:
        expected = schema.layout[("table", table.name)]
        assert isinstance(expected, tuple)
        shortest = len(expected) - 1 - table.upgraded_columns
        columns = found.get(("table", table.name))
        if columns not in [expected[:n] for n in range(shortest, len(expected) + 1)]:
            raise CorruptDatabaseError(path, f"table {table.name}'s columns are not as made")


def insert(db: sqlite3.Connection, table: Table, values: Sequence[Any], *,
           verb: str = "INSERT") -> None:
    """Write a whole row with its check (verb: INSERT, or REPLACE for a changed row)."""
    marks = ", ".join("?" * (len(values) + 1))
    db.execute(f"{verb} INTO {table.name} ({table.select()}) VALUES ({marks})",
               (*values, row_check(table.name, values)))


def verify_file(path: str, schema: Schema) -> list[str]:
    """What is damaged in a database file, read only: an empty list when nothing is.

    A table made before row checks is noted as unchecked rather than damaged.
    """
    uri = f"file:{urllib.parse.quote(path)}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return [f"does not open: {exc}"]
    found: list[str] = []
    try:
        checked = [row[0] for row in db.execute(
            f"PRAGMA integrity_check({_INTEGRITY_ERRORS_MAX})")]
        if checked != ["ok"]:
            return [str(line) for line in checked]
        _check_names(db, path, schema)
        check_columns(db, path, schema)
        for table in schema.tables:
            if not _has_checks(db, table):
                continue
            for row in db.execute(f"SELECT {table.select()} FROM {table.name}"):
                try:
                    verified(path, table.name, row)
                except CorruptDatabaseError as exc:
                    found.append(exc.reason)
    except CorruptDatabaseError as exc:
        found.append(exc.reason)
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        found.append(str(exc))
    finally:
        db.close()
    return found


def _add_checks(db: sqlite3.Connection, path: str, table: Table) -> None:
    """Give a table made before row checks its check column, filled from its rows."""
    if _has_checks(db, table):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        # Another process may have added it between the look and the lock.
        if not _has_checks(db, table):
            db.execute(f"ALTER TABLE {table.name} ADD COLUMN {CHECK_COLUMN} INTEGER")
            rows = db.execute(f"SELECT {', '.join(table.columns)} FROM {table.name}"
                              ).fetchall()
            keys = table.columns[:table.key_columns]
            where = " AND ".join(f"{k} = ?" for k in keys)
            for row in rows:
                db.execute(f"UPDATE {table.name} SET {CHECK_COLUMN} = ? WHERE {where}",
                           (row_check(table.name, row), *row[:table.key_columns]))
            _log.warning("%s: table %s now checks its rows (%d rows, taken as they are)",
                         path, table.name, len(rows))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _has_checks(db: sqlite3.Connection, table: Table) -> bool:
    return CHECK_COLUMN in {row[1] for row in db.execute(f"PRAGMA table_info({table.name})")}


def _verify_all(db: sqlite3.Connection, path: str, table: Table) -> None:
    for row in db.execute(f"SELECT {table.select()} FROM {table.name}"):
        verified(path, table.name, row)
