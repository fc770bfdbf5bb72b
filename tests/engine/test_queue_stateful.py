"""engine.Queue (a standard queue) against the plain-Python ReferenceQueue, one random
operation at a time, with the broker closed and reopened along the way."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine import Broker, ManualClock, Queue, SendEntry, SendResult
from engine.errors import (
    EngineError,
    InvalidParameterError,
    MessageNotInflightError,
    ReceiptInvalidError,
)
from tests.engine.queue_reference import (
    NotInFlight,
    ReferenceQueue,
    StaleReceipt,
    VisibilityTooLong,
)

NAME = "jobs"
# Tiny segments and snapshot threshold: snapshots and segment deletion happen within a
# few dozen steps, so live messages' bodies must survive them.
SEGMENT_BYTES = 4096
SNAPSHOT_BYTES = 2048

delays = st.one_of(st.none(), st.sampled_from([0, 0, 1, 2, 5, 30]))
visibilities = st.one_of(st.none(), st.sampled_from([0, 0, 1, 5]), st.integers(0, 90))
advance_ms = st.one_of(st.integers(0, 60).map(lambda s: s * 1000), st.integers(0, 60_000),
                       st.integers(0, 6_000))

MODEL_TO_ENGINE: dict[type[Exception], type[EngineError]] = {
    StaleReceipt: ReceiptInvalidError,
    NotInFlight: MessageNotInflightError,
    VisibilityTooLong: InvalidParameterError,
}


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="conveyor-queue-stateful-")
        self.clock = ManualClock()
        self.broker: Broker | None = None
        self.ref: ReferenceQueue | None = None
        self.receipts: dict[int, str] = {}  # model lease token -> the engine's receipt
        self.serial = itertools.count()

    def _open(self) -> Broker:
        return Broker(self.dir, fsync="never", clock=self.clock,
                      segment_bytes_max=SEGMENT_BYTES, snapshot_bytes=SNAPSHOT_BYTES)

    @property
    def queue(self) -> Queue:
        assert self.broker is not None
        return self.broker.get_queue(NAME)

    @property
    def model(self) -> ReferenceQueue:
        assert self.ref is not None
        return self.ref

    def now(self) -> int:
        return self.clock.now_ms()

    def teardown(self) -> None:
        if self.broker is not None:
            self.broker.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _body(self, size: int) -> bytes:
        return b"m%d." % next(self.serial) + b"x" * size

    def _tokens(self, which: Callable[[int, int], bool]) -> list[int]:
        if self.ref is None:
            return []
        now = self.now()
        return [t for t in self.receipts if which(now, t)]

    def _current(self) -> list[int]:
        return self._tokens(self.model.is_current) if self.ref else []

    def _stale(self) -> list[int]:
        return self._tokens(self.model.is_stale) if self.ref else []

    def _gone(self) -> list[int]:
        return self._tokens(self.model.is_gone) if self.ref else []

    def _in_flight(self) -> list[int]:
        if self.ref is None:
            return []
        now = self.now()
        return [t for t in self._current()
                if self.model.messages[self.model.token_owner[t]].in_flight(now)]

    # -- setup ----------------------------------------------------------------------------

    @initialize(visibility=st.sampled_from([0, 1, 30]), delay=st.sampled_from([0, 0, 3]),
                retention=st.sampled_from([300, 900]))
    def create(self, visibility: int, delay: int, retention: int) -> None:
        self.broker = self._open()
        self.broker.create_queue(NAME, visibility_timeout=visibility, delay_seconds=delay,
                                 retention_seconds=retention)
        self.ref = ReferenceQueue(visibility, retention, delay_seconds=delay)

    # -- sends ----------------------------------------------------------------------------

    def _record_send(self, result: SendResult | EngineError, body: bytes,
                     delay: int | None) -> None:
        assert isinstance(result, SendResult), result
        assert not result.duplicate, "a standard queue deduplicated a send"
        self.model.send(self.now(), body, delay, message_id=result.message_id)

    @rule(delay=delays, size=st.integers(0, 40))
    def send(self, delay: int | None, size: int) -> None:
        body = self._body(size)
        self._record_send(self.queue.send(body, delay_seconds=delay), body, delay)

    @rule(entries=st.lists(st.tuples(delays, st.integers(0, 20)), min_size=1, max_size=10))
    def send_batch(self, entries: list[tuple[int | None, int]]) -> None:
        batch = [SendEntry(self._body(size), delay) for delay, size in entries]
        results = self.queue.send_batch(batch)
        assert len(results) == len(batch)
        for entry, result in zip(batch, results, strict=True):
            self._record_send(result, entry.body, entry.delay_seconds)

    # -- receive --------------------------------------------------------------------------

    @rule(n=st.integers(1, 10), visibility=visibilities)
    def receive(self, n: int, visibility: int | None) -> None:
        messages = self.queue.receive(n, wait_seconds=0, visibility_timeout=visibility)
        deliveries = self.model.receive(self.now(), n, visibility,
                                        [m.message_id for m in messages])
        issued = set(self.receipts.values())
        for message, delivery in zip(messages, deliveries, strict=True):
            expected = self.model.messages[delivery.message_id]
            assert message.body == delivery.body, message
            assert message.receive_count == delivery.receive_count, message
            # Times are whole milliseconds, reported as float seconds.
            assert round(message.sent_at * 1000) == expected.sent_at, message
            assert round(message.first_received_at * 1000) == expected.first_received_at, message
            assert message.receipt not in issued, "a receipt handle was issued twice"
            self.receipts[delivery.token] = message.receipt

    # -- delete ---------------------------------------------------------------------------

    @precondition(lambda self: self._current())
    @rule(data=st.data())
    def delete_current(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from(self._current()), label="token")
        self.queue.delete(self.receipts[token])
        self.model.delete(self.now(), token)

    @precondition(lambda self: self._stale())
    @rule(data=st.data())
    def delete_stale(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from(self._stale()), label="token")
        before = (self.queue.digest(), self.queue.stats())
        with pytest.raises(ReceiptInvalidError) as info:
            self.queue.delete(self.receipts[token])
        assert info.value.reason == "stale"
        with pytest.raises(StaleReceipt):
            self.model.delete(self.now(), token)
        assert (self.queue.digest(), self.queue.stats()) == before

    @precondition(lambda self: self._gone())
    @rule(data=st.data())
    def delete_gone(self, data: st.DataObject) -> None:
        token = data.draw(st.sampled_from(self._gone()), label="token")
        before = self.queue.digest()
        self.queue.delete(self.receipts[token])
        self.model.delete(self.now(), token)
        assert self.queue.digest() == before

    @precondition(lambda self: self.receipts)
    @rule(data=st.data())
    def delete_batch(self, data: st.DataObject) -> None:
        # One lease per message: with two leases of one message in a batch, whether the
        # older counts as stale depends on the order entries are applied in.
        by_message: dict[str, list[int]] = {}
        for token in self.receipts:
            by_message.setdefault(self.model.token_owner[token], []).append(token)
        owners = data.draw(st.lists(st.sampled_from(sorted(by_message)), min_size=1,
                                    max_size=10, unique=True), label="messages")
        tokens = [data.draw(st.sampled_from(by_message[o]), label="token") for o in owners]
        results = self.queue.delete_batch([self.receipts[t] for t in tokens])
        assert len(results) == len(tokens)
        now = self.now()
        for token, result in zip(tokens, results, strict=True):
            try:
                self.model.delete(now, token)
            except StaleReceipt:
                assert isinstance(result, ReceiptInvalidError), (token, result)
                assert result.reason == "stale", result
            else:
                assert result is None, (token, result)

    # -- visibility -----------------------------------------------------------------------

    @precondition(lambda self: self.receipts)
    @rule(data=st.data(), seconds=st.one_of(st.just(0), st.integers(0, 120)))
    def change_visibility(self, data: st.DataObject, seconds: int) -> None:
        in_flight = self._in_flight()
        pool = st.sampled_from(sorted(self.receipts))
        if in_flight:
            # Mostly a lease that can be changed; sometimes any receipt, for the errors.
            pool = st.one_of(st.sampled_from(in_flight), st.sampled_from(in_flight), pool)
        token = data.draw(pool, label="token")
        before = self.queue.digest()
        try:
            self.model.change_visibility(self.now(), token, seconds)
        except (StaleReceipt, NotInFlight, VisibilityTooLong) as exc:
            with pytest.raises(MODEL_TO_ENGINE[type(exc)]) as info:
                self.queue.change_visibility(self.receipts[token], seconds)
            if isinstance(exc, StaleReceipt):
                assert info.value.reason == "stale", info.value
            assert self.queue.digest() == before
        else:
            self.queue.change_visibility(self.receipts[token], seconds)

    # -- purge ----------------------------------------------------------------------------

    # Purges and retention jumps empty the queue: rare, or little else gets exercised.
    @rule(chance=st.integers(0, 9))
    def purge(self, chance: int) -> None:
        if chance == 0:
            self.queue.purge()
            self.model.purge(self.now())

    # -- time -----------------------------------------------------------------------------

    @rule(ms=advance_ms, past_retention=st.integers(0, 5))
    def advance(self, ms: int, past_retention: int) -> None:
        if past_retention == 0:
            ms = self.model.retention_ms + 1000
        self.clock.advance(ms / 1000)

    @precondition(lambda self: self.ref is not None and self.model.timers(self.now()))
    @rule(data=st.data(), nudge=st.sampled_from([-1, 0, 0, 1]))
    def advance_to_a_timer(self, data: st.DataObject, nudge: int) -> None:
        # Just before, at, or just after a message's visibility or retention moment.
        now = self.now()
        due = data.draw(st.sampled_from(self.model.timers(now)), label="due")
        self.clock.advance(max(0, due + nudge - now) / 1000)

    # -- restart --------------------------------------------------------------------------

    @rule(data=st.data(), chance=st.integers(0, 2))
    def close_and_reopen(self, data: st.DataObject, chance: int) -> None:
        assert self.broker is not None
        if chance:
            return  # a reopen costs a snapshot and fsyncs: not every time
        digest = self.queue.digest()
        self.broker.close()
        self.broker = self._open()
        assert self.queue.digest() == digest, "the state changed across close and reopen"
        in_flight = self._in_flight()
        if in_flight and data.draw(st.booleans(), label="delete an in-flight message"):
            token = data.draw(st.sampled_from(in_flight), label="token")
            # A receipt handed out before the restart still names the current lease.
            self.queue.delete(self.receipts[token])
            self.model.delete(self.now(), token)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def stats_match_the_model(self) -> None:
        if self.ref is None:
            return
        now = self.now()
        stats = self.queue.stats()
        model = self.model
        counters = model.counters
        expected = {
            "visible/in_flight/delayed": model.counts(now),
            "sent": counters["sent"], "received": counters["received"],
            "deleted": counters["deleted"], "expired": counters["expired"],
            "purged": counters["purged"], "moved_to_dead_letter": 0,
            "oldest_age_s": round(model.oldest_age_s(now), 3),
        }
        actual = {
            "visible/in_flight/delayed": (stats.visible, stats.in_flight, stats.delayed),
            "sent": stats.sent, "received": stats.received, "deleted": stats.deleted,
            "expired": stats.expired, "purged": stats.purged,
            "moved_to_dead_letter": stats.moved_to_dead_letter,
            "oldest_age_s": round(stats.oldest_age_s, 3),
        }
        assert actual == expected


QueueMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=40)
TestQueueStateMachine = QueueMachine.TestCase
