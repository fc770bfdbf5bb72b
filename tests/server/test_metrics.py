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
