"""Usage data: what each principal and each queue has asked of the server.

Counted per request, after its response (so a refused request counts too): requests,
messages sent, received or deleted, bytes in and out, and requests refused by a rate
limit. The counters are exported to /metrics and, for the caller's own account, at
``GET /v1/usage`` (for billing or quotas). They live in memory and restart at zero with
the process, as Prometheus counters do; keys are bounded so that a flood of made-up queue
names cannot grow them without end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily

FIELDS = ("requests", "messages", "bytes_in", "bytes_out", "throttled")
# Distinct principals and queues counted; beyond it, new ones are counted under "other".
KEYS_MAX = 100_000
OTHER = "other"


class Usage:
    def __init__(self, keys_max: int = KEYS_MAX) -> None:
        self._keys_max = keys_max
        # (account, principal) and (account, queue name) -> [requests, messages, ...]
        self.principals: dict[tuple[str, str], list[int]] = {}
        self.queues: dict[tuple[str, str], list[int]] = {}

    def record(self, account: str, principal: str | None, queue: str | None, messages: int,
               bytes_in: int, bytes_out: int, throttled: bool) -> None:
        if principal is not None:
            _add(self.principals, (account, principal), self._keys_max, messages, bytes_in,
                 bytes_out, throttled)
        if queue is not None:
            owner, _, name = queue.partition("/")
            _add(self.queues, (owner, name), self._keys_max, messages, bytes_in, bytes_out,
                 throttled)

    def of_account(self, account: str) -> dict[str, Any]:
        """The usage endpoint's document: this account's principals and queues."""
        return {
            "account": account,
            "principals": {p: dict(zip(FIELDS, c, strict=True))
                           for (a, p), c in sorted(self.principals.items()) if a == account},
            "queues": {q: dict(zip(FIELDS, c, strict=True))
                       for (a, q), c in sorted(self.queues.items()) if a == account},
        }

    def snapshot(self) -> Callable[[], Iterator[CounterMetricFamily]]:
        """For /metrics (server/metrics.py), on the event loop: a copy of which keys there
        are, whose counters are read on the render thread. A count may move on meanwhile
        (an int read is atomic); the tables may not grow under an iteration."""
        tables = (("principal", dict(self.principals)), ("queue", dict(self.queues)))

        def render() -> Iterator[CounterMetricFamily]:
            for scope, table in tables:
                for index, field in enumerate(FIELDS):
                    family = CounterMetricFamily(
                        f"conveyor_usage_{scope}_{field}",
                        f"{field.replace('_', ' ')} by {scope}", labels=["account", scope])
                    for (account, key), counts in table.items():
                        family.add_metric([account, key], counts[index])
                    yield family

        return render


def _add(table: dict[tuple[str, str], list[int]], key: tuple[str, str], keys_max: int,
         messages: int, bytes_in: int, bytes_out: int, throttled: bool) -> None:
    counts = table.get(key)
    if counts is None:
        if len(table) >= keys_max:
            key = (key[0], OTHER)
        counts = table.setdefault(key, [0, 0, 0, 0, 0])
    counts[0] += 1
    counts[1] += messages
    counts[2] += bytes_in
    counts[3] += bytes_out
    counts[4] += throttled
