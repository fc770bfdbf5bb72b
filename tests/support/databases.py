"""Tampering with the server's SQLite files as an attacker with write access would.

Row checks (engine/sqlite.py) find damage, not forgery: whoever can write the file can
recompute them. Tests of the defences behind them (a wrapped secret bound to its row, say)
change a row and then call :func:`forge_checks`, so that what they test is that defence.
"""

from __future__ import annotations

import contextlib
import sqlite3

from engine import sqlite


def forge_checks(path: str, table: sqlite.Table) -> None:
    """Recompute the check of every row of ``table``, whatever the rows now hold (a
    table made before row checks is left as it is)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table.name})")}
        if sqlite.CHECK_COLUMN not in present:
            return
        keys = table.columns[:table.key_columns]
        where = " AND ".join(f"{k} = ?" for k in keys)
        for row in db.execute(f"SELECT {', '.join(table.columns)} FROM {table.name}"
                              ).fetchall():
            db.execute(f"UPDATE {table.name} SET {sqlite.CHECK_COLUMN} = ? WHERE {where}",
                       (sqlite.row_check(table.name, row), *row[:table.key_columns]))
