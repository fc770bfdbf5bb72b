"""The collector's policy of a server process (server/gcpolicy.py): old objects are frozen,
so collections no longer walk them; frozen garbage is collected once the frozen objects
have grown. Against this process's real collector, and a real `conveyor serve`.

Negative control: a frozen cycle that becomes garbage outlives gc.collect(); only a thaw
collects it."""

from __future__ import annotations

import asyncio
import gc
import time
import urllib.request
import weakref
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import gcpolicy
from server.gcpolicy import GcPolicy
from tests.support.server import Server


class Node:
    """A cycle: a node that refers to itself."""

    def __init__(self) -> None:
        self.me = self


class Leaf:
    """No cycle."""


@pytest.fixture
def policy() -> Iterator[GcPolicy]:
    made = GcPolicy()
    try:
        yield made
    finally:
        made.stop()  # thaws: the rest of the session's objects are the collector's again


def _tracked(target: object) -> bool:
    """Whether the collector walks target (gc.get_objects leaves frozen objects out)."""
    return any(o is target for o in gc.get_objects())


def test_a_step_freezes_what_is_alive(policy: GcPolicy) -> None:
    kept = Node()
    assert _tracked(kept)
    policy.step()
    assert not _tracked(kept)
    # The count the step took, less any frozen object freed since by another thread (the
    # test runner's): nothing but a step freezes, so it cannot grow.
    assert policy.frozen >= gc.get_freeze_count() > 0
    made_after = Node()
    assert _tracked(made_after)  # only what was alive at the step


def test_a_frozen_object_is_still_freed_when_its_last_reference_goes(
        policy: GcPolicy) -> None:
    leaf = Leaf()
    ref = weakref.ref(leaf)
    policy.step()
    assert not _tracked(leaf)
    del leaf
    assert ref() is None  # by its reference count, with no collection


def test_a_frozen_cycle_is_collected_by_a_thaw_and_not_before(policy: GcPolicy) -> None:
    cycle = Node()
    ref = weakref.ref(cycle)
    policy.step()
    del cycle
    gc.collect()
    assert ref() is not None  # the negative control: freezing alone keeps frozen garbage
    policy.thaw()
    assert ref() is None
    assert policy.thaws == 1
    # Frozen again after the collection: the count the thaw took, less any frozen object
    # freed since by another thread (the test runner's), as in the test of a step above.
    assert policy.frozen >= gc.get_freeze_count() > 0


def test_a_thaw_comes_once_the_frozen_objects_grew(policy: GcPolicy,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpolicy, "CHECK_S", 0.0)
    monkeypatch.setattr(gcpolicy, "THAW_MIN_S", 0.0)
    policy.step()  # the first count: the heap the process started with
    policy.step()
    assert policy.thaws == 0  # no growth, no thaw
    cycle = Node()
    ref = weakref.ref(cycle)
    policy.step()
    del cycle
    gc.collect()
    assert ref() is not None and policy.thaws == 0  # frozen garbage, kept for now
    grown = [Node() for _ in range(policy.frozen // 3)]  # past THAW_GROWTH, a quarter
    policy.step()
    assert policy.thaws == 1
    assert ref() is None  # the thaw collected it
    del grown


def test_thaws_are_at_least_thaw_min_s_apart(policy: GcPolicy,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gcpolicy, "CHECK_S", 0.0)
    monkeypatch.setattr(gcpolicy, "THAW_MIN_S", 3600.0)
    policy.step()
    grown = [Node() for _ in range(policy.frozen // 3)]
    policy.step()
    assert policy.thaws == 0
    del grown


def test_collections_of_the_oldest_generation_are_counted_and_timed(
        policy: GcPolicy) -> None:
    loop = asyncio.new_event_loop()
    policy.start(loop)
    try:
        before = policy.oldest_collections
        gc.collect()
        assert policy.oldest_collections == before + 1
        assert policy.oldest_pause_s > 0
        gc.collect(0)
        assert policy.oldest_collections == before + 1  # the young ones are not counted
    finally:
        policy.stop()
        loop.close()


def test_a_server_process_freezes_and_exports_its_collector(server: Server) -> None:
    deadline = time.monotonic() + 10
    values: dict[str, float] = {}
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(server.url + "/metrics", timeout=5).read().decode()
        values = {sample.name: sample.value
                  for family in text_string_to_metric_families(text)
                  for sample in family.samples if sample.name.startswith("conveyor_gc_")}
        if values.get("conveyor_gc_frozen_objects", 0) > 0:
            break
        time.sleep(0.2)
    assert values["conveyor_gc_frozen_objects"] > 10_000  # the modules and the app, at least
    assert {"conveyor_gc_oldest_collections_total", "conveyor_gc_oldest_pause_seconds_total",
            "conveyor_gc_thaws_total"} <= values.keys()
