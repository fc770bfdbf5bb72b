"""Prometheus metrics of one server, in a registry of its own (no global state), and the
text of /metrics.

Requests are counted and timed on the event loop in plain integers (:class:`RequestStats`),
and turned into metric families only when /metrics is scraped: prometheus_client's
instruments take a lock and look up their label set on every call, which cost about a
fifth of a SendMessage's server time. The fsync histogram, observed on the sync threads,
stays a locked instrument. Queue depth, in-flight counts and the message counters are read
from the engine when /metrics is scraped, for the queues open at that moment (closed
queues are idle), so the message path pays nothing for them.

Nothing here builds the text on the event loop. With 1,000 open queues it is over a
megabyte, and building it there stalled every request for about 150 ms
(bench/metrics_scrape.py measures it). A scrape takes a :meth:`Metrics.snapshot` on the
loop: it copies only what the loop alone may touch (which queues are open, the usage
tables, the guards' counters), which costs a list and two dict copies. Reading each
queue's stats (under the queue's own lock, as every engine call does) and formatting run
on one thread of :class:`Exposition`'s own.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from engine import Broker
from engine.errors import EngineError
from server.partitioned import queue_of_partition
from server.protection.breaker import CLOSED, Guard

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                    5, 10, 25)
_FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 1)
# A bucket's bound as prometheus_client writes it ("+Inf", "0.0005", "1.0"): its own
# function, so that the text stays the same as its Histogram's. It has no annotations.
_bound_text: Callable[[float], str] = floatToGoString
# The least time between the end of one render of /metrics and the start of the next.
# Scrapes that arrive meanwhile wait for that next render and share it, so scrapers, however
# many and however fast, keep the render thread busy for at most render / (render + gap) of
# the time. Prometheus scrapes every 15 s or more; a wait this short costs it nothing.
RENDER_GAP_S = 1.0

Family = GaugeMetricFamily | CounterMetricFamily
Render = Callable[[], Iterable[Metric]]
"""Builds metric families from a snapshot; runs on the render thread."""


class Source(Protocol):
    """State the event loop owns: :meth:`snapshot` runs on the loop and must be cheap (a
    copy); what it returns runs on the render thread and must touch only that copy, or
    objects with locks of their own."""

    def snapshot(self) -> Render: ...


class RequestStats:
    """Requests by protocol, action and status, their latency and their body bytes, counted
    in plain integers. Loop-only: :meth:`record` runs in the request path; a scrape copies
    the tables (:meth:`snapshot`) and builds the families from the copy.

    The tables are bounded by their labels: the protocols and statuses are the server's
    own, and an action is one the server serves or a fixed stand-in for any other
    (server/web/middleware.py), never a value a client made up.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}
        # (protocol, action) -> a count per bucket of _LATENCY_BUCKETS, one for +Inf, and
        # the sum of the latencies last (not cumulative: summed at render).
        self._latency: dict[tuple[str, str], list[float]] = {}
        self._bytes: dict[str, int] = {}

    def record(self, protocol: str, action: str, status: int, elapsed_s: float,
               received: int) -> None:
        key = (protocol, action, status)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        timed = self._latency.get((protocol, action))
        if timed is None:
            timed = self._latency[(protocol, action)] = [0] * (len(_LATENCY_BUCKETS) + 2)
        # bisect_left: the first bound >= the latency, as Prometheus' "le" is inclusive.
        timed[bisect.bisect_left(_LATENCY_BUCKETS, elapsed_s)] += 1
        timed[-1] += elapsed_s
        self._bytes[protocol] = self._bytes.get(protocol, 0) + received

    def snapshot(self) -> Render:
        counts = dict(self._counts)
        latency = {key: list(timed) for key, timed in self._latency.items()}
        received = dict(self._bytes)

        def render() -> Iterator[Metric]:
            requests = CounterMetricFamily(
                "conveyor_requests", "HTTP requests by protocol, action and status",
                labels=["protocol", "action", "status"])
            for (protocol, action, status), count in counts.items():
                requests.add_metric([protocol, action, str(status)], count)
            seconds = HistogramMetricFamily(
                "conveyor_request_seconds", "Request latency by protocol and action",
                labels=["protocol", "action"])
            for (protocol, action), timed in latency.items():
                buckets, total = [], 0.0
                for bound, in_bucket in zip((*_LATENCY_BUCKETS, float("inf")), timed[:-1],
                                            strict=True):
                    total += in_bucket
                    buckets.append((_bound_text(bound), total))
                seconds.add_metric([protocol, action], buckets, timed[-1])
            body_bytes = CounterMetricFamily(
                "conveyor_request_bytes", "Request body bytes by protocol", labels=["protocol"])
            for protocol, count in received.items():
                body_bytes.add_metric([protocol], count)
            yield from (requests, seconds, body_bytes)

        return render


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestStats()
        self.fsync = Histogram(
            "conveyor_fsync_seconds", "Latency of each log fsync (group commit)",
            buckets=_FSYNC_BUCKETS, registry=self.registry)
        self._sources: list[Source] = [self.requests]

    def watch(self, broker: Broker) -> None:
        self._sources.append(_QueueCollector(broker))

    def watch_protection(self, guards: Sequence[Guard], unopened: Callable[[], int]) -> None:
        """Export the dispatch guards' state and the count of bodies that did not open."""
        self._sources.append(_ProtectionCollector(guards, unopened))

    def watch_source(self, source: Source) -> None:
        self._sources.append(source)

    def snapshot(self) -> Callable[[], bytes]:
        """On the event loop: what the scrape will show, as a function that formats it
        (the exposition text) and may run on any thread."""
        renders = [source.snapshot() for source in self._sources]
        registry = self.registry

        def text() -> bytes:
            return generate_latest(_Joined(registry, renders))

        return text


class _Joined(Collector):
    def __init__(self, registry: CollectorRegistry, renders: Sequence[Render]) -> None:
        self._registry = registry
        self._renders = renders

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()
        for render in self._renders:
            yield from render()


class Exposition:
    """The text of /metrics, rendered off the event loop, one render at a time.

    A scrape is answered by a render whose snapshot was taken after the scrape arrived, so
    it shows every request answered before it. Scrapes that arrive while a render runs or
    waits share the next one; a render starts no sooner than ``gap_s`` after the last one
    ended. So however many scrapers there are, at most one render runs and one waits.
    Loop-only: every method runs on the event loop.
    """

    def __init__(self, metrics: Metrics, gap_s: float = RENDER_GAP_S) -> None:
        self._metrics = metrics
        self._gap_s = gap_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._lock = asyncio.Lock()
        self._next: asyncio.Future[bytes] | None = None
        self._ended = -gap_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.renders = 0
        """Renders started (a test counts them)."""

    async def text(self) -> bytes:
        if self._next is None:
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._next = future
            task = asyncio.create_task(self._render(future))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Shielded: a scraper that hangs up must not cancel the render others wait for.
        return await asyncio.shield(self._next)

    async def _render(self, future: asyncio.Future[bytes]) -> None:
        async with self._lock:
            try:
                wait_s = self._ended + self._gap_s - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                # No await between here and the snapshot: a scrape arriving from now on
                # needs a later snapshot, so it starts the next render.
                self._next = None
                self.renders += 1
                text = self._metrics.snapshot()
                body = await asyncio.get_running_loop().run_in_executor(self._executor, text)
            except asyncio.CancelledError:
                if self._next is future:
                    self._next = None
                future.cancel()
                raise
            except Exception as exc:  # a bug: each scraper gets it as a 500
                if self._next is future:
                    self._next = None
                future.set_exception(exc)
                future.exception()  # retrieved, even if every scraper has gone
            else:
                future.set_result(body)
            finally:
                self._ended = time.monotonic()

    async def close(self) -> None:
        """Stop rendering: scrapes still waiting are cancelled, a render already on the
        thread is let finish (it reads the engine, which closes after this), and the
        thread ends."""
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)


class _ProtectionCollector:
    def __init__(self, guards: Sequence[Guard], unopened: Callable[[], int]) -> None:
        self._guards = guards
        self._unopened = unopened

    def snapshot(self) -> Render:
        # The guards live on the loop: their few numbers are read here, not on the thread.
        rows = [(guard.name, 0 if guard.breaker.state == CLOSED else 1,
                 guard.bulkhead.in_flight, guard.bulkhead.rejected, guard.breaker.rejected,
                 guard.breaker.timeouts) for guard in self._guards]
        unopened_now = self._unopened()

        def render() -> Iterator[Family]:
            state = GaugeMetricFamily(
                "conveyor_dependency_circuit_open",
                "1 while a dependency's circuit breaker is open or half-open, 0 when closed",
                labels=["dependency"])
            in_flight = GaugeMetricFamily("conveyor_dependency_calls_in_flight",
                                          "Calls to a dependency in flight",
                                          labels=["dependency"])
            refused = CounterMetricFamily(
                "conveyor_dependency_calls_refused",
                "Calls refused by a dependency's bulkhead or open circuit, or timed out",
                labels=["dependency", "reason"])
            for name, is_open, calls, full, open_refused, timeouts in rows:
                state.add_metric([name], is_open)
                in_flight.add_metric([name], calls)
                refused.add_metric([name, "bulkhead_full"], full)
                refused.add_metric([name, "circuit_open"], open_refused)
                refused.add_metric([name, "timeout"], timeouts)
            unopened = CounterMetricFamily(
                "conveyor_sse_unopened_messages",
                "Encrypted message bodies that failed to open (altered or misplaced): skipped")
            unopened.add_metric([], unopened_now)
            yield from (state, in_flight, refused, unopened)

        return render


_STATES = ("visible", "in_flight", "delayed")
_OPERATIONS = ("sent", "received", "deleted", "expired", "moved_to_dead_letter", "purged")
_COUNTED = (*_STATES, *_OPERATIONS)


class _QueueCollector:
    """Per-queue gauges and counters, read from the open queues at scrape time."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def snapshot(self) -> Render:
        # Which queues are open is the loop's to know; each queue's stats are read on the
        # render thread under the queue's own lock, which every engine call takes.
        cores = self._broker.open_cores()
        memory = self._broker.memory

        def render() -> Iterator[Family]:
            depth = GaugeMetricFamily("conveyor_queue_depth", "Messages in a queue by state",
                                      labels=["queue", "state"])
            oldest = GaugeMetricFamily("conveyor_queue_oldest_message_age_seconds",
                                       "Age of the oldest message in a queue", labels=["queue"])
            messages = CounterMetricFamily("conveyor_queue_operations",
                                           "Messages sent, received, deleted ... per queue",
                                           labels=["queue", "operation"])
            open_queues = GaugeMetricFamily("conveyor_open_queues", "Queues open in the engine")
            open_queues.add_metric([], len(cores))
            held = GaugeMetricFamily(
                "conveyor_message_state_bytes",
                "Memory the open queues' messages hold (bodies stay on disk)")
            held.add_metric([], memory.used)
            bound = GaugeMetricFamily(
                "conveyor_message_state_max_bytes",
                "Bound on conveyor_message_state_bytes, from --memory-max: sends are "
                "refused at it (absent: no bound)")
            if memory.limit is not None:
                bound.add_metric([], memory.limit)
            # A queue of several partitions is one queue here: its partitions' counts
            # summed, its oldest message the oldest of any.
            counts: dict[str, list[int]] = {}
            ages: dict[str, float] = {}
            for core in cores:
                try:
                    stats = core.stats()
                except EngineError:
                    continue  # closed or failed meanwhile
                name = queue_of_partition(core.name)
                row = counts.setdefault(name, [0] * len(_COUNTED))
                for i, field in enumerate(_COUNTED):
                    row[i] += getattr(stats, field)
                ages[name] = max(ages.get(name, 0.0), stats.oldest_age_s)
            for name, row in counts.items():
                values = dict(zip(_COUNTED, row, strict=True))
                for state in _STATES:
                    depth.add_metric([name, state], values[state])
                oldest.add_metric([name], ages[name])
                for operation in _OPERATIONS:
                    messages.add_metric([name, operation], values[operation])
            yield from (depth, oldest, messages, open_queues, held, bound)

        return render
