"""Request ids (server/randomness.py): random version-4 UUIDs, unique, and telling a
client nothing about other clients' requests."""

from __future__ import annotations

import uuid

from server.randomness import RandomPool, request_id


def test_request_ids_are_random_version_4_uuids() -> None:
    made = [request_id() for _ in range(10 * RandomPool.BLOCK // 16 + 7)]  # many refills
    assert len(set(made)) == len(made)
    for value in made:
        parsed = uuid.UUID(value)
        assert str(parsed) == value  # the canonical 8-4-4-4-12 form
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_consecutive_ids_share_no_counter() -> None:
    # A counter in the id would let a client count everyone's requests between two of its
    # own: consecutive ids must differ everywhere a counter could hide.
    first, second = request_id(), request_id()
    assert first[:8] != second[:8] and first[-12:] != second[-12:]


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    import os

    from server import randomness

    randomness.pool.forget()
    randomness.request_id()  # the parent holds unused random bytes now, a block of them
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent, and out without cleanup
        os.write(write, randomness.request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != randomness.request_id()
