"""A plain-Python model of one standard SQS queue, for checking engine.Queue against.

Time is an explicit argument (integer milliseconds) to every method: the model never reads
a clock. Every method first drops the messages that reached the retention period, so the
model's state at ``now`` is always fully settled.

A standard queue does not promise an order. So ``receive``, when told which messages the
real queue delivered, does not choose any itself: it checks that the choice was legal
(each message visible, as many as were asked for or as are visible) and records it.

Leases are named by tokens (small integers the model hands out); a caller maps them to the
real queue's receipt handles. Only the newest lease of a message is current, whether or
not its visibility timeout has run out.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import NamedTuple

LEASE_MAX_MS = 12 * 60 * 60 * 1000


class ModelMismatch(AssertionError):
    """The real queue did something the model says a standard queue may not do."""


class StaleReceipt(Exception):
    """The token names an older lease of a message that is still in the queue."""


class NotInFlight(Exception):
    """A visibility change named a message that is not in flight (or no longer exists)."""


class VisibilityTooLong(Exception):
    """A visibility change would keep a message invisible past 12 hours after its lease."""


@dataclasses.dataclass
class RefMessage:
    message_id: str
    body: bytes
    sent_at: int
    visible_at: int
    receive_count: int = 0
    token: int | None = None  # the current lease; None until first received
    leased_at: int = 0
    first_received_at: int = 0

    def visible(self, now: int) -> bool:
        return self.visible_at <= now

    def in_flight(self, now: int) -> bool:
        return self.token is not None and self.visible_at > now

    def delayed(self, now: int) -> bool:
        return self.token is None and self.visible_at > now


class Delivery(NamedTuple):
    message_id: str
    body: bytes
    receive_count: int
    token: int


class ReferenceQueue:
    def __init__(self, visibility_timeout: int, retention_seconds: int,
                 delay_seconds: int = 0) -> None:
        self.visibility_timeout = visibility_timeout
        self.retention_ms = retention_seconds * 1000
        self.delay_seconds = delay_seconds
        self.messages: dict[str, RefMessage] = {}
        self.token_owner: dict[int, str] = {}
        self.counters = dict.fromkeys(("sent", "received", "deleted", "expired", "purged"), 0)
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._last_now = 0

    # -- time ---------------------------------------------------------------------------

    def _at(self, now: int) -> int:
        if now < self._last_now:
            raise ValueError(f"time went backwards: {now} < {self._last_now}")
        self._last_now = now
        for message_id in [i for i, m in self.messages.items()
                           if now - m.sent_at >= self.retention_ms]:
            del self.messages[message_id]
            self.counters["expired"] += 1
        return now

    # -- operations ---------------------------------------------------------------------

    def send(self, now: int, body: bytes, delay: int | None = None,
             message_id: str | None = None) -> str:
        now = self._at(now)
        if message_id is None:
            message_id = f"ref-{next(self._ids)}"
        if message_id in self.messages:
            raise ModelMismatch(f"message id {message_id} handed out twice")
        seconds = self.delay_seconds if delay is None else delay
        self.messages[message_id] = RefMessage(message_id, body, now, now + seconds * 1000)
        self.counters["sent"] += 1
        return message_id

    def receive(self, now: int, n: int, visibility: int | None = None,
                chosen: Sequence[str] | None = None) -> list[Delivery]:
        """Lease up to n visible messages: those in ``chosen`` if given (after checking
        that the choice was legal), else any n of them."""
        now = self._at(now)
        visible = [i for i, m in self.messages.items() if m.visible(now)]
        expected = min(n, len(visible))
        if chosen is None:
            chosen = visible[:expected]
        else:
            if len(chosen) != expected:
                raise ModelMismatch(f"received {len(chosen)} messages; asked for {n} "
                                    f"with {len(visible)} visible")
            if len(set(chosen)) != len(chosen):
                raise ModelMismatch(f"one receive delivered a message twice: {chosen}")
            for message_id in chosen:
                message = self.messages.get(message_id)
                if message is None:
                    raise ModelMismatch(f"delivered {message_id}, which is not in the queue")
                if not message.visible(now):
                    state = "in flight" if message.in_flight(now) else "delayed"
                    raise ModelMismatch(f"delivered {message_id}, which is {state} until "
                                        f"{message.visible_at} (now {now})")
        seconds = self.visibility_timeout if visibility is None else visibility
        out = []
        for message_id in chosen:
            message = self.messages[message_id]
            token = next(self._tokens)
            self.token_owner[token] = message_id
            message.token = token
            message.receive_count += 1
            message.leased_at = now
            if not message.first_received_at:
                message.first_received_at = now
            message.visible_at = now + seconds * 1000
            self.counters["received"] += 1
            out.append(Delivery(message_id, message.body, message.receive_count, token))
        return out

    def delete(self, now: int, token: int) -> None:
        """Delete the message the token leased. A message already gone: nothing to do."""
        self._at(now)
        message = self.messages.get(self.token_owner[token])
        if message is None:
            return
        if message.token != token:
            raise StaleReceipt(token)
        del self.messages[message.message_id]
        self.counters["deleted"] += 1

    def change_visibility(self, now: int, token: int, seconds: int) -> None:
        now = self._at(now)
        message = self.messages.get(self.token_owner[token])
        if message is not None and message.token != token:
            raise StaleReceipt(token)
        if message is None or not message.in_flight(now):
            raise NotInFlight(token)
        if now + seconds * 1000 > message.leased_at + LEASE_MAX_MS:
            raise VisibilityTooLong(token)
        message.visible_at = now + seconds * 1000

    def purge(self, now: int) -> None:
        self._at(now)
        self.counters["purged"] += len(self.messages)
        self.messages.clear()

    # -- observation --------------------------------------------------------------------

    def counts(self, now: int) -> tuple[int, int, int]:
        """(visible, in_flight, delayed)."""
        now = self._at(now)
        values = self.messages.values()
        return (sum(m.visible(now) for m in values), sum(m.in_flight(now) for m in values),
                sum(m.delayed(now) for m in values))

    def oldest_age_s(self, now: int) -> float:
        now = self._at(now)
        if not self.messages:
            return 0.0
        return max(0.0, (now - min(m.sent_at for m in self.messages.values())) / 1000)

    def is_current(self, now: int, token: int) -> bool:
        self._at(now)
        message = self.messages.get(self.token_owner[token])
        return message is not None and message.token == token

    def is_stale(self, now: int, token: int) -> bool:
        self._at(now)
        message = self.messages.get(self.token_owner[token])
        return message is not None and message.token != token

    def is_gone(self, now: int, token: int) -> bool:
        self._at(now)
        return self.token_owner[token] not in self.messages

    def timers(self, now: int) -> list[int]:
        """Future moments at which something changes by itself: a message becomes
        visible or reaches the retention period."""
        now = self._at(now)
        out = set()
        for m in self.messages.values():
            if m.visible_at > now:
                out.add(m.visible_at)
            out.add(m.sent_at + self.retention_ms)
        return sorted(t for t in out if t > now)
