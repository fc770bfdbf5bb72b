"""Random bytes for the request path: read from the kernel's random source in blocks.

Request ids, the message ids of encrypted queues and the nonces that seal their bodies are
all random, and each ``os.urandom`` is a system call that also releases the GIL: on a busy
server another thread takes the GIL then, and the event loop waits to get it back. So the
bytes are read a block at a time and handed out from memory, by one pool. Its buffer is the
process's own: a forked child drops what its parent had not used (``os.register_at_fork``),
or it would hand out the same ids and nonces as its parent.
"""

from __future__ import annotations

import os
import threading


class RandomPool:
    """Random bytes from the kernel's source, read BLOCK bytes at a time."""

    BLOCK = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = b""
        self._at = 0

    def forget(self) -> None:
        """Drop the bytes not yet handed out (in a forked child: its lock is new too)."""
        self._lock = threading.Lock()
        self._data, self._at = b"", 0

    def take(self, count: int) -> bytes:
        """``count`` random bytes, never handed out before."""
        if count > self.BLOCK:
            return os.urandom(count)
        # Under a lock: sealing runs on worker threads too, and two callers handed the
        # same bytes would seal under the same GCM nonce.
        with self._lock:
            at = self._at
            end = at + count
            if end > len(self._data):
                self._data = os.urandom(self.BLOCK)
                at, end = 0, count
            self._at = end
            return self._data[at:end]

    def uuid4s(self, count: int) -> list[bytes]:
        """``count`` random version-4 UUIDs, 16 bytes each."""
        if count > len(_UUID4_MASKS):
            return [*self.uuid4s(len(_UUID4_MASKS)), *self.uuid4s(count - len(_UUID4_MASKS))]
        if count <= 0:
            return []
        keep, set_ = _UUID4_MASKS[count - 1]
        # The version and variant bits of every id at once, in one integer.
        data = ((int.from_bytes(self.take(16 * count)) & keep) | set_).to_bytes(16 * count)
        return [data[at:at + 16] for at in range(0, 16 * count, 16)]


def _uuid4_masks(count: int) -> tuple[int, int]:
    # Byte 6 keeps its low nibble under version 4; byte 8 its low six bits under variant 10.
    keep = b"\xff" * 6 + b"\x0f\xff\x3f" + b"\xff" * 7
    set_ = b"\x00" * 6 + b"\x40\x00\x80" + b"\x00" * 7
    return int.from_bytes(keep * count), int.from_bytes(set_ * count)


# For up to an SQS batch of ids at once; more are made in runs of this many.
_UUID4_MASKS = [_uuid4_masks(count) for count in range(1, 11)]


def request_id() -> str:
    """A random version-4 UUID as text, for a request.

    A counter would be cheaper, but every answer carries its request id, so a counter
    would tell each tenant how many requests the server handled for everyone else between
    two of its own.
    """
    h = pool.take(16).hex()
    # The version nibble set to 4, and the variant's two bits to 10 (RFC 4122).
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


pool = RandomPool()
os.register_at_fork(after_in_child=pool.forget)
