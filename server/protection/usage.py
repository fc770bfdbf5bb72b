"""Usage data: what each principal and each queue has asked of the server.

Counted per request, after its response (so a refused request counts too): requests,
messages sent, received or deleted, bytes in and out, and requests refused by a rate
limit. The counters are exported to /metrics and, for the caller's own account, at
``GET /v1/usage`` (for billing or quotas). They live in memory and restart at zero with
the process, as Prometheus counters do.

Keys are bounded in number and in size, so that no client can grow them without end. A
queue is counted under its name only once the name is known to be one a queue could have
(:func:`queue_label`, used wherever a request names its queue): a request naming
megabytes of made-up queue name is counted for its principal, and for no queue. Beyond
KEYS_MAX principals or queues, new ones are counted together under the account and
name "other".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily

from engine.errors import InvalidQueueNameError
from engine.limits import FIFO_SUFFIX, NAMESPACE_CHARS_MAX, QUEUE_NAME_CHARS_MAX, check_queue_name

FIELDS = ("requests", "messages", "bytes_in", "bytes_out", "throttled")
# Distinct principals and queues counted; beyond it, new ones are counted under "other".
KEYS_MAX = 100_000
# The longest part of a key: an account is a queue namespace (at most 64 characters), a
# queue name at most 80, a principal at most 64. A longer one never comes from the
# callers above; were one to, it would be counted under "other" rather than kept.
KEY_PART_CHARS_MAX = max(NAMESPACE_CHARS_MAX, QUEUE_NAME_CHARS_MAX)
OTHER = "other"


def queue_label(owner: object, name: object) -> str | None:
    """``owner/name`` if that is a queue name the server could hold, else None.

    Only such a label may become a usage key, an audit field or a metrics label: a
    request's queue is known from what the client sent before anything checks it, and
    a made-up name can be megabytes long.
    """
    if not isinstance(owner, str) or not isinstance(name, str):
        return None
    if len(owner) > NAMESPACE_CHARS_MAX or len(name) > QUEUE_NAME_CHARS_MAX:
        return None  # before the name is copied into the label below
    try:
        return check_queue_name(f"{owner}/{name}", name.endswith(FIFO_SUFFIX))
    except InvalidQueueNameError:
        return None


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
        if (len(table) >= keys_max or len(key[0]) > KEY_PART_CHARS_MAX
                or len(key[1]) > KEY_PART_CHARS_MAX):
            # One key for all of them, account included: a queue's owner comes from the
            # request, so (owner, "other") per owner would grow without end again.
            key = (OTHER, OTHER)
        counts = table.setdefault(key, [0, 0, 0, 0, 0])
    counts[0] += 1
    counts[1] += messages
    counts[2] += bytes_in
    counts[3] += bytes_out
    counts[4] += throttled
