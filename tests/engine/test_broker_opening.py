"""The broker's cache of open queues: queues open and close outside its lock, one at a time
per queue, and eviction past open_queues_max stays cheap when pinned queues keep it
above the limit (a cluster node taking over thousands of partitions)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from engine import Broker
from engine import broker as broker_module
from engine.queue import QueueCore

WAIT_S = 10.0


class _SlowOpen:
    """QueueCore, but the open of one queue (once named) waits until released."""

    def __init__(self) -> None:
        self.name = ""
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> QueueCore:
        if name == self.name:
            self.started.set()
            assert self.release.wait(WAIT_S), "never released"
        return QueueCore(name, *args, **kwargs)


def _in_thread(work: Any) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> _SlowOpen:
    opener = _SlowOpen()
    monkeypatch.setattr(broker_module, "QueueCore", opener)
    return opener


def test_a_queue_slow_to_open_holds_up_no_other_queue(tmp_path: Path, slow: _SlowOpen
                                                      ) -> None:
    with Broker(tmp_path / "data", fsync="never") as broker:
        broker.create_queue("slow")
        broker.create_queue("fast").send(b"x")
        broker.close_queue("slow")
        broker.close_queue("fast")
        slow.name = "slow"
        opening, outcome = _in_thread(lambda: broker._core_of("slow"))
        assert slow.started.wait(WAIT_S)
        # The broker's lock was held for the whole open: this waited for "slow".
        other, other_outcome = _in_thread(lambda: broker._core_of("fast"))
        other.join(WAIT_S)
        assert not other.is_alive(), "opening one queue waited for another's open"
        assert other_outcome[0].name == "fast"
        # A second caller of the queue being opened waits for that open, not a second.
        again, again_outcome = _in_thread(lambda: broker._core_of("slow"))
        slow.release.set()
        opening.join(WAIT_S)
        again.join(WAIT_S)
        assert outcome[0] is again_outcome[0] is broker.open_core("slow")


@pytest.mark.parametrize("change", ["delete_queue", "close_queue", "set_aside_queue"])
def test_a_queue_being_opened_is_not_changed_under_the_open(tmp_path: Path, slow: _SlowOpen,
                                                            change: str) -> None:
    with Broker(tmp_path / "data", fsync="never") as broker:
        broker.create_queue("slow").send(b"x")
        broker.close_queue("slow")
        slow.name = "slow"
        opening, outcome = _in_thread(lambda: broker._core_of("slow"))
        assert slow.started.wait(WAIT_S)
        args = ("slow", "a test") if change == "set_aside_queue" else ("slow",)
        changing, changed = _in_thread(lambda: getattr(broker, change)(*args))
        changing.join(0.5)
        assert changing.is_alive(), f"{change} ran while the queue was being opened"
        slow.release.set()
        opening.join(WAIT_S)
        changing.join(WAIT_S)
        assert not changing.is_alive() and not isinstance(changed[0], BaseException)
        core = outcome[0]
        assert isinstance(core, QueueCore) and core.closed
        assert broker.open_core("slow") is None


class _PinsAll:
    """A leadership that leads every queue and keeps each open (a follower behind)."""

    def __init__(self) -> None:
        self.pinned_calls = 0
        self.pinning = True

    def check(self, name: str) -> None:
        pass

    def opened(self, core: QueueCore) -> None:
        pass

    def pinned(self, name: str) -> bool:
        self.pinned_calls += 1
        return self.pinning


def test_opening_past_the_limit_with_every_queue_pinned_scans_them_seldom(
        tmp_path: Path) -> None:
    """Each open past open_queues_max scanned every open queue for one to close; with all
    of them pinned, a node taking over thousands of partitions paid that on every open."""
    leadership = _PinsAll()
    queues, limit = 400, 16
    # The maintenance pass (once a second) scans them all too: not during this test.
    with Broker(tmp_path / "data", fsync="never", leadership=leadership,
                open_queues_max=limit, maintenance_interval_ms=3_600_000) as broker:
        for i in range(queues):
            broker.adopt_queue(f"q{i}", i + 1, {}, start_epoch=1)
        for i in range(queues):
            broker._core_of(f"q{i}")
        assert len(broker.open_cores()) == queues  # none could be closed
        # A scan at every open is about queues^2 / 2 = 80,000 calls; scans each time the
        # count has grown by what the last one left above the limit, about 650.
        assert leadership.pinned_calls < 2 * queues, leadership.pinned_calls
        # Once nothing is pinned, the maintenance pass closes down to the limit at once.
        leadership.pinning = False
        broker._maintain()
        assert len(broker.open_cores()) <= limit
