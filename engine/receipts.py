"""Receipt handles: opaque, unforgeable names for one lease of one message.

The handle layout (drawn in docs/FORMAT.md) is made and read in engine/_queue.pyx. This
module holds the key, 32 random bytes per data directory created on first open, and the
mac: keyed BLAKE2b-128 over version, queue uid, seq and lease. BLAKE2b's keyed mode is a
MAC in its own right and costs a third of HMAC-SHA256, once per message received and once
per message deleted.
"""

from __future__ import annotations

import hashlib
import os

from engine._queue import RECEIPT_HANDLE_CHARS, ReceiptOpener, make_handle

# Routing a handle to its queue (server/partitioned.py) reads its uid, unchecked.
from engine._queue import handle_queue_uid as handle_queue_uid
from engine.files import write_file

KEY_BYTES = 32
MAC_BYTES = 16
HANDLE_CHARS = RECEIPT_HANDLE_CHARS


class ReceiptCodec:
    """Makes and checks receipt handles with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a receipt key is {KEY_BYTES} bytes")
        # Keying BLAKE2b costs a compression; copying a keyed state does not.
        self._keyed = hashlib.blake2b(key=key, digest_size=MAC_BYTES)

    def mac(self, body: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(body)
        return mac.digest()

    def make(self, queue_uid: int, seq: int, lease: int) -> str:
        handle: str = make_handle(self.mac, queue_uid, seq, lease)
        return handle

    def opener(self, queue_uid: int) -> ReceiptOpener:
        """Checks handles for one queue."""
        return ReceiptOpener(self.mac, queue_uid)

    def open(self, handle: str, queue_uid: int) -> tuple[int, int]:
        """(seq, lease) named by handle, if genuine and for this queue; else
        ReceiptInvalidError with reason "malformed", "forged" or "other-queue"."""
        seq, lease = self.opener(queue_uid).open(handle)
        return seq, lease


def load_or_create_key(path: str) -> bytes:
    """The data directory's receipt key, created (0600, fsync'd) on first use."""
    try:
        with open(path, "rb") as f:
            key = f.read()
    except FileNotFoundError:
        key = os.urandom(KEY_BYTES)
        write_file(path, key, 0o600)
    if len(key) != KEY_BYTES:
        raise ValueError(f"receipt key {path} is damaged ({len(key)} bytes)")
    return key
