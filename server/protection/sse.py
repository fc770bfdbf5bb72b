"""Server-side encryption of message bodies: AES-256-GCM, with per-queue data keys.

A queue with encryption on has each body sealed when the server accepts it and opened only
when a consumer is handed the message, so the engine's log, snapshots and replicas hold
only ciphertext. The work is done here, not in the engine: the engine never sees a key,
and a body is just bytes to it.

The envelope stored as the body::

    magic b"\\x00CVE" (4) | version u8 = 1 | key_id u32 BE (4) | nonce (12) | ciphertext+tag

It begins with NUL, which no SQS body can hold (U+0000 is outside SQS's allowed
characters), so a client's body can never pass for an envelope; the server refuses any
that begins with the magic (:func:`is_sealed`) all the same. The associated data binds the
envelope to its place::

    b"conveyor-sse/v1\\x00" + queue_id + b"\\x00" + message_id (16 bytes)

so a sealed body copied into another queue or onto another message does not open. The
queue is the one the message was sent to: a message the engine has moved to a dead-letter
queue is opened with its source queue's id (the engine keeps it as the message's
``dead_letter_source``), and a redrive that sends a body afresh under a new message id must
open it and seal it again.

Keys. The key-encryption key (KEK) is the master key's "sse-kek" subkey
(:mod:`server.protection.masterkey`). Each queue has one active data key of 32 random bytes; it is
stored in a SQLite file wrapped under the KEK (``nonce (12) | AESGCM(KEK).encrypt(key)``,
the associated data ``b"conveyor-sse-key/v1\\x00" + key_id u32 BE + queue_id``, so a wrapped
key moved to another row does not unwrap). Key ids are global, not per queue, so
:meth:`Keyring.open` finds a key from the envelope alone. Retired keys are kept for good:
a message sealed under one may sit in a dead-letter queue after its source queue has gone,
and a row costs about a hundred bytes. Unwrapped keys stay in memory, so sealing and
opening read no file after the first use of each key.

Why keys rotate. GCM with random 96-bit nonces must stay under 2^32 encryptions per key
(NIST SP 800-38D, 8.3) for the chance of a repeated nonce to stay negligible: a repeat
reveals the XOR of two plaintexts and lets the key's authentication subkey be recovered.
A key is retired after :data:`ROTATE_AFTER_USES` encryptions, half that limit, and also
once it is older than the keyring's rotation period, so that no key protects an unbounded
span of data. Uses are counted in memory and reserved on disk a block at a time *before*
they are spent; after a crash, counting resumes from the reserved count, so a crash may
waste part of a block but can never make a key's count too low. The workers of one server
share the keyring file: each takes its blocks from the row in a write transaction, past
every block taken before, so the blocks of two processes never overlap.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine import sqlite
from engine.errors import ConfigError, InvalidParameterError
from engine.limits import MESSAGE_ID_BYTES
from server import randomness
from server.errors import ServerError
from server.protection import masterkey

FILE_NAME = "sse-keys.sqlite3"
"""The keyring's file in the data directory."""
MAGIC = b"\x00CVE"
VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
_HEADER = struct.Struct(">4sBI")
_PREFIX_BYTES = _HEADER.size + NONCE_BYTES  # everything before the ciphertext
ENVELOPE_OVERHEAD = _PREFIX_BYTES + TAG_BYTES  # 37
MAX_KEY_ID = 2**32 - 1

RESERVE_BLOCK = 1 << 16
"""Uses reserved on disk at a time: one SQLite write per this many encryptions."""
ROTATE_AFTER_USES = 2**31 - RESERVE_BLOCK
"""Encryptions after which a key is retired: well under the 2^32 that SP 800-38D allows."""
ROTATE_PERIOD_S = 30 * 86400.0

_AAD_PREFIX = b"conveyor-sse/v1\x00"
_WRAP_AAD_PREFIX = b"conveyor-sse-key/v1\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS data_keys (
    key_id        INTEGER PRIMARY KEY,
    queue_id      TEXT NOT NULL,
    wrapped       BLOB NOT NULL,
    created_ms    INTEGER NOT NULL,
    uses_reserved INTEGER NOT NULL,
    retired       INTEGER NOT NULL DEFAULT 0,
    row_check     INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS data_keys_active ON data_keys (queue_id) WHERE retired = 0;
"""
# Every row carries a check (engine/sqlite.py): the wrapped key is sealed against change
# already, but its reservation and retirement are not.
TABLE = sqlite.Table("data_keys", ("key_id", "queue_id", "wrapped", "created_ms",
                                    "uses_reserved", "retired"))
SCHEMA = sqlite.Schema(_SCHEMA, (TABLE,))


class SealError(ServerError):
    """A body that does not open (tampered with, truncated, under an unknown key, or
    sealed for another queue or message), or a keyring that cannot be used."""


def is_sealed(body: bytes) -> bool:
    """Whether ``body`` begins as an envelope does (no SQS text body can)."""
    return body[:4] == MAGIC


def key_id_of(envelope: bytes) -> int:
    """The id of the data key an envelope was sealed under."""
    if len(envelope) < ENVELOPE_OVERHEAD or envelope[:4] != MAGIC:
        raise SealError("not a sealed body")
    return int(_HEADER.unpack_from(envelope)[2])


def _aad(queue_id: str, message_id: bytes) -> bytes:
    return _AAD_PREFIX + queue_id.encode() + b"\x00" + message_id


def _wrap_aad(key_id: int, queue_id: str) -> bytes:
    return _WRAP_AAD_PREFIX + key_id.to_bytes(4, "big") + queue_id.encode()


class _Active:
    """A queue's active key, as this process counts its uses."""

    __slots__ = ("aead", "expires", "header", "key_id", "reserved", "used")

    def __init__(self, key_id: int, aead: AESGCM, used: int, reserved: int,
                 expires: float) -> None:
        self.key_id = key_id
        self.aead = aead
        self.header = _HEADER.pack(MAGIC, VERSION, key_id)
        self.used = used
        self.reserved = reserved
        self.expires = expires


class Keyring:
    """The data keys of every queue, wrapped in a SQLite file; seals and opens bodies.

    ``rotate_period_s`` of 0 or None turns rotation by age off. ``rotate_after_uses`` and
    ``reserve_block`` exist so tests can reach the bound; servers keep the defaults.
    """

    def __init__(self, path: str, master_key: bytes, *,
                 rotate_period_s: float | None = ROTATE_PERIOD_S,
                 clock: Callable[[], float] = time.time,
                 rotate_after_uses: int = ROTATE_AFTER_USES,
                 reserve_block: int = RESERVE_BLOCK) -> None:
        if not 1 <= rotate_after_uses <= ROTATE_AFTER_USES:
            raise ConfigError("rotate_after_uses", rotate_after_uses,
                              f"must be 1..{ROTATE_AFTER_USES}")
        if reserve_block < 1:
            raise ConfigError("reserve_block", reserve_block, "must be at least 1")
        if rotate_period_s is not None and rotate_period_s < 0:
            raise ConfigError("rotate_period_s", rotate_period_s, "must not be negative")
        self._path = path
        self._kek = AESGCM(masterkey.subkey(master_key, "sse-kek"))
        self._dedup_key = masterkey.subkey(master_key, "sse-dedup")
        self._period = float(rotate_period_s) if rotate_period_s else float("inf")
        self._clock = clock
        self._max_uses = rotate_after_uses
        self._block = reserve_block
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._ciphers: dict[int, AESGCM] = {}
        db = sqlite.connect(path, SCHEMA)
        try:
            self._check_master(db)
        except BaseException:
            db.close()
            raise
        self._db: sqlite3.Connection | None = db

    def _check_master(self, db: sqlite3.Connection) -> None:
        # A server started with the wrong master key file must stop at once, not seal new
        # messages beside old ones it can never open.
        row = db.execute("SELECT key_id, queue_id, wrapped FROM data_keys "
                         "ORDER BY key_id DESC LIMIT 1").fetchone()
        if row is None:
            return
        try:
            self._unwrap(row[0], row[1], row[2])
        except SealError:
            raise ConfigError("master key for keyring", self._path,
                              "it does not unwrap the keyring's data keys: it is not the "
                              "master key they were made with, or the keyring is damaged"
                              ) from None

    # -- the hot path ------------------------------------------------------------------------

    def seal(self, queue_id: str, message_id: bytes, plaintext: bytes) -> bytes:
        """The envelope of ``plaintext``, for message ``message_id`` of ``queue_id``."""
        return self.seal_many(queue_id, ((message_id, plaintext),))[0]

    def seal_many(self, queue_id: str, items: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """The envelopes of (message_id, plaintext) pairs of ``queue_id``. A batch takes the
        lock once, and its nonces come from the process's pool of random bytes
        (server/randomness.py): a read of the random source per message would cost more
        than the encryption of a small body."""
        for message_id, _ in items:
            if len(message_id) != MESSAGE_ID_BYTES:
                raise InvalidParameterError("message_id", message_id,
                                            f"must be {MESSAGE_ID_BYTES} bytes")
        count = len(items)
        with self._lock:
            active = self._active.get(queue_id)
            if (active is not None and active.used + count <= active.reserved
                    and self._clock() < active.expires):
                active.used += count
                keys = [active] * count
            else:
                keys = []
                for _ in items:  # one use each; a batch may cross a reservation or a rotation
                    active = self._active.get(queue_id)
                    if active is None or active.used >= active.reserved \
                            or self._clock() >= active.expires:
                        active = self._replenish(queue_id, active)
                    active.used += 1
                    keys.append(active)
        nonces = randomness.pool.take(NONCE_BYTES * count)
        aad = _aad(queue_id, b"")  # each message's own id is appended below
        envelopes = []
        for i, (message_id, plaintext) in enumerate(items):
            nonce = nonces[i * NONCE_BYTES:(i + 1) * NONCE_BYTES]
            active = keys[i]
            envelopes.append(active.header + nonce
                             + active.aead.encrypt(nonce, plaintext, aad + message_id))
        return envelopes

    def dedup_key(self, queue_id: str, plaintext: bytes) -> str:
        """The content-based deduplication key of a body of an encrypted queue.

        The key is stored beside the envelope, so it must not be a plain digest of the
        body, which would let anyone with the files confirm a guessed body: it is an HMAC
        under a subkey of the master key instead. Equal bodies of a queue get equal keys,
        across restarts, which is all deduplication needs.
        """
        return hmac.new(self._dedup_key, queue_id.encode() + b"\x00" + plaintext,
                        hashlib.sha256).hexdigest()

    def open(self, queue_id: str, message_id: bytes, envelope: bytes) -> bytes:
        """The plaintext of an envelope made by :meth:`seal` with the same ids."""
        if len(envelope) < ENVELOPE_OVERHEAD:
            raise SealError(f"a sealed body is at least {ENVELOPE_OVERHEAD} bytes; "
                            f"this one is {len(envelope)}")
        magic, version, key_id = _HEADER.unpack_from(envelope)
        if magic != MAGIC:
            raise SealError("not a sealed body")
        if version != VERSION:
            raise SealError(f"unknown envelope version {version}")
        aead = self._ciphers.get(key_id)
        if aead is None:
            aead = self._load(key_id)
        view = memoryview(envelope)  # no copy of a large body before decryption
        try:
            return aead.decrypt(view[_HEADER.size:_PREFIX_BYTES], view[_PREFIX_BYTES:],
                                _aad(queue_id, message_id))
        except InvalidTag:
            raise SealError(f"a body sealed under key {key_id} does not open for message "
                            f"{message_id.hex()} of queue {queue_id!r}: it was altered, "
                            "or belongs to another message or queue") from None

    # -- keys --------------------------------------------------------------------------------

    def rotate(self, queue_id: str) -> int:
        """Retire the queue's active key and make a new one; its id."""
        with self._lock:
            return self._new_key(queue_id).key_id

    def key_ids(self, queue_id: str) -> list[int]:
        """Every key of the queue, retired ones included, oldest first."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT key_id FROM data_keys WHERE queue_id = ? ORDER BY key_id",
                (queue_id,)).fetchall()
        return [int(row[0]) for row in rows]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            # Drop the keys, so that use after close fails rather than half works.
            self._active.clear()
            self._ciphers.clear()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SealError("the keyring is closed")
        return self._db

    def _row(self, where: str, args: tuple[object, ...]) -> tuple[Any, ...] | None:
        """The one data key row that matches, checked."""
        with sqlite.reading(self._path):
            row = self._conn().execute(f"SELECT {TABLE.select()} FROM data_keys {where}",
                                       args).fetchone()
        return None if row is None else sqlite.verified(self._path, TABLE.name, row)

    def _replenish(self, queue_id: str, active: _Active | None) -> _Active:
        """The key to seal the next body of the queue with (lock held), with uses left:
        the queue's active key with a new block of uses reserved, or a new key.

        The block is taken from the row, in one write transaction: the server's workers
        share the keyring, and each reserves a block of its own past what any has
        reserved, so that the uses of a key, summed over every process, never exceed what
        its row says (a block one process would count as another's too would let the
        key be used past its bound)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        made = None
        try:
            row = self._row("WHERE queue_id = ? AND retired = 0", (queue_id,))
            if row is None or self._spent(row):
                made = self._add_key(db, queue_id, row)
            else:
                key_id, _, wrapped, created_ms, start, _ = row
                reserved = min(start + self._block, self._max_uses)
                # Durable before the first of these uses is spent: synchronous=FULL.
                sqlite.insert(db, TABLE, (*row[:4], reserved, row[5]), verb="REPLACE")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if made is not None:
            return self._keep(queue_id, *made)
        aead = self._ciphers.get(key_id) or self._unwrap(key_id, queue_id, wrapped)
        # Uses before start are another reservation's (this process's or another's).
        return self._keep(queue_id, key_id, aead, start, reserved,
                          created_ms / 1000 + self._period)

    def _keep(self, queue_id: str, key_id: int, aead: AESGCM, used: int, reserved: int,
              expires: float) -> _Active:
        """Make a key whose row is committed the queue's active one in memory: only once
        committed, so that nothing is sealed under a key the keyring may not hold."""
        self._ciphers[key_id] = aead
        active = self._active[queue_id] = _Active(key_id, aead, used, reserved, expires)
        return active

    def _spent(self, row: tuple[Any, ...]) -> bool:
        """Whether an active key's row leaves it no uses, or it is past its age."""
        return bool(row[4] >= self._max_uses or self._clock() >= row[3] / 1000 + self._period)

    def _new_key(self, queue_id: str) -> _Active:
        """Retire the queue's active key, if any, and make a new one (rotate)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = self._row("WHERE queue_id = ? AND retired = 0", (queue_id,))
            made = self._add_key(db, queue_id, row)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return self._keep(queue_id, *made)

    def _add_key(self, db: sqlite3.Connection, queue_id: str,
                 retiring: tuple[Any, ...] | None
                 ) -> tuple[int, AESGCM, int, int, float]:
        """Write a new active key for the queue, retiring ``retiring`` (transaction open,
        not committed): what _keep makes of it once committed."""
        now = self._clock()
        key = os.urandom(KEY_BYTES)
        reserved = min(self._block, self._max_uses)
        key_id = int(db.execute("SELECT COALESCE(MAX(key_id), 0) + 1 FROM data_keys")
                     .fetchone()[0])
        if key_id > MAX_KEY_ID:
            raise SealError("the keyring has run out of 32-bit key ids")
        nonce = os.urandom(NONCE_BYTES)
        wrapped = nonce + self._kek.encrypt(nonce, key, _wrap_aad(key_id, queue_id))
        if retiring is not None:
            sqlite.insert(db, TABLE, (*retiring[:5], 1), verb="REPLACE")
        sqlite.insert(db, TABLE, (key_id, queue_id, wrapped, int(now * 1000), reserved, 0))
        return key_id, AESGCM(key), 0, reserved, now + self._period

    def _load(self, key_id: int) -> AESGCM:
        """The key of an envelope not seen before in this process: read once, then cached."""
        with self._lock:
            aead = self._ciphers.get(key_id)
            if aead is not None:
                return aead
            row = self._row("WHERE key_id = ?", (key_id,))
            if row is None:
                raise SealError(f"no data key has the id {key_id}")
            aead = self._unwrap(key_id, row[1], row[2])
            self._ciphers[key_id] = aead
            return aead

    def _unwrap(self, key_id: int, queue_id: str, wrapped: bytes) -> AESGCM:
        try:
            key = self._kek.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:],
                                    _wrap_aad(key_id, queue_id))
        except InvalidTag:
            raise SealError(f"data key {key_id} does not unwrap under this master key"
                            ) from None
        return AESGCM(key)
