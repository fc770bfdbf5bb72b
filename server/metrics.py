"""Prometheus metrics of one server, in a registry of its own (no global state).

Requests are counted and timed as they happen. Queue depth, in-flight counts and the
message counters are read from the engine when /metrics is scraped, for the queues open at
that moment (closed queues are idle), so the message path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import Broker
from engine.errors import EngineError
from server.protection.breaker import CLOSED, Guard

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

    def watch_protection(self, guards: Sequence[Guard], unopened: Callable[[], int]) -> None:
        """Export the dispatch guards' state and the count of bodies that did not open."""
        self.registry.register(_ProtectionCollector(guards, unopened))


class _ProtectionCollector(Collector):
    def __init__(self, guards: Sequence[Guard], unopened: Callable[[], int]) -> None:
        self._guards = guards
        self._unopened = unopened

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily(
            "conveyor_dependency_circuit_open",
            "1 while a dependency's circuit breaker is open or half-open, 0 when closed",
            labels=["dependency"])
        in_flight = GaugeMetricFamily("conveyor_dependency_calls_in_flight",
                                      "Calls to a dependency in flight", labels=["dependency"])
        refused = CounterMetricFamily(
            "conveyor_dependency_calls_refused",
            "Calls refused by a dependency's bulkhead or open circuit, or timed out",
            labels=["dependency", "reason"])
        for guard in self._guards:
            breaker, bulkhead = guard.breaker, guard.bulkhead
            state.add_metric([guard.name], 0 if breaker.state == CLOSED else 1)
            in_flight.add_metric([guard.name], bulkhead.in_flight)
            refused.add_metric([guard.name, "bulkhead_full"], bulkhead.rejected)
            refused.add_metric([guard.name, "circuit_open"], breaker.rejected)
            refused.add_metric([guard.name, "timeout"], breaker.timeouts)
        unopened = CounterMetricFamily(
            "conveyor_sse_unopened_messages",
            "Encrypted message bodies that failed to open (altered or misplaced): skipped")
        unopened.add_metric([], self._unopened())
        yield from (state, in_flight, refused, unopened)


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
