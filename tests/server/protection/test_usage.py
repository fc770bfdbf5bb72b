"""Usage keys: only valid queue names, bounded in number and in size."""

from __future__ import annotations

import pytest

from server.protection.usage import OTHER, Usage, queue_label


@pytest.mark.parametrize(("owner", "name", "label"), [
    ("000000000000", "orders", "000000000000/orders"),
    ("000000000000", "orders.fifo", "000000000000/orders.fifo"),
    ("000000000000", "q" * 80, "000000000000/" + "q" * 80),
    ("000000000000", "q" * 81, None),
    ("000000000000", "n" * 8 * 1024 * 1024, None),
    ("0" * 8 * 1024 * 1024, "orders", None),
    ("000000000000", "bad name", None),
    ("000000000000", "a/b", None),
    ("000000000000", "", None),
    ("000000000000", None, None),
    (["000000000000"], "orders", None),
])
def test_queue_label(owner: object, name: object, label: str | None) -> None:
    assert queue_label(owner, name) == label


def test_keys_are_bounded_in_number_and_size() -> None:
    usage = Usage(keys_max=3)
    for i in range(10):
        usage.record("000000000000", f"p{i}", f"000000000000/q{i}", 1, 10, 20, False)
    usage.record("000000000000", "p0", "x" * 1000 + "/q", 1, 10, 20, False)
    assert len(usage.queues) == 4 and len(usage.principals) == 4
    assert usage.queues[(OTHER, OTHER)][0] == 8  # seven late ones and the over-long one
    assert all(len(a) <= 80 and len(q) <= 80 for a, q in usage.queues)
