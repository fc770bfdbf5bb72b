"""SQS semantics of the embeddable engine, through its public API only.

Every time-dependent rule (visibility, delay, retention, the FIFO dedup window) is driven
with a ManualClock; real time is used only where waiting is the behaviour under test
(long polling, idle queues being closed).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import shutil
import string
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import (
    AsyncBroker,
    AsyncQueue,
    Broker,
    ManualClock,
    MessageAttribute,
    Queue,
    QueueStats,
    SendEntry,
    SendResult,
    errors,
)
from engine import format as log_format
from engine import records as rec
from engine._queue import State
from engine.broker import IDLE_BEFORE_CLOSE_S
from engine.snapshot import decode_state, encode_state, state_digest

TWELVE_HOURS = 12 * 60 * 60
FOURTEEN_DAYS = 14 * 24 * 60 * 60
DEDUP_WINDOW_S = 5 * 60
CLOSED_ERRORS = (errors.BrokerClosedError, errors.QueueUnavailableError)


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def broker(tmp_path: Path, clock: ManualClock) -> Iterator[Broker]:
    with Broker(tmp_path / "data", fsync="never", clock=clock) as b:
        yield b


def bodies(messages: list[Any]) -> list[bytes]:
    return [m.body for m in messages]


def state(q: Queue) -> tuple[QueueStats, str]:
    """What must not move when a request is refused: the counters and the whole state."""
    return q.stats(), q.digest()


def drain(q: Queue) -> list[bytes]:
    """Every message receivable now, leased for long enough not to come back meanwhile."""
    out: list[bytes] = []
    while True:
        got = q.receive(max_messages=10, visibility_timeout=TWELVE_HOURS)
        if not got:
            return out
        out += bodies(got)


def seeded(broker: Broker, name: str, **attributes: Any) -> Queue:
    """A queue holding one visible message, so that a refused request has something to
    disturb."""
    q = broker.create_queue(name, **attributes)
    if q.fifo:
        q.send(b"keep", group_id="g", dedup_id="keep")
    else:
        q.send(b"keep")
    return q


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def counts(s: QueueStats) -> tuple[int, int, int]:
    return s.visible, s.in_flight, s.delayed


# --- 1. visibility timeout ----------------------------------------------------------------


def test_received_message_is_invisible_until_its_lease_expires(broker: Broker,
                                                               clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=30)
    sent = q.send(b"hello")
    sent_at = clock.now_ms() / 1000
    clock.advance(2)
    [first] = q.receive()
    assert (first.message_id, first.body, first.receive_count) == (sent.message_id, b"hello", 1)
    assert first.sent_at == sent_at
    assert first.first_received_at == sent_at + 2
    assert q.receive() == []
    assert counts(q.stats()) == (0, 1, 0)

    clock.advance(29.999)
    assert q.receive() == []
    clock.advance(0.001)
    [second] = q.receive()
    assert (second.message_id, second.body, second.receive_count) == (sent.message_id,
                                                                       b"hello", 2)
    assert second.receipt != first.receipt
    # The first receive is remembered across leases.
    assert second.first_received_at == sent_at + 2
    assert q.stats().received == 2


def test_change_visibility_to_zero_releases_the_message_at_once(broker: Broker) -> None:
    q = broker.create_queue("q", visibility_timeout=300)
    q.send(b"m")
    [m] = q.receive()
    q.change_visibility(m.receipt, 0)
    assert counts(q.stats()) == (1, 0, 0)
    [again] = q.receive()
    assert (again.body, again.receive_count) == (b"m", 2)


def test_change_visibility_extends_the_lease(broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=30)
    q.send(b"m")
    [m] = q.receive()
    clock.advance(20)
    # Counted from now, not from the receive: visible again at 20 + 60.
    q.change_visibility(m.receipt, 60)
    clock.advance(59.999)
    assert q.receive() == []
    assert counts(q.stats()) == (0, 1, 0)
    clock.advance(0.001)
    assert bodies(q.receive()) == [b"m"]


def test_change_visibility_can_also_shorten_the_lease(broker: Broker,
                                                      clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=600)
    q.send(b"m")
    [m] = q.receive()
    q.change_visibility(m.receipt, 10)
    clock.advance(10)
    assert bodies(q.receive()) == [b"m"]


def test_visibility_cannot_reach_past_twelve_hours_after_the_receive(
        broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=30)
    q.send(b"m")
    [m] = q.receive()
    q.change_visibility(m.receipt, TWELVE_HOURS)  # exactly 12 h after the receive: allowed
    clock.advance(1)
    before = state(q)
    with pytest.raises(errors.InvalidParameterError):
        q.change_visibility(m.receipt, TWELVE_HOURS)
    assert state(q) == before
    q.change_visibility(m.receipt, TWELVE_HOURS - 1)  # still exactly 12 h after the receive
    with pytest.raises(errors.InvalidParameterError):
        q.change_visibility(m.receipt, TWELVE_HOURS + 1)
    with pytest.raises(errors.InvalidParameterError):
        q.change_visibility(m.receipt, -1)
    # The refused changes left the allowed 12 h lease alone.
    clock.advance(TWELVE_HOURS - 1.001)
    assert q.receive() == []
    clock.advance(0.001)
    assert bodies(q.receive()) == [b"m"]


def test_change_visibility_of_a_message_not_in_flight_is_refused(broker: Broker,
                                                                 clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=30)
    q.send(b"m")
    [m] = q.receive()
    clock.advance(30)  # the lease ran out: visible again, not in flight
    before = state(q)
    with pytest.raises(errors.MessageNotInflightError):
        q.change_visibility(m.receipt, 60)
    assert state(q) == before
    [again] = q.receive()
    q.delete(again.receipt)
    with pytest.raises(errors.MessageNotInflightError):
        q.change_visibility(again.receipt, 60)


def test_visibility_timeout_of_a_receive_overrides_the_queues(broker: Broker,
                                                             clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=30)
    q.send(b"short")
    [m] = q.receive(visibility_timeout=5)
    clock.advance(5)
    [m] = q.receive(visibility_timeout=120)
    clock.advance(119)
    assert q.receive() == []
    clock.advance(1)
    assert bodies(q.receive(visibility_timeout=0)) == [b"short"]
    # A zero lease leaves the message receivable straight away.
    [m] = q.receive()
    assert m.receive_count == 4


def test_heaps_rebuilt_past_their_stale_entries_keep_every_waiting_message() -> None:
    """The state machine's ready heap and timer heap are rebuilt once stale entries pile
    up (here 4,900 of each, past the 4,096 that start a rebuild): no visible, delayed or
    in-flight message may lose its entry, or it would never be delivered again."""
    state = State(False)
    now = 1_000_000
    offset = 0

    def at() -> int:
        nonlocal offset
        offset += 100
        return offset

    for seq in range(1, 5001):  # visible at once
        state.apply_send(at(), seq, now, now, None, None, None, None)
    for seq in range(5001, 5021):  # delayed by a minute
        state.apply_send(at(), seq, now, now + 60_000, None, None, None, None)
    state.apply_lease(at(), now, now + 120_000, list(range(1, 21)))  # in flight 2 min
    # Leased and deleted as a replica applies them, never taken here: each leaves a stale
    # entry in both heaps.
    for seq in range(21, 4921):
        lease = at()
        state.apply_lease(lease, now, now + 30_000, [seq])
        state.apply_deletes(now, [(seq, lease)])
    state.advance(now)
    assert state.category_counts == [20, 80, 20, 0]
    state.advance(now + 60_000)
    assert state.category_counts == [0, 100, 20, 0]
    state.advance(now + 120_000)
    assert state.category_counts == [0, 120, 0, 0]
    assert [m.seq for m in state.take(now + 120_000, 1000)] == [
        *range(1, 21), *range(4921, 5021)]


def test_a_backlog_costs_its_chunks_and_gives_them_back() -> None:
    """Plain messages cost one fixed record each (about 32 bytes with their share of the
    chunk) and no Python object; a chunk is freed with its last message, so a drained
    queue holds nothing."""
    state = State(False)
    now = 1_000_000
    count = 100_000
    for seq in range(1, count + 1):
        state.apply_send(seq, seq, now, now, None, None, None, None)
    assert len(state) == count
    assert 32 * count <= state.memory_bytes() <= 36 * count
    taken = state.take(now, count)
    state.apply_lease(count + 1, now, now + 30_000, [m.seq for m in taken])
    state.apply_deletes(now, [(m.seq, count + 1) for m in taken])
    assert len(state) == 0 and state.category_counts == [0, 0, 0, 0]
    state.advance(now)  # drops the deleted messages' timers, and the array they grew
    assert state.memory_bytes() < 4 * 1024
    assert state.oldest_sent_at() is None and state.oldest_location() is None


def test_an_older_message_visible_again_is_delivered_first() -> None:
    """Standard queues deliver the lowest visible seq first: a message whose lease ends
    comes before newer ones, even after take has moved past its chunk."""
    state = State(False)
    now = 1_000_000
    for seq in range(1, 2001):
        state.apply_send(seq, seq, now, now, None, None, None, None)
    state.apply_lease(3000, now, now + 1_000, [m.seq for m in state.take(now, 1000)])
    state.apply_lease(3001, now, now + 60_000, [m.seq for m in state.take(now, 999)])
    assert [m.seq for m in state.take(now, 3)] == [2000]
    assert [m.seq for m in state.take(now + 1_000, 3)] == [1, 2, 3]
    message = state.get(1)
    assert message is not None and message.lease == 3000 and message.receive_count == 1


def test_seqs_far_apart_and_out_of_order_are_kept() -> None:
    """The chunk directory grows at either end and across gaps (a snapshot restores in
    seq order, but a state must not depend on it), and shrinks back with its window."""
    state = State(False)
    now = 1_000_000
    seqs = [10**9, 5, 10**9 + 300, 70_000, 1, 3 * 10**9]
    for offset, seq in enumerate(seqs):
        state.apply_send(offset, seq, now, now + offset, None, None, None, None)
    assert len(state) == len(seqs)
    assert [m.seq for m in state.take(now + 100, 100)] == sorted(seqs)
    assert state.oldest_sent_at() == now and state.get(10**9 + 300) is not None
    state.apply_seqs(99, log_format.QREC_EXPIRE, now, [1, 5, 70_000, 10**9, 10**9 + 300])
    assert [m.seq for m in state.take(now + 100, 100)] == [3 * 10**9]
    assert state.memory_bytes() < 64 * 1024  # the window is one block again
    with pytest.raises(ValueError, match="already"):
        state.apply_send(100, 3 * 10**9, now, now, None, None, None, None)
    with pytest.raises(ValueError, match="16 bytes"):
        state.apply_send(100, 4, now, now, None, None, b"short", None)
    assert len(state) == 1 and state.get(4) is None
    # Each placement below the lowest so far: the directory grows with the span only.
    for k in range(40):
        state.apply_send(200 + k, (3 * 10**9 // 65536 - k - 1) * 65536 + 1, now, now,
                         None, None, None, None)
    assert len(state) == 41 and state.memory_bytes() < 41 * 20 * 1024


def test_timers_give_back_what_a_burst_grew() -> None:
    state = State(False)
    now = 1_000_000
    for seq in range(1, 100_001):
        state.apply_send(seq, seq, now, now + 1_000, None, None, None, None)
    assert state.memory_bytes() > 100_000 * 48  # records and timers
    state.advance(now + 1_000)  # every timer comes due and is popped
    state.apply_seqs(200_000, log_format.QREC_EXPIRE, now + 1_000, range(1, 100_001))
    state.advance(now + 2_000)
    assert len(state) == 0 and state.memory_bytes() < 4 * 1024


def _fifo_take_expected(state: State, live: dict[int, str], limit: int) -> list[int]:
    """What a FIFO take must return: among the groups with nothing in flight or moving,
    lowest head first, each group's visible messages from its head on, in seq order."""
    groups: dict[str, list[int]] = {}
    for seq in sorted(live):
        groups.setdefault(live[seq], []).append(seq)

    def category(seq: int) -> int:
        message = state.get(seq)
        assert message is not None
        return message.category

    free = [g for g, seqs in groups.items() if all(category(s) in (0, 1) for s in seqs)]
    out: list[int] = []
    for group in sorted(free, key=lambda g: groups[g][0]):
        for seq in groups[group]:
            if len(out) >= limit or category(seq) != 1:
                break
            out.append(seq)
    return out


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fifo_groups_deliver_in_order_through_any_history(data: st.DataObject) -> None:
    """The FIFO state (groups numbered, their messages linked through the chunks) against
    a model of the rule, under sends, receives, deletes, expiry, visibility changes,
    purges and time; and a snapshot of it takes the same."""
    state = State(True)
    now = 1_000_000
    seq = 0
    live: dict[int, str] = {}
    leases: dict[int, int] = {}
    for offset in range(1, data.draw(st.integers(2, 121))):
        op = data.draw(st.sampled_from(
            ["send", "send", "send", "take", "take", "delete", "expire", "later",
             "release", "purge"]))
        if op == "send":
            seq += 1
            live[seq] = data.draw(st.sampled_from(["a", "b", "c", "d"]))
            state.apply_send(offset, seq, now, now, live[seq], None, None, None)
        elif op == "take":
            limit = data.draw(st.integers(1, 10))
            state.advance(now)
            expected = _fifo_take_expected(state, live, limit)
            got = [m.seq for m in state.take(now, limit)]
            assert got == expected
            if got:
                state.apply_lease(offset, now, now + 30_000, got)
                leases.update(dict.fromkeys(got, offset))
        elif op in ("delete", "release") and leases:
            chosen = data.draw(st.lists(st.sampled_from(sorted(leases)), max_size=4,
                                        unique=True))
            if op == "delete":
                state.apply_deletes(now, [(s, leases[s]) for s in chosen])
                for s in chosen:
                    live.pop(s, None)
            else:
                state.apply(offset, rec.Receipts(log_format.QREC_CHANGE_VISIBILITY, now,
                                                 [(s, leases[s], now) for s in chosen]))
            for s in chosen:
                del leases[s]
        elif op == "expire" and live:
            chosen = data.draw(st.lists(st.sampled_from(sorted(live)), max_size=3,
                                        unique=True))
            state.apply_seqs(offset, log_format.QREC_EXPIRE, now, chosen)
            for s in chosen:
                del live[s]
                leases.pop(s, None)
        elif op == "later":
            now += data.draw(st.integers(0, 40_000))
        elif op == "purge":
            below = data.draw(st.integers(1, seq + 1))
            state.apply(offset, rec.Purge(now, below))
            for s in [s for s in live if s < below]:
                del live[s]
                leases.pop(s, None)
        assert len(state) == len(live)
    restored = decode_state(encode_state(state))
    assert state_digest(restored) == state_digest(state)
    state.advance(now)
    expected = _fifo_take_expected(state, live, 10)
    assert [m.seq for m in restored.take(now, 10)] == expected
    assert [m.seq for m in state.take(now, 10)] == expected


_WINDOW_MS = DEDUP_WINDOW_S * 1000
_KEYS = [f"k{i}" for i in range(24)] + ["ключ-ø", "x" * 128, "", "k1 "]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_dedup_window_matches_its_rule_through_any_history(data: st.DataObject) -> None:
    """The deduplication window (one byte buffer and a hash index) against a dict and a
    list of the rule: an id is a duplicate for five minutes after its send; one sent again
    after that is a new send that the old entry's pruning must not forget; the window
    survives a snapshot and lets go of all it holds once every id has aged."""
    state = State(True)
    empty = state.memory_bytes()
    now = 1_000_000
    seq = 0
    model: dict[str, tuple[int, int, bytes | None]] = {}
    order: list[tuple[int, str]] = []

    def prune(at: int) -> None:
        while order and order[0][0] + _WINDOW_MS <= at:
            sent_at, key = order.pop(0)
            if model[key][1] == sent_at:
                del model[key]

    for offset in range(1, data.draw(st.integers(2, 300))):
        op = data.draw(st.sampled_from(["send", "send", "send", "later", "tick", "look"]))
        if op == "send":
            key = data.draw(st.sampled_from(_KEYS))
            entry = model.get(key)
            assert state.duplicate_of(key, now) == (
                entry if entry is not None and entry[1] + _WINDOW_MS > now else None)
            if entry is not None and entry[1] + _WINDOW_MS > now:
                continue  # the leader answers a duplicate without a record
            seq += 1
            message_id = data.draw(st.sampled_from([None, None, os.urandom(16)]))
            state.apply_send(offset, seq, now, now, "g", key, message_id, None)
            model[key] = (seq, now, message_id)
            order.append((now, key))
            prune(now)
        elif op == "later":
            now += data.draw(st.sampled_from([1, 1_000, 60_000, _WINDOW_MS - 1, _WINDOW_MS]))
        elif op == "tick":  # a record with nothing in it, as maintenance writes
            state.apply_seqs(offset, log_format.QREC_EXPIRE, now, [])
            prune(now)
        else:
            key = data.draw(st.sampled_from(_KEYS))
            entry = model.get(key)
            assert state.duplicate_of(key, now) == (
                entry if entry is not None and entry[1] + _WINDOW_MS > now else None)
        expected = sorted(model.items(), key=lambda item: (item[1][1], item[0]))
        assert state.dedup_entries() == expected
    restored = decode_state(encode_state(state))
    assert restored.dedup_entries() == state.dedup_entries()
    assert state_digest(restored) == state_digest(state)
    for aged in (state, restored):
        aged.apply_seqs(10_000, log_format.QREC_EXPIRE, now + _WINDOW_MS, range(1, seq + 1))
        assert aged.dedup_entries() == [] and aged.memory_bytes() < empty + 1024


def test_the_dedup_window_gives_back_what_a_burst_grew() -> None:
    state = State(True)
    now = 1_000_000
    for seq in range(1, 50_001):
        state.apply_send(seq, seq, now + seq, now + seq, "g", f"{seq:036d}", None, None)
    state.apply_seqs(60_000, log_format.QREC_EXPIRE, now, range(1, 50_001))
    assert len(state) == 0 and len(state.dedup_entries()) == 50_000  # ids outlive messages
    # All but the last 100 age out: what is left is sized for them.
    state.apply_seqs(60_001, log_format.QREC_EXPIRE, now + 49_900 + _WINDOW_MS, [])
    assert len(state.dedup_entries()) == 100
    assert state.memory_bytes() < 32 * 1024
    assert state.duplicate_of(f"{49_950:036d}", now + 49_900 + _WINDOW_MS) == (
        49_950, now + 49_950, None)


def test_a_drained_fifo_queue_gives_back_its_groups() -> None:
    """A producer with a group per message grows the table of groups to the backlog's
    size; drained, the table is given back."""
    state = State(True)
    now = 1_000_000
    for seq in range(1, 10_001):
        state.apply_send(seq, seq, now, now, f"group-{seq}", None, None, None)
    full = state.memory_bytes()
    assert full > 10_000 * (44 + 32)
    taken = [m.seq for m in state.take(now, 10_000)]
    assert taken == list(range(1, 10_001))  # every group free: each head, lowest first
    state.apply_lease(20_000, now, now + 30_000, taken)
    state.apply_deletes(now, [(seq, 20_000) for seq in taken])
    state.advance(now)
    assert len(state) == 0 and state.memory_bytes() < 4 * 1024
    state.apply_send(30_000, 10_001, now, now, "again", None, None, None)
    assert [m.seq for m in state.take(now, 10)] == [10_001]


# --- 2. receipts -----------------------------------------------------------------------


def test_receipt_of_an_older_lease_is_stale(broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=30)
    q.send(b"m")
    [old] = q.receive()
    clock.advance(30)
    [new] = q.receive()
    before = state(q)
    with pytest.raises(errors.ReceiptInvalidError) as deleted:
        q.delete(old.receipt)
    assert deleted.value.reason == "stale"
    with pytest.raises(errors.ReceiptInvalidError) as changed:
        q.change_visibility(old.receipt, 0)
    assert changed.value.reason == "stale"
    assert q.delete_batch([old.receipt])[0].reason == "stale"  # type: ignore[union-attr]
    assert state(q) == before
    # Untouched: the current lease runs its course and the message comes back.
    assert q.receive() == []
    clock.advance(30)
    [third] = q.receive()
    assert (third.message_id, third.receive_count) == (new.message_id, 3)
    q.delete(third.receipt)
    assert q.stats().deleted == 1


def _forgeries(receipt: str) -> list[object]:
    rnd = random.Random(1234)
    flip = "A" if receipt[10] != "A" else "B"
    return [
        "",
        "not-a-receipt",
        receipt[:-1],
        receipt + "A",
        receipt[:-4],
        receipt + receipt,
        receipt[:20] + "é" + receipt[21:],
        receipt[:10] + flip + receipt[11:],
        receipt.swapcase(),
        "A" * len(receipt),
        "=" * len(receipt),
        base64.urlsafe_b64encode(rnd.randbytes(41)).decode(),
        base64.urlsafe_b64encode(rnd.randbytes(41)).decode(),
        receipt.encode(),
        None,
    ]


def test_forged_receipts_are_refused_and_change_nothing(broker: Broker) -> None:
    q = broker.create_queue("q")
    q.send(b"a")
    q.send(b"b")
    [m] = q.receive()
    before = state(q)
    for forged in _forgeries(m.receipt):
        with pytest.raises(errors.ReceiptInvalidError):
            q.delete(forged)  # type: ignore[arg-type]
        with pytest.raises(errors.ReceiptInvalidError):
            q.change_visibility(forged, 0)  # type: ignore[arg-type]
        assert state(q) == before, forged
    results = q.delete_batch(_forgeries(m.receipt))  # type: ignore[arg-type]
    assert all(isinstance(r, errors.ReceiptInvalidError) for r in results)
    assert state(q) == before
    q.delete(m.receipt)
    assert q.stats().deleted == 1


def test_every_single_character_change_of_a_receipt_is_refused(broker: Broker) -> None:
    # A receipt is an opaque token: only a string the queue handed out names a lease.
    q = broker.create_queue("q")
    q.send(b"a")
    q.send(b"b")
    first, second = q.receive(max_messages=2)
    issued = {first.receipt, second.receipt}
    receipt = first.receipt
    alphabet = string.ascii_letters + string.digits + "-_+/="
    variants = [receipt[:i] + c + receipt[i + 1:]
                for i in range(len(receipt)) for c in alphabet if c != receipt[i]]
    variants = [v for v in variants if v not in issued]
    before = state(q)
    accepted: dict[str, list[str]] = {"change_visibility": [], "delete": []}
    for start in range(0, len(variants), 500):
        chunk = variants[start:start + 500]
        results = q.change_visibility_batch([(v, 600) for v in chunk])
        accepted["change_visibility"] += [
            f"{v} -> {r!r}" for v, r in zip(chunk, results, strict=True)
            if not isinstance(r, errors.ReceiptInvalidError)]
        results = q.delete_batch(chunk)
        accepted["delete"] += [
            f"{v} -> {r!r}" for v, r in zip(chunk, results, strict=True)
            if not isinstance(r, errors.ReceiptInvalidError)]
    summary = {op: (len(found), found[:3]) for op, found in accepted.items()}
    assert summary == {"change_visibility": (0, []), "delete": (0, [])}, (
        f"{len(variants)} variants of {receipt}")
    assert state(q) == before


def test_receipt_from_another_queue_is_refused(broker: Broker) -> None:
    a = broker.create_queue("a")
    b = broker.create_queue("b")
    a.send(b"from a")
    b.send(b"from b")
    [ma] = a.receive()
    [mb] = b.receive()
    before_a, before_b = state(a), state(b)
    with pytest.raises(errors.ReceiptInvalidError) as exc:
        b.delete(ma.receipt)
    assert exc.value.reason == "other-queue"
    with pytest.raises(errors.ReceiptInvalidError):
        b.change_visibility(ma.receipt, 0)
    with pytest.raises(errors.ReceiptInvalidError):
        a.delete(mb.receipt)
    assert (state(a), state(b)) == (before_a, before_b)


def test_deleting_twice_with_the_same_receipt_is_idempotent(broker: Broker) -> None:
    q = broker.create_queue("q")
    q.send(b"m")
    [m] = q.receive()
    q.delete(m.receipt)
    q.delete(m.receipt)
    assert q.delete_batch([m.receipt, m.receipt]) == [None, None]
    s = q.stats()
    assert (s.deleted, *counts(s)) == (1, 0, 0, 0)


def test_receipt_of_a_deleted_and_recreated_queue_is_refused(broker: Broker) -> None:
    q = broker.create_queue("q")
    q.send(b"old")
    [old] = q.receive()
    broker.delete_queue("q")
    q = broker.create_queue("q")
    q.send(b"new")
    [new] = q.receive(visibility_timeout=60)
    before = state(q)
    with pytest.raises(errors.ReceiptInvalidError):
        q.delete(old.receipt)
    with pytest.raises(errors.ReceiptInvalidError):
        q.change_visibility(old.receipt, 0)
    assert state(q) == before
    q.delete(new.receipt)


def test_expired_lease_that_was_not_received_again_can_still_be_deleted(
        broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=30)
    q.send(b"m")
    [m] = q.receive()
    clock.advance(31)
    assert counts(q.stats()) == (1, 0, 0)
    q.delete(m.receipt)
    assert q.receive() == []
    s = q.stats()
    assert (s.deleted, *counts(s)) == (1, 0, 0, 0)


# --- 3. delay ----------------------------------------------------------------------------


def test_queue_delay_holds_messages_back(broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("q", delay_seconds=60)
    q.send(b"m")
    assert counts(q.stats()) == (0, 0, 1)
    assert q.receive() == []
    clock.advance(59.999)
    assert q.receive() == []
    clock.advance(0.001)
    assert counts(q.stats()) == (1, 0, 0)
    [m] = q.receive()
    assert m.body == b"m"
    assert m.first_received_at - m.sent_at == 60


def test_message_delay_overrides_the_queues(broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("q", delay_seconds=60)
    q.send(b"now", delay_seconds=0)
    q.send(b"late", delay_seconds=900)
    q.send(b"default")
    assert counts(q.stats()) == (1, 0, 2)
    assert drain(q) == [b"now"]
    clock.advance(60)
    assert drain(q) == [b"default"]
    clock.advance(839.999)
    assert drain(q) == []
    assert q.stats().delayed == 1
    clock.advance(0.001)
    assert drain(q) == [b"late"]


@pytest.mark.parametrize("delay", [-1, 901, 3600, True, 1.5, "10"])
def test_delay_out_of_range_is_refused(broker: Broker, delay: object) -> None:
    q = seeded(broker, "q")
    before = state(q)
    with pytest.raises(errors.InvalidParameterError):
        q.send(b"m", delay_seconds=delay)  # type: ignore[arg-type]
    assert state(q) == before
    with pytest.raises(errors.InvalidAttributeError):
        broker.create_queue("other", delay_seconds=delay)
    with pytest.raises(errors.InvalidAttributeError):
        q.set_attributes(delay_seconds=delay)
    assert q.attributes.delay_seconds == 0
    assert broker.list_queues() == ["q"]
    assert drain(q) == [b"keep"]


def test_delay_of_nine_hundred_seconds_is_the_maximum(broker: Broker,
                                                     clock: ManualClock) -> None:
    q = broker.create_queue("q", delay_seconds=900)
    q.send(b"m")
    clock.advance(899)
    assert q.receive() == []
    clock.advance(1)
    assert bodies(q.receive()) == [b"m"]


# --- 4. retention ----------------------------------------------------------------------


def test_messages_older_than_retention_are_dropped(broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("q", retention_seconds=60)
    q.send(b"old")
    clock.advance(30)
    q.send(b"young")
    clock.advance(30)
    assert drain(q) == [b"young"]
    s = q.stats()
    assert (s.expired, s.sent) == (1, 2)


def test_retention_also_drops_in_flight_and_delayed_messages(broker: Broker,
                                                             clock: ManualClock) -> None:
    q = broker.create_queue("q", retention_seconds=60)
    q.send(b"leased")
    q.receive(visibility_timeout=600)
    clock.advance(10)
    q.send(b"delayed", delay_seconds=120)  # due only after it has expired
    clock.advance(50)
    s = q.stats()
    assert (s.expired, *counts(s)) == (1, 0, 0, 1)
    clock.advance(600)
    assert drain(q) == []
    s = q.stats()
    assert (s.expired, *counts(s)) == (2, 0, 0, 0)
    assert s.received == 1


@pytest.mark.parametrize("seconds", [0, 59, FOURTEEN_DAYS + 1, -60, True])
def test_retention_out_of_range_is_refused(broker: Broker, seconds: object) -> None:
    with pytest.raises(errors.InvalidAttributeError):
        broker.create_queue("q", retention_seconds=seconds)
    assert broker.list_queues() == []


@pytest.mark.parametrize("seconds", [60, FOURTEEN_DAYS])
def test_retention_limits_are_inclusive(broker: Broker, seconds: int) -> None:
    q = broker.create_queue("q", retention_seconds=seconds)
    assert q.attributes.retention_seconds == seconds


def test_oldest_age_follows_the_clock(broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("q")
    assert q.stats().oldest_age_s == 0.0
    q.send(b"m")
    clock.advance(12.5)
    assert q.stats().oldest_age_s == 12.5


def test_oldest_age_after_deletes_out_of_order_and_long_gaps(
        broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=600)
    for i in range(3000):
        q.send(b"%d" % i)
        clock.advance(1)
    received = q.receive(10)
    while len(received) < 3000:
        received += q.receive(10)
    by_body = {int(m.body): m.receipt for m in received}
    # Delete seqs 0..1999 newest first, then check at each step that the age is that of
    # the oldest message left; then a gap longer than any forward walk.
    for i in range(1999, 1499, -1):
        q.delete(by_body[i])
    assert q.stats().oldest_age_s == 3000
    q.delete_batch([by_body[i] for i in range(0, 10)])
    assert q.stats().oldest_age_s == 2990
    for i in range(10, 1500):
        q.delete(by_body[i])
    assert q.stats().oldest_age_s == 1000  # message 2000, sent at t=2000, now t=3000
    q.delete_batch([by_body[i] for i in range(2000, 2010)])
    assert q.stats().oldest_age_s == 990
    for i in range(2010, 3000):
        q.delete(by_body[i])
    assert q.stats().oldest_age_s == 0.0
    q.send(b"after")
    clock.advance(3)
    assert q.stats().oldest_age_s == 3


# --- 5. long polling -----------------------------------------------------------------------


# A call that must not wait (a refusal, a short poll, a long poll woken early) returns
# within PROMPT_S. The waits these tests would catch are LONG_POLL_S, so a slow machine
# cannot fail them, and a correct run still takes a fraction of a second.
PROMPT_S = 5
LONG_POLL_S = 20


def _send_later(q: Queue, delay: float, body: bytes) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        q.send(body)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_long_poll_returns_as_soon_as_a_message_arrives(broker: Broker) -> None:
    q = broker.create_queue("q")
    start = time.monotonic()
    sender = _send_later(broker.get_queue("q"), 0.2, b"late")
    got = q.receive(max_messages=10, wait_seconds=LONG_POLL_S)
    elapsed = time.monotonic() - start
    sender.join()
    assert bodies(got) == [b"late"]
    assert 0.15 <= elapsed < PROMPT_S


def test_long_poll_on_an_empty_queue_waits_then_returns_nothing(broker: Broker) -> None:
    q = broker.create_queue("q")
    start = time.monotonic()
    assert q.receive(wait_seconds=1) == []
    assert 0.9 <= time.monotonic() - start < 3.0


def test_queue_receive_wait_seconds_is_the_default_wait(broker: Broker) -> None:
    q = broker.create_queue("q", receive_wait_seconds=1)
    start = time.monotonic()
    assert q.receive() == []
    assert 0.9 <= time.monotonic() - start < 3.0
    # wait_seconds=0 overrides a default long enough that obeying it would show.
    patient = broker.create_queue("patient", receive_wait_seconds=LONG_POLL_S)
    start = time.monotonic()
    assert patient.receive(wait_seconds=0) == []
    assert time.monotonic() - start < PROMPT_S


@pytest.mark.parametrize("wait", [21, -1, True, 1.5])
def test_wait_seconds_out_of_range_is_refused(broker: Broker, wait: object) -> None:
    q = seeded(broker, "q")
    before = state(q)
    start = time.monotonic()
    with pytest.raises(errors.InvalidParameterError):
        q.receive(wait_seconds=wait)  # type: ignore[arg-type]
    assert time.monotonic() - start < PROMPT_S
    assert state(q) == before
    with pytest.raises(errors.InvalidAttributeError):
        broker.create_queue("other", receive_wait_seconds=wait)


def test_closing_the_broker_ends_a_long_poll_with_an_engine_error(tmp_path: Path,
                                                                  clock: ManualClock) -> None:
    broker = Broker(tmp_path / "data", fsync="never", clock=clock)
    q = broker.create_queue("q")
    outcome: list[object] = []

    def poll() -> None:
        try:
            outcome.append(q.receive(wait_seconds=10))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=poll)
    start = time.monotonic()
    thread.start()
    time.sleep(0.2)
    broker.close()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - start < 3.0
    assert len(outcome) == 1
    assert isinstance(outcome[0], CLOSED_ERRORS)


def test_async_long_poll_does_not_block_the_event_loop(tmp_path: Path,
                                                       clock: ManualClock) -> None:
    async def main() -> tuple[list[bytes], float, int]:
        async with AsyncBroker(str(tmp_path / "data"), fsync="never", clock=clock) as broker:
            q = await broker.create_queue("q")
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    ticks += 1

            async def sender() -> None:
                # Sends once the loop has turned ten times during the poll: a poll that
                # blocked the loop would never see this message, and would time out.
                while ticks < 10:
                    await asyncio.sleep(0.01)
                await q.send(b"wake")

            tick_task = asyncio.create_task(ticker())
            send_task = asyncio.create_task(sender())
            start = time.monotonic()
            got = await q.receive(max_messages=10, wait_seconds=LONG_POLL_S)
            elapsed = time.monotonic() - start
            ticks_meanwhile = ticks
            stop.set()
            await asyncio.gather(tick_task, send_task)
            return bodies(got), elapsed, ticks_meanwhile

    got, elapsed, ticks = asyncio.run(main())
    assert got == [b"wake"]
    assert elapsed < PROMPT_S
    # The sender could only run because the poll yielded; the ticker shows it kept yielding.
    assert ticks >= 10


def test_async_long_poll_times_out_while_the_loop_keeps_running(tmp_path: Path,
                                                                clock: ManualClock) -> None:
    async def main() -> tuple[list[Any], float, int]:
        async with AsyncBroker(str(tmp_path / "data"), fsync="never", clock=clock) as broker:
            q = await broker.create_queue("q")
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            tick_task = asyncio.create_task(ticker())
            start = time.monotonic()
            got = await q.receive(wait_seconds=1)
            elapsed = time.monotonic() - start
            tick_task.cancel()
            return got, elapsed, ticks

    got, elapsed, ticks = asyncio.run(main())
    assert got == []
    assert 0.9 <= elapsed < 3.0
    assert ticks >= 20


def test_async_long_poll_wakes_for_a_send_from_another_thread(tmp_path: Path,
                                                              clock: ManualClock) -> None:
    async def main() -> tuple[list[bytes], float]:
        async with AsyncBroker(str(tmp_path / "data"), fsync="never", clock=clock) as broker:
            q = await broker.create_queue("q")
            sender = _send_later(broker.broker.get_queue("q"), 0.2, b"threaded")
            start = time.monotonic()
            got = await q.receive(wait_seconds=LONG_POLL_S)
            elapsed = time.monotonic() - start
            await asyncio.to_thread(sender.join)
            return bodies(got), elapsed

    got, elapsed = asyncio.run(main())
    assert got == [b"threaded"]
    assert elapsed < PROMPT_S


# --- 6. dead-letter queues ---------------------------------------------------------------


def test_message_moves_to_the_dead_letter_queue_after_max_receive_count(
        broker: Broker, clock: ManualClock) -> None:
    dlq = broker.create_queue("dlq")
    src = broker.create_queue("src", visibility_timeout=30, dead_letter_queue="dlq",
                              max_receive_count=2)
    attributes = {"kind": ("String", "poison"), "n": ("Number", "42"),
                  "raw": ("Binary", b"\x00\xff")}
    sent = src.send(b"poison", attributes=attributes)
    sent_at = clock.now_ms() / 1000
    for n in (1, 2):
        got = src.receive()
        assert [(m.message_id, m.receive_count) for m in got] == [(sent.message_id, n)]
        clock.advance(30)
    assert src.receive(max_messages=10) == []
    s = src.stats()
    assert (s.moved_to_dead_letter, *counts(s)) == (1, 0, 0, 0)
    assert counts(dlq.stats()) == (1, 0, 0)

    [moved] = dlq.receive()
    assert moved.message_id == sent.message_id
    assert moved.body == b"poison"
    assert moved.attributes == {k: MessageAttribute(*v) for k, v in attributes.items()}
    # Retention in the dead-letter queue counts from the original send.
    assert moved.sent_at == sent_at
    # Never back in the source, whatever happens to its lease in the dead-letter queue.
    assert src.receive() == []
    clock.advance(30)
    assert src.receive() == []
    assert bodies(dlq.receive()) == [b"poison"]


def test_receive_that_moves_a_message_still_delivers_the_others(broker: Broker,
                                                               clock: ManualClock) -> None:
    broker.create_queue("dlq")
    src = broker.create_queue("src", visibility_timeout=30, dead_letter_queue="dlq",
                              max_receive_count=1)
    src.send(b"poison")
    assert bodies(src.receive()) == [b"poison"]
    clock.advance(30)
    src.send(b"fresh")
    got = src.receive(max_messages=10)
    assert [(m.body, m.receive_count) for m in got] == [(b"fresh", 1)]
    s = src.stats()
    assert (s.moved_to_dead_letter, s.received) == (1, 2)


def test_fifo_message_moves_to_a_fifo_dead_letter_queue(broker: Broker,
                                                       clock: ManualClock) -> None:
    dlq = broker.create_queue("dlq.fifo", fifo=True)
    src = broker.create_queue("src.fifo", fifo=True, visibility_timeout=30,
                              dead_letter_queue="dlq.fifo", max_receive_count=1)
    first = src.send(b"a1", group_id="g", dedup_id="1")
    src.send(b"a2", group_id="g", dedup_id="2")
    assert bodies(src.receive()) == [b"a1"]
    clock.advance(30)
    # a1 has had its receive: it leaves, and the group carries on with a2.
    [m] = src.receive()
    assert m.body == b"a2"
    assert src.stats().moved_to_dead_letter == 1
    [moved] = dlq.receive()
    assert (moved.message_id, moved.body, moved.group_id) == (first.message_id, b"a1", "g")


def test_change_visibility_to_zero_counts_towards_max_receive_count(broker: Broker) -> None:
    dlq = broker.create_queue("dlq")
    src = broker.create_queue("src", dead_letter_queue="dlq", max_receive_count=3)
    src.send(b"m")
    for _ in range(3):
        [m] = src.receive()
        src.change_visibility(m.receipt, 0)
    assert src.receive() == []
    assert bodies(dlq.receive()) == [b"m"]


def test_dead_letter_queue_must_exist(broker: Broker) -> None:
    with pytest.raises(errors.InvalidAttributeError):
        broker.create_queue("src", dead_letter_queue="missing", max_receive_count=3)
    with pytest.raises(errors.InvalidAttributeError):
        broker.create_queue("src", dead_letter_queue="src", max_receive_count=3)
    assert broker.list_queues() == []
    q = seeded(broker, "q")
    with pytest.raises(errors.InvalidAttributeError):
        q.set_attributes(dead_letter_queue="missing", max_receive_count=3)
    assert q.attributes.dead_letter_queue is None


@pytest.mark.parametrize(
    ("source", "source_fifo", "target", "target_fifo"),
    [("src", False, "dlq.fifo", True), ("src.fifo", True, "dlq", False)],
    ids=["standard-to-fifo", "fifo-to-standard"],
)
def test_dead_letter_queue_must_be_fifo_exactly_when_the_source_is(
        broker: Broker, source: str, source_fifo: bool, target: str,
        target_fifo: bool) -> None:
    broker.create_queue(target, fifo=target_fifo)
    with pytest.raises(errors.InvalidAttributeError):
        broker.create_queue(source, fifo=source_fifo, dead_letter_queue=target,
                            max_receive_count=2)
    assert broker.list_queues() == [target]


@pytest.mark.parametrize("changes", [
    {"dead_letter_queue": "dlq"},
    {"max_receive_count": 3},
    {"dead_letter_queue": "dlq", "max_receive_count": 0},
    {"dead_letter_queue": "dlq", "max_receive_count": 1001},
    {"dead_letter_queue": "dlq", "max_receive_count": True},
])
def test_dead_letter_settings_are_validated(broker: Broker, changes: dict[str, Any]) -> None:
    broker.create_queue("dlq")
    with pytest.raises(errors.InvalidParameterError):
        broker.create_queue("src", **changes)
    assert broker.list_queues() == ["dlq"]


def test_dead_letter_sources_lists_the_queues_that_use_it(broker: Broker) -> None:
    broker.create_queue("dlq")
    broker.create_queue("b-src", dead_letter_queue="dlq", max_receive_count=2)
    broker.create_queue("a-src", dead_letter_queue="dlq", max_receive_count=5)
    other = broker.create_queue("other")
    assert broker.dead_letter_sources("dlq") == ["a-src", "b-src"]
    assert broker.dead_letter_sources("other") == []
    other.set_attributes(dead_letter_queue="dlq", max_receive_count=1)
    assert broker.dead_letter_sources("dlq") == ["a-src", "b-src", "other"]
    with pytest.raises(errors.QueueNotFoundError):
        broker.dead_letter_sources("missing")


# --- 7. FIFO queues ------------------------------------------------------------------------


@pytest.fixture
def fifo(broker: Broker) -> Queue:
    return broker.create_queue("jobs.fifo", fifo=True, visibility_timeout=30)


def test_fifo_send_needs_a_group(fifo: Queue) -> None:
    before = state(fifo)
    with pytest.raises(errors.MissingParameterError):
        fifo.send(b"m", dedup_id="d")
    assert state(fifo) == before
    assert fifo.fifo is True


def test_fifo_delivers_a_group_in_order(fifo: Queue) -> None:
    sent = [fifo.send(b"m%d" % i, group_id="g", dedup_id=str(i)) for i in range(5)]
    seen = []
    for _ in range(5):
        [m] = fifo.receive()
        seen.append((m.body, m.message_id, m.sequence_number, m.group_id))
        fifo.delete(m.receipt)
    assert seen == [(b"m%d" % i, r.message_id, r.sequence_number, "g")
                    for i, r in enumerate(sent)]
    assert fifo.receive() == []


def test_fifo_delivers_several_of_a_group_in_one_receive_in_order(fifo: Queue) -> None:
    for i in range(4):
        fifo.send(b"m%d" % i, group_id="g", dedup_id=str(i))
    assert bodies(fifo.receive(max_messages=3)) == [b"m0", b"m1", b"m2"]
    # m3 waits until none of its group is in flight.
    assert fifo.receive(max_messages=10) == []


def test_fifo_group_with_a_message_in_flight_delivers_nothing_else(fifo: Queue) -> None:
    fifo.send(b"a1", group_id="a", dedup_id="a1")
    fifo.send(b"a2", group_id="a", dedup_id="a2")
    fifo.send(b"b1", group_id="b", dedup_id="b1")
    [a1] = fifo.receive()
    assert a1.body == b"a1"
    [b1] = fifo.receive(max_messages=10)
    assert b1.body == b"b1"
    assert fifo.receive(max_messages=10) == []
    fifo.delete(b1.receipt)
    assert fifo.receive(max_messages=10) == []
    fifo.delete(a1.receipt)
    assert bodies(fifo.receive(max_messages=10)) == [b"a2"]


def test_fifo_group_stays_locked_until_every_message_of_it_is_done(fifo: Queue) -> None:
    for i in range(3):
        fifo.send(b"m%d" % i, group_id="g", dedup_id=str(i))
    m0, m1 = fifo.receive(max_messages=2)
    fifo.delete(m0.receipt)
    assert fifo.receive() == []  # m1 is still in flight
    fifo.delete(m1.receipt)
    assert bodies(fifo.receive()) == [b"m2"]


def test_fifo_expired_message_comes_back_first(fifo: Queue, clock: ManualClock) -> None:
    fifo.send(b"first", group_id="g", dedup_id="1")
    fifo.send(b"second", group_id="g", dedup_id="2")
    assert bodies(fifo.receive()) == [b"first"]
    clock.advance(30)
    got = fifo.receive(max_messages=10)
    assert [(m.body, m.receive_count) for m in got] == [(b"first", 2), (b"second", 1)]


def test_fifo_released_message_comes_back_first(fifo: Queue) -> None:
    fifo.send(b"first", group_id="g", dedup_id="1")
    fifo.send(b"second", group_id="g", dedup_id="2")
    [m] = fifo.receive()
    fifo.change_visibility(m.receipt, 0)
    assert bodies(fifo.receive()) == [b"first"]


def test_fifo_dedup_id_suppresses_duplicates_for_five_minutes(fifo: Queue,
                                                             clock: ManualClock) -> None:
    original = fifo.send(b"one", group_id="g", dedup_id="d")
    assert original.duplicate is False
    clock.advance(DEDUP_WINDOW_S - 0.001)
    again = fifo.send(b"other body", group_id="other", dedup_id="d")
    assert again == SendResult(original.message_id, original.sequence_number, True)
    s = fifo.stats()
    assert (s.sent, s.visible) == (1, 1)
    clock.advance(0.001)
    fresh = fifo.send(b"two", group_id="g", dedup_id="d")
    assert fresh.duplicate is False
    assert fresh.message_id != original.message_id
    assert drain(fifo) == [b"one", b"two"]


def test_fifo_dedup_within_one_batch(fifo: Queue) -> None:
    results = fifo.send_batch([SendEntry(b"a", group_id="g", dedup_id="same"),
                               SendEntry(b"b", group_id="g", dedup_id="same"),
                               SendEntry(b"c", group_id="g", dedup_id="else")])
    first, second, third = results
    assert isinstance(first, SendResult)
    assert isinstance(third, SendResult)
    assert second == SendResult(first.message_id, first.sequence_number, True)
    assert not third.duplicate
    assert drain(fifo) == [b"a", b"c"]


def test_fifo_dedup_applies_even_after_the_original_was_deleted(fifo: Queue) -> None:
    original = fifo.send(b"m", group_id="g", dedup_id="d")
    [m] = fifo.receive()
    fifo.delete(m.receipt)
    again = fifo.send(b"m", group_id="g", dedup_id="d")
    assert (again.message_id, again.duplicate) == (original.message_id, True)
    assert fifo.receive() == []


def test_content_based_dedup_uses_the_body(broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("cbd.fifo", fifo=True, content_based_dedup=True)
    first = q.send(b"payload", group_id="g")
    dup = q.send(b"payload", group_id="h")
    assert (dup.message_id, dup.duplicate) == (first.message_id, True)
    assert q.send(b"payload!", group_id="g").duplicate is False
    # An explicit dedup id takes precedence over the body.
    assert q.send(b"payload", group_id="g", dedup_id="explicit").duplicate is False
    [m] = q.receive()
    assert m.dedup_id == hashlib.sha256(b"payload").hexdigest()
    assert q.stats().sent == 3
    clock.advance(DEDUP_WINDOW_S)
    assert q.send(b"payload", group_id="g").duplicate is False


def test_fifo_without_content_based_dedup_needs_a_dedup_id(fifo: Queue) -> None:
    before = state(fifo)
    with pytest.raises(errors.MissingParameterError):
        fifo.send(b"m", group_id="g")
    assert state(fifo) == before


def test_fifo_sequence_numbers_increase(fifo: Queue) -> None:
    numbers = [fifo.send(b"m", group_id=f"g{i % 3}", dedup_id=str(i)).sequence_number
               for i in range(20)]
    assert all(n is not None and n.isdigit() for n in numbers)
    as_ints = [int(n) for n in numbers]  # type: ignore[arg-type]
    assert as_ints == sorted(as_ints)
    assert len(set(as_ints)) == 20
    got = fifo.receive(max_messages=10)
    assert all(m.sequence_number in numbers for m in got)


def test_standard_queue_has_no_sequence_numbers(broker: Broker) -> None:
    q = broker.create_queue("q")
    result = q.send(b"m", dedup_id="ignored")
    assert result.sequence_number is None
    [m] = q.receive()
    assert (m.sequence_number, m.group_id) == (None, None)
    assert q.fifo is False


def test_fifo_refuses_per_message_delay(fifo: Queue) -> None:
    before = state(fifo)
    with pytest.raises(errors.InvalidParameterError):
        fifo.send(b"m", group_id="g", dedup_id="d", delay_seconds=5)
    assert state(fifo) == before


def test_fifo_queue_delay_applies(broker: Broker, clock: ManualClock) -> None:
    q = broker.create_queue("slow.fifo", fifo=True, delay_seconds=10)
    q.send(b"m", group_id="g", dedup_id="d")
    assert counts(q.stats()) == (0, 0, 1)
    assert q.receive() == []
    clock.advance(10)
    assert bodies(q.receive()) == [b"m"]


def test_content_based_dedup_is_for_fifo_queues_only(broker: Broker) -> None:
    with pytest.raises(errors.InvalidAttributeError):
        broker.create_queue("q", content_based_dedup=True)
    q = seeded(broker, "q")
    with pytest.raises(errors.InvalidAttributeError):
        q.set_attributes(content_based_dedup=True)
    assert q.attributes.content_based_dedup is False


def test_standard_queue_deduplicates_sends_with_a_dedup_id(broker: Broker,
                                                            clock: ManualClock) -> None:
    q = broker.create_queue("idem")
    original = q.send(b"order 1", dedup_id="key-1")
    again = q.send(b"order 1 retried", dedup_id="key-1")
    assert again == SendResult(original.message_id, None, True)
    plain = [q.send(b"no key"), q.send(b"no key")]  # without a key nothing is deduplicated
    assert plain[0].message_id != plain[1].message_id
    [first, *_] = q.receive(max_messages=10)
    q.delete(first.receipt)
    assert q.send(b"x", dedup_id="key-1").message_id == original.message_id  # after delete
    clock.advance(DEDUP_WINDOW_S)
    fresh = q.send(b"order 1, much later", dedup_id="key-1")
    assert not fresh.duplicate and fresh.message_id != original.message_id
    assert q.stats().sent == 4


def test_explicit_message_id_is_kept_and_returned_for_duplicates(broker: Broker) -> None:
    q = broker.create_queue("ids")
    chosen = bytes(range(16))
    expected = "00010203-0405-0607-0809-0a0b0c0d0e0f"
    [sent, dup] = q.send_batch([SendEntry(b"m", dedup_id="k", message_id=chosen),
                                SendEntry(b"m", dedup_id="k", message_id=b"\xff" * 16)])
    assert isinstance(sent, SendResult) and isinstance(dup, SendResult)
    assert (sent.message_id, dup.message_id, dup.duplicate) == (expected, expected, True)
    [m] = q.receive()
    assert m.message_id == expected
    q.delete(m.receipt)
    assert q.send_batch([SendEntry(b"m", dedup_id="k")])[0] == SendResult(expected, None, True)


@pytest.mark.parametrize("message_id", [b"short", b"x" * 17, "0" * 16])
def test_malformed_explicit_message_id_is_refused(broker: Broker, message_id: Any) -> None:
    q = broker.create_queue("ids")
    [result] = q.send_batch([SendEntry(b"m", message_id=message_id)])
    assert isinstance(result, errors.InvalidParameterError)
    assert q.stats().sent == 0


def test_envelope_overhead_does_not_count_toward_the_size_limit(broker: Broker) -> None:
    q = broker.create_queue("sealed", max_message_bytes=1024)
    at_limit = b"x" * (1024 + 37)
    ok, over, too_much = q.send_batch([
        SendEntry(at_limit, message_id=b"\1" * 16, overhead=37),
        SendEntry(at_limit + b"x", message_id=b"\2" * 16, overhead=37),
        SendEntry(at_limit, message_id=b"\3" * 16, overhead=65)])
    assert isinstance(ok, SendResult)
    assert isinstance(over, errors.MessageTooLargeError)
    assert isinstance(too_much, errors.InvalidParameterError)


def test_dedup_window_with_explicit_ids_survives_restart(tmp_path: Path,
                                                         clock: ManualClock) -> None:
    """Through a snapshot (clean close) and through log replay (a copy taken while open)."""
    path, copy = tmp_path / "data", tmp_path / "copy"
    with Broker(path, fsync="always", clock=clock) as broker:
        q = broker.create_queue("q")
        sent = q.send_batch([SendEntry(b"a", dedup_id="a", message_id=b"\xaa" * 16)])[0]
        derived = q.send(b"b", dedup_id="b")
        shutil.copytree(path, copy)
    assert isinstance(sent, SendResult)
    for directory in (path, copy):
        with Broker(directory, fsync="always", clock=clock) as broker:
            q = broker.get_queue("q")
            assert q.send(b"a", dedup_id="a") == SendResult(sent.message_id, None, True)
            assert q.send(b"b", dedup_id="b") == SendResult(derived.message_id, None, True)
            assert q.stats().sent == 2


@pytest.mark.parametrize("field", ["group_id", "dedup_id"])
@pytest.mark.parametrize("value", ["", "x" * 129, "has space", "ünï", "tab\t", "line\n"])
def test_fifo_bad_group_or_dedup_id_is_refused(fifo: Queue, field: str, value: str) -> None:
    fifo.send(b"keep", group_id="g", dedup_id="keep")
    before = state(fifo)
    kwargs = {"group_id": "g", "dedup_id": "d", field: value}
    with pytest.raises(errors.InvalidParameterError):
        fifo.send(b"m", **kwargs)
    assert state(fifo) == before
    assert drain(fifo) == [b"keep"]


# --- 8. purge --------------------------------------------------------------------------------


def test_purge_drops_visible_in_flight_and_delayed_messages(broker: Broker,
                                                            clock: ManualClock) -> None:
    q = broker.create_queue("q")
    q.send(b"visible")
    q.send(b"leased")
    q.send(b"delayed", delay_seconds=60)
    q.receive(visibility_timeout=30)
    q.send(b"also visible")
    assert counts(q.stats()) == (2, 1, 1)
    q.purge()
    s = q.stats()
    assert (s.purged, *counts(s)) == (4, 0, 0, 0)
    clock.advance(120)
    assert drain(q) == []
    q.send(b"after")
    assert drain(q) == [b"after"]
    assert q.stats().purged == 4


def test_purge_of_a_fifo_queue_frees_its_groups(fifo: Queue) -> None:
    fifo.send(b"a", group_id="g", dedup_id="a")
    fifo.send(b"b", group_id="g", dedup_id="b")
    fifo.receive()
    fifo.purge()
    fifo.send(b"c", group_id="g", dedup_id="c")
    assert bodies(fifo.receive()) == [b"c"]


# --- 9. bad inputs change nothing ------------------------------------------------------------


@pytest.mark.parametrize("digest", [b"\x00" * 15, b"\x00" * 17, "0" * 32, bytearray(16)])
@pytest.mark.parametrize("fifo", [False, True])
def test_a_body_md5_not_of_sixteen_bytes_is_refused(broker: Broker, digest: object,
                                                    fifo: bool) -> None:
    q = seeded(broker, "q.fifo" if fifo else "q", fifo=fifo)
    before = state(q)
    entry = SendEntry(b"body", body_md5=digest,  # type: ignore[arg-type]
                      group_id="g" if fifo else None, dedup_id="d" if fifo else None)
    [result] = q.send_batch([entry])
    assert isinstance(result, errors.InvalidParameterError)
    assert state(q) == before


def test_oversize_message_is_refused(broker: Broker) -> None:
    q = seeded(broker, "q", max_message_bytes=1024)
    before = state(q)
    with pytest.raises(errors.MessageTooLargeError) as exc:
        q.send(b"x" * 1025)
    assert (exc.value.size, exc.value.limit) == (1025, 1024)
    assert state(q) == before
    q.send(b"x" * 1024)
    assert drain(q) == [b"keep", b"x" * 1024]


def test_message_size_counts_attribute_names_types_and_values(broker: Broker) -> None:
    q = seeded(broker, "q", max_message_bytes=1024)
    attributes = {"key": ("String", "é")}  # 3 + 6 + 2 (UTF-8) = 11 bytes
    before = state(q)
    with pytest.raises(errors.MessageTooLargeError):
        q.send(b"x" * 1014, attributes=attributes)
    with pytest.raises(errors.MessageTooLargeError):
        q.send(b"x" * 1000, attributes={"blob": ("Binary", b"\0" * 15)})  # 1000 + 4 + 6 + 15
    assert state(q) == before
    q.send(b"x" * 1013, attributes=attributes)
    q.send(b"x" * 1000, attributes={"blob": ("Binary", b"\0" * 14)})
    assert q.stats().sent == 3


def test_default_maximum_is_one_mebibyte(broker: Broker) -> None:
    q = broker.create_queue("q")
    q.send(b"x" * (1024 * 1024))
    with pytest.raises(errors.MessageTooLargeError):
        q.send(b"x" * (1024 * 1024 + 1))
    assert len(q.receive()[0].body) == 1024 * 1024


@pytest.mark.parametrize("name", [
    "", "a" * 81, "has space", "tab\tname", "jobs.fifo", "a.b", "a/", "/b", "a b/c", "ünïcode",
    "名前",
    "jobs\n", "\njobs", "star*",
])
def test_bad_standard_queue_names_are_refused(broker: Broker, name: str) -> None:
    broker.create_queue("existing")
    with pytest.raises(errors.InvalidQueueNameError):
        broker.create_queue(name)
    assert broker.list_queues() == ["existing"]


@pytest.mark.parametrize("name", [
    "jobs", ".fifo", "a" * 76 + ".fifo", "jo bs.fifo", "ü.fifo", "a.b.fifo", "jobs.FIFO",
    "jobs.fifo\n",
])
def test_bad_fifo_queue_names_are_refused(broker: Broker, name: str) -> None:
    with pytest.raises(errors.InvalidQueueNameError):
        broker.create_queue(name, fifo=True)
    assert broker.list_queues() == []


def test_longest_and_unusual_valid_names_are_accepted(broker: Broker) -> None:
    names = ["a" * 80, "A-z_0-9", "-", "_"]
    for name in names:
        broker.create_queue(name)
    broker.create_queue("b" * 75 + ".fifo", fifo=True)
    assert broker.list_queues() == sorted([*names, "b" * 75 + ".fifo"])


@pytest.mark.parametrize("attributes", [
    {"visibility_timeout": -1},
    {"visibility_timeout": TWELVE_HOURS + 1},
    {"visibility_timeout": "30"},
    {"visibility_timeout": 1.5},
    {"visibility_timeout": True},
    {"visibility_timeout": None},
    {"delay_seconds": -1},
    {"retention_seconds": 59},
    {"max_message_bytes": 1023},
    {"max_message_bytes": 1024 * 1024 + 1},
    {"max_message_bytes": False},
    {"receive_wait_seconds": 21},
    {"fifo": "yes"},
    {"fifo": 1},
    {"content_based_dedup": 1},
], ids=lambda a: "-".join(f"{k}={v!r}" for k, v in a.items()))
def test_bad_queue_attributes_are_refused(broker: Broker, attributes: dict[str, Any]) -> None:
    with pytest.raises(errors.InvalidAttributeError):
        broker.create_queue("new", **attributes)
    assert broker.list_queues() == []
    q = seeded(broker, "q", visibility_timeout=45)
    before_attributes, before = q.attributes, state(q)
    if "fifo" not in attributes:
        with pytest.raises(errors.InvalidAttributeError):
            q.set_attributes(**attributes)
        with pytest.raises(errors.InvalidAttributeError):
            broker.set_queue_attributes("q", **attributes)
    assert q.attributes == before_attributes
    assert state(q) == before


def test_unknown_queue_attribute_is_refused_with_an_engine_error(broker: Broker) -> None:
    # A misspelt attribute must be reported like any other bad attribute.
    with pytest.raises(errors.InvalidAttributeError):
        broker.create_queue("q", visiblity_timeout=5)
    assert broker.list_queues() == []
    q = broker.create_queue("q")
    with pytest.raises(errors.InvalidAttributeError):
        q.set_attributes(visiblity_timeout=5)
    assert q.attributes.visibility_timeout == 30


BAD_MESSAGE_ATTRIBUTES: list[Any] = [
    {f"a{i}": ("String", "v") for i in range(11)},
    {"AWS.x": ("String", "v")},
    {"amazon.x": ("String", "v")},
    {"a..b": ("String", "v")},
    {".a": ("String", "v")},
    {"a.": ("String", "v")},
    {"": ("String", "v")},
    {"a b": ("String", "v")},
    {"a" * 257: ("String", "v")},
    {"ünï": ("String", "v")},
    {"name\n": ("String", "v")},
    {"a": ("Strin", "v")},
    {"a": ("string", "v")},
    {"a": ("", "v")},
    {"a": ("Text", "v")},
    {"a": ("String\n", "v")},
    {"a": ("Number", "abc")},
    {"a": ("Number", "1 ")},
    {"a": ("Number", "nan")},
    {"a": ("Number", "Infinity")},
    {"a": ("Number", "1_000")},
    {"a": ("Number", 5)},
    {"a": ("Binary", "not bytes")},
    {"a": ("String", b"bytes")},
    {"a": ("String", "")},
    {"a": ("Binary", b"")},
    {"a": ("Number", "")},
    {"a": "String"},
    {"a": ("String", "v", "extra")},
    [("a", ("String", "v"))],
]


@pytest.mark.parametrize("attributes", BAD_MESSAGE_ATTRIBUTES,
                         ids=[f"{i}-{a!r:.40}" for i, a in enumerate(BAD_MESSAGE_ATTRIBUTES)])
def test_bad_message_attributes_are_refused(broker: Broker, attributes: Any) -> None:
    q = seeded(broker, "q")
    before = state(q)
    with pytest.raises(errors.InvalidParameterError):
        q.send(b"m", attributes=attributes)
    [result] = q.send_batch([SendEntry(b"m", attributes=attributes)])
    assert isinstance(result, errors.InvalidParameterError)
    assert state(q) == before
    assert drain(q) == [b"keep"]


def test_valid_message_attributes_round_trip(broker: Broker) -> None:
    q = broker.create_queue("q")
    attributes = {
        "s": ("String", "naïve ✓"),
        "custom": ("String.json", '{"a": 1}'),
        "n": ("Number", "-1.5e3"),
        "int": ("Number.int", "42"),
        "blob": ("Binary", bytes(range(256))),
        "dotted.name-with_chars": ("Binary.png", b"\x89PNG"),
        "x" * 256: ("String", "long name"),
        "a3": ("String", "3"),
        "a4": ("String", "4"),
        "a5": ("String", "5"),
    }
    q.send(b"m", attributes=attributes)
    [m] = q.receive()
    assert m.attributes == {k: MessageAttribute(*v) for k, v in attributes.items()}
    assert all(isinstance(v, MessageAttribute) for v in m.attributes.values())
    q.send(b"plain")
    [plain] = q.receive()
    assert plain.attributes == {}


@pytest.mark.parametrize("body", ["text", None, 42, [b"x"]])
def test_body_must_be_bytes(broker: Broker, body: object) -> None:
    q = seeded(broker, "q")
    before = state(q)
    with pytest.raises(errors.InvalidParameterError):
        q.send(body)  # type: ignore[arg-type]
    assert state(q) == before


def test_bytes_like_bodies_and_empty_body_are_accepted(broker: Broker) -> None:
    q = broker.create_queue("q")
    q.send(bytearray(b"array"))
    q.send(memoryview(b"view"))
    q.send(b"")
    assert sorted(drain(q)) == [b"", b"array", b"view"]


@pytest.mark.parametrize("kwargs", [
    {"max_messages": 0},
    {"max_messages": -1},
    {"max_messages": True},
    {"max_messages": "1"},
    {"visibility_timeout": -1},
    {"visibility_timeout": TWELVE_HOURS + 1},
    {"visibility_timeout": True},
])
def test_bad_receive_arguments_are_refused(broker: Broker, kwargs: dict[str, Any]) -> None:
    q = seeded(broker, "q")
    before = state(q)
    with pytest.raises(errors.InvalidParameterError):
        q.receive(**kwargs)
    assert state(q) == before


def test_send_batch_entries_succeed_or_fail_alone(broker: Broker) -> None:
    q = broker.create_queue("q", max_message_bytes=1024)
    results = q.send_batch([
        SendEntry(b"first"),
        SendEntry(b"x" * 1025),
        SendEntry(b"second", attributes={"AWS.bad": ("String", "v")}),
        SendEntry(b"third", delay_seconds=901),
        SendEntry(b"fourth", attributes={"ok": ("String", "v")}),
    ])
    assert isinstance(results[0], SendResult)
    assert isinstance(results[1], errors.MessageTooLargeError)
    assert isinstance(results[2], errors.InvalidParameterError)
    assert isinstance(results[3], errors.InvalidParameterError)
    assert isinstance(results[4], SendResult)
    ids = {r.message_id for r in results if isinstance(r, SendResult)}
    got = q.receive(max_messages=10)
    assert sorted(bodies(got)) == [b"first", b"fourth"]
    assert {m.message_id for m in got} == ids
    assert q.stats().sent == 2


def test_fifo_send_batch_with_a_bad_entry_keeps_order_of_the_good_ones(fifo: Queue) -> None:
    results = fifo.send_batch([
        SendEntry(b"1", group_id="g", dedup_id="1"),
        SendEntry(b"bad", dedup_id="2"),
        SendEntry(b"3", group_id="g", dedup_id="3"),
    ])
    assert isinstance(results[1], errors.MissingParameterError)
    assert drain(fifo) == [b"1", b"3"]


def test_send_batch_takes_plain_bodies_beside_entries(broker: Broker) -> None:
    # What a user tries first, as with Log.append_batch.
    q = broker.create_queue("q")
    results = q.send_batch([b"a", SendEntry(b"b", delay_seconds=0), bytearray(b"c")])
    assert all(isinstance(r, SendResult) for r in results)
    assert sorted(bodies(q.receive(max_messages=10))) == [b"a", b"b", b"c"]


@pytest.mark.parametrize("entries", [["text"], [b"ok", 7], [None], [(b"body",)]],
                         ids=["str", "int", "none", "tuple"])
def test_send_batch_of_something_else_is_a_type_error_naming_it(
        broker: Broker, clock: ManualClock, tmp_path: Path, entries: list[Any]) -> None:
    q = seeded(broker, "q")
    before = state(q)
    index = next(i for i, e in enumerate(entries) if not isinstance(e, bytes))
    with pytest.raises(TypeError, match=rf"entries\[{index}\] must be bytes or a SendEntry"):
        q.send_batch(entries)
    assert state(q) == before

    async def async_send() -> None:
        async with AsyncBroker(str(tmp_path / "async"), fsync="never", clock=clock) as aio:
            queue = await aio.create_queue("q")
            assert [m.body for m in await _async_bodies(queue, [b"x", b"y"])] == [b"x", b"y"]
            with pytest.raises(TypeError, match=rf"entries\[{index}\]"):
                await queue.send_batch(entries)

    asyncio.run(async_send())


async def _async_bodies(queue: Any, sends: list[bytes]) -> list[Any]:
    await queue.send_batch(sends)
    return sorted(await queue.receive(max_messages=10), key=lambda m: m.body)


@pytest.mark.parametrize("call", [
    lambda q: q.send_batch([]),
    lambda q: q.send_batch([SendEntry(b"x")] * 1001),
    lambda q: q.delete_batch([]),
    lambda q: q.change_visibility_batch([]),
], ids=["send-empty", "send-too-many", "delete-empty", "visibility-empty"])
def test_bad_batches_are_refused(broker: Broker, call: Callable[[Queue], Any]) -> None:
    q = seeded(broker, "q")
    before = state(q)
    with pytest.raises(errors.InvalidParameterError):
        call(q)
    assert state(q) == before


def test_delete_and_visibility_batches_answer_each_entry(broker: Broker,
                                                         clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=30)
    for body in (b"a", b"b", b"c"):
        q.send(body)
    a, b, c = q.receive(max_messages=3)
    stale = a.receipt
    q.change_visibility(a.receipt, 0)
    [a] = q.receive()
    results = q.change_visibility_batch([(a.receipt, 100), (stale, 100), ("junk", 100),
                                         (b.receipt, TWELVE_HOURS + 1), (c.receipt, 0)])
    assert results[0] is None
    assert isinstance(results[1], errors.ReceiptInvalidError)
    assert isinstance(results[2], errors.ReceiptInvalidError)
    assert isinstance(results[3], errors.InvalidParameterError)
    assert results[4] is None
    assert counts(q.stats()) == (1, 2, 0)
    results = q.delete_batch([a.receipt, stale, b.receipt, "junk"])
    assert [r is None for r in results] == [True, False, True, False]
    s = q.stats()
    assert (s.deleted, *counts(s)) == (2, 1, 0, 0)
    assert drain(q) == [b"c"]


# --- 10. queue management ------------------------------------------------------------------


def test_create_queue_is_idempotent_with_the_same_attributes(broker: Broker) -> None:
    first = broker.create_queue("q", visibility_timeout=10, delay_seconds=5)
    second = broker.create_queue("q", visibility_timeout=10, delay_seconds=5)
    first.send(b"m", delay_seconds=0)
    assert bodies(second.receive()) == [b"m"]
    assert broker.list_queues() == ["q"]
    assert second.attributes == first.attributes
    assert broker.create_queue("plain").attributes == broker.create_queue(
        "plain", visibility_timeout=30).attributes


def test_create_queue_with_different_attributes_is_refused(broker: Broker) -> None:
    q = seeded(broker, "q", visibility_timeout=10)
    before = q.attributes
    with pytest.raises(errors.QueueExistsError) as exc:
        broker.create_queue("q", visibility_timeout=20)
    assert exc.value.differing == ["visibility_timeout"]
    with pytest.raises(errors.QueueExistsError) as exc:
        broker.create_queue("q", visibility_timeout=10, delay_seconds=1, retention_seconds=60)
    assert sorted(exc.value.differing) == ["delay_seconds", "retention_seconds"]
    assert q.attributes == before
    assert drain(q) == [b"keep"]


def test_missing_queue_is_reported(broker: Broker) -> None:
    with pytest.raises(errors.QueueNotFoundError) as exc:
        broker.get_queue("missing")
    assert exc.value.queue == "missing"
    with pytest.raises(errors.QueueNotFoundError):
        broker.delete_queue("missing")
    with pytest.raises(errors.QueueNotFoundError):
        broker.set_queue_attributes("missing", visibility_timeout=5)
    q = broker.create_queue("q")
    broker.delete_queue("q")
    with pytest.raises(errors.QueueNotFoundError):
        broker.delete_queue("q")
    with pytest.raises(errors.QueueNotFoundError):
        q.send(b"m")
    with pytest.raises(errors.QueueNotFoundError):
        q.receive()
    with pytest.raises(errors.QueueNotFoundError):
        q.stats()


def test_get_queue_returns_a_handle_on_the_same_queue(broker: Broker) -> None:
    broker.create_queue("q").send(b"m")
    q = broker.get_queue("q")
    assert q.name == "q"
    assert bodies(q.receive()) == [b"m"]


def test_list_queues_treats_wildcards_in_the_prefix_literally(broker: Broker) -> None:
    names = ["a_b", "axb", "ab", "a-b", "b_", "bb"]
    for name in names:
        broker.create_queue(name)
    assert broker.list_queues() == sorted(names)
    assert broker.list_queues("a") == sorted(["a_b", "axb", "ab", "a-b"])
    assert broker.list_queues("a_") == ["a_b"]
    assert broker.list_queues("b_") == ["b_"]
    assert broker.list_queues("a%") == []
    assert broker.list_queues("%") == []
    assert broker.list_queues("_") == []
    assert broker.list_queues("a\\") == []
    assert broker.list_queues("axb") == ["axb"]
    assert broker.list_queues("axbc") == []


def test_list_queues_prefix_is_case_sensitive(broker: Broker) -> None:
    # Queue names are case-sensitive ("Jobs" and "jobs" are two queues), so prefixes are.
    for name in ["Jobs", "jobs", "JOBS-2"]:
        broker.create_queue(name)
    assert broker.list_queues() == ["JOBS-2", "Jobs", "jobs"]
    assert broker.list_queues("j") == ["jobs"]
    assert broker.list_queues("J") == ["JOBS-2", "Jobs"]
    assert broker.list_queues("JOBS") == ["JOBS-2"]


def test_delete_queue_removes_its_messages(broker: Broker) -> None:
    q = broker.create_queue("q")
    for i in range(5):
        q.send(b"m%d" % i)
    q.receive()
    broker.delete_queue("q")
    assert broker.list_queues() == []
    q = broker.create_queue("q")
    s = q.stats()
    assert (s.sent, s.received, *counts(s)) == (0, 0, 0, 0, 0)
    assert q.receive(max_messages=10) == []


def test_set_attributes_takes_effect_on_the_next_request(broker: Broker,
                                                         clock: ManualClock) -> None:
    q = broker.create_queue("q", visibility_timeout=30)
    changed = q.set_attributes(visibility_timeout=5)
    assert changed.visibility_timeout == 5
    assert changed.retention_seconds == 4 * 24 * 60 * 60  # untouched
    assert q.attributes == changed
    q.send(b"m")
    q.receive()
    clock.advance(5)
    assert bodies(q.receive()) == [b"m"]

    assert broker.set_queue_attributes("q", delay_seconds=20).delay_seconds == 20
    q.send(b"delayed")
    assert q.stats().delayed == 1
    # Only messages sent afterwards are affected.
    clock.advance(5)
    assert bodies(q.receive()) == [b"m"]
    # The queue's configuration now differs from what it was created with.
    with pytest.raises(errors.QueueExistsError):
        broker.create_queue("q", visibility_timeout=30)


def test_fifo_attribute_cannot_be_changed(broker: Broker, fifo: Queue) -> None:
    q = seeded(broker, "q")
    with pytest.raises(errors.InvalidAttributeError):
        q.set_attributes(fifo=True)
    with pytest.raises(errors.InvalidAttributeError):
        fifo.set_attributes(fifo=False)
    assert (q.fifo, fifo.fifo) == (False, True)


# --- 11. persistence ---------------------------------------------------------------------


def test_a_body_md5_given_at_send_comes_back_with_the_message(tmp_path: Path,
                                                              clock: ManualClock) -> None:
    """Stored in the SEND record (docs/FORMAT.md, flag 0x80) and returned on every read
    path: a record with no other field, one with a sender or an explicit id beside it (the
    extension's light decoder), one with attributes (the full decoder), after a reopen,
    and after a move to the dead-letter queue. A send without it returns None."""
    path = tmp_path / "data"
    entries = {
        b"plain": SendEntry(b"plain", body_md5=hashlib.md5(b"plain").digest()),
        b"light": SendEntry(b"light", sender="AIDA", message_id=os.urandom(16),
                            body_md5=hashlib.md5(b"light").digest()),
        b"full": SendEntry(b"full", attributes={"k": MessageAttribute("String", "v")},
                           body_md5=hashlib.md5(b"full").digest()),
        b"none": SendEntry(b"none"),
    }
    want = {body: entry.body_md5 for body, entry in entries.items()}

    def received(q: Queue) -> dict[bytes, bytes | None]:
        got = q.receive(max_messages=10, visibility_timeout=0)
        return {m.body: m.body_md5 for m in got}

    with Broker(path, fsync="always", clock=clock) as broker:
        broker.create_queue("dlq")
        q = broker.create_queue("q", dead_letter_queue="dlq", max_receive_count=2)
        assert all(not isinstance(r, Exception) for r in q.send_batch(list(entries.values())))
        assert received(q) == want
    with Broker(path, fsync="always", clock=clock) as broker:
        q = broker.get_queue("q")
        assert received(q) == want  # read from the log after the reopen
        assert received(q) == {}  # received twice: moved
        assert received(broker.get_queue("dlq")) == want



def test_state_survives_close_and_reopen(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "data"
    attributes = {"k": ("String", "v"), "b": ("Binary", b"\x00\x01"), "n": ("Number", "7")}
    with Broker(path, fsync="always", clock=clock) as broker:
        q = broker.create_queue("q", visibility_timeout=60)
        sent = {body: q.send(body, attributes=attributes) for body in (b"one", b"two", b"three")}
        leased = {m.body: m for m in q.receive(max_messages=10)}
        assert set(leased) == {b"one", b"two", b"three"}
        q.change_visibility(leased[b"two"].receipt, 0)  # back to visible, counted once
        q.delete(leased[b"three"].receipt)
        q.set_attributes(visibility_timeout=45)

        f = broker.create_queue("f.fifo", fifo=True, visibility_timeout=600)
        f.send(b"a1", group_id="g", dedup_id="d1")
        f.send(b"a2", group_id="g", dedup_id="d2")
        [a1] = f.receive()  # group g is now locked
        digests = q.digest(), f.digest()
        stats = q.stats(), f.stats()

    with Broker(path, fsync="always", clock=clock) as broker:
        q = broker.get_queue("q")
        f = broker.get_queue("f.fifo")
        assert (q.digest(), f.digest()) == digests
        assert (q.stats(), f.stats()) == stats
        assert q.attributes.visibility_timeout == 45
        assert f.fifo is True

        [two] = q.receive(max_messages=10)  # "one" is still leased
        assert (two.body, two.receive_count, two.message_id) == (b"two", 2,
                                                                 sent[b"two"].message_id)
        assert two.attributes == {k: MessageAttribute(*v) for k, v in attributes.items()}
        assert two.first_received_at == leased[b"two"].first_received_at
        # The lease taken before the restart is still named by its receipt.
        q.change_visibility(leased[b"one"].receipt, 0)
        [one] = q.receive()
        assert (one.body, one.receive_count) == (b"one", 2)
        q.delete(one.receipt)
        clock.advance(45)  # two was leased with the changed timeout
        assert bodies(q.receive()) == [b"two"]

        assert f.receive() == []  # still locked by a1's lease
        dup = f.send(b"again", group_id="g", dedup_id="d1")
        assert dup.duplicate is True
        f.delete(a1.receipt)
        [a2] = f.receive()
        assert a2.body == b"a2"


def test_damage_to_records_the_snapshot_covers_is_refused_not_cut(
        tmp_path: Path, clock: ManualClock) -> None:
    # The last batch of the active segment would pass for a torn tail, but the snapshot
    # says it was fsync'd: the damage is refused, the file left as it is, and the other
    # queues go on.
    path = tmp_path / "data"
    with Broker(path, fsync="always", clock=clock) as broker:
        q = broker.create_queue("q")
        for i in range(5):
            q.send(f"m{i}".encode())
        broker.create_queue("other").send(b"fine")
        uid = broker.catalog.get("q").uid
    # Closing took a snapshot at the end of the log; damage the last batch's body.
    [segment] = (path / "queues" / f"{uid:016x}" / "log").glob(f"*{log_format.LOG_SUFFIX}")
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(data)
    with Broker(path, fsync="always", clock=clock) as broker:
        with pytest.raises(errors.QueueUnavailableError, match="made durable") as caught:
            broker.get_queue("q").receive(max_messages=10)
        cause = caught.value.__cause__
        assert isinstance(cause, errors.CorruptSegmentError)
        assert cause.path == str(segment)
        assert bodies(broker.get_queue("other").receive()) == [b"fine"]
    assert segment.read_bytes() == data


def test_digest_is_equal_after_reopen_with_fsync_always(tmp_path: Path,
                                                         clock: ManualClock) -> None:
    path = tmp_path / "data"
    with Broker(path, fsync="always", clock=clock) as broker:
        q = broker.create_queue("q", retention_seconds=60)
        for i in range(30):
            q.send(b"m%d" % i, delay_seconds=i % 3)
            clock.advance(1)
        for m in q.receive(max_messages=5):
            q.delete(m.receipt)
        q.receive(max_messages=5)
        clock.advance(35)
        q.stats()  # runs retention: the oldest messages expire
        digest = q.digest()
        expected = q.stats()
    with Broker(path, fsync="always", clock=clock) as broker:
        q = broker.get_queue("q")
        assert q.digest() == digest
        assert q.stats() == expected


def test_messages_survive_a_clean_close_with_fsync_never(tmp_path: Path,
                                                          clock: ManualClock) -> None:
    path = tmp_path / "data"
    with Broker(path, fsync="never", clock=clock) as broker:
        q = broker.create_queue("q")
        q.send_batch([SendEntry(b"m%d" % i) for i in range(100)])
    with Broker(path, fsync="never", clock=clock) as broker:
        q = broker.get_queue("q")
        assert sorted(drain(q)) == sorted(b"m%d" % i for i in range(100))


def test_dead_letter_configuration_survives_reopen(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "data"
    with Broker(path, fsync="never", clock=clock) as broker:
        broker.create_queue("dlq")
        src = broker.create_queue("src", dead_letter_queue="dlq", max_receive_count=1)
        src.send(b"m")
        src.receive()
    clock.advance(30)
    with Broker(path, fsync="never", clock=clock) as broker:
        assert broker.dead_letter_sources("dlq") == ["src"]
        assert broker.get_queue("src").receive() == []
        assert bodies(broker.get_queue("dlq").receive()) == [b"m"]


def test_a_data_directory_has_one_broker_at_a_time(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "data"
    with Broker(path, fsync="never", clock=clock) as broker:
        broker.create_queue("q").send(b"m")
        with pytest.raises(errors.DataDirectoryLockedError):
            Broker(path, fsync="never", clock=clock)
        with pytest.raises(errors.DataDirectoryLockedError):
            AsyncBroker(str(path), fsync="never", clock=clock)
        # The refused broker left the running one alone.
        assert broker.list_queues() == ["q"]
    with Broker(path, fsync="never", clock=clock) as broker:
        assert bodies(broker.get_queue("q").receive()) == [b"m"]


def test_bad_fsync_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.EngineError):
        Broker(tmp_path / "data", fsync="sometimes")


# --- 12. many queues -------------------------------------------------------------------------


def test_many_queues_keep_open_files_bounded(tmp_path: Path, clock: ManualClock) -> None:
    # 16 times open_queues_max, and more than the 500 descriptors the bound allows.
    QUEUES = 800
    with Broker(tmp_path / "data", fsync="never", clock=clock, open_queues_max=50) as broker:
        base = open_fds()
        peak = 0
        handles = []
        for i in range(QUEUES):
            q = broker.create_queue(f"q{i:04d}")
            q.send(b"m%d" % i)
            handles.append(q)
            if i % 50 == 0:
                peak = max(peak, open_fds() - base)
        for i, q in enumerate(handles):
            got = q.receive()
            assert bodies(got) == [b"m%d" % i]
            q.delete(got[0].receipt)
            if i % 50 == 0:
                peak = max(peak, open_fds() - base)
        peak = max(peak, open_fds() - base)
        assert len(broker.list_queues()) == QUEUES
        assert sum(q.stats().deleted for q in handles[:100]) == 100
        assert peak < 500, f"{peak} descriptors open for {QUEUES} queues with open_queues_max=50"


def test_idle_closed_queue_reopens_behind_an_old_handle(tmp_path: Path,
                                                         clock: ManualClock) -> None:
    with Broker(tmp_path / "data", fsync="never", clock=clock, open_queues_max=1,
                maintenance_interval_ms=100) as broker:
        base = open_fds()
        handles = [broker.create_queue(f"q{i}") for i in range(6)]
        for i, q in enumerate(handles):
            q.send(b"m%d" % i)
        time.sleep(IDLE_BEFORE_CLOSE_S + 1.5)
        after_idle = open_fds() - base
        # The handles must work whether or not their queue was closed meanwhile.
        for i, q in enumerate(handles):
            [m] = q.receive()
            assert m.body == b"m%d" % i
            q.delete(m.receipt)
            assert q.stats().deleted == 1
        # Only open_queues_max queues (about two descriptors each) may stay open when idle.
        assert after_idle <= 2, f"{after_idle} descriptors still open after idling"


# --- 13. use after close and the error hierarchy -------------------------------------------

QUEUE_CALLS: dict[str, Callable[[Queue, str], Any]] = {
    "attributes": lambda q, r: q.attributes,
    "fifo": lambda q, r: q.fifo,
    "set_attributes": lambda q, r: q.set_attributes(visibility_timeout=5),
    "send": lambda q, r: q.send(b"x"),
    "send_batch": lambda q, r: q.send_batch([SendEntry(b"x")]),
    "receive": lambda q, r: q.receive(),
    "receive_waiting": lambda q, r: q.receive(wait_seconds=1),
    "delete": lambda q, r: q.delete(r),
    "delete_batch": lambda q, r: q.delete_batch([r]),
    "change_visibility": lambda q, r: q.change_visibility(r, 0),
    "change_visibility_batch": lambda q, r: q.change_visibility_batch([(r, 0)]),
    "purge": lambda q, r: q.purge(),
    "stats": lambda q, r: q.stats(),
    "digest": lambda q, r: q.digest(),
}


@pytest.mark.parametrize("method", sorted(QUEUE_CALLS))
def test_queue_refuses_use_after_the_broker_is_closed(tmp_path: Path, clock: ManualClock,
                                                      method: str) -> None:
    broker = Broker(tmp_path / "data", fsync="never", clock=clock)
    q = broker.create_queue("q")
    q.send(b"m")
    [m] = q.receive()
    broker.close()
    start = time.monotonic()
    with pytest.raises(CLOSED_ERRORS):
        QUEUE_CALLS[method](q, m.receipt)
    assert time.monotonic() - start < PROMPT_S
    # Nothing was changed on disk by the refused call.
    with Broker(tmp_path / "data", fsync="never", clock=clock) as reopened:
        s = reopened.get_queue("q").stats()
        assert (s.sent, s.deleted, s.purged, *counts(s)) == (1, 0, 0, 0, 1, 0)
        assert reopened.get_queue("q").attributes.visibility_timeout == 30


BROKER_CALLS: dict[str, Callable[[Broker], Any]] = {
    "create_queue": lambda b: b.create_queue("new"),
    "create_existing": lambda b: b.create_queue("q"),
    "get_queue": lambda b: b.get_queue("q"),
    "list_queues": lambda b: b.list_queues(),
    "delete_queue": lambda b: b.delete_queue("q"),
    "set_queue_attributes": lambda b: b.set_queue_attributes("q", visibility_timeout=5),
    "dead_letter_sources": lambda b: b.dead_letter_sources("q"),
}


@pytest.mark.parametrize("method", sorted(BROKER_CALLS))
def test_broker_refuses_use_after_close(tmp_path: Path, clock: ManualClock,
                                        method: str) -> None:
    broker = Broker(tmp_path / "data", fsync="never", clock=clock)
    broker.create_queue("q")
    broker.close()
    broker.close()  # idempotent
    with pytest.raises(CLOSED_ERRORS):
        BROKER_CALLS[method](broker)
    with Broker(tmp_path / "data", fsync="never", clock=clock) as reopened:
        assert reopened.list_queues() == ["q"]


ASYNC_QUEUE_CALLS: dict[str, Callable[[AsyncQueue, str], Any]] = {
    "attributes": lambda q, r: q.attributes(),
    "set_attributes": lambda q, r: q.set_attributes(visibility_timeout=5),
    "send": lambda q, r: q.send(b"x"),
    "send_batch": lambda q, r: q.send_batch([SendEntry(b"x")]),
    "receive": lambda q, r: q.receive(),
    "receive_waiting": lambda q, r: q.receive(wait_seconds=1),
    "delete": lambda q, r: q.delete(r),
    "delete_batch": lambda q, r: q.delete_batch([r]),
    "change_visibility": lambda q, r: q.change_visibility(r, 0),
    "change_visibility_batch": lambda q, r: q.change_visibility_batch([(r, 0)]),
    "purge": lambda q, r: q.purge(),
    "stats": lambda q, r: q.stats(),
    "digest": lambda q, r: q.digest(),
}


@pytest.mark.parametrize("method", sorted(ASYNC_QUEUE_CALLS))
def test_async_queue_refuses_use_after_the_broker_is_closed(tmp_path: Path,
                                                            clock: ManualClock,
                                                            method: str) -> None:
    async def main() -> None:
        broker = AsyncBroker(str(tmp_path / "data"), fsync="never", clock=clock)
        q = await broker.create_queue("q")
        await q.send(b"m")
        [m] = await q.receive()
        await broker.close()
        with pytest.raises(CLOSED_ERRORS):
            await ASYNC_QUEUE_CALLS[method](q, m.receipt)

    asyncio.run(main())


ASYNC_BROKER_CALLS: dict[str, Callable[[AsyncBroker], Any]] = {
    "create_queue": lambda b: b.create_queue("new"),
    "get_queue": lambda b: b.get_queue("q"),
    "list_queues": lambda b: b.list_queues(),
    "delete_queue": lambda b: b.delete_queue("q"),
    "set_queue_attributes": lambda b: b.set_queue_attributes("q", visibility_timeout=5),
}


@pytest.mark.parametrize("method", sorted(ASYNC_BROKER_CALLS))
def test_async_broker_refuses_use_after_close(tmp_path: Path, clock: ManualClock,
                                              method: str) -> None:
    async def main() -> None:
        broker = AsyncBroker(str(tmp_path / "data"), fsync="never", clock=clock)
        await broker.create_queue("q")
        await broker.close()
        await broker.close()
        with pytest.raises(CLOSED_ERRORS):
            await ASYNC_BROKER_CALLS[method](broker)

    asyncio.run(main())


MISUSES: dict[str, Callable[[Broker, Queue, str], Any]] = {
    "queue-name-not-str": lambda b, q, r: b.create_queue(None),  # type: ignore[arg-type]
    "misspelt-attribute": lambda b, q, r: b.create_queue("x", visiblity_timeout=5),
    "unknown-attribute-change": lambda b, q, r: b.set_queue_attributes("q", colour="red"),
    "fifo-change": lambda b, q, r: q.set_attributes(fifo=True),
    "body-str": lambda b, q, r: q.send("text"),  # type: ignore[arg-type]
    "attributes-not-pairs": lambda b, q, r: q.send(b"x", attributes={"a": "v"}),
    "max-messages-str": lambda b, q, r: q.receive(max_messages="1"),  # type: ignore[arg-type]
    "too-many-messages": lambda b, q, r: q.receive(max_messages=1001),
    "receipt-none": lambda b, q, r: q.delete(None),  # type: ignore[arg-type]
    "visibility-none": lambda b, q, r: q.change_visibility(r, None),  # type: ignore[arg-type]
    "visibility-float": lambda b, q, r: q.change_visibility(r, 1.5),  # type: ignore[arg-type]
    "group-id-int": lambda b, q, r: q.send(b"x", group_id=5),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("misuse", sorted(MISUSES))
def test_misuse_raises_engine_errors(broker: Broker, misuse: str) -> None:
    q = broker.create_queue("q")
    q.send(b"m")
    [m] = q.receive()
    before = state(q), q.attributes
    with pytest.raises(errors.EngineError):
        MISUSES[misuse](broker, q, m.receipt)
    assert (state(q), q.attributes) == before
    assert broker.list_queues() == ["q"]


# --- asyncio twin --------------------------------------------------------------------------


def test_async_queue_has_the_same_semantics(tmp_path: Path, clock: ManualClock) -> None:
    async def main() -> None:
        async with AsyncBroker(str(tmp_path / "data"), fsync="never", clock=clock) as broker:
            q = await broker.create_queue("q", visibility_timeout=30)
            assert await broker.list_queues() == ["q"]
            assert (await broker.get_queue("q")).name == "q"
            sent = await q.send(b"one", attributes={"k": ("String", "v")})
            results = await q.send_batch([SendEntry(b"two"), SendEntry(b"x" * (2 << 20))])
            assert isinstance(results[0], SendResult)
            assert isinstance(results[1], errors.MessageTooLargeError)
            got = {m.body: m for m in await q.receive(max_messages=10)}
            assert set(got) == {b"one", b"two"}
            assert got[b"one"].message_id == sent.message_id
            assert got[b"one"].attributes == {"k": MessageAttribute("String", "v")}
            assert await q.receive() == []

            await q.change_visibility(got[b"one"].receipt, 0)
            [again] = await q.receive()
            assert (again.body, again.receive_count) == (b"one", 2)
            with pytest.raises(errors.ReceiptInvalidError):
                await q.delete(got[b"one"].receipt)
            assert await q.change_visibility_batch([(again.receipt, 60)]) == [None]
            results = await q.delete_batch([again.receipt, "junk"])
            assert results[0] is None
            assert isinstance(results[1], errors.ReceiptInvalidError)
            await q.delete(got[b"two"].receipt)
            s = await q.stats()
            assert (s.deleted, *counts(s)) == (2, 0, 0, 0)

            changed = await q.set_attributes(visibility_timeout=5)
            assert changed.visibility_timeout == 5
            assert (await q.attributes()).visibility_timeout == 5
            await q.send(b"three")
            await q.receive()
            clock.advance(5)
            assert bodies(await q.receive()) == [b"three"]
            await q.purge()
            assert (await q.stats()).purged == 1
            assert len(await q.digest()) > 0

            with pytest.raises(errors.QueueExistsError):
                await broker.create_queue("q", visibility_timeout=30)
            await broker.delete_queue("q")
            with pytest.raises(errors.QueueNotFoundError):
                await broker.get_queue("q")
            assert await broker.list_queues() == []

    asyncio.run(main())


def test_async_fifo_keeps_group_order(tmp_path: Path, clock: ManualClock) -> None:
    async def main() -> list[bytes]:
        async with AsyncBroker(str(tmp_path / "data"), fsync="always", clock=clock) as broker:
            q = await broker.create_queue("a.fifo", fifo=True, content_based_dedup=True)
            for i in range(5):
                await q.send(b"m%d" % i, group_id="g")
            assert (await q.send(b"m0", group_id="g")).duplicate is True
            out = []
            while got := await q.receive():
                out += bodies(got)
                await q.delete(got[0].receipt)
            return out

    assert asyncio.run(main()) == [b"m%d" % i for i in range(5)]


# --- concurrency -----------------------------------------------------------------------------


def test_concurrent_receivers_never_share_a_message(broker: Broker) -> None:
    q = broker.create_queue("q", visibility_timeout=600)
    q.send_batch([SendEntry(b"m%d" % i) for i in range(300)])
    seen: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        handle = broker.get_queue("q")
        while got := handle.receive(max_messages=7):
            with lock:
                seen.extend(m.message_id for m in got)
            handle.delete_batch([m.receipt for m in got])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 300
    assert len(set(seen)) == 300
    s = q.stats()
    assert (s.deleted, s.received, *counts(s)) == (300, 300, 0, 0, 0)


def test_namespaces_keep_same_named_queues_apart(broker: Broker) -> None:
    # "owner/name": one broker serves several owners (SQS accounts) that may share names.
    first = broker.create_queue("111111111111/jobs")
    second = broker.create_queue("222222222222/jobs")
    first.send(b"one")
    assert second.receive() == []
    assert [m.body for m in first.receive()] == [b"one"]
    assert broker.list_queues("111111111111/") == ["111111111111/jobs"]
    with pytest.raises(errors.InvalidQueueNameError):
        broker.create_queue("a" * 65 + "/jobs")
    with pytest.raises(errors.InvalidQueueNameError):
        broker.create_queue("111111111111/" + "x" * 81)


def test_sender_and_system_attributes_travel_with_the_message(broker: Broker) -> None:
    q = broker.create_queue("q")
    q.send_batch([SendEntry(b"with", sender="AIDAEXAMPLE",
                            system_attributes={"AWSTraceHeader": ("String", "Root=1-abc")})])
    q.send(b"plain")
    got = {m.body: m for m in q.receive(max_messages=2)}
    assert got[b"with"].sender == "AIDAEXAMPLE"
    assert got[b"with"].system_attributes == {"AWSTraceHeader": ("String", "Root=1-abc")}
    assert (got[b"plain"].sender, got[b"plain"].system_attributes) == (None, {})


def test_senders_are_checked_on_every_path(broker: Broker) -> None:
    # Plain entries with a sender take the extension's fast path, which checks a sender
    # once per batch when the entries share it: a bad one must still be refused, alone.
    q = broker.create_queue("q")
    shared = "s" * 256
    results = q.send_batch([SendEntry(b"a", sender=shared), SendEntry(b"b", sender=shared),
                            SendEntry(b"c", sender="s" * 257), SendEntry(b"d", sender="a b"),
                            SendEntry(b"e", sender=""), SendEntry(b"f", sender=7),  # type: ignore[arg-type]
                            SendEntry(b"g", sender=shared, message_id=b"x" * 16, overhead=3)])
    refused = [type(r).__name__ for r in results if isinstance(r, errors.EngineError)]
    assert refused == ["InvalidParameterError"] * 4
    got = {m.body: m.sender for m in q.receive(max_messages=10)}
    assert got == {b"a": shared, b"b": shared, b"g": shared}


def test_a_dead_lettered_message_names_its_source_queue(broker: Broker, clock: ManualClock
                                                        ) -> None:
    broker.create_queue("dlq")
    src = broker.create_queue("src", dead_letter_queue="dlq", max_receive_count=1,
                              visibility_timeout=5)
    src.send(b"poison", sender="s1")
    assert src.receive()[0].dead_letter_source is None
    clock.advance(6)
    assert src.receive() == []  # moved instead of delivered a second time
    [moved] = broker.get_queue("dlq").receive()
    assert (moved.body, moved.dead_letter_source, moved.sender) == (b"poison", "src", "s1")


class _SteppingDown:
    """A Leadership whose queue steps down while the broker opens it (the cluster's loop
    does that while the broker's thread opens the queue), then leads it again."""

    def __init__(self) -> None:
        self.refuse = True
        self.refused: list[Any] = []

    def check(self, name: str) -> None:
        pass

    def opened(self, core: Any) -> None:
        if self.refuse:
            self.refused.append(core)
            raise errors.QueueUnavailableError(core.name, "stepped down")

    def pinned(self, name: str) -> bool:
        return False


def test_a_queue_no_longer_led_when_opened_is_closed_not_leaked(tmp_path: Path) -> None:
    leadership = _SteppingDown()
    with Broker(tmp_path / "data", fsync="never", leadership=leadership) as broker:
        broker.adopt_queue("led", 7, {}, start_epoch=1)
        before = open_fds()
        with pytest.raises(errors.QueueUnavailableError):
            broker._core_of("led")
        assert broker.open_core("led") is None
        # Closed, its log flushed and released at once; before, it was left open, owned
        # by nobody, for the garbage collector.
        assert [core.closed for core in leadership.refused] == [True]
        assert open_fds() == before
        leadership.refuse = False
        assert broker._core_of("led").name == "led"
