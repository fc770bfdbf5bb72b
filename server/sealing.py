"""Encryption at rest on the message path: bodies sealed on the way in, opened on the way out.

The keyring (server/protection/sse.py) holds the keys and the envelope format; this is the
policy around it. A queue with encryption on stores every body as an envelope, under a
message id chosen here because the envelope binds it. Only the server writes envelopes:
a client's body that looks like one is refused, since it would be opened, and fail, on
its way back out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engine import Message, QueueAttributes
from engine.errors import EngineError, InvalidMessageContentsError
from engine.results import SendEntry
from server import randomness
from server.protection.sse import ENVELOPE_OVERHEAD, Keyring, SealError, is_sealed

_log = logging.getLogger("conveyor.service")
# open() rebuilds a Message from its fields in order, replacing the second.
if Message._fields[:2] != ("message_id", "body"):
    raise RuntimeError("engine.Message no longer begins with message_id, body")


class Sealer:
    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self.unopened = 0
        """Sealed messages that failed to open (tampered or damaged), since start."""

    @staticmethod
    def screen(entries: Sequence[SendEntry | EngineError]) -> Sequence[SendEntry | EngineError]:
        """The entries, each whose body looks sealed replaced by its refusal."""
        if not any(isinstance(e, SendEntry) and is_sealed(e.body) for e in entries):
            return entries
        return [InvalidMessageContentsError(
                    "body", e.body[:4], "may not begin with the bytes 00 43 56 45, which "
                    "mark a body the server encrypted")
                if isinstance(e, SendEntry) and is_sealed(e.body) else e for e in entries]

    def seal(self, queue_id: str, attributes: QueueAttributes,
             entries: list[SendEntry]) -> list[SendEntry]:
        """The entries with their bodies sealed, under ids chosen here because the seal
        binds them; content-based deduplication keys on the plaintext, as the client
        expects, through a keyed digest (a plain SHA-256 stored beside the envelope would
        let a reader of the files confirm a guessed body)."""
        ids = randomness.pool.uuid4s(len(entries))
        envelopes = self.keyring.seal_many(
            queue_id, [(ids[i], e.body) for i, e in enumerate(entries)])
        content_dedup = attributes.fifo and attributes.content_based_dedup
        # Built field by field: NamedTuple._replace costs more than the encryption here.
        # No body_md5: a plaintext digest stored beside the envelope would let a reader of
        # the files confirm a guessed body, as above.
        return [SendEntry(envelopes[i], e.delay_seconds, e.attributes, e.group_id,
                          self.keyring.dedup_key(queue_id, e.body)
                          if e.dedup_id is None and content_dedup else e.dedup_id,
                          e.sender, e.system_attributes, ids[i], ENVELOPE_OVERHEAD)
                for i, e in enumerate(entries)]

    def open(self, queue_name: str, messages: list[Message]) -> list[Message]:
        """Messages with sealed bodies opened; one that does not open is reported and left
        in flight (its visibility timeout returns it, and a redrive policy moves it to
        the dead-letter queue), never returned with a wrong body."""
        if not any(is_sealed(m.body) for m in messages):
            return messages
        opened = []
        open_body = self.keyring.open
        for m in messages:
            if is_sealed(m.body):
                source = m.dead_letter_source
                try:
                    body = open_body(source if isinstance(source, str) else queue_name,
                                     bytes.fromhex(m.message_id.replace("-", "")), m.body)
                    # Made from the tuple: NamedTuple._replace costs more than the decryption.
                    m = Message._make((m[0], body, *m[2:]))
                except SealError as exc:
                    self.unopened += 1
                    _log.error("message %s of queue %s does not open, skipped: %s",
                               m.message_id, queue_name, exc)
                    continue
            opened.append(m)
        return opened
