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
from server.protection.ratelimit import Rate, parse_rate

# This server's own queue attributes, named as SQS attributes are.
RATE_LIMIT = "ConveyorRateLimit"
"""A per-queue rate limit ("100/s:200"; "off" for none) over the server's default."""
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

    def rate_or(self, default: Rate | None) -> Rate | None:
        """The queue's rate limit: its own, else the server's default."""
        return self.rate if self.own_rate else default


def check_settings(extra: Mapping[str, str], existing: Mapping[str, str] | None) -> None:
    """Refuse a bad value of these attributes in ``extra`` (a create, or a change of the
    queue whose attributes are ``existing``) before anything is kept."""
    if extra.get(RATE_LIMIT):
        parse_rate(extra[RATE_LIMIT], RATE_LIMIT)
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
