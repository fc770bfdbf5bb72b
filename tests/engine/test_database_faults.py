"""Bit flips anywhere in the SQLite databases: found as damage, never served as data.

The catalog (engine/catalog.py), the server's queue records (server/metadata.py) and the
access keys (server/protection/keystore.py) are built once, closed cleanly (their WAL
checkpointed into the file), and then each case flips one bit of a fresh copy at a seeded
random byte and opens it through the store's own class. Exactly one of two things may
happen: the store refuses to open, or a read refuses, with CorruptDatabaseError naming the
file; or every row reads back as it was written. Anything else (another exception, a
changed or missing row) fails the case.

SQLite checks its b-tree structure but not the values in a row: the negative control
turns row checks off (engine.sqlite.LEGACY_UNCHECKED_ROWS) and shows the same cases
serving changed rows without a word.
"""

from __future__ import annotations

import asyncio
import collections
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import Broker, sqlite
from engine.catalog import Catalog
from engine.errors import CorruptDatabaseError
from server.metadata import QueueRecord, SQLiteMetadataStore
from server.protection import keystore
from server.protection.keystore import KeyStore

SEED = 4_410_117
CASES = {"catalog": 1000, "metadata": 500, "keys": 500}
FAULT_CASES = 20_000
MASTER = bytes(range(32))

Reader = Callable[[str], Any]


def _catalog(path: str) -> Any:
    catalog = Catalog(path)
    try:
        return [(e.name, e.uid, e.created_ms, e.modified_ms, e.attributes)
                for e in catalog.entries()]
    finally:
        catalog.close()


def _metadata(path: str) -> Any:
    async def read() -> list[QueueRecord]:
        store = SQLiteMetadataStore(path)
        try:
            return sorted(await store.all_records(), key=lambda r: (r.account, r.name))
        finally:
            await store.close()

    return asyncio.run(read())


def _keys(path: str) -> Any:
    store = KeyStore(path, MASTER)
    try:
        listed = store.list()
        # get() opens each secret: a row that passes its check must still open.
        return listed, [store.get(k.access_key_id) for k in listed]
    finally:
        store.close()


READERS: dict[str, Reader] = {"catalog": _catalog, "metadata": _metadata, "keys": _keys}


def _build(kind: str, root: Path) -> Path:
    """A database of a few dozen rows, closed cleanly."""
    root.mkdir(parents=True)
    if kind == "catalog":
        broker = Broker(root / "data", fsync="never")
        for i in range(40):
            broker.create_queue(f"queue-{i:02d}", visibility_timeout=1000 + i,
                                delay_seconds=i % 15, receive_wait_seconds=i % 20)
        broker.close()
        return root / "data" / "catalog.sqlite3"
    if kind == "metadata":
        path = root / "metadata.sqlite3"

        async def fill() -> None:
            store = SQLiteMetadataStore(str(path))
            for i in range(40):
                await store.put(QueueRecord(f"{i % 3:012d}", f"queue-{i:02d}", 1000 + i,
                                            2000 + i, {"team": f"t{i}"},
                                            {"Policy": '{"Statement": []}'} if i % 4 else {}))
            await store.close()

        asyncio.run(fill())
        return path
    store = KeyStore(str(root / keystore.FILE_NAME), MASTER)
    for i in range(30):
        key = store.create(f"p{i}", f"{i % 3:012d}")
        if i % 3 == 0:
            store.revoke(key.access_key_id)
    store.close()
    return root / keystore.FILE_NAME


def _run(kind: str, pristine: Path, scratch: Path, seed: int, n: int
         ) -> tuple[collections.Counter[str], list[str]]:
    reader = READERS[kind]
    expected = reader(str(pristine))
    raw = pristine.read_bytes()
    assert not Path(str(pristine) + "-wal").exists() or \
        Path(str(pristine) + "-wal").stat().st_size == 0, "the WAL was not checkpointed"
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    for case in range(n):
        at, bit = rng.randrange(len(raw)), rng.randrange(8)
        damaged = bytearray(raw)
        damaged[at] ^= 1 << bit
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        copy = scratch / pristine.name
        copy.write_bytes(bytes(damaged))
        try:
            got = reader(str(copy))
        except CorruptDatabaseError as exc:
            assert exc.path == str(copy)
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # any other ending is what this looks for
            wrong.append(f"case {case} (byte {at} bit {bit}): {type(exc).__name__}: {exc}")
            continue
        if got == expected:
            outcomes["intact"] += 1
        else:
            wrong.append(f"case {case} (byte {at} bit {bit}): rows served changed")
    return outcomes, wrong


@pytest.mark.parametrize("kind", sorted(CASES))
def test_database_bit_flips_are_refused_or_harmless(kind: str, tmp_path: Path) -> None:
    pristine = _build(kind, tmp_path / "pristine")
    outcomes, wrong = _run(kind, pristine, tmp_path / "case", SEED, CASES[kind])
    assert not wrong, wrong[:10]
    # Both endings were seen: flips in row values, structure and free space alike.
    assert outcomes["refused"] and outcomes["intact"], outcomes


def test_row_checks_catch_what_sqlite_does_not(tmp_path: Path) -> None:
    """One flip in a row's value: SQLite's own integrity check passes it."""
    pristine = _build("catalog", tmp_path / "pristine")
    raw = bytearray(pristine.read_bytes())
    at = raw.index(b'"visibility_timeout": 1007')
    raw[at + len(b'"visibility_timeout": 100')] ^= 0x01  # 1007 -> 1006
    pristine.write_bytes(bytes(raw))
    import sqlite3

    db = sqlite3.connect(pristine)
    assert [r[0] for r in db.execute("PRAGMA integrity_check")] == ["ok"]
    db.close()
    with pytest.raises(CorruptDatabaseError, match="queue-07"):
        Catalog(str(pristine))


def test_row_check_is_the_one_docs_format_draws(tmp_path: Path) -> None:
    """xxh3-64 of the compact JSON [table, *values], as a signed 64-bit integer, computed
    here from the drawing rather than by engine.sqlite."""
    import json
    import sqlite3

    import xxhash

    pristine = _build("keys", tmp_path / "pristine")
    with sqlite3.connect(pristine) as db:
        rows = db.execute(f"SELECT {keystore.TABLE.select()} FROM access_keys").fetchall()
    for *values, stored in rows:
        drawn = json.dumps(["access_keys", *(v.hex() if isinstance(v, bytes) else v
                                             for v in values)], separators=(",", ":"),
                           ensure_ascii=False).encode()
        digest = xxhash.xxh3_64_intdigest(drawn)
        assert stored == (digest - 2**64 if digest >= 2**63 else digest)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_negative_control_unchecked_rows_serve_damage(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pristine = _build(kind, tmp_path / "pristine")
    monkeypatch.setattr(sqlite, "LEGACY_UNCHECKED_ROWS", True)
    _, wrong = _run(kind, pristine, tmp_path / "case", SEED, CASES[kind])
    assert any("rows served changed" in w for w in wrong), \
        "the checker missed rows served changed without row checks"


@pytest.mark.faults
@pytest.mark.parametrize("kind", sorted(CASES))
def test_database_bit_flips_many(kind: str, tmp_path: Path) -> None:
    pristine = _build(kind, tmp_path / "pristine")
    outcomes, wrong = _run(kind, pristine, tmp_path / "case", SEED + 1, FAULT_CASES)
    assert not wrong, wrong[:10]
    assert outcomes["refused"] and outcomes["intact"], outcomes
