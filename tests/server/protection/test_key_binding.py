"""A stored access key is bound to its id, account and principal (keystore.py, format 2).

Whoever can write the key database must not be able to make a key act for another
account or principal by editing its row: the wrapped secret no longer opens, the server
answers as for an unknown key (403, never a 5xx) and logs why. Keys stored by an older
version (format 1, bound to the key id only) are rewrapped once, on first open, and a
format-1 row that appears after that is refused.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.errors import ConfigError
from server.protection import keystore, masterkey
from server.protection.keystore import KeyStore
from tests.support.databases import forge_checks
from tests.support.server import Server

ALICE = "111111111111"
BOB = "222222222222"


@contextlib.contextmanager
def database(data_dir: Path) -> Iterator[sqlite3.Connection]:
    """The key store's file, to change as an attacker with write access would (the row
    checks recomputed after)."""
    db = sqlite3.connect(data_dir / keystore.FILE_NAME, isolation_level=None)
    try:
        yield db
    finally:
        db.close()
    forge_checks(str(data_dir / keystore.FILE_NAME), keystore.TABLE)


@contextlib.contextmanager
def opened(data_dir: Path, master_key_file: str | None = None) -> Iterator[KeyStore]:
    store = KeyStore.open(str(data_dir), master_key_file)
    try:
        yield store
    finally:
        store.close()


def _refused(caplog: pytest.LogCaptureFixture, key_id: str) -> bool:
    return any(key_id in r.getMessage() and "refused" in r.getMessage()
               for r in caplog.records)


async def test_a_key_row_moved_to_another_account_or_principal_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with opened(tmp_path) as store:
        alice = store.create("alice", ALICE)
        bob = store.create("bob", BOB)
    with database(tmp_path) as db:
        db.execute("UPDATE access_keys SET account = ? WHERE access_key_id = ?",
                   (BOB, alice.access_key_id))
        db.execute("UPDATE access_keys SET principal = ? WHERE access_key_id = ?",
                   ("admin", bob.access_key_id))
    caplog.set_level(logging.WARNING, "conveyor.server")
    with opened(tmp_path) as store:
        assert await store.lookup(alice.access_key_id) is None
        assert await store.lookup(bob.access_key_id) is None
        assert _refused(caplog, alice.access_key_id) and _refused(caplog, bob.access_key_id)
        with pytest.raises(ConfigError, match="account and principal"):
            store.get(alice.access_key_id)  # the command line says why
    # Moved back, both open again: the refusal was the binding, not damage.
    with database(tmp_path) as db:
        db.execute("UPDATE access_keys SET account = ? WHERE access_key_id = ?",
                   (ALICE, alice.access_key_id))
        db.execute("UPDATE access_keys SET principal = ? WHERE access_key_id = ?",
                   ("bob", bob.access_key_id))
    with opened(tmp_path) as store:
        got = await store.lookup(alice.access_key_id)
        assert got is not None and (got.account, got.secret) == (ALICE, alice.secret)
        got = await store.lookup(bob.access_key_id)
        assert got is not None and (got.principal, got.secret) == ("bob", bob.secret)


def test_a_server_answers_a_moved_key_with_403_and_serves_nothing(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", fsync="never", extra=("--auth", "required"))
    try:
        alice = server.create_key("alice", ALICE)
        bob = server.create_key("bob", BOB)
        url = server.sqs(bob).create_queue(QueueName="bobs-only")["QueueUrl"]
        with database(server.data_dir) as db:  # alice's key, moved to bob's account
            db.execute("UPDATE access_keys SET account = ? WHERE access_key_id = ?",
                       (BOB, alice["access_key_id"]))
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            server.sqs(alice).list_queues()
        error = caught.value.response
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert error["Error"]["Code"] == "InvalidClientTokenId"
        with pytest.raises(botocore.exceptions.ClientError):
            server.sqs(alice).send_message(QueueUrl=url, MessageBody="as bob")
        assert server.sqs(bob).receive_message(QueueUrl=url).get("Messages") is None
        # The server says why, once per cache lifetime, not per request.
        deadline = time.monotonic() + 5
        while "refused" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"access key {alice['access_key_id']} refused" in server.log.read_text()
    finally:
        server.kill()


# --- format 1, from an older version ------------------------------------------------------

_LEGACY_SCHEMA = """
CREATE TABLE access_keys (
    access_key_id  TEXT PRIMARY KEY,
    principal      TEXT NOT NULL,
    account        TEXT NOT NULL,
    wrapped_secret BLOB NOT NULL,
    created_ms     INTEGER NOT NULL,
    revoked_ms     INTEGER
) WITHOUT ROWID;
"""


def _legacy_row(db: sqlite3.Connection, master: bytes, principal: str, account: str
                ) -> tuple[str, str]:
    """A row as an older version wrote it: the secret bound to the key id alone, and no
    wrap_version (the column's default, 1, says format 1)."""
    key_id, secret = keystore.new_key()
    nonce = secrets.token_bytes(12)
    wrapped = nonce + AESGCM(masterkey.subkey(master, "access-keys")).encrypt(
        nonce, secret.encode(), key_id.encode())
    db.execute("INSERT INTO access_keys (access_key_id, principal, account, wrapped_secret, "
               "created_ms) VALUES (?, ?, ?, ?, ?)", (key_id, principal, account, wrapped,
                                                      int(time.time() * 1000)))
    return key_id, secret


def test_format_1_keys_are_rewrapped_once_and_later_ones_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    master = masterkey.load_or_create(str(tmp_path / masterkey.FILE_NAME))
    with database(tmp_path) as db:
        db.executescript(_LEGACY_SCHEMA)
        old = [_legacy_row(db, master, "alice", ALICE), _legacy_row(db, master, "bob", BOB)]
    caplog.set_level(logging.WARNING, "conveyor.server")

    # First, a wrong master key: nothing opens, so nothing is marked done.
    with opened(tmp_path, str(tmp_path / "wrong.key")):
        pass
    with database(tmp_path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (0,)
        assert {v for (v,) in db.execute("SELECT wrap_version FROM access_keys")} == {1}

    with opened(tmp_path) as store:
        for key_id, secret in old:
            got = store.get(key_id)
            assert got is not None and got.secret == secret
            assert any(key_id in r.getMessage() and "rewrapped from format 1" in r.getMessage()
                       for r in caplog.records)
    with database(tmp_path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (keystore.WRAP_VERSION,)
        assert {v for (v,) in db.execute("SELECT wrap_version FROM access_keys")} == {2}
        # A format-1 row written now (an older `conveyor keys`, or someone editing the
        # file) is not rewrapped on the next open: it is refused.
        late_id, _ = _legacy_row(db, master, "mallory", BOB)
    with opened(tmp_path) as store:
        with pytest.raises(ConfigError, match="format 1"):
            store.get(late_id)
        assert store.get(old[0][0]) is not None
    with database(tmp_path) as db:
        assert db.execute("SELECT wrap_version FROM access_keys WHERE access_key_id = ?",
                          (late_id,)).fetchone() == (1,)
