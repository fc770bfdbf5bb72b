"""FIFO receive attempts: what a ReceiveMessage with a ``ReceiveRequestAttemptId`` returned.

SQS lets a FIFO consumer that lost a response retry its receive with the same attempt id
within five minutes and get the same messages and receipt handles back. Serving that
means keeping each answer, bodies included, for the window, and every consumer can make
up attempt ids: so the answers kept are bounded by count (ATTEMPTS_MAX) and by bytes
(ATTEMPTS_BYTES_MAX), as well as by time.

When either bound is reached the oldest answers are forgotten first, before their five
minutes are up. A retry of a forgotten attempt is then a new receive: it gets whatever is
visible now, and the messages of the first answer stay in flight until their visibility
timeout, then are delivered again (their FIFO group stays locked until then, so order
holds). That is within SQS's own terms: it promises the same answer only while none of the
messages has changed, and delivery stays at least once. Nothing is lost; a client retrying
after a forgotten attempt sees a delay and a duplicate, as after any expired lease.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

# How long an attempt id is remembered (SQS's five minutes).
WINDOW_S = 300
# Answers kept at once. A consumer needs only its latest attempt remembered; this is room
# for thousands of consumers retrying at the same time.
ATTEMPTS_MAX = 10_000
# Bytes of the answers kept at once (as held in memory: bodies, receipts, attributes). An
# answer holds at most 10 messages of up to 1 MiB, so even the largest answers fit six
# times over; typical answers fit by the thousand.
ATTEMPTS_BYTES_MAX = 64 * 1024 * 1024

Clock = Callable[[], float]


class ReceiveAttempts:
    """Answers by (queue, attempt id), oldest first, bounded by count, bytes and age."""

    def __init__(self, max_entries: int = ATTEMPTS_MAX, max_bytes: int = ATTEMPTS_BYTES_MAX,
                 window_s: float = WINDOW_S, clock: Clock = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.window_s = window_s
        self._clock = clock
        # Insertion order is age order (every entry lives the same window), so the
        # expired and the oldest are always at the front: each removal is O(1).
        self._answers: OrderedDict[tuple[str, str], tuple[float, int, dict[str, Any]]] = (
            OrderedDict())
        self.bytes = 0
        """Bytes of the answers kept now."""
        self.evicted = 0
        """Answers forgotten before their window ended, to stay within the bounds."""

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, queue: str, attempt: str) -> dict[str, Any] | None:
        """The answer remembered for this attempt, if it is within its window."""
        kept = self._answers.get((queue, attempt))
        if kept is None or self._clock() - kept[0] >= self.window_s:
            return None
        return kept[2]

    def put(self, queue: str, attempt: str, answer: dict[str, Any]) -> None:
        """Remember ``answer``, forgetting expired answers and then, while a bound would be
        passed, the oldest ones."""
        now = self._clock()
        key = (queue, attempt)
        self._drop(key)  # a retry after its window: the new answer replaces the old
        size = answer_bytes(answer)
        if size > self.max_bytes:
            return  # could never be kept: the retry is a new receive
        answers = self._answers
        while answers:
            oldest_key, (when, oldest_size, _) = next(iter(answers.items()))
            expired = now - when >= self.window_s
            if not expired and (len(answers) < self.max_entries
                                and self.bytes + size <= self.max_bytes):
                break
            self.evicted += not expired
            del answers[oldest_key]
            self.bytes -= oldest_size
        answers[key] = (now, size, answer)
        self.bytes += size

    def _drop(self, key: tuple[str, str]) -> None:
        kept = self._answers.pop(key, None)
        if kept is not None:
            self.bytes -= kept[1]


def answer_bytes(value: object) -> int:
    """The memory a ReceiveMessage answer holds: every object in it, counted with
    sys.getsizeof (so a non-ASCII body counts as Python stores it, up to four bytes a
    character). Answers are a few levels of dicts and lists, walked without recursion."""
    total = 0
    pending = [value]
    while pending:
        item = pending.pop()
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return total
