"""Full queue cycles (send, receive, delete) against peers in the same run.

One measured call handles 10 messages: send a batch of 10, receive 10, delete the 10.
Peers do the nearest equivalent: persist-queue's SQLiteAckQueue puts, gets and acks each
message; diskcache's Deque appends and pops (no acknowledgement); queuelib's
FifoDiskQueue pushes and pops (no acknowledgement: a ceiling, not a peer).
"""

from __future__ import annotations

import os

from diskcache import Deque
from persistqueue import SQLiteAckQueue
from queuelib import FifoDiskQueue

from engine import Broker, SendEntry

BATCH = 10
BODY = b"x" * 100
ROUNDS = 2000


def engine_cycle(benchmark, scratch: str, fsync: str, rounds: int) -> None:
    with Broker(scratch, fsync=fsync) as broker:
        queue = broker.create_queue("bench")
        entries = [SendEntry(BODY)] * BATCH

        def cycle() -> None:
            queue.send_batch(entries)
            messages = queue.receive(max_messages=BATCH)
            queue.delete_batch([m.receipt for m in messages])

        benchmark.extra_info["records"] = BATCH
        benchmark.pedantic(cycle, rounds=rounds, warmup_rounds=20)


def test_engine_cycle_never(benchmark, scratch: str) -> None:
    """Broker queue, fsync="never": send_batch 10, receive 10, delete_batch 10."""
    engine_cycle(benchmark, scratch, "never", ROUNDS * 5)


def test_engine_cycle_always(benchmark, scratch: str) -> None:
    """Broker queue, fsync="always": the send and the delete each wait for an fdatasync."""
    engine_cycle(benchmark, scratch, "always", 300)


def test_baseline_fdatasync_rate(benchmark, scratch: str) -> None:
    """This disk's fdatasync rate: a 1 KiB write and an fdatasync per call.

    A durable cycle needs two (send and delete), so the bound on messages/s is
    rate * 10 / 2; docs/PERFORMANCE.md reports the engine against that bound.
    """
    fd = os.open(os.path.join(scratch, "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    chunk = b"y" * 1024

    def sync() -> None:
        os.write(fd, chunk)
        os.fdatasync(fd)

    benchmark.extra_info["records"] = 1
    benchmark.pedantic(sync, rounds=600, warmup_rounds=20)
    os.close(fd)


def test_peer_persistqueue_ack(benchmark, scratch: str) -> None:
    """persist-queue SQLiteAckQueue (defaults: a commit per put and per ack)."""
    queue = SQLiteAckQueue(os.path.join(scratch, "pq"))

    def cycle() -> None:
        for _ in range(BATCH):
            queue.put(BODY)
        for _ in range(BATCH):
            queue.ack(queue.get(block=False))

    benchmark.extra_info["records"] = BATCH
    benchmark.pedantic(cycle, rounds=200, warmup_rounds=5)


def test_peer_diskcache_deque(benchmark, scratch: str) -> None:
    """diskcache Deque: append 10, popleft 10 (no acknowledgement)."""
    queue = Deque(directory=os.path.join(scratch, "dc"))

    def cycle() -> None:
        for _ in range(BATCH):
            queue.append(BODY)
        for _ in range(BATCH):
            queue.popleft()

    benchmark.extra_info["records"] = BATCH
    benchmark.pedantic(cycle, rounds=ROUNDS, warmup_rounds=20)


def test_peer_queuelib_fifo(benchmark, scratch: str) -> None:
    """queuelib FifoDiskQueue: push 10, pop 10 (no acknowledgement: a ceiling)."""
    queue = FifoDiskQueue(os.path.join(scratch, "ql"))

    def cycle() -> None:
        for _ in range(BATCH):
            queue.push(BODY)
        for _ in range(BATCH):
            queue.pop()

    benchmark.extra_info["records"] = BATCH
    benchmark.pedantic(cycle, rounds=ROUNDS, warmup_rounds=20)
    queue.close()
