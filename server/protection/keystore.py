"""Access keys: who may call the server, as which principal of which account.

A key is an (access key id, secret access key) pair, used exactly as AWS credentials are:
clients sign requests with SigV4 (server/protection/sigv4.py). The secret is stored wrapped with
AES-256-GCM under a subkey of the master key, bound to its key id, account and principal,
so a copy of the database alone reveals no secret, and a row changed to name another
account or principal no longer opens: the server refuses the key (logged) rather than
serve it as whoever the row now names. Keys are created, listed and revoked with
``conveyor keys`` against the data directory (in a cluster, against etcd:
server/cluster/etcd_keystore.py, with the same wrapping); the server reads them through
:class:`KeyCache`, which remembers a lookup for ``KEY_CACHE_TTL_S`` so that the signature
check costs no database read, and so a revocation takes effect within that time.

Format 1 bound the wrapped secret to the key id alone. Such rows (from an older version)
are rewrapped in format 2 when the store is first opened by this version, each with a log
line naming its account and principal; after that (``PRAGMA user_version`` 2) a format-1
row is refused, never rewrapped, so the rewrap happens once. docs/FORMAT.md draws both.

Every row also carries a check (engine/sqlite.py): a damaged row (a revocation time
flipped away, say) is refused, never served.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine import sqlite
from engine.errors import ConfigError, CorruptDatabaseError, InvalidParameterError
from engine.files import make_dirs
from server.protection import masterkey

FILE_NAME = "access-keys.sqlite3"
# How long the server trusts a looked-up key (or its absence) before reading it again:
# the longest a revoked key keeps working.
KEY_CACHE_TTL_S = 5.0
# Keys (present or absent) the server remembers; a flood of made-up key ids evicts the
# oldest rather than growing memory.
KEY_CACHE_MAX = 10_000
PRINCIPAL_CHARS_MAX = 64
_PRINCIPAL = re.compile(r"[A-Za-z0-9_.@+=,-]{1,64}")
_ACCOUNT = re.compile(r"[0-9]{12}")
_KEY_ID = re.compile(r"CVY[A-Z2-7]{17}")
_NONCE_BYTES = 12
# How a secret is wrapped: 1 binds it to the key id alone (read only to rewrap it), 2 to
# the key id, account and principal.
WRAP_LEGACY = 1
WRAP_VERSION = 2
_AD_LABEL = b"conveyor-access-key/v2"
_log = logging.getLogger("conveyor.server")

# wrap_version: its default is 1 because a version that predates the column inserts rows
# without it, and those are wrapped in format 1.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS access_keys (
    access_key_id  TEXT PRIMARY KEY,
    principal      TEXT NOT NULL,
    account        TEXT NOT NULL,
    wrapped_secret BLOB NOT NULL,
    created_ms     INTEGER NOT NULL,
    revoked_ms     INTEGER,
    wrap_version   INTEGER NOT NULL DEFAULT 1,
    row_check      INTEGER
) WITHOUT ROWID;
"""
TABLE = sqlite.Table("access_keys", ("access_key_id", "principal", "account",
                                      "wrapped_secret", "created_ms", "revoked_ms",
                                      "wrap_version"), upgraded_columns=1)
SCHEMA = sqlite.Schema(_SCHEMA, (TABLE,))


@dataclasses.dataclass(frozen=True)
class AccessKey:
    access_key_id: str
    principal: str
    account: str
    created_ms: int
    revoked_ms: int | None = None
    secret: str = dataclasses.field(default="", repr=False)
    """Empty when listed: secrets are shown once, when a key is created."""


def check_principal(value: object) -> str:
    if not isinstance(value, str) or not _PRINCIPAL.fullmatch(value):
        raise InvalidParameterError("principal", value, "must be 1..64 of A-Z a-z 0-9 _.@+=,-")
    return value


def check_account(value: object) -> str:
    if not isinstance(value, str) or not _ACCOUNT.fullmatch(value):
        raise InvalidParameterError("account", value, "must be 12 digits")
    return value


def is_key_id(value: str) -> bool:
    return _KEY_ID.fullmatch(value) is not None


def new_key() -> tuple[str, str]:
    """A fresh (access key id, secret access key)."""
    key_id = "CVY" + base64.b32encode(secrets.token_bytes(11)).decode()[:17]
    return key_id, secrets.token_urlsafe(30)  # 40 characters, like an AWS secret key


def associated_data(version: int, access_key_id: str, account: str, principal: str
                    ) -> bytes:
    """What a wrapped secret is bound to. Fields are joined with NUL, which none of them
    may hold (key ids, accounts and principals are checked), so the join is unambiguous."""
    if version == WRAP_LEGACY:
        return access_key_id.encode()
    return b"\0".join((_AD_LABEL, access_key_id.encode(), account.encode(),
                       principal.encode()))


class SecretWrap:
    """Secrets sealed with AES-256-GCM under the master key's access-keys subkey, bound
    to their key id, account and principal."""

    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(masterkey.subkey(master_key, "access-keys"))

    def seal(self, access_key_id: str, account: str, principal: str, secret: str) -> bytes:
        """``secret`` wrapped in format WRAP_VERSION."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ad = associated_data(WRAP_VERSION, access_key_id, account, principal)
        return nonce + self._aead.encrypt(nonce, secret.encode(), ad)

    def open(self, access_key_id: str, account: str, principal: str, wrapped: bytes,
             version: int = WRAP_VERSION) -> str:
        """The secret; ConfigError if it was not wrapped under this master key for this
        key id, account and principal (in format ``version``)."""
        if not (isinstance(account, str) and isinstance(principal, str)
                and isinstance(wrapped, bytes)):  # a record written by hand, say
            raise ConfigError("access key", access_key_id, "its record is malformed")
        try:
            return self._aead.decrypt(
                wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:],
                associated_data(version, access_key_id, account, principal)).decode()
        except InvalidTag:
            raise ConfigError("access key", access_key_id,
                              "its secret does not open under this master key for its id, "
                              "account and principal (another master key, or a record "
                              "changed outside Conveyor)") from None

    def open_stored(self, access_key_id: str, account: str, principal: str, wrapped: bytes,
                    version: int) -> str:
        """The secret of a stored key, which must be in format 2: a format-1 record left
        after the rewrap binds no account, so whoever wrote it chose its account."""
        if version == WRAP_LEGACY:
            raise ConfigError("access key", access_key_id,
                              "it is wrapped in format 1 (bound to its id only), and format "
                              "1 keys were rewrapped when this version first started: "
                              "refused; create the key again")
        if version != WRAP_VERSION:
            raise ConfigError("access key", access_key_id,
                              f"its wrap format {version} is not one this version reads")
        return self.open(access_key_id, account, principal, wrapped)


def refuse(access_key_id: str, exc: ConfigError) -> None:
    """Log a stored key that does not open: the request it came with is then answered as
    for an unknown key (403), not with a server error, and nothing is served under it."""
    _log.warning("access key %s refused: %s", access_key_id, exc.reason)


def rewrapped(access_key_id: str, account: str, principal: str) -> None:
    _log.warning("access key %s rewrapped from format 1 to 2 as account %s, principal %s: "
                 "format 1 did not bind these, so check them (conveyor keys list)",
                 access_key_id, account, principal)


class KeyStore:
    """The access-key database. Blocking calls: the server runs them on a thread."""

    def __init__(self, path: str, master_key: bytes) -> None:
        self._wrap = SecretWrap(master_key)
        self._lock = threading.Lock()
        self.path = path
        self._db = sqlite.connect(path, SCHEMA, check_rows=False)
        try:
            os.chmod(path, 0o600)
            sqlite.check_columns(self._db, path, SCHEMA)  # before an upgrade adds to them
            with sqlite.reading(path):
                self._add_wrap_version()
            sqlite.check_tables(self._db, path, SCHEMA)
            with sqlite.reading(path):
                self._upgrade()
        except BaseException:
            self._db.close()
            raise

    def _add_wrap_version(self) -> None:
        """Give a store made by a version without wrap_version the column (before its rows
        get their checks, which cover it)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                columns = {row[1] for row in
                           self._db.execute("PRAGMA table_info(access_keys)")}
                if "wrap_version" not in columns:
                    self._db.execute("ALTER TABLE access_keys ADD COLUMN wrap_version "
                                     "INTEGER NOT NULL DEFAULT 1")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _upgrade(self) -> None:
        """Rewrap format-1 rows in format 2, once (see the module docstring).

        The store is marked done only if every row opened: with no check value to prove
        the master key, rows that all fail may mean a wrong --master-key-file, and
        marking them done would refuse them for good once the right key is back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # one process rewraps; the others wait
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version < WRAP_VERSION and self._rewrap_legacy():
                    self._db.execute(f"PRAGMA user_version = {WRAP_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _rewrap_legacy(self) -> bool:
        """Rewrap every format-1 row; whether all of them opened. Under the lock, in a
        transaction."""
        rows = [sqlite.verified(self.path, TABLE.name, row) for row in self._db.execute(
            f"SELECT {TABLE.select()} FROM access_keys WHERE wrap_version = ?",
            (WRAP_LEGACY,)).fetchall()]
        all_opened = True
        for key_id, principal, account, wrapped, created, revoked, _ in rows:
            try:
                secret = self._wrap.open(key_id, account, principal, wrapped, WRAP_LEGACY)
            except ConfigError as exc:
                _log.error("access key %s: not rewrapped (%s); it is refused until it "
                           "opens", key_id, exc.reason)
                all_opened = False
                continue
            sqlite.insert(self._db, TABLE, (
                key_id, principal, account, self._wrap.seal(key_id, account, principal, secret),
                created, revoked, WRAP_VERSION), verb="REPLACE")
            rewrapped(key_id, account, principal)
        return all_opened

    @classmethod
    def open(cls, data_dir: str, master_key_file: str | None = None) -> KeyStore:
        """The store of a data directory, with its master key (created if absent)."""
        make_dirs(data_dir)
        key_file = master_key_file or os.path.join(data_dir, masterkey.FILE_NAME)
        return cls(os.path.join(data_dir, FILE_NAME), masterkey.load_or_create(key_file))

    def create(self, principal: str, account: str) -> AccessKey:
        principal, account = check_principal(principal), check_account(account)
        key_id, secret = new_key()
        wrapped = self._wrap.seal(key_id, account, principal, secret)
        created = time.time_ns() // 1_000_000
        with self._lock, sqlite.reading(self.path):
            sqlite.insert(self._db, TABLE, (key_id, principal, account, wrapped, created,
                                             None, WRAP_VERSION))
        return AccessKey(key_id, principal, account, created, None, secret)

    def get(self, access_key_id: str) -> AccessKey | None:
        """The key with its secret, or None if it does not exist or was revoked;
        ConfigError if its secret does not open (see SecretWrap.open_stored),
        CorruptDatabaseError if its row fails its check."""
        if not is_key_id(access_key_id):
            return None
        found = self._rows("WHERE access_key_id = ?", (access_key_id,))
        if not found:
            return None
        _, principal, account, wrapped, created, revoked, version = found[0]
        if revoked is not None:
            return None
        return AccessKey(access_key_id, principal, account, created, None,
                         self._wrap.open_stored(access_key_id, account, principal, wrapped,
                                                version))

    async def lookup(self, access_key_id: str) -> AccessKey | None:
        """get, on a thread: the server's KeyCache fetch. A key that does not open is
        logged and answered as absent."""
        try:
            return await asyncio.to_thread(self.get, access_key_id)
        except ConfigError as exc:
            refuse(access_key_id, exc)
            return None
        except CorruptDatabaseError as exc:
            # Its revocation may be what the damage hid: refused, as a key that does not
            # open is, and logged as the damage it is.
            _log.error("access key %s refused: %s", access_key_id, exc)
            return None

    def _rows(self, where: str = "", args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock, sqlite.reading(self.path):
            rows = self._db.execute(f"SELECT {TABLE.select()} FROM access_keys {where}",
                                    args).fetchall()
        return [sqlite.verified(self.path, TABLE.name, row) for row in rows]

    def list(self) -> list[AccessKey]:
        rows = self._rows("ORDER BY created_ms, access_key_id")
        return [AccessKey(key_id, principal, account, created, revoked)
                for key_id, principal, account, _, created, revoked, _ in rows]

    def revoke(self, access_key_id: str) -> bool:
        """Revoke a key; False if there is no such key or it was already revoked."""
        with self._lock, sqlite.reading(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(f"SELECT {TABLE.select()} FROM access_keys "
                                       "WHERE access_key_id = ?", (access_key_id,)).fetchone()
                values = None if row is None else sqlite.verified(self.path, TABLE.name, row)
                if values is not None and values[5] is None:
                    sqlite.insert(self._db, TABLE, (*values[:5], time.time_ns() // 1_000_000,
                                                     values[6]), verb="REPLACE")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return values is not None and values[5] is None

    def close(self) -> None:
        with self._lock:
            self._db.close()


class KeyCache:
    """The server's view of a store: lookups remembered for KEY_CACHE_TTL_S.

    fetch: the store's lookup, a coroutine (a KeyStore's runs on a thread)."""

    def __init__(self, fetch: Callable[[str], Awaitable[AccessKey | None]],
                 ttl_s: float = KEY_CACHE_TTL_S, max_entries: int = KEY_CACHE_MAX) -> None:
        self._fetch = fetch
        self._ttl = ttl_s
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, AccessKey | None]] = OrderedDict()

    async def lookup(self, access_key_id: str) -> AccessKey | None:
        if not is_key_id(access_key_id):
            # Answered without the store, so nothing to remember: caching such ids (up to
            # a header's 16 KB each) would let KEY_CACHE_MAX of them hold 160 MB.
            return None
        now = time.monotonic()
        entry = self._entries.get(access_key_id)
        if entry is not None and entry[0] > now:
            return entry[1]
        key = await self._fetch(access_key_id)
        self._entries[access_key_id] = (now + self._ttl, key)
        self._entries.move_to_end(access_key_id)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return key
