"""The FIFO receive-attempt memory: bounded by count, bytes and age, oldest forgotten first."""

from __future__ import annotations

from typing import Any

from server.sqs import attempts
from server.sqs.attempts import ReceiveAttempts, answer_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(body: str) -> dict[str, Any]:
    return {"Messages": [{"MessageId": "m", "ReceiptHandle": "r" * 100, "Body": body,
                          "MD5OfBody": "0" * 32, "Attributes": {"SenderId": "s"}}]}


def test_the_documented_bounds() -> None:
    assert (attempts.WINDOW_S, attempts.ATTEMPTS_MAX, attempts.ATTEMPTS_BYTES_MAX) == (
        300, 10_000, 64 * 1024 * 1024)


def test_an_answer_is_remembered_for_its_window_only() -> None:
    clock = Clock()
    kept = ReceiveAttempts(clock=clock)
    kept.put("q", "a", answer("x"))
    clock.now += 299
    assert kept.get("q", "a") == answer("x")
    assert kept.get("q", "b") is None and kept.get("other", "a") is None
    clock.now += 1
    assert kept.get("q", "a") is None


def test_count_bound_forgets_the_oldest_first() -> None:
    kept = ReceiveAttempts(max_entries=3, clock=Clock())
    for i in range(5):
        kept.put("q", str(i), answer(str(i)))
    assert len(kept) == 3 and kept.evicted == 2
    assert [kept.get("q", str(i)) is not None for i in range(5)] == [False, False, True,
                                                                    True, True]


def test_byte_bound_forgets_the_oldest_first() -> None:
    size = answer_bytes(answer("b" * 1000))
    kept = ReceiveAttempts(max_bytes=3 * size, clock=Clock())
    for i in range(10):
        kept.put("q", str(i), answer("b" * 1000))
        assert kept.bytes <= 3 * size
    assert len(kept) == 3 and kept.evicted == 7
    assert kept.get("q", "9") is not None and kept.get("q", "6") is None
    # An answer larger than the whole bound is not kept, and keeps the others.
    kept.put("q", "huge", answer("h" * 10 * size))
    assert kept.get("q", "huge") is None and len(kept) == 3


def test_expired_answers_go_before_live_ones_and_count_as_not_evicted() -> None:
    clock = Clock()
    kept = ReceiveAttempts(max_entries=2, clock=clock)
    kept.put("q", "old", answer("o"))
    clock.now += 301
    kept.put("q", "new", answer("n"))
    kept.put("q", "newer", answer("n"))
    assert kept.evicted == 0 and len(kept) == 2


def test_a_repeated_attempt_replaces_its_answer_and_its_bytes() -> None:
    clock = Clock()
    kept = ReceiveAttempts(clock=clock)
    kept.put("q", "a", answer("first"))
    clock.now += 400  # past its window: a retry now is a new receive, whose answer counts
    kept.put("q", "a", answer("second" * 100))
    assert len(kept) == 1 and kept.bytes == answer_bytes(answer("second" * 100))
    assert kept.get("q", "a") == answer("second" * 100)


def test_answer_bytes_counts_what_python_holds() -> None:
    ascii_body, wide_body = answer("a" * 10_000), answer("😀" * 10_000)
    assert answer_bytes(ascii_body) > 10_000
    assert answer_bytes(wide_body) > 40_000  # four bytes a character, as stored
