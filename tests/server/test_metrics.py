"""The text of /metrics (server/metrics.py): rendered off the event loop, fresh for every
scrape, and shared by scrapes that arrive together, so scrapers cannot multiply its cost."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from engine import Broker
from server.metrics import Exposition, Metrics, Render
from server.protection.usage import Usage


class Probe:
    """A source whose render notes the thread it ran on and shows a loop-owned value."""

    def __init__(self) -> None:
        self.value = 0
        self.render_threads: list[int] = []

    def snapshot(self) -> Render:
        value = self.value

        def render() -> Iterator[GaugeMetricFamily]:
            self.render_threads.append(threading.get_ident())
            family = GaugeMetricFamily("probe_value", "a value the loop owns")
            family.add_metric([], value)
            yield family

        return render


def probe_value(text: bytes) -> float:
    for family in text_string_to_metric_families(text.decode()):
        if family.name == "probe_value":
            return float(family.samples[0].value)
    raise AssertionError("no probe_value")


async def test_the_text_is_rendered_on_a_thread_not_the_loop(tmp_path: Path) -> None:
    metrics, probe = Metrics(), Probe()
    with Broker(str(tmp_path), fsync="never") as broker:
        broker.create_queue("000000000000/q").send(b"x")
        usage = Usage()
        usage.record("000000000000", "me", "000000000000/q", 1, 1, 0, False)
        metrics.watch(broker)
        metrics.watch_source(usage)
        metrics.watch_source(probe)
        exposition = Exposition(metrics, gap_s=0)
        try:
            text = (await exposition.text()).decode()
        finally:
            await exposition.close()
    assert probe.render_threads and threading.get_ident() not in probe.render_threads
    assert 'conveyor_queue_depth{queue="000000000000/q",state="visible"} 1.0' in text
    assert ('conveyor_usage_principal_requests_total{account="000000000000",principal="me"}'
            ' 1.0') in text


async def test_concurrent_scrapes_share_renders_and_each_sees_what_came_before() -> None:
    metrics, probe = Metrics(), Probe()
    metrics.watch_source(probe)
    exposition = Exposition(metrics, gap_s=0.2)
    try:
        probe.value = 1
        first = asyncio.gather(*(exposition.text() for _ in range(20)))
        while exposition.renders < 1:  # until the first render has taken its snapshot
            await asyncio.sleep(0)
        probe.value = 2  # what the scrapes below must see: it happened before they came
        second = asyncio.gather(*(exposition.text() for _ in range(20)))
        assert {probe_value(t) for t in await first} == {1}
        assert {probe_value(t) for t in await second} == {2}
        assert exposition.renders == 2
        # A scrape that comes later still sees the newest value, after the gap.
        probe.value = 3
        assert probe_value(await exposition.text()) == 3
        assert exposition.renders == 3
    finally:
        await exposition.close()


async def test_a_scraper_that_hangs_up_does_not_cancel_the_render_of_others() -> None:
    metrics, probe = Metrics(), Probe()
    metrics.watch_source(probe)
    exposition = Exposition(metrics, gap_s=0)
    try:
        gone = asyncio.create_task(exposition.text())
        stays = asyncio.create_task(exposition.text())
        await asyncio.sleep(0)
        gone.cancel()
        assert probe_value(await stays) == 0
        assert exposition.renders == 1
    finally:
        await exposition.close()


def _samples(text: bytes, family_name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                       float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            if family.name == family_name for s in family.samples}


def test_request_counts_and_latency_buckets_are_what_prometheus_would_show() -> None:
    # The same observations through prometheus_client's own instruments give the reference.
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from server.metrics import _LATENCY_BUCKETS

    registry = CollectorRegistry()
    counter = Counter("conveyor_requests", "x", ["protocol", "action", "status"],
                      registry=registry)
    histogram = Histogram("conveyor_request_seconds", "x", ["protocol", "action"],
                          buckets=_LATENCY_BUCKETS, registry=registry)
    body_bytes = Counter("conveyor_request_bytes", "x", ["protocol"], registry=registry)
    metrics = Metrics()
    # On a bound (inclusive), between bounds, past the last one; two actions and statuses.
    for action, status, elapsed in (("SendMessage", 200, 0.0005), ("SendMessage", 200, 0.0007),
                                    ("SendMessage", 400, 1.0), ("ReceiveMessage", 200, 30.0)):
        metrics.requests.record("sqs-json", action, status, elapsed, 100)
        counter.labels("sqs-json", action, str(status)).inc()
        histogram.labels("sqs-json", action).observe(elapsed)
        body_bytes.labels("sqs-json").inc(100)
    ours, reference = metrics.snapshot()(), generate_latest(registry)
    for name in ("conveyor_requests", "conveyor_request_seconds", "conveyor_request_bytes"):
        expected = {key: value for key, value in _samples(reference, name).items()
                    if not key[0].endswith("_created")}
        assert _samples(ours, name) == expected, name
    assert _samples(ours, "conveyor_request_seconds")[
        ("conveyor_request_seconds_bucket",
         (("action", "SendMessage"), ("le", "0.0005"), ("protocol", "sqs-json")))] == 1


def test_a_scrape_shows_the_requests_counted_before_its_snapshot_only() -> None:
    metrics = Metrics()
    metrics.requests.record("native", "get_queue", 404, 0.001, 0)
    text = metrics.snapshot()
    metrics.requests.record("native", "get_queue", 404, 0.001, 0)  # after: the next scrape's
    key = ("conveyor_requests_total",
           (("action", "get_queue"), ("protocol", "native"), ("status", "404")))
    assert _samples(text(), "conveyor_requests")[key] == 1
    assert _samples(metrics.snapshot()(), "conveyor_requests")[key] == 2
