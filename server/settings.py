"""The queue attributes the server itself acts on, parsed once into a typed value.

A queue's record keeps every SQS attribute the engine does not use as a string in
``extra``. Most are only stored and given back (Policy, RedriveAllowPolicy ...); these the
server acts on: its own ``Conveyor*`` attributes and the encryption switches.
:func:`check_settings` refuses a bad value before it is kept; ``QueueRecord.settings``
reads them once per record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from engine.errors import InvalidAttributeError
from server.config import PARTITIONS_MAX, REPLICATION_FACTOR_MAX
from server.protection.ratelimit import Rate, parse_rate, tighter, within

# This server's own queue attributes, named as SQS attributes are.
RATE_LIMIT = "ConveyorRateLimit"
"""A per-queue rate limit ("100/s:200"; "off" for none) in place of the server's default
(--rate-limit-queue). It may only tighten the server's limit: a value above it, or "off"
while the server has one, is refused when set, and one kept from before the server's limit
was lowered is held under it (:meth:`QueueSettings.rate_or`)."""
REPLICATION_FACTOR = "ConveyorReplicationFactor"
"""Replicas of each of the queue's partitions in a cluster."""
PARTITIONS = "ConveyorPartitions"
"""Partitions of the queue, fixed at creation."""
# SQS's encryption switches: SQS-managed keys, or a KMS key id (served by the server's own
# keyring; the id is kept only to be reported back).
SSE_MANAGED = "SqsManagedSseEnabled"
KMS_KEY = "KmsMasterKeyId"


@dataclasses.dataclass(frozen=True)
class QueueSettings:
    own_rate: bool
    """The queue overrides the server's per-queue rate limit (with ``rate``)."""
    rate: Rate | None
    """The queue's own rate limit; None for none."""
    replication_factor: int | None
    """None: the cluster's default (--replication-factor)."""
    partitions: int
    encrypted: bool

    @classmethod
    def of(cls, extra: Mapping[str, str]) -> QueueSettings:
        """The settings of a stored record (checked by check_settings when kept)."""
        override = extra.get(RATE_LIMIT)
        return cls(own_rate=bool(override),
                   rate=parse_rate(override, RATE_LIMIT) if override else None,
                   replication_factor=_whole(extra.get(REPLICATION_FACTOR, ""),
                                             REPLICATION_FACTOR_MAX),
                   partitions=_whole(extra.get(PARTITIONS, ""), PARTITIONS_MAX) or 1,
                   encrypted=extra.get(SSE_MANAGED) == "true" or bool(extra.get(KMS_KEY)))

    def rate_or(self, ceiling: Rate | None) -> Rate | None:
        """The queue's rate limit: its own, else the server's per-queue limit, and never
        more than the server's. The operator's limit protects the server from one queue,
        so its owner may lower it but not lift it; a value above it is refused when set,
        and this holds a value kept while the server's limit was higher (or absent)
        under the current one, as a stored value cannot be refused after the fact."""
        if not self.own_rate:
            return ceiling
        if ceiling is None:
            return self.rate  # None for "off": no limit at all
        if self.rate is None:
            return ceiling  # "off", kept before the server had a limit
        return tighter(self.rate, ceiling)


def check_settings(extra: Mapping[str, str], existing: Mapping[str, str] | None,
                   queue_rate: Rate | None = None) -> None:
    """Refuse a bad value of these attributes in ``extra`` (a create, or a change of the
    queue whose attributes are ``existing``) before anything is kept. ``queue_rate``: the
    server's per-queue limit, which a queue's own may only tighten."""
    if RATE_LIMIT in extra and extra[RATE_LIMIT] != "":  # "" removes the queue's own
        rate = parse_rate(extra[RATE_LIMIT], RATE_LIMIT)
        # Refused rather than quietly held down: the owner asked for more than the server
        # grants any queue, and would otherwise meet 429s it was told it would not.
        if queue_rate is not None and (rate is None or not within(rate, queue_rate)):
            raise InvalidAttributeError(
                RATE_LIMIT, extra[RATE_LIMIT],
                f"the server limits each queue to {queue_rate}; a queue's own limit may "
                "only be lower (a lower rate and a burst no larger)")
    factor = extra.get(REPLICATION_FACTOR)
    if factor and _whole(factor, REPLICATION_FACTOR_MAX) is None:
        raise InvalidAttributeError(REPLICATION_FACTOR, factor,
                                    f"must be a whole number from 1 to {REPLICATION_FACTOR_MAX}")
    sse = extra.get(SSE_MANAGED)
    if sse is not None and sse not in ("true", "false", ""):
        raise InvalidAttributeError(SSE_MANAGED, sse, "must be true or false")
    if sse == "true" and extra.get(KMS_KEY):
        raise InvalidAttributeError(SSE_MANAGED, sse, "cannot be set together with " + KMS_KEY)
    if PARTITIONS in extra:
        value = extra[PARTITIONS]
        if _whole(value, PARTITIONS_MAX) is None:
            raise InvalidAttributeError(PARTITIONS, value,
                                        f"must be a whole number from 1 to {PARTITIONS_MAX}")
        # A new count would map FIFO message groups to other partitions, out of order.
        if existing is not None and int(value) != QueueSettings.of(existing).partitions:
            raise InvalidAttributeError(PARTITIONS, value, "is fixed when the queue is created")


def _whole(value: str, most: int) -> int | None:
    """value as a whole number 1..most, or None."""
    # isascii: "²".isdigit() is true, and int("²") raises.
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= most:
        return None
    return int(value)
