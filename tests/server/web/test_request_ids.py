"""Request ids (server/web/middleware.py): unique within a process and across processes,
in a UUID's shape, as SQS clients show them."""

from __future__ import annotations

import uuid

from server.web.middleware import RequestIds


def test_request_ids_are_unique_and_shaped_as_uuids() -> None:
    ids = RequestIds()
    made = [ids() for _ in range(100_000)]
    assert len(set(made)) == len(made)
    for value in (made[0], made[-1]):
        assert str(uuid.UUID(value)) == value  # the canonical 8-4-4-4-12 form


def test_each_process_start_draws_its_own_prefix() -> None:
    # Two servers, or one restarted, must not hand out the same ids.
    first, second = RequestIds(), RequestIds()
    assert first() != second()
    assert first()[:18] != second()[:18]


def test_the_counter_carries_past_48_bits() -> None:
    ids = RequestIds()
    ids._next = iter([2**48 - 1, 2**48])
    low, high = ids(), ids()
    assert low.endswith("-0000-ffffffffffff") and high.endswith("-0001-000000000000")
