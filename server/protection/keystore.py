"""Access keys: who may call the server, as which principal of which account.

A key is an (access key id, secret access key) pair, used exactly as AWS credentials are:
clients sign requests with SigV4 (server/protection/sigv4.py). The secret is stored wrapped with
AES-256-GCM under a subkey of the master key, bound to its key id, so a copy of the
database alone reveals no secret. Keys are created, listed and revoked with
``conveyor keys`` against the data directory (in a cluster, against etcd:
server/cluster/etcd_keystore.py, with the same wrapping); the server reads them through
:class:`KeyCache`, which remembers a lookup for ``KEY_CACHE_TTL_S`` so that the signature
check costs no database read, and so a revocation takes effect within that time.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.errors import ConfigError, InvalidParameterError
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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS access_keys (
    access_key_id  TEXT PRIMARY KEY,
    principal      TEXT NOT NULL,
    account        TEXT NOT NULL,
    wrapped_secret BLOB NOT NULL,
    created_ms     INTEGER NOT NULL,
    revoked_ms     INTEGER
) WITHOUT ROWID;
"""


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


class SecretWrap:
    """Secrets sealed with AES-256-GCM under the master key's access-keys subkey, bound
    to their key id."""

    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(masterkey.subkey(master_key, "access-keys"))

    def seal(self, access_key_id: str, secret: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret.encode(), access_key_id.encode())

    def open(self, access_key_id: str, wrapped: bytes) -> str:
        try:
            return self._aead.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:],
                                      access_key_id.encode()).decode()
        except InvalidTag:
            raise ConfigError("access key", access_key_id,
                              "its secret does not open under this master key") from None


class KeyStore:
    """The access-key database. Blocking calls: the server runs them on a thread."""

    def __init__(self, path: str, master_key: bytes) -> None:
        self._wrap = SecretWrap(master_key)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        os.chmod(path, 0o600)

    @classmethod
    def open(cls, data_dir: str, master_key_file: str | None = None) -> KeyStore:
        """The store of a data directory, with its master key (created if absent)."""
        os.makedirs(data_dir, exist_ok=True)
        key_file = master_key_file or os.path.join(data_dir, masterkey.FILE_NAME)
        return cls(os.path.join(data_dir, FILE_NAME), masterkey.load_or_create(key_file))

    def create(self, principal: str, account: str) -> AccessKey:
        principal, account = check_principal(principal), check_account(account)
        key_id, secret = new_key()
        wrapped = self._wrap.seal(key_id, secret)
        created = time.time_ns() // 1_000_000
        with self._lock:
            self._db.execute(
                "INSERT INTO access_keys (access_key_id, principal, account, wrapped_secret, "
                "created_ms) VALUES (?, ?, ?, ?, ?)", (key_id, principal, account, wrapped,
                                                       created))
        return AccessKey(key_id, principal, account, created, None, secret)

    def get(self, access_key_id: str) -> AccessKey | None:
        """The key with its secret, or None if it does not exist or was revoked."""
        if not is_key_id(access_key_id):
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT principal, account, wrapped_secret, created_ms FROM access_keys "
                "WHERE access_key_id = ? AND revoked_ms IS NULL", (access_key_id,)).fetchone()
        if row is None:
            return None
        principal, account, wrapped, created = row
        return AccessKey(access_key_id, principal, account, created, None,
                         self._wrap.open(access_key_id, wrapped))

    async def lookup(self, access_key_id: str) -> AccessKey | None:
        """get, on a thread: the server's KeyCache fetch."""
        return await asyncio.to_thread(self.get, access_key_id)

    def list(self) -> list[AccessKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT access_key_id, principal, account, created_ms, revoked_ms "
                "FROM access_keys ORDER BY created_ms, access_key_id").fetchall()
        return [AccessKey(*row) for row in rows]

    def revoke(self, access_key_id: str) -> bool:
        """Revoke a key; False if there is no such key or it was already revoked."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE access_keys SET revoked_ms = ? WHERE access_key_id = ? "
                "AND revoked_ms IS NULL", (time.time_ns() // 1_000_000, access_key_id))
        return cursor.rowcount == 1

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
