"""A client-side history of a queue's use, and a check of what it must never show.

Consistency tests cannot trust the servers to report their own mistakes, so clients
record what they attempted and what the servers acknowledged, and ``check`` judges the
queue from that record alone:

- lost: a send was acknowledged, but the message was never consumed: no delivery of it
  ended in an acknowledged delete, and no final drain returned it. A message received
  once whose delete then failed counts, unless it is seen again: it must still be in the
  queue, so it must come back;
- in_doubt: as lost, except that the last delete of the message failed ambiguously (the
  call raised, or the server answered with a fault of its own), so the delete may have
  taken effect and the message may rightly be gone. Reported apart, not failed; a test
  bounds how many faults may leave in doubt (each can strand one delete call's messages);
- unexpected: a delivered body that nobody tried to send;
- delivered_after_delete: a receive that *started* after a delete of the message was
  acknowledged still returned it (a stronger contract than SQS's);
- id_mismatch: a delivery whose message id differs from the one its send was given.

Redeliveries are counted as duplicates but are no failure: delivery is at-least-once.
A send whose outcome the client never learned (an error, a timeout) is ambiguous: the
message may or may not exist, so it is neither lost if missing nor unexpected if seen.
A delete attempted with no outcome recorded settles nothing: only a client that records
``delete_failed`` says the delete may have happened.

Bodies must be unique per send attempt: a body is how a delivery is matched to its send.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

Kind = Literal["attempt", "ack", "fail", "receive", "delete", "delete_ack", "delete_fail",
               "delete_refused"]
KINDS: frozenset[str] = frozenset(
    ("attempt", "ack", "fail", "receive", "delete", "delete_ack", "delete_fail",
     "delete_refused"))
EXAMPLES = 10


@dataclasses.dataclass(frozen=True)
class Event:
    """One recorded step.

    ``at`` is when it was recorded (time.monotonic(), so only comparable within the
    process that recorded the history); ``started`` is, for a receive, when the call
    began, and otherwise equals ``at``. ``seq`` orders events that share a timestamp.
    """

    seq: int
    kind: Kind
    body: str
    at: float
    started: float
    message_id: str = ""
    receipt: str = ""
    error: str = ""


class History:
    """What clients did and saw; thread-safe, since producers and consumers share one."""

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = sorted(events, key=lambda e: e.seq)

    @property
    def events(self) -> list[Event]:
        """A snapshot: recording may go on in other threads while it is read."""
        with self._lock:
            return list(self._events)

    def _record(self, kind: Kind, body: str, *, message_id: str = "", receipt: str = "",
                error: str = "", started: float | None = None) -> None:
        # The clock is read under the lock so that seq and at never disagree.
        with self._lock:
            now = time.monotonic()
            self._events.append(Event(
                seq=len(self._events), kind=kind, body=body, at=now,
                started=now if started is None else started,
                message_id=message_id, receipt=receipt, error=error))

    def send_attempted(self, body: str) -> None:
        self._record("attempt", body)

    def send_acked(self, body: str, message_id: str) -> None:
        self._record("ack", body, message_id=message_id)

    def send_failed(self, body: str, error: str) -> None:
        """The send's outcome is unknown: the message may or may not exist."""
        self._record("fail", body, error=error)

    def received(self, body: str, message_id: str, receipt: str,
                 started: float | None = None) -> None:
        """Record one delivery (redeliveries included).

        ``started`` is time.monotonic() taken just before the receive call: a delivery
        only proves a delete was ignored if the call began after the delete's ack, and
        recording time cannot tell that, since a long poll may have begun much earlier.
        """
        self._record("receive", body, message_id=message_id, receipt=receipt,
                     started=started)

    def delete_attempted(self, body: str, receipt: str) -> None:
        self._record("delete", body, receipt=receipt)

    def delete_acked(self, body: str, receipt: str) -> None:
        """Record after the delete call returned, so ``at`` bounds its completion."""
        self._record("delete_ack", body, receipt=receipt)

    def delete_failed(self, body: str, receipt: str, error: str) -> None:
        """The delete's outcome is unknown (the call raised, or the server answered with a
        fault of its own): the message may or may not be gone."""
        self._record("delete_fail", body, receipt=receipt, error=error)

    def delete_refused(self, body: str, receipt: str, error: str) -> None:
        """The server answered that it did not delete (a client error, such as a bad
        receipt handle): the message is still there, and must come back."""
        self._record("delete_refused", body, receipt=receipt, error=error)

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write one JSON object per event, so a failed run can be checked afterwards."""
        with open(path, "w", encoding="utf-8") as f:
            for event in self.events:
                f.write(json.dumps(dataclasses.asdict(event)) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        events = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    fields = json.loads(line)
                    if fields.get("kind") not in KINDS:
                        raise ValueError(f"unknown event kind in {path}: {line.strip()}")
                    events.append(Event(**fields))
        return cls(events)

    def check(self, final_drain: Iterable[str] | None = None) -> Report:
        return check(self, final_drain)


@dataclasses.dataclass(frozen=True)
class Report:
    """The verdict on a history; ``str(report)`` is meant for assertion messages."""

    lost: tuple[str, ...]
    unexpected: tuple[str, ...]
    duplicated: Mapping[str, int]
    """Extra deliveries per body: at-least-once allows them, so they are no failure."""
    delivered_after_delete: tuple[str, ...]
    id_mismatch: tuple[str, ...]
    """Reported, not failed: a client's own retry of a send can make a second message
    with the same body (and another id), which the server cannot tell from a new send."""
    ambiguous_seen: int
    ambiguous_missing: int
    sends_attempted: int
    sends_acked: int
    deliveries: int
    deletes_acked: int
    in_doubt: tuple[str, ...] = ()
    """Acknowledged, never consumed for sure, and last deleted by a call whose outcome is
    unknown: not failed by ``ok``; a test bounds their number (see ``in_doubt_within``)."""
    deletes_failed: int = 0
    """Delete outcomes recorded as unknown (``delete_failed``), one per message."""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexpected or self.delivered_after_delete)

    def in_doubt_within(self, limit: int) -> bool:
        """ok, with at most ``limit`` messages in doubt."""
        return self.ok and len(self.in_doubt) <= limit

    def summary(self) -> str:
        extra = sum(self.duplicated.values())
        return (f"{'OK' if self.ok else 'FAILED'}: {self.sends_attempted} sends attempted, "
                f"{self.sends_acked} acknowledged, {self.deliveries} deliveries, "
                f"{self.deletes_acked} deletes acknowledged, {self.deletes_failed} failed "
                f"ambiguously; {len(self.lost)} lost, {len(self.in_doubt)} in doubt, "
                f"{len(self.unexpected)} unexpected, {len(self.delivered_after_delete)} "
                f"delivered after delete, {len(self.id_mismatch)} with mismatched ids, "
                f"{len(self.duplicated)} duplicated ({extra} extra deliveries); "
                f"ambiguous sends: {self.ambiguous_seen} seen, "
                f"{self.ambiguous_missing} missing.")

    def __str__(self) -> str:
        lines = [self.summary()]
        problems: dict[str, list[str]] = {
            "lost": list(self.lost),
            "in_doubt": list(self.in_doubt),
            "unexpected": list(self.unexpected),
            "delivered_after_delete": list(self.delivered_after_delete),
            "id_mismatch": list(self.id_mismatch),
            "duplicated": [f"{b} (+{n})" for b, n in sorted(self.duplicated.items())],
        }
        for name, items in problems.items():
            if items:
                more = f" ... and {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else ""
                lines.append(f"  {name}: {', '.join(items[:EXAMPLES])}{more}")
        return "\n".join(lines)


def _settled(deliveries: list[Event], acked_deletes: set[str], failed_deletes: set[str]
             ) -> Literal["consumed", "in_doubt", "open"]:
    """Whether a message's deliveries end in its consumption.

    The lease that counts is the last one granted, and the client cannot order two
    deliveries whose calls overlapped: so every delivery that may have been the last (no
    other delivery's call began after it returned) must have had its delete acknowledged.
    A delete with a stale receipt is acknowledged and deletes nothing, which is why an
    earlier delivery's acknowledged delete settles nothing. If each of them that was not
    acknowledged failed ambiguously, the message is in doubt.
    """
    maybe_last = [d for d in deliveries
                  if not any(o.started > d.at for o in deliveries if o is not d)]
    unsettled = [d for d in maybe_last if d.receipt not in acked_deletes]
    if deliveries and not unsettled:
        return "consumed"
    if unsettled and all(d.receipt in failed_deletes for d in unsettled):
        return "in_doubt"
    return "open"


def check(history: History, final_drain: Iterable[str] | None = None) -> Report:
    """Judge a history.

    ``final_drain`` lists bodies seen by a drain that was not recorded into the history
    (a drain recorded with ``received`` and ``delete_acked`` needs nothing here). Each
    counts as a delivery that consumes the message, and the drain is taken to have started
    after every event in the history, so a drained body whose delete was acknowledged is a
    delivery after delete.
    """
    events = history.events
    attempted: set[str] = set()
    acked: dict[str, str] = {}
    failed: set[str] = set()
    deliveries: Counter[str] = Counter()
    received: dict[str, list[Event]] = defaultdict(list)
    seen_ids: dict[str, set[str]] = defaultdict(set)
    starts: dict[str, list[float]] = defaultdict(list)
    delete_acked_at: dict[str, float] = {}
    acked_deletes: dict[str, set[str]] = defaultdict(set)
    failed_deletes: dict[str, set[str]] = defaultdict(set)
    deletes_acked = deletes_failed = 0
    for e in events:
        if e.kind == "attempt":
            attempted.add(e.body)
        elif e.kind == "ack":
            acked[e.body] = e.message_id
        elif e.kind == "fail":
            failed.add(e.body)
        elif e.kind == "receive":
            deliveries[e.body] += 1
            received[e.body].append(e)
            seen_ids[e.body].add(e.message_id)
            starts[e.body].append(e.started)
        elif e.kind == "delete_ack":
            deletes_acked += 1
            acked_deletes[e.body].add(e.receipt)
            # The earliest ack is the one that matters: from then on the message is gone.
            delete_acked_at[e.body] = min(e.at, delete_acked_at.get(e.body, e.at))
        elif e.kind == "delete_fail":
            deletes_failed += 1
            failed_deletes[e.body].add(e.receipt)
    drained: set[str] = set()
    for body in final_drain or ():
        deliveries[body] += 1
        starts[body].append(math.inf)
        drained.add(body)

    # An ack or a failure implies an attempt, even if the attempt went unrecorded.
    sent = attempted | set(acked) | failed
    ambiguous = failed - set(acked)
    id_mismatch = sorted(
        body for body, ids in seen_ids.items()
        if len(ids) > 1 or (body in acked and ids != {acked[body]}))
    fates = {body: "consumed" if body in drained else
             _settled(received[body], acked_deletes[body], failed_deletes[body])
             for body in acked}
    return Report(
        lost=tuple(sorted(b for b, fate in fates.items() if fate == "open")),
        unexpected=tuple(sorted(b for b in deliveries if b not in sent)),
        duplicated={b: n - 1 for b, n in sorted(deliveries.items()) if n > 1},
        # Strictly later: a receive that began as the delete finished may have raced it.
        delivered_after_delete=tuple(sorted(
            b for b, at in delete_acked_at.items() if any(s > at for s in starts[b]))),
        id_mismatch=tuple(id_mismatch),
        ambiguous_seen=sum(1 for b in ambiguous if b in deliveries),
        ambiguous_missing=sum(1 for b in ambiguous if b not in deliveries),
        sends_attempted=len(sent),
        sends_acked=len(acked),
        deliveries=sum(deliveries.values()),
        deletes_acked=deletes_acked,
        in_doubt=tuple(sorted(b for b, fate in fates.items() if fate == "in_doubt")),
        deletes_failed=deletes_failed,
    )


@dataclasses.dataclass(frozen=True)
class FifoReport:
    """What a FIFO queue's history must never show, beyond what ``check`` judges."""

    out_of_order: tuple[str, ...]
    """First deliveries of a group that came before an earlier message of the group."""
    duplicated_sends: tuple[str, ...]
    """Bodies delivered under two message ids: a send retried with its deduplication id
    inside the window made a second message."""
    groups: int
    first_deliveries: int

    @property
    def ok(self) -> bool:
        return not (self.out_of_order or self.duplicated_sends)

    def __str__(self) -> str:
        lines = [f"{'OK' if self.ok else 'FAILED'}: {self.first_deliveries} first deliveries "
                 f"in {self.groups} groups; {len(self.out_of_order)} out of order, "
                 f"{len(self.duplicated_sends)} sent twice."]
        for name, items in (("out_of_order", self.out_of_order),
                            ("duplicated_sends", self.duplicated_sends)):
            if items:
                more = f" ... and {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else ""
                lines.append(f"  {name}: {', '.join(items[:EXAMPLES])}{more}")
        return "\n".join(lines)


def check_fifo(history: History, position: Callable[[str], tuple[str, int]]) -> FifoReport:
    """Judge a FIFO queue's history: within each message group, the first delivery of each
    message comes in send order, and no message is enqueued twice.

    ``position`` maps a body to its (group, index in the group's send order); the producer
    must send a group's message only once the one before was acknowledged, so that the
    index is the order the queue owes. Redeliveries (same message id) are no fault.
    Deliveries are ordered as recorded: a group's next message can only be received once
    the one before it was deleted, and a consumer records a receive before its delete.
    """
    seen: set[str] = set()
    last: dict[str, tuple[int, str]] = {}
    out_of_order: list[str] = []
    ids: dict[str, set[str]] = defaultdict(set)
    for e in history.events:
        if e.kind != "receive":
            continue
        ids[e.body].add(e.message_id)
        if e.body in seen:
            continue
        seen.add(e.body)
        group, index = position(e.body)
        before = last.get(group)
        if before is not None and index < before[0]:
            out_of_order.append(f"{e.body} after {before[1]}")
        if before is None or index > before[0]:
            last[group] = (index, e.body)
    return FifoReport(
        out_of_order=tuple(out_of_order),
        duplicated_sends=tuple(sorted(b for b, found in ids.items() if len(found) > 1)),
        groups=len({position(b)[0] for b in seen}),
        first_deliveries=len(seen),
    )
