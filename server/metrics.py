"""Prometheus metrics of one server, in a registry of its own (no global state).

Requests are counted and timed as they happen. Queue depth, in-flight counts and the
message counters are read from the engine when /metrics is scraped, for the queues open at
that moment (closed queues are idle), so the message path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import Broker
from engine.errors import EngineError

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                    5, 10, 25)
_FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "conveyor_requests", "HTTP requests by protocol, action and status",
            ["protocol", "action", "status"], registry=self.registry)
        self.latency = Histogram(
            "conveyor_request_seconds", "Request latency by protocol and action",
            ["protocol", "action"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.request_bytes = Counter(
            "conveyor_request_bytes", "Request body bytes by protocol", ["protocol"],
            registry=self.registry)
        self.fsync = Histogram(
            "conveyor_fsync_seconds", "Latency of each log fsync (group commit)",
            buckets=_FSYNC_BUCKETS, registry=self.registry)

    def watch(self, broker: Broker) -> None:
        self.registry.register(_QueueCollector(broker))


class _QueueCollector(Collector):
    """Per-queue gauges and counters, read from the open queues at scrape time."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily("conveyor_queue_depth",
                                  "Messages in a queue by state", labels=["queue", "state"])
        oldest = GaugeMetricFamily("conveyor_queue_oldest_message_age_seconds",
                                   "Age of the oldest message in a queue", labels=["queue"])
        messages = CounterMetricFamily("conveyor_queue_operations",
                                       "Messages sent, received, deleted ... per queue",
                                       labels=["queue", "operation"])
        open_queues = GaugeMetricFamily("conveyor_open_queues", "Queues open in the engine")
        cores = self._broker.open_cores()
        open_queues.add_metric([], len(cores))
        for core in cores:
            try:
                stats = core.stats()
            except EngineError:
                continue  # closed or failed meanwhile
            for state, value in (("visible", stats.visible), ("in_flight", stats.in_flight),
                                 ("delayed", stats.delayed)):
                depth.add_metric([core.name, state], value)
            oldest.add_metric([core.name], stats.oldest_age_s)
            for operation, value in (("sent", stats.sent), ("received", stats.received),
                                     ("deleted", stats.deleted), ("expired", stats.expired),
                                     ("moved_to_dead_letter", stats.moved_to_dead_letter),
                                     ("purged", stats.purged)):
                messages.add_metric([core.name, operation], value)
        yield from (depth, oldest, messages, open_queues)
