"""The pool of random bytes (server/randomness.py) behind message ids and nonces."""

from __future__ import annotations

import os
import uuid

from server import randomness
from server.randomness import RandomPool


def test_bytes_are_never_handed_out_twice() -> None:
    pool = RandomPool()
    first = pool.take(12)
    pieces = [first] + [pool.take(12) for _ in range(RandomPool.BLOCK // 12 - 1)]
    assert b"".join(pieces) == pool._data[:len(pieces) * 12]  # one block, in order, no overlap
    taken = [pool.take(12) for _ in range(3 * RandomPool.BLOCK // 12 + 5)]  # across refills
    assert all(len(t) == 12 for t in taken)
    assert len(set(taken)) == len(taken)
    assert len(pool.take(RandomPool.BLOCK + 1)) == RandomPool.BLOCK + 1


def test_uuid4s_are_random_version_4_uuids() -> None:
    pool = RandomPool()
    for count in (0, 1, 2, 10, 11, 25):  # within and past one run of masks
        made = pool.uuid4s(count)
        assert len(made) == count
        for raw in made:
            parsed = uuid.UUID(bytes=raw)
            assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    made = [raw for _ in range(500) for raw in pool.uuid4s(10)]
    assert len(set(made)) == len(made)
    # The masks touch only the version and variant bits: every other bit varies.
    ored = 0
    anded = (1 << 128) - 1
    for raw in made:
        ored |= int.from_bytes(raw)
        anded &= int.from_bytes(raw)
    fixed = int(uuid.UUID("00000000-0000-f000-c000-000000000000"))
    assert ored | fixed == (1 << 128) - 1 and anded & ~fixed == 0


def test_a_forked_child_does_not_repeat_its_parents_bytes() -> None:
    randomness.pool.forget()
    randomness.pool.take(1)  # the parent holds unused random bytes now, a block of them
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next bytes, to the parent, and out without cleanup
        os.write(write, randomness.pool.take(32))
        os._exit(0)
    os.close(write)
    child = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != randomness.pool.take(32)


def test_threads_are_never_handed_the_same_bytes() -> None:
    # Sealing may run on worker threads: the same bytes twice would be a repeated nonce.
    # The pool's block is made to yield to the other threads between the pool reading
    # where it is and moving on, the window a thread switch could fall into.
    import threading
    import time

    class Yielding(bytes):
        def __len__(self) -> int:
            time.sleep(0.0005)
            return bytes.__len__(self)

    pool = RandomPool()
    pool._data = Yielding(os.urandom(RandomPool.BLOCK))
    taken: list[list[bytes]] = [[] for _ in range(4)]

    def take(into: list[bytes]) -> None:
        for _ in range(20):
            into.append(pool.take(12))

    threads = [threading.Thread(target=take, args=(t,)) for t in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [b for t in taken for b in t]
    assert len(every) == 80 and len(set(every)) == len(every)
