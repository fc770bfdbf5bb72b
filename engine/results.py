"""What queue operations take and return.

Results are NamedTuples: one is built per message on the hot path, where a frozen
dataclass's __init__ costs several times as much.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

from engine.records import MessageAttribute


class SendEntry(NamedTuple):
    """One message to send: the arguments of Queue.send, for send_batch."""

    body: bytes
    delay_seconds: int | None = None
    attributes: Mapping[str, MessageAttribute] | None = None
    group_id: str | None = None
    dedup_id: str | None = None
    sender: str | None = None
    """Who sent it (an SQS SenderId): returned with the message."""
    system_attributes: Mapping[str, MessageAttribute] | None = None
    """Attributes for other systems, such as SQS's AWSTraceHeader."""
    message_id: bytes | None = None
    """16 bytes chosen by the caller (the server does for encrypted queues); None lets the
    queue derive the id from the message's seq, which costs nothing to store."""
    overhead: int = 0
    """Bytes of framing the caller wrapped the body in (an encryption envelope) that do not
    count toward the message size limit: at most ENVELOPE_BYTES_MAX."""
    body_md5: bytes | None = None
    """The body's MD5 digest (16 bytes), which the caller has made: stored with the
    message and returned with it (Message.body_md5), so that a receive need not hash the
    body again. The queue does not check it against the body. None stores nothing."""


class SendResult(NamedTuple):
    message_id: str
    sequence_number: str | None = None
    duplicate: bool = False
    """True when a FIFO deduplication id matched an earlier send: nothing was enqueued."""


class Message(NamedTuple):
    """A received message. ``receipt`` deletes it or changes its visibility."""

    message_id: str
    body: bytes
    receipt: str
    receive_count: int
    sent_at: float
    first_received_at: float
    attributes: dict[str, MessageAttribute]
    group_id: str | None
    sequence_number: str | None
    dedup_id: str | None
    sender: str | None
    system_attributes: dict[str, MessageAttribute]
    dead_letter_source: str | int | None
    """For a message moved to a dead-letter queue: the queue it came from."""
    body_md5: bytes | None
    """The body's MD5 digest as its sender stored it (SendEntry.body_md5), or None."""


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStats:
    visible: int
    in_flight: int
    delayed: int
    oldest_age_s: float
    sent: int
    received: int
    deleted: int
    expired: int
    moved_to_dead_letter: int
    purged: int
