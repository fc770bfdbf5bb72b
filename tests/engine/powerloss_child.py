"""Sends, receives and deletes on queue "power" from several threads until it is killed.

Run as ``python powerloss_child.py DATA_DIR RUN SEED FSYNC [MODE]``. MODE ``threads``
(the default) calls the blocking API from threads; ``async`` runs the same producers and
consumers as coroutines on one event loop (uvloop when installed, as the server does), whose
acknowledgements come from the group commit's native sync threads. Lines on stdout, each
written whole under one lock and flushed:

- ``open`` once the broker and the queue are open, before any operation;
- ``S <body>`` for every message a send_batch call acknowledged, after it returned;
- ``R <body> <t>`` for every message a receive returned (t: the monotonic time at which
  that receive was called);
- ``X <body>`` for every message about to be deleted, before the delete_batch call;
- ``D <body> <t>`` for every message that delete_batch acknowledged (t: after it returned;
  a stale receipt's refusal is no acknowledgement, and no failure);
- ``E <thread> <error>`` when an operation fails; that thread stops. Before a power loss
  that is a failure; after one, it is what every thread must do.

Bodies are ``<run>.<thread>-<n>``. The main thread waits to be killed.

CONVEYOR_TEST_NO_FSYNC=1 replaces os.fsync and os.fdatasync with functions that do
nothing, before the engine is imported: the negative control of a missing sync.
CONVEYOR_TEST_NO_NATIVE_FSYNC=1 makes the native sync threads report syncs they never made,
and leaves os.fdatasync alone: the control that async acknowledgements come from them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine import Broker, Message
    from engine.errors import EngineError

VISIBILITY_S = 2
PRODUCERS = 2
CONSUMERS = 2
# Small, so that snapshots, segment rolls and segment deletions happen within a run and a
# power loss can land in any of them.
SNAPSHOT_BYTES = 16 * 1024
SEGMENT_BYTES = 32 * 1024

_out = threading.Lock()


def say(line: str) -> None:
    with _out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# What both kinds of child do around each call, and say of it (the lines above).


def _bodies(run: int, number: int, batch: int, rng: random.Random) -> list[str]:
    return [f"{run}.p{number}-{batch}.{n}" for n in range(rng.randint(1, 10))]


def _sent(bodies: list[str], results: Sequence[object]) -> None:
    from engine.errors import EngineError

    failed = [r for r in results if isinstance(r, EngineError)]
    if failed:
        raise failed[0]
    say("\n".join(f"S {body}" for body in bodies))


def _received(received: list[Message], started: float, rng: random.Random) -> list[Message]:
    """Say what came; the messages to delete (X said of them)."""
    if received:
        say("\n".join(f"R {m.body.decode()} {started:.6f}" for m in received))
    # Some are left for their lease to run out, to be delivered again.
    doomed = [m for m in received if rng.random() < 0.8]
    if doomed:
        say("\n".join(f"X {m.body.decode()}" for m in doomed))
    return doomed


def _deleted(doomed: list[Message], errors: Sequence[EngineError | None],
             acked: float) -> None:
    from engine.errors import MessageNotInflightError, ReceiptInvalidError

    deleted = []
    for message, error in zip(doomed, errors, strict=True):
        # A lease that ran out (the process stalled) makes a receipt stale: the message
        # stays, and that is no failure.
        if error is None:
            deleted.append(message)
        elif not isinstance(error, MessageNotInflightError | ReceiptInvalidError):
            raise error
    if deleted:
        say("\n".join(f"D {m.body.decode()} {acked:.6f}" for m in deleted))


def main(path: str, run: int, seed: int, fsync: str, mode: str = "threads") -> None:
    if os.environ.get("CONVEYOR_TEST_NO_FSYNC") == "1":
        os.fsync = os.fdatasync = lambda fd: None

    from engine import Broker, Queue, SendEntry

    if os.environ.get("CONVEYOR_TEST_NO_NATIVE_FSYNC") == "1":
        from engine._syncer import set_sync_for_tests
        set_sync_for_tests(error=0)

    broker = Broker(path, fsync=fsync, snapshot_bytes=SNAPSHOT_BYTES,
                    segment_bytes_max=SEGMENT_BYTES)
    queue = broker.get_queue("power")
    queue.stats()  # opens the queue: recovery and replay happen before the clock starts
    say("open")
    if mode == "async":
        run_async(broker, run, seed)
        return

    def produce(number: int, rng: random.Random) -> None:
        for batch in itertools.count():
            bodies = _bodies(run, number, batch, rng)
            _sent(bodies, queue.send_batch([SendEntry(body.encode()) for body in bodies]))

    def consume(q: Queue, rng: random.Random) -> None:
        while True:
            started = time.monotonic()
            received = q.receive(max_messages=10, wait_seconds=0,
                                 visibility_timeout=VISIBILITY_S)
            doomed = _received(received, started, rng)
            if not doomed:
                time.sleep(0.01)
                continue
            errors = q.delete_batch([m.receipt for m in doomed])
            _deleted(doomed, errors, time.monotonic())

    def guarded(name: str, work: object, *args: object) -> None:
        try:
            work(*args)  # type: ignore[operator]
        except BaseException as exc:
            say(f"E {name} {exc!r}".replace("\n", " "))

    rng = random.Random(seed)
    threads = [threading.Thread(target=guarded, daemon=True,
                                args=(f"p{i}", produce, i, random.Random(rng.random())))
               for i in range(PRODUCERS)]
    threads += [threading.Thread(target=guarded, daemon=True,
                                 args=(f"c{i}", consume, queue, random.Random(rng.random())))
                for i in range(CONSUMERS)]
    for thread in threads:
        thread.start()
    threading.Event().wait()


def run_async(broker: Broker, run: int, seed: int) -> None:
    """The producers and consumers of main, as coroutines on one event loop."""
    from engine import AsyncQueue, SendEntry

    aqueue = AsyncQueue(broker, "power")

    async def produce(number: int, rng: random.Random) -> None:
        for batch in itertools.count():
            bodies = _bodies(run, number, batch, rng)
            _sent(bodies, await aqueue.send_batch([SendEntry(body.encode())
                                                   for body in bodies]))

    async def consume(rng: random.Random) -> None:
        while True:
            started = time.monotonic()
            received = await aqueue.receive(max_messages=10, wait_seconds=0,
                                            visibility_timeout=VISIBILITY_S)
            doomed = _received(received, started, rng)
            if not doomed:
                await asyncio.sleep(0.01)
                continue
            errors = await aqueue.delete_batch([m.receipt for m in doomed])
            _deleted(doomed, errors, time.monotonic())

    async def guarded(name: str, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except BaseException as exc:
            say(f"E {name} {exc!r}".replace("\n", " "))

    async def all_of_them() -> None:
        rng = random.Random(seed)
        await asyncio.gather(
            *(guarded(f"p{i}", produce(i, random.Random(rng.random())))
              for i in range(PRODUCERS)),
            *(guarded(f"c{i}", consume(random.Random(rng.random())))
              for i in range(CONSUMERS)))

    try:
        import uvloop
    except ImportError:
        asyncio.run(all_of_them())
    else:
        uvloop.run(all_of_them())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:6])
