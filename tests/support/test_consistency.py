"""The history checker on synthetic histories: each fault it exists to catch is caught.

A checker that never fails proves nothing, so every category is shown both firing on a
history that has the fault and staying quiet on one that does not.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

from tests.support.consistency import Event, History, Kind, Report, check, check_fifo


def sent(history: History, body: str, message_id: str | None = None) -> None:
    history.send_attempted(body)
    history.send_acked(body, message_id or f"id-{body}")


def consumed(history: History, body: str, receipt: str = "r1") -> None:
    """Receive and delete, as a well-behaved consumer does."""
    history.received(body, f"id-{body}", receipt)
    history.delete_attempted(body, receipt)
    history.delete_acked(body, receipt)


class Timeline:
    """A history with explicit times, for cases that turn on the order of calls."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def add(self, kind: Kind, body: str, at: float, started: float | None = None,
            receipt: str = "", error: str = "") -> Timeline:
        message_id = f"id-{body}" if kind in ("ack", "receive") else ""
        self.events.append(Event(len(self.events), kind, body, at,
                                 at if started is None else started, message_id, receipt,
                                 error))
        return self

    def sent(self, body: str, at: float) -> Timeline:
        return self.add("attempt", body, at).add("ack", body, at)

    def received(self, body: str, receipt: str, at: float,
                 started: float | None = None) -> Timeline:
        return self.add("receive", body, at, started, receipt)

    def delete_attempted(self, body: str, receipt: str, at: float) -> Timeline:
        return self.add("delete", body, at, receipt=receipt)

    def deleted(self, body: str, receipt: str, at: float) -> Timeline:
        return self.delete_attempted(body, receipt, at).add("delete_ack", body, at,
                                                           receipt=receipt)

    def delete_failed(self, body: str, receipt: str, at: float) -> Timeline:
        return self.delete_attempted(body, receipt, at).add(
            "delete_fail", body, at, receipt=receipt, error="ReadTimeoutError")

    def history(self) -> History:
        return History(self.events)


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
    # Either the delete was stale (the poll leased it first) and this delete consumes the
    # message, or the poll raced a delete that took effect and this one deletes nothing.
    history.delete_attempted("m", "r2")
    history.delete_acked("m", "r2")
    report = check(history)
    assert report.ok, str(report)
    assert report.delivered_after_delete == ()
    assert report.duplicated == {"m": 1}


def test_drained_after_delete_ack_is_delivered_after_delete() -> None:
    history = History()
    sent(history, "m")
    consumed(history, "m")
    assert check(history, final_drain=["m"]).delivered_after_delete == ("m",)


def test_received_once_then_a_delete_without_outcome_is_lost() -> None:
    """The blind spot of a checker that asks only "was it ever delivered?": the message
    came once, its delete never returned (a failover), and it was never seen again. It
    should still be in the queue, so it had to come back; it did not."""
    history = History()
    sent(history, "m")
    history.received("m", "id-m", "r1")
    history.delete_attempted("m", "r1")
    report = check(history)
    assert not report.ok
    assert report.lost == ("m",)
    assert report.in_doubt == ()


def test_received_but_never_deleted_is_lost_unless_it_comes_back() -> None:
    script = Timeline().sent("m", 0).received("m", "r1", 1)  # the consumer died then
    assert check(script.history()).lost == ("m",)
    assert check(script.history(), final_drain=["m"]).ok
    script.received("m", "r2", 7, started=6).deleted("m", "r2", 8)  # its lease ran out
    report = check(script.history())
    assert report.ok, str(report)
    assert report.duplicated == {"m": 1}


def test_delete_refused_by_the_server_settles_nothing() -> None:
    history = History()
    sent(history, "m")
    history.received("m", "id-m", "r1")
    history.delete_attempted("m", "r1")
    history.delete_refused("m", "r1", "ReceiptHandleIsInvalid")
    report = check(history)
    assert report.lost == ("m",)
    assert report.in_doubt == () and report.deletes_failed == 0


def test_ambiguous_delete_never_followed_by_a_delivery_is_in_doubt_not_lost() -> None:
    history = clean_history()
    sent(history, "m")
    history.received("m", "id-m", "r1")
    history.delete_attempted("m", "r1")
    history.delete_failed("m", "r1", "ConnectionClosedError")
    report = check(history)
    assert report.ok, str(report)
    assert report.lost == ()
    assert report.in_doubt == ("m",)
    assert report.deletes_failed == 1
    assert report.in_doubt_within(1) and not report.in_doubt_within(0)
    assert "1 in doubt" in report.summary() and "in_doubt: m" in str(report)


def test_ambiguous_delete_then_redelivered_and_deleted_is_consumed() -> None:
    script = (Timeline().sent("m", 0).received("m", "r1", 1)
              .delete_failed("m", "r1", 2).received("m", "r2", 8, started=7))
    assert check(script.history()).lost == ("m",)  # came back, so it must be consumed
    script.deleted("m", "r2", 9)
    report = check(script.history())
    assert report.ok, str(report)
    assert report.in_doubt == () and report.lost == ()


def test_stale_receipts_acknowledged_delete_does_not_settle_a_later_lease() -> None:
    """A delete with the receipt of an earlier lease is acknowledged and deletes nothing:
    only the last lease's delete consumes the message."""
    script = (Timeline().sent("m", 0).received("m", "r1", 1)
              # r1's lease ran out; another consumer's receive began after the first returned
              .received("m", "r2", 7, started=6)
              .deleted("m", "r1", 8)
              .delete_attempted("m", "r2", 8))  # no outcome: the second consumer died
    report = check(script.history())
    assert report.lost == ("m",)
    assert report.delivered_after_delete == ()
    script.deleted("m", "r2", 9)
    assert check(script.history()).ok


def test_overlapping_deliveries_must_each_be_deleted() -> None:
    """Two receive calls that overlap cannot be ordered by the client: either lease may be
    the last, so each must end in an acknowledged delete."""
    script = (Timeline().sent("m", 0)
              .received("m", "r2", 3, started=2)
              .received("m", "r1", 4, started=1)  # began first, returned last
              .deleted("m", "r2", 5))
    assert check(script.history()).lost == ("m",)
    script.delete_failed("m", "r1", 6)
    assert check(script.history()).in_doubt == ("m",)
    script.deleted("m", "r1", 7)  # a retry that went through
    report = check(script.history())
    assert report.ok and report.in_doubt == (), str(report)
    # A delivery whose call began after another returned is the later lease: the earlier
    # one's delete is not needed.
    later = (Timeline().sent("m", 0).received("m", "r1", 1)
             .received("m", "r2", 7, started=6).deleted("m", "r2", 8))
    assert check(later.history()).ok


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
    report = check(history, final_drain=["m", "n"])
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
    history.delete_failed("m", "r1", "ReadTimeoutError")
    history.delete_refused("m", "r1", "ReceiptHandleIsInvalid")
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


# --- FIFO order and deduplication ---------------------------------------------------------


def position(body: str) -> tuple[str, int]:
    group, index = body.split(":")
    return group, int(index)


def fifo_history(*deliveries: tuple[str, str]) -> History:
    """Each (body, message id) received in turn, and deleted."""
    history = History()
    for body, message_id in deliveries:
        history.received(body, message_id, f"r-{message_id}")
        history.delete_attempted(body, f"r-{message_id}")
        history.delete_acked(body, f"r-{message_id}")
    return history


def test_fifo_groups_interleaved_in_order_are_ok() -> None:
    report = check_fifo(fifo_history(("a:0", "1"), ("b:0", "2"), ("a:1", "3"), ("b:1", "4"),
                                     ("a:2", "5")), position)
    assert report.ok, str(report)
    assert (report.groups, report.first_deliveries) == (2, 5)
    assert str(report).startswith("OK:")


def test_fifo_redelivery_of_an_earlier_message_is_not_out_of_order() -> None:
    """A lease that ran out gives the same message (same id) again: at-least-once."""
    report = check_fifo(fifo_history(("a:0", "1"), ("a:1", "2"), ("a:1", "2"), ("a:0", "1"),
                                     ("a:2", "3")), position)
    assert report.ok, str(report)


def test_fifo_first_delivery_after_a_later_message_is_out_of_order() -> None:
    report = check_fifo(fifo_history(("a:0", "1"), ("a:2", "3"), ("b:0", "4"), ("a:1", "2")),
                        position)
    assert not report.ok
    assert report.out_of_order == ("a:1 after a:2",)
    assert "out_of_order: a:1 after a:2" in str(report)


def test_fifo_message_enqueued_twice_is_a_duplicated_send() -> None:
    """The retry of a send inside the deduplication window made a second message."""
    report = check_fifo(fifo_history(("a:0", "1"), ("a:1", "2"), ("a:1", "7")), position)
    assert not report.ok
    assert report.duplicated_sends == ("a:1",)
    assert report.out_of_order == ()
