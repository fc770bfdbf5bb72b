"""Sends, receives and deletes on queue "crash" until it is killed, acknowledging on stdout.

Run as ``python queue_crash_child.py DATA_DIR RUN SEED``. Lines on stdout, each flushed:

- ``S <body>`` for every message a send_batch call acknowledged, after it returned;
- ``R <body>`` for every message a receive returned;
- ``X <body>`` for every message about to be deleted, before the delete_batch call;
- ``D <body>`` for every message that delete_batch call acknowledged, after it returned.

Bodies are ``<run>.<round>-<n>``: unique across runs as long as RUN is. A lease lasts
VISIBILITY_S, so what a killed run received comes back soon after.

Anything unexpected (an error from the queue) exits with a message on stderr and status 3,
not the SIGKILL the parent expects.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import traceback

VISIBILITY_S = 1
# Small enough that snapshots and segment deletion happen within a run, so the kill can
# land in one of them too.
SNAPSHOT_BYTES = 16 * 1024
SEGMENT_BYTES = 64 * 1024


def _say(tag: str, body: bytes) -> None:
    sys.stdout.write(f"{tag} {body.decode()}\n")
    sys.stdout.flush()


def _die(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(3)


def main(path: str, run: int, seed: int) -> None:
    from engine import Broker, SendEntry
    from engine.errors import EngineError

    rng = random.Random(seed)
    broker = Broker(path, fsync="always", snapshot_bytes=SNAPSHOT_BYTES,
                    segment_bytes_max=SEGMENT_BYTES)
    queue = broker.create_queue("crash")
    for round_no in itertools.count():
        bodies = [f"{run}.{round_no}-{n}".encode() for n in range(rng.randint(1, 10))]
        results = queue.send_batch([SendEntry(body) for body in bodies])
        for body, result in zip(bodies, results, strict=True):
            if isinstance(result, EngineError):
                _die(f"send of {body!r} failed: {result!r}")
            _say("S", body)
        received = queue.receive(max_messages=10, wait_seconds=0,
                                 visibility_timeout=VISIBILITY_S)
        for message in received:
            _say("R", message.body)
        doomed = [m for m in received if rng.random() < 0.6]
        if not doomed:
            continue
        for message in doomed:
            _say("X", message.body)
        errors = queue.delete_batch([m.receipt for m in doomed])
        for message, error in zip(doomed, errors, strict=True):
            if error is not None:
                _die(f"delete of {message.body!r} failed: {error!r}")
            _say("D", message.body)


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    except BaseException:
        _die(traceback.format_exc())
