"""Appends to a log until it is killed, acknowledging on stdout what each append returned.

Run as ``python crash_child.py LOG_DIR SEGMENT_BYTES_MAX SEED [THREADS]``. Lines on stdout:

- ``open <next_offset>`` once the log is open and recovered, before any append;
- ``<first> <end> <tag> <n0>`` after an append call that stored offsets [first, end) has
  returned. Record ``first + i`` is ``payload(f"{tag}.{n0 + i}")``.

With one thread the tag is ``o`` and n0 is the offset itself, so every record in the log,
acknowledged or not, can be checked from its offset alone. With several threads offsets
are not known before the append returns, so each thread numbers its own records.

Any unexpected behaviour exits the process with a message on stderr and a status other
than the SIGKILL the parent expects.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import threading
import traceback
from collections.abc import Callable

from engine.log import Log

BATCH_RECORDS_MAX = 8
FILLER_BYTES_MAX = 200


def payload(key: str) -> bytes:
    """The record stored under key: the key, a colon, then filler derived from the key."""
    digest = hashlib.blake2b(key.encode(), digest_size=32).digest()
    size = digest[0] % FILLER_BYTES_MAX
    return key.encode() + b":" + (digest * (size // len(digest) + 1))[:size]


def key_of(record: bytes) -> str:
    return record.split(b":", 1)[0].decode()


def _append_forever(log: Log, rng: random.Random, tag: str | None,
                    ack: threading.Lock) -> None:
    seq = 0
    while True:
        count = 1 if rng.random() < 0.4 else rng.randint(1, BATCH_RECORDS_MAX)
        # One writer: the offset is known in advance and becomes the key.
        n0 = log.next_offset if tag is None else seq
        name = "o" if tag is None else tag
        records = [payload(f"{name}.{n0 + i}") for i in range(count)]
        if count == 1 and rng.random() < 0.5:
            first = log.append(records[0])
        else:
            first = log.append_batch(records)
        if tag is None and first != n0:
            _die(f"append returned offset {first}, next_offset was {n0}")
        with ack:
            sys.stdout.write(f"{first} {first + count} {name} {n0}\n")
            sys.stdout.flush()
        seq += count


def _die(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(3)


def _guarded(fn: Callable[..., None], *args: object) -> None:
    try:
        fn(*args)
    except BaseException:
        _die(traceback.format_exc())


def main(argv: list[str]) -> None:
    path, segment_bytes_max, seed = argv[1], int(argv[2]), int(argv[3])
    threads = int(argv[4]) if len(argv) > 4 else 1
    log = Log(path, fsync="always", segment_bytes_max=segment_bytes_max)
    ack = threading.Lock()
    with ack:
        sys.stdout.write(f"open {log.next_offset}\n")
        sys.stdout.flush()
    if threads == 1:
        _guarded(_append_forever, log, random.Random(seed), None, ack)
        return
    workers = [
        threading.Thread(target=_guarded, daemon=True,
                         args=(_append_forever, log, random.Random(seed * 1000 + t),
                               f"s{seed}t{t}", ack))
        for t in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main(sys.argv)
