"""The history checker on synthetic histories: each fault it exists to catch is caught.

A checker that never fails proves nothing, so every category is shown both firing on a
history that has the fault and staying quiet on one that does not.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

from tests.support.consistency import History, Report, check


def sent(history: History, body: str, message_id: str | None = None) -> None:
    history.send_attempted(body)
    history.send_acked(body, message_id or f"id-{body}")


def consumed(history: History, body: str, receipt: str = "r1") -> None:
    """Receive and delete, as a well-behaved consumer does."""
    history.received(body, f"id-{body}", receipt)
    history.delete_attempted(body, receipt)
    history.delete_acked(body, receipt)


def last_event_at(history: History) -> float:
    return history.events[-1].at


def clean_history(n: int = 5) -> History:
    history = History()
    for i in range(n):
        sent(history, f"m{i}")
    for i in range(n):
        consumed(history, f"m{i}")
    return history


def test_clean_history_is_ok() -> None:
    result = check(clean_history())
    assert result.ok, str(result)
    assert result == Report(
        lost=(), unexpected=(), duplicated={}, delivered_after_delete=(), id_mismatch=(),
        ambiguous_seen=0, ambiguous_missing=0, sends_attempted=5, sends_acked=5,
        deliveries=5, deletes_acked=5)
    assert str(result) == result.summary()
    assert result.summary().startswith("OK:")


def test_acked_message_never_delivered_is_lost() -> None:
    history = clean_history()
    sent(history, "dropped")
    report = check(history)
    assert not report.ok
    assert report.lost == ("dropped",)
    assert "dropped" in str(report)
    assert report.summary().startswith("FAILED:")


def test_final_drain_finds_what_the_run_did_not() -> None:
    history = clean_history()
    sent(history, "late")
    report = check(history, final_drain=["late"])
    assert report.ok, str(report)
    assert report.deliveries == 6


def test_delivery_of_a_body_never_sent_is_unexpected() -> None:
    history = clean_history()
    history.received("ghost", "id-ghost", "r1")
    report = check(history)
    assert not report.ok
    assert report.unexpected == ("ghost",)
    assert check(clean_history(), final_drain=["ghost"]).unexpected == ("ghost",)


def test_redelivery_is_a_duplicate_but_ok() -> None:
    history = History()
    sent(history, "m")
    history.received("m", "id-m", "r1")  # visibility timeout expires, no delete
    history.received("m", "id-m", "r2")
    history.received("m", "id-m", "r3")
    history.delete_attempted("m", "r3")
    history.delete_acked("m", "r3")
    report = check(history)
    assert report.ok, str(report)
    assert report.duplicated == {"m": 2}
    assert report.deliveries == 3
    assert "m (+2)" in str(report)


def test_receive_started_after_delete_ack_is_delivered_after_delete() -> None:
    history = History()
    sent(history, "m")
    consumed(history, "m")
    history.received("m", "id-m", "r2", started=last_event_at(history) + 0.001)
    report = check(history)
    assert not report.ok
    assert report.delivered_after_delete == ("m",)
    assert report.duplicated == {"m": 1}


def test_receive_started_before_delete_ack_finished_is_not_after_delete() -> None:
    """A long poll begun while the delete was in flight may legitimately return it."""
    history = History()
    sent(history, "m")
    history.received("m", "id-m", "r1")
    poll_started = last_event_at(history)
    history.delete_attempted("m", "r1")
    history.delete_acked("m", "r1")
    history.received("m", "id-m", "r2", started=poll_started)  # returned after the ack
    report = check(history)
    assert report.ok, str(report)
    assert report.delivered_after_delete == ()
    assert report.duplicated == {"m": 1}


def test_drained_after_delete_ack_is_delivered_after_delete() -> None:
    history = History()
    sent(history, "m")
    consumed(history, "m")
    assert check(history, final_drain=["m"]).delivered_after_delete == ("m",)


def test_failed_send_is_ambiguous_not_lost_nor_unexpected() -> None:
    history = clean_history()
    for body in ("timed-out", "made-it"):
        history.send_attempted(body)
        history.send_failed(body, "ReadTimeoutError")
    history.received("made-it", "id-made-it", "r1")
    report = check(history)
    assert report.ok, str(report)
    assert report.lost == ()
    assert report.unexpected == ()
    assert (report.ambiguous_seen, report.ambiguous_missing) == (1, 1)
    assert (report.sends_attempted, report.sends_acked) == (7, 5)


def test_delivered_id_differing_from_acked_id_is_id_mismatch() -> None:
    history = History()
    sent(history, "m", message_id="id-A")
    history.received("m", "id-B", "r1")
    sent(history, "n")
    history.received("n", "id-n", "r1")
    report = check(history)
    assert report.id_mismatch == ("m",)
    assert report.ok  # reported, not failed: a client retry can duplicate a body
    assert "id_mismatch: m" in str(report)


def test_examples_are_capped() -> None:
    history = History()
    for i in range(25):
        sent(history, f"m{i:02}")
    text = str(check(history))
    assert "m09" in text and "m10" not in text
    assert "and 15 more" in text


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    history = History()
    sent(history, "m")
    history.send_attempted("f")
    history.send_failed("f", "ConnectionError")
    history.received("m", "id-m", "r1", started=1.5)
    history.delete_attempted("m", "r1")
    history.delete_acked("m", "r1")
    path = tmp_path / "history.jsonl"
    history.dump(path)
    loaded = History.load(path)
    assert loaded.events == history.events
    assert loaded.check() == check(history)
    loaded.send_attempted("next")  # recording goes on with the following seq
    assert loaded.events[-1].seq == len(history.events)


def test_concurrent_recording_loses_nothing() -> None:
    history = History()
    threads, per_thread = 8, 1000

    def client(t: int) -> None:
        # 4 events per message: 250 messages make 1000 events per thread.
        for i in range(per_thread // 4):
            body = f"t{t}-{i}"
            sent(history, body)
            history.received(body, f"id-{body}", "r")
            history.delete_acked(body, "r")

    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    events = history.events
    assert len(events) == threads * per_thread
    assert [e.seq for e in events] == list(range(threads * per_thread))
    assert all(a.at <= b.at for a, b in itertools.pairwise(events))
    report = check(history)
    assert report.ok, str(report)
    messages = threads * per_thread // 4
    assert (report.sends_attempted, report.sends_acked) == (messages, messages)
    assert (report.deliveries, report.deletes_acked) == (messages, messages)
    assert report.duplicated == {}
