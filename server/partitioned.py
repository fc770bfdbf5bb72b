"""A queue of one or more partitions, each an engine queue of its own, seen as one queue.

The same on one node and in a cluster; only where a partition's engine calls are made
differs, and a :class:`PartitionRouter` answers that: on one node
(:class:`server.backend.LocalPartitions`) every partition is in this process's broker; in
a cluster (:class:`server.cluster.calls.PartitionCalls`) each is a replicated log led on
some node, called in process where this node leads it and over the inter-node port where
another does.

Partition 0 is stored under the queue's engine name (``account/name``), partition p > 0
under ``account-p{p}/name``: a namespace no account can have (accounts are 12 digits), with
the name kept whole so that a FIFO partition's name still ends in ``.fifo``. A cluster's
ring places each partition by its own name, so the partitions of one queue spread over
nodes.

- A standard queue's send goes whole to one partition, taken in turn. One that certainly
  did not take it (no leader; its leader's node refused the connection; memory full)
  passes it to the next. A refusal that leaves the outcome open (too few in-sync
  replicas, a lost answer) goes back to the client: the batch may yet be committed there,
  and sending it again elsewhere would deliver it twice, which only a retrying client may
  cause.
- A FIFO queue's send goes by message group: a group always maps to the same partition,
  which keeps the group's order and its lock. Deduplication is per partition, so a
  deduplication id repeated in groups of different partitions is not caught (SQS's
  DeduplicationScope=messageGroup, which high-throughput FIFO queues use, promises no more).
- A receive drains the partitions in turn, starting at a different one each time; with
  nothing anywhere it long-polls all of them at once and receives from the first that has
  messages.
- A receipt handle names its partition's uid, which routes deletes and visibility changes;
  the partition then checks the handle's mac.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import xxhash

from engine import Message, QueueAttributes, QueueStats
from engine.errors import EngineError, MemoryFullError, QueueUnavailableError
from engine.queue import check_receive
from engine.receipts import handle_queue_uid
from engine.results import SendEntry, SendResult
from replication.errors import ClusterError, NotLeaderError
from server.errors import DependencyUnavailableError, LeaderUnreachableError

if TYPE_CHECKING:
    from engine.catalog import Catalog
    from engine.records import Origin, Send

# A long poll over several partitions waits on each in slices as long as its router's
# wait_slice_s: a cluster's 2 s, so that a wait at a leader that stepped down meanwhile
# (which no send there completes) ends soon; in one process or between workers, the whole
# wait, each remote wait being cancelled once another partition answers.
WAIT_SLICE_S = 2.0
# When a partition cannot be waited on (its worker restarting), the others are waited on
# this long at most before the partitions are drained and waited on again.
WAIT_RETRY_S = 1.0
# Refusals that say a partition cannot serve now, not that the request is wrong: a send
# or receive may go to the queue's other partitions instead.
_UNAVAILABLE = (ClusterError, DependencyUnavailableError, QueueUnavailableError)
# Refusals that say the call was not made at all, so a send may safely go to another
# partition: those of the above, and a partition at its memory bound (another partition,
# led elsewhere, may have room).
_NOT_MADE = (NotLeaderError, LeaderUnreachableError, MemoryFullError)
_DEFAULTS = QueueAttributes()
_log = logging.getLogger("conveyor.service")
_T = TypeVar("_T")
_PARTITION_MARK = "-p"


class PartitionRouter(Protocol):
    """Where a partition's engine calls are made."""

    async def call(self, partition: str, op: str, *args: Any) -> Any:
        """``AsyncQueue(partition).<op>(*args)``, made wherever the partition is served
        (``set_attributes`` takes its changes as one dict)."""

    async def partition_uids(self, names: list[str], fresh: bool = False) -> dict[int, int]:
        """uid -> index in names, for the partitions of one queue that exist; with fresh,
        read anew where the router may hold an older view (a queue made again since)."""

    def nearest(self, partitions: list[str]) -> int | None:
        """The index of a partition to try first because this process serves it (a
        send taken there costs no call), or None for no preference."""

    @property
    def wait_slice_s(self) -> float:
        """How long a long poll waits on its partitions before draining them again."""


def partition_names(engine_name: str, count: int) -> list[str]:
    """The names of a queue's partitions, partition 0 first."""
    return [engine_name] + [_partition_name(engine_name, p) for p in range(1, count)]


def _partition_name(engine_name: str, p: int) -> str:
    account, _, name = engine_name.partition("/")
    return f"{account}{_PARTITION_MARK}{p}/{name}"


def partition_account(partition: str) -> str:
    """The account whose queue a partition is part of (partition_names, inverted)."""
    return partition.partition("/")[0].partition(_PARTITION_MARK)[0]


def partition_index(partition: str) -> int:
    """Which of its queue's partitions an engine queue is: p of ``account-p{p}/name``."""
    _, mark, index = partition.partition("/")[0].partition(_PARTITION_MARK)
    return int(index) if mark and index.isdigit() else 0


def queue_of_partition(partition: str) -> str:
    """The engine name of the queue a partition is part of: partition 0's name."""
    account, _, name = partition.partition("/")
    return f"{account.partition(_PARTITION_MARK)[0]}/{name}"


def group_partition(group_id: str | None, count: int) -> int:
    """The partition of a FIFO message group: the same on every node and every release."""
    if group_id is None or count == 1:
        return 0
    return xxhash.xxh3_64_intdigest(group_id.encode()) % count


_turns = itertools.count()


class PartitionedQueue:
    """One queue of partitions; the methods the service uses, as on AsyncQueue."""

    def __init__(self, calls: PartitionRouter, engine_name: str, count: int) -> None:
        self.calls = calls
        self.name = engine_name
        self.partitions = partition_names(engine_name, count)
        self.fifo = engine_name.endswith(".fifo")

    # -- queue-wide ----------------------------------------------------------------------

    async def attributes(self) -> QueueAttributes:
        result: QueueAttributes = await self.calls.call(self.partitions[0], "attributes")
        return result

    async def _any_attributes(self) -> QueueAttributes:
        """The attributes from whichever partition answers (they are set on all), one
        served here first."""
        refusal: EngineError | None = None
        near = self.calls.nearest(self.partitions) or 0
        for partition in self.partitions[near:] + self.partitions[:near]:
            try:
                result: QueueAttributes = await self.calls.call(partition, "attributes")
                return result
            except _UNAVAILABLE as exc:
                refusal = refusal or exc
        assert refusal is not None
        raise refusal

    async def set_attributes(self, **changes: Any) -> QueueAttributes:
        results = await _all([self.calls.call(p, "set_attributes", changes)
                              for p in self.partitions])
        return results[0]  # type: ignore[no-any-return]

    async def stats(self) -> QueueStats:
        parts: list[QueueStats] = await _all([self.calls.call(p, "stats")
                                              for p in self.partitions])
        if len(parts) == 1:
            return parts[0]
        fields = {f: sum(getattr(s, f) for s in parts) for f in QueueStats.__dataclass_fields__}
        fields["oldest_age_s"] = max(s.oldest_age_s for s in parts)
        return QueueStats(**fields)

    async def purge(self) -> None:
        await _all([self.calls.call(p, "purge") for p in self.partitions])

    # -- sending -------------------------------------------------------------------------

    async def send_batch(self, entries: Sequence[SendEntry]) -> list[SendResult | EngineError]:
        if len(self.partitions) == 1:
            result: list[SendResult | EngineError] = await self.calls.call(
                self.partitions[0], "send_batch", list(entries))
            return result
        if not self.fifo:
            return await self._send_anywhere(entries)
        by_partition: dict[int, list[int]] = {}
        for i, entry in enumerate(entries):
            p = group_partition(entry.group_id, len(self.partitions))
            by_partition.setdefault(p, []).append(i)
        return await self._scatter(by_partition, entries, "send_batch")

    async def _send_anywhere(self, entries: Sequence[SendEntry]
                             ) -> list[SendResult | EngineError]:
        start = self._start()
        refusal: EngineError | None = None
        for i in range(len(self.partitions)):
            partition = self.partitions[(start + i) % len(self.partitions)]
            try:
                result: list[SendResult | EngineError] = await self.calls.call(
                    partition, "send_batch", list(entries))
                return result
            except _NOT_MADE as exc:
                refusal = refusal or exc
        assert refusal is not None
        raise refusal

    def _start(self) -> int:
        """Where a send or a drain starts: at a partition served here, else in turn."""
        near = self.calls.nearest(self.partitions)
        return next(_turns) if near is None else near

    # -- receipts ------------------------------------------------------------------------

    async def delete_batch(self, receipts: Sequence[str]) -> list[EngineError | None]:
        return await self._by_receipt(list(receipts), list(receipts), "delete_batch")

    async def change_visibility_batch(self, entries: Sequence[tuple[str, int]]
                                      ) -> list[EngineError | None]:
        return await self._by_receipt([r for r, _ in entries], list(entries),
                                      "change_visibility_batch")

    async def _by_receipt(self, receipts: list[str], items: list[Any], op: str
                          ) -> list[EngineError | None]:
        if len(self.partitions) == 1:
            result: list[EngineError | None] = await self.calls.call(
                self.partitions[0], op, items)
            return result
        named = [handle_queue_uid(r) if isinstance(r, str) else None for r in receipts]
        uids = await self.calls.partition_uids(self.partitions)
        if any(uid is not None and uid not in uids for uid in named):
            # A handle of a partition not known here may be of a queue made again since
            # this process last looked.
            uids = await self.calls.partition_uids(self.partitions, fresh=True)
        by_partition: dict[int, list[int]] = {}
        for i, uid in enumerate(named):
            # A handle of no partition of this queue goes to partition 0, which refuses
            # it for what it is: malformed, forged or another queue's.
            by_partition.setdefault(uids.get(uid or 0, 0), []).append(i)
        return await self._scatter(by_partition, items, op)

    async def _scatter(self, by_partition: dict[int, list[int]], items: Sequence[Any],
                       op: str) -> list[Any]:
        """op on each partition's share of items, the results back in items' order. A
        share whose call failed gets the failure as each of its results, unless all
        failed: then the request fails as a whole."""
        if len(by_partition) == 1:
            # One share (a batch received together): its call, without a task of its own.
            [partition] = by_partition
            result: list[Any] = await self.calls.call(self.partitions[partition], op,
                                                      list(items))
            return result
        shares = list(by_partition.items())
        outcomes = await asyncio.gather(
            *(self.calls.call(self.partitions[p], op, [items[i] for i in indexes])
              for p, indexes in shares), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        for error in errors:
            if not isinstance(error, EngineError):
                raise error
        if len(errors) == len(outcomes):
            raise errors[0]
        results: list[Any] = [None] * len(items)
        for (_, indexes), outcome in zip(shares, outcomes, strict=True):
            for n, i in enumerate(indexes):
                results[i] = outcome if isinstance(outcome, BaseException) else outcome[n]
        return results

    # -- receiving -----------------------------------------------------------------------

    async def receive(self, max_messages: int = 1, wait_seconds: int | None = None,
                      visibility_timeout: int | None = None) -> list[Message]:
        if len(self.partitions) == 1:
            result: list[Message] = await self.calls.call(
                self.partitions[0], "receive", max_messages, wait_seconds,
                visibility_timeout)
            return result
        if wait_seconds is None:  # the queue's ReceiveMessageWaitTimeSeconds
            wait_seconds = (await self._any_attributes()).receive_wait_seconds
        wait = check_receive(max_messages, wait_seconds, visibility_timeout, _DEFAULTS)
        deadline = time.monotonic() + wait
        start = self._start()
        order = [self.partitions[(start + i) % len(self.partitions)]
                 for i in range(len(self.partitions))]
        while True:
            got = await self._drain(order, max_messages, visibility_timeout)
            remaining = deadline - time.monotonic()
            if got or remaining <= 0:
                return got
            await self._wait_any(order, min(remaining, self.calls.wait_slice_s))

    async def _drain(self, order: list[str], max_messages: int,
                     visibility_timeout: int | None) -> list[Message]:
        """Receive from the partitions in order until max_messages. Partitions that cannot
        serve now are passed over; only if none can does the receive fail."""
        got: list[Message] = []
        refusals: list[EngineError] = []
        for partition in order:
            try:
                got += await self.calls.call(partition, "receive", max_messages - len(got),
                                             0, visibility_timeout)
            except _UNAVAILABLE as exc:
                refusals.append(exc)
                continue
            except Exception:
                if not got:
                    raise
                # Messages leased from the partitions before go to the caller, rather
                # than stay hidden for their visibility timeout.
                _log.exception("receive from %s failed; returning what others gave",
                               partition)
                return got
            if len(got) >= max_messages:
                break
        if len(refusals) == len(order):
            raise refusals[0]
        return got

    async def _wait_any(self, order: list[str], seconds: float) -> None:
        """Until a partition may have messages, or seconds pass."""
        waits = [asyncio.ensure_future(self.calls.call(p, "wait_receivable", seconds))
                 for p in order]
        try:
            pending = set(waits)
            while pending:
                done, pending = await asyncio.wait(pending,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if any(w.exception() is None and w.result() for w in done):
                    return
                if pending and any(w.exception() is not None for w in done):
                    # A partition that cannot be waited on may get messages meanwhile:
                    # look at every partition again soon.
                    await asyncio.wait(pending, timeout=min(seconds, WAIT_RETRY_S))
                    return
            if all(w.exception() is not None for w in waits):
                # Every partition refused at once: pause rather than spin; the next
                # drain reports the refusal.
                await asyncio.sleep(min(seconds, 0.2))
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


async def _all(calls: Sequence[Awaitable[_T]]) -> list[_T]:
    """Every call's result; the first failure once all have finished (a partial change
    is completed by retrying the request, which every caller of this may)."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]


class EnginePartitions:
    """What the engine asks of partitions (engine.broker.Partitions), for a broker that
    holds every partition of its queues (one node)."""

    def dead_letter_partition(self, catalog: Catalog, target: str, group_id: str | None
                              ) -> str:
        # A standard queue's dead letters all go to partition 0: it promises no order,
        # and a receive drains every partition. A FIFO group's go to its partition, which
        # keeps the group in one place, in order, under one lock.
        if group_id is None:
            return target
        count = 1
        while catalog.uid_of(_partition_name(target, count)) is not None:
            count += 1
        return partition_names(target, count)[group_partition(group_id, count)]

    def queue_of(self, name: str) -> str:
        return queue_of_partition(name)

    def accept_elsewhere(self, name: str, entries: list[tuple[Origin, bytes, Send]]) -> bool:
        return False  # every partition is in this broker
