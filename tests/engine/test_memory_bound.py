"""The broker's memory bound (engine/memory.py): a producer with no consumer is refused
at the bound rather than growing the process, loses nothing it was told was sent, and is
taken again once consumers drain."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Broker, ManualClock, SendEntry
from engine.errors import MemoryFullError

BATCH = [SendEntry(b"x" * 100) for _ in range(10)]


def fill(queue: object, sent: list[str]) -> MemoryFullError:
    """Send batches of 10 until refused; collect the ids acknowledged."""
    for _ in range(100_000):
        try:
            results = queue.send_batch(BATCH)  # type: ignore[attr-defined]
        except MemoryFullError as exc:
            return exc
        sent += [r.message_id for r in results]
    raise AssertionError("never refused")


def test_sends_are_refused_at_the_bound_and_taken_again_after_a_drain(tmp_path: Path) -> None:
    limit = 1 << 20
    with Broker(tmp_path / "data", fsync="never", clock=ManualClock(),
                memory_max=limit) as broker:
        standard = broker.create_queue("q")
        fifo = broker.create_queue("f.fifo", fifo=True)
        sent: list[str] = []
        refused = fill(standard, sent)
        assert refused.limit == limit and refused.used >= limit and refused.retry_after_s > 0
        # Past the bound by no more than one batch's records (and a chunk being filled).
        assert limit <= broker.memory.used <= limit + 16 * 1024
        assert 28_000 <= len(sent) <= 34_000  # about 32 bytes a message
        # The bound is the broker's, not the queue's: another queue is refused too.
        with pytest.raises(MemoryFullError):
            fifo.send(b"m", group_id="g", dedup_id="d")
        # A refused send changed nothing; every acknowledged one is there.
        assert standard.stats().visible == len(sent)
        received: list[str] = []
        while len(received) < len(sent) // 2:
            got = standard.receive(max_messages=10)
            standard.delete_batch([m.receipt for m in got])
            received += [m.message_id for m in got]
        # The half left, and up to 4,096 timers of deleted messages not yet dropped.
        assert broker.memory.used < limit // 2 + 160 * 1024
        standard.send(b"again")  # taken again
        fifo.send(b"m", group_id="g", dedup_id="d")
        while got := standard.receive(max_messages=10):
            standard.delete_batch([m.receipt for m in got])
            received += [m.message_id for m in got]
        assert set(sent) < set(received) and len(received) == len(set(received)) == len(sent) + 1


def test_a_closed_queue_gives_its_bytes_back(tmp_path: Path) -> None:
    with Broker(tmp_path / "data", fsync="never", clock=ManualClock(),
                memory_max=1 << 30) as broker:
        queue = broker.create_queue("q")
        for _ in range(1_000):
            queue.send_batch(BATCH)
        held = broker.memory.used
        assert 10_000 * 32 <= held <= 10_000 * 36
        broker.close_queue("q")
        assert broker.memory.used == 0
        # Reopened (from its snapshot), the queue's state is counted again.
        assert queue.stats().visible == 10_000
        assert abs(broker.memory.used - held) <= 16 * 1024


def test_an_aged_deduplication_window_is_let_go_with_nothing_sent(tmp_path: Path) -> None:
    """A FIFO producer and consumer that keep up until the bound: the queue is empty, but
    its deduplication window holds every id for five minutes. Once they age out, the
    maintenance pass lets them go (an empty EXPIRE record carries the time), though no
    send can be written to do it."""
    clock = ManualClock()
    limit = 1 << 20
    with Broker(tmp_path / "data", fsync="never", clock=clock, memory_max=limit,
                maintenance_interval_ms=3_600_000) as broker:
        fifo = broker.create_queue("f.fifo", fifo=True)
        other = broker.create_queue("q")
        n = 0
        with pytest.raises(MemoryFullError):
            for n in range(100_000):
                fifo.send(b"m", group_id="g", dedup_id=f"d{n}")
                [got] = fifo.receive()
                fifo.delete(got.receipt)
        with pytest.raises(MemoryFullError):
            other.send(b"m")
        assert n > 1_000 and fifo.stats().visible == 0
        clock.advance(5 * 60 + 1)
        broker._maintain()
        assert broker.memory.used < limit // 8
        other.send(b"taken again")


def test_dead_letter_moves_wait_at_the_bound(tmp_path: Path) -> None:
    """A moved message costs the dead-letter queue more than it frees in its queue: at
    the bound the move waits (the message is delivered again meanwhile), so a flood of
    poison messages cannot grow memory past the bound."""
    clock = ManualClock()
    limit = 1 << 20
    with Broker(tmp_path / "data", fsync="never", clock=clock, memory_max=limit) as broker:
        broker.create_queue("dlq")
        source = broker.create_queue("src", visibility_timeout=30, dead_letter_queue="dlq",
                                     max_receive_count=1)
        sent = [r.message_id for _ in range(2_000) for r in source.send_batch(BATCH)]
        assert broker.memory.used < limit  # 20,000 plain messages: about 650 KiB
        redelivered = 0
        for _ in range(len(sent) // 10 * 3):
            got = source.receive(max_messages=10)  # first receives; then moves, or not
            redelivered += sum(m.receive_count > 1 for m in got)
            clock.advance(31)  # every lease ends: the consumer failed them all
        moved = broker.get_queue("dlq").stats().visible
        left = source.stats()
        assert 0 < moved < len(sent)  # moves went on until the bound, and then waited
        assert broker.memory.used <= limit + 64 * 1024
        assert redelivered > 0  # delivered again rather than moved, meanwhile
        assert moved + left.visible + left.in_flight == len(sent)  # nothing lost
