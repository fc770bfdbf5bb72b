"""A queue this node leads: ship its log to the followers, and say what is committed.

Each follower has one persistent TCP connection (a link). The link opens with the
follower's position, cuts the follower's log back to where it agrees with ours
(replication.history), then streams whole batches as they are appended, without waiting
for acknowledgements (at most INFLIGHT_RECORDS_MAX records ahead). The follower appends,
fsyncs and acknowledges its durable offset.

The commit offset is the least durable offset over the in-sync replicas (ISR), this
node's included. A client's write is acknowledged once the commit offset passes it
(``committed``). A follower that falls REPLICA_LAG_S behind is taken out of the ISR by an
etcd transaction *before* the commit offset stops counting it; one that catches up is put
back. With fewer than min_insync replicas, writes are refused (503), never acknowledged.

The node is reached only through ``LeaderNode`` and etcd only through ``LeaderControl``,
so a leader runs in a test against a control plane held in memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from engine.errors import EngineError
from replication import frames as fr
from replication.control import Leader, Partition
from replication.errors import (
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    ReplicationUnavailableError,
)
from replication.history import EpochHistory, batch_end, divergence
from replication.peer import Channel, Peers

if TYPE_CHECKING:
    from engine.queue import QueueCore

_log = logging.getLogger("conveyor.replication")

# A follower whose durable offset stays behind what the leader had REPLICA_LAG_S ago
# leaves the ISR. Longer tolerates slower disks; shorter stalls writes less on a failure.
REPLICA_LAG_S = 2.0
# Records sent to a follower and not yet acknowledged, at most.
INFLIGHT_RECORDS_MAX = 100_000
# How often an idle link looks for records that did not wake it (receives, visibility
# changes: appended without a waiting client), and sends a heartbeat.
POLL_S = 0.02
HEARTBEAT_S = 0.5
# How often the ISR is checked, and the placement.
MONITOR_S = 0.1
REBALANCE_S = 1.0
# A write not committed in this long is answered 503: its outcome is unknown.
COMMIT_WAIT_S = 10.0
CONNECT_S = 2.0
RETRY_S = 0.2


class LeaderNode(Protocol):
    """What a leader needs of its node (replication.node.ClusterNode)."""

    @property
    def node_id(self) -> str:
        """This node's id in the cluster."""

    def lease_valid(self) -> bool:
        """Whether the node's etcd lease is alive now: no acknowledgement without it."""

    def seen_partition(self, name: str) -> Partition | None:
        """The queue's partition record as the node last read it (None: not read)."""

    def live_nodes(self) -> set[str] | None:
        """Nodes whose lease is alive, as last read (None: not read yet)."""

    def replication_address(self, node_id: str) -> tuple[str, int] | None:
        """Where a node's inter-node port listens (None: not known)."""

    @property
    def peers(self) -> Peers:
        """This node's credentials on the inter-node port."""

    def step_down(self, name: str, reason: str) -> None:
        """Stop leading the queue: close this role now, and the queue soon after."""

    def knows_members(self) -> bool:
        """Whether the node has watched the cluster long enough to move replicas."""

    def placement(self, name: str, rf: int) -> list[str]:
        """The replicas the ring over the cluster's members gives the queue."""


class LeaderControl(Protocol):
    """What a leader changes and reads in etcd (replication.control.Control)."""

    async def set_members(self, partition: Partition, epoch: int, replicas: tuple[str, ...],
                          isr: tuple[str, ...]) -> Partition | None:
        """Change replicas and ISR while epoch is the current leader's; None if not."""

    async def leader(self, name: str) -> Leader | None:
        """The queue's leader key."""

    async def partition(self, name: str) -> Partition | None:
        """The queue's partition record."""


class LeaderRole:
    """This node's leadership of one queue, for one epoch."""

    def __init__(self, node: LeaderNode, control: LeaderControl, partition: Partition,
                 epoch: int, min_insync: int) -> None:
        self.node = node
        self.control = control
        self.name = partition.name
        self.uid = partition.uid
        self.epoch = epoch
        self.partition = partition
        self._min_insync = min_insync
        self.core: QueueCore | None = None
        self.acked: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        """Per follower, the end of what this link has sent it: no ACK may pass it."""
        self.closed = False
        self.reason = ""
        self._loop = asyncio.get_running_loop()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._wakes: list[asyncio.Event] = []
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._history = EpochHistory()
        self._tasks: list[asyncio.Task[None]] = []
        self._isr_busy = False
        self._connected: set[str] = set()
        self._linked: set[str] = set()
        self._rebalanced_at = 0.0

    @property
    def min_insync(self) -> int:
        """min_insync_replicas, capped by the replicas the partition has: fewer only when
        the cluster had fewer nodes than the replication factor when the replicas were
        placed (a gone node's replica is kept until it is replaced, see _rebalance)."""
        return min(self._min_insync, len(self.partition.replicas))

    @property
    def under_replicated(self) -> bool:
        """Fewer replicas in sync than the replication factor asks."""
        return len(self.partition.isr) < self.partition.rf

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, open_core: Callable[[], QueueCore]) -> None:
        """Open the queue (replaying its log) and start the links and the ISR monitor."""
        await asyncio.to_thread(open_core)
        self._ensure_links()
        self._tasks.append(asyncio.create_task(self._monitor()))

    def _ensure_links(self) -> None:
        """A link to every follower replica (new ones too, after a rebalance)."""
        for follower in self.partition.replicas:
            if follower != self.node.node_id and follower not in self._linked:
                self._linked.add(follower)
                self._tasks.append(asyncio.create_task(self._link(follower)))

    def opened(self, core: QueueCore) -> None:
        """The broker opened (or reopened) the queue: stamp our epoch on its batches."""
        core.log.epoch = self.epoch
        core.replication = self
        self.core = core

    def close(self, reason: str) -> None:
        """Step down at once: refuse every waiting write (the links stop in ``stop``)."""
        if not self.closed:
            self.closed = True
            self.reason = reason
            self._fail_waiters(reason)

    async def stop(self, reason: str) -> None:
        """Step down: refuse every waiting write and stop shipping."""
        self.close(reason)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # -- the commit offset ------------------------------------------------------------------

    @property
    def isr(self) -> tuple[str, ...]:
        return self.partition.isr

    def commit_offset(self, members: tuple[str, ...] | None = None) -> int:
        """The least durable offset over members (default: the ISR), this node's included."""
        core = self.core
        if core is None:
            return 0
        log = core.log
        offset = log.durable_offset if log.fsync_policy.mode == "always" else log.next_offset
        for member in self.partition.isr if members is None else members:
            if member != self.node.node_id:
                offset = min(offset, self.acked.get(member, 0))
        return offset

    def check_writable(self) -> None:
        """Raise unless a write may be acknowledged now. Checked before a write is made
        (from the engine's thread: a read of a few fields), so that a refusal for too few
        in-sync replicas leaves nothing behind, and again before it is acknowledged."""
        if self.closed:
            raise ReplicationUnavailableError(self.name, f"no longer the leader: {self.reason}")
        if len(self.partition.isr) < self.min_insync:
            raise NotEnoughReplicasError(
                self.name, f"{len(self.partition.isr)} in-sync replicas "
                f"({', '.join(self.partition.isr)}), fewer than min_insync_replicas "
                f"{self.min_insync}")
        if not self.node.lease_valid():
            raise ReplicationUnavailableError(self.name, "this node's etcd lease lapsed")

    async def committed(self, offset: int) -> None:
        """Return once every record before offset is on the ISR. The write is already in
        this node's log: a refusal for too few in-sync replicas here is
        NotEnoughReplicasAfterAppendError (the write may yet take effect)."""
        try:
            await self._committed(offset)
        except NotEnoughReplicasError as exc:
            raise NotEnoughReplicasAfterAppendError(self.name, exc.reason) from None

    async def _committed(self, offset: int) -> None:
        self.check_writable()
        if self.commit_offset() < offset:
            future = self._loop.create_future()
            heapq.heappush(self._waiters, (offset, next(self._seq), future))
            self._kick()
            try:
                await asyncio.wait_for(asyncio.shield(future), COMMIT_WAIT_S)
            except TimeoutError:
                raise ReplicationUnavailableError(
                    self.name, f"not committed on the ISR in {COMMIT_WAIT_S:g} s") from None
            finally:
                # Nobody waits on it any more: failing it later (a step-down) would log
                # "Future exception was never retrieved".
                future.cancel()
        # Acknowledging needs leadership now, not only when the write was made.
        self.check_writable()

    def wait_committed(self, offset: int) -> None:
        asyncio.run_coroutine_threadsafe(self.committed(offset), self._loop).result()

    def _settle(self) -> None:
        if not self._waiters:
            return
        commit = self.commit_offset()
        while self._waiters and self._waiters[0][0] <= commit:
            future = heapq.heappop(self._waiters)[2]
            if not future.done():
                future.set_result(None)

    def _fail_waiters(self, reason: str, error: type[ReplicationUnavailableError]
                      = ReplicationUnavailableError) -> None:
        waiters, self._waiters = self._waiters, []
        for _, _, future in waiters:
            if not future.done():
                future.set_exception(error(self.name, reason))

    def _kick(self) -> None:
        for wake in self._wakes:
            wake.set()

    # -- the ISR ----------------------------------------------------------------------------

    async def _monitor(self) -> None:
        while not self.closed:
            await asyncio.sleep(MONITOR_S)
            core = self.core
            if core is None:
                continue
            if not self.node.lease_valid():
                self.node.step_down(self.name, "this node's etcd lease lapsed")
                return
            # Only this leader changes replicas and ISR; a newer record was changed by an
            # operator (the replication factor), and is taken as it is.
            seen = self.node.seen_partition(self.name)
            if seen is not None and seen.revision > self.partition.revision \
                    and not self._isr_busy:
                self.partition = seen
            now = time.monotonic()
            end = core.log.next_offset
            self._samples.append((now, end))
            threshold = 0
            while self._samples and self._samples[0][0] <= now - REPLICA_LAG_S:
                threshold = self._samples.popleft()[1]
            if threshold:
                self._samples.appendleft((now - REPLICA_LAG_S, threshold))
            me = self.node.node_id
            isr = self.partition.isr
            live = self.node.live_nodes()
            # A member with no node key (its lease ran out: dead or cut off) is out at
            # once; one that is alive but behind gets REPLICA_LAG_S to catch up.
            keep = tuple(m for m in isr if m == me or (
                self.acked.get(m, 0) >= threshold and (live is None or m in live)))
            # A follower rejoins once it holds everything the members kept have made
            # durable: the commit offset then cannot go back when it starts counting again.
            # Over the kept members, not the ISR: a laggard still in the ISR holds the ISR's
            # commit back to its own offset, so it would always qualify, and a follower
            # that stays connected but stops acknowledging would never leave.
            commit = self.commit_offset(keep)
            wanted = keep + tuple(m for m in self.partition.replicas
                                  if m not in keep and self.acked.get(m, -1) >= commit
                                  and m in self._connected)
            if set(wanted) != set(isr) and not self._isr_busy:
                await self._change_members(self.partition.replicas, wanted)
            elif now - self._rebalanced_at >= REBALANCE_S and not self._isr_busy:
                self._rebalanced_at = now
                await self._rebalance()
            if len(self.partition.isr) < self.min_insync:
                self._fail_waiters(f"{len(self.partition.isr)} in-sync replicas, fewer than "
                                   f"min_insync_replicas {self.min_insync}",
                                   NotEnoughReplicasError)
            self._settle()

    async def _rebalance(self) -> None:
        """Move the queue's replicas to where the ring over the cluster's members says.

        New replicas are added first, outside the ISR: they are copied the whole log and
        join the ISR once caught up. Only when every replica the ring wants is in the ISR
        are the others let go - this node too, which then steps down so that the first
        of the new replicas leads. Replicas the ring still wants never move.

        A gone node's replica is replaced, never just dropped: with too few live nodes to
        place the replication factor, the replicas on gone nodes stay (out of the ISR),
        and the partition stays under-replicated, refusing writes while its ISR is below
        min_insync_replicas, until nodes come back or join. Shrinking the set instead
        would lower, silently, what a write needs to be acknowledged.
        """
        me = self.node.node_id
        if not self.node.knows_members():
            return
        replicas = self.partition.replicas
        target = self.node.placement(self.name, self.partition.rf)
        wanted = min(self.partition.rf, max(len(replicas), len(target)))
        if len(target) < wanted:
            target += [r for r in replicas if r not in target][:wanted - len(target)]
        if not target or set(target) == set(replicas):
            return
        missing = tuple(n for n in target if n not in replicas)
        if missing:
            _log.warning("queue %s: adding replicas %s", self.name, list(missing))
            await self._change_members(replicas + missing, self.partition.isr)
            self._ensure_links()
            return
        if all(n in self.partition.isr for n in target):
            _log.warning("queue %s: replicas %s -> %s", self.name, list(replicas), target)
            isr = tuple(n for n in target if n in self.partition.isr)
            if await self._change_members(tuple(target), isr) and me not in target:
                self.node.step_down(self.name, "the ring placed this queue elsewhere")

    async def _change_members(self, replicas: tuple[str, ...], isr: tuple[str, ...]) -> bool:
        """Record new replicas and ISR in etcd; only then does the commit offset follow.
        True if it was recorded."""
        self._isr_busy = True
        try:
            ordered = tuple(m for m in replicas if m in isr)
            updated = await self.control.set_members(self.partition, self.epoch, replicas,
                                                     ordered)
            if updated is None:
                current = await self.control.leader(self.name)
                if current is None or current.epoch != self.epoch:
                    self.node.step_down(self.name, "another leader took over")
                    return False
                fresh = await self.control.partition(self.name)
                if fresh is not None:
                    self.partition = fresh
                return False
            if updated.isr != self.partition.isr:
                _log.warning("queue %s: ISR %s -> %s", self.name, list(self.partition.isr),
                             list(updated.isr))
            self.partition = updated
            self._settle()
            return True
        except EngineError as exc:
            _log.warning("queue %s: ISR change failed: %s", self.name, exc)
            return False
        finally:
            self._isr_busy = False

    # -- links --------------------------------------------------------------------------------

    async def _link(self, follower: str) -> None:
        wake = asyncio.Event()
        self._wakes.append(wake)
        try:
            await self._keep_linked(follower, wake)
        finally:
            self._wakes.remove(wake)
            self._linked.discard(follower)

    async def _keep_linked(self, follower: str, wake: asyncio.Event) -> None:
        while not self.closed and follower in self.partition.replicas:
            address = self.node.replication_address(follower)
            if address is None:
                await asyncio.sleep(RETRY_S)
                continue
            try:
                channel = await self.node.peers.connect(address, follower, fr.MAGIC,
                                                        fr.FRAME_BYTES_MAX, CONNECT_S)
                try:
                    await self._stream(follower, channel, wake)
                finally:
                    channel.close()
            except fr.LINK_ERRORS as exc:
                _log.info("queue %s: link to %s: %s", self.name, follower, exc)
            except Exception:  # a bug: say so, and keep the link trying
                _log.exception("queue %s: link to %s failed", self.name, follower)
            await asyncio.sleep(RETRY_S)

    async def _stream(self, follower: str, channel: Channel, wake: asyncio.Event) -> None:
        core = self.core
        assert core is not None
        channel.send(fr.encode(fr.Open(self.epoch, self.uid, self.name,
                                       self.partition.attributes)))
        position = await asyncio.wait_for(fr.read_frame(channel), CONNECT_S)
        await self._check_refused(position)
        if not isinstance(position, fr.Position):
            raise fr.ProtocolError(f"expected POSITION, got {type(position).__name__}")
        history = await asyncio.to_thread(self._history.update, core.log)
        agreed = min(divergence(history, core.log.next_offset, position.history,
                                position.next_offset), position.next_offset)
        sent = position.next_offset
        if agreed < position.next_offset:
            channel.send(fr.encode(fr.Sync(self.uid, self.epoch, agreed)))
            reply = await asyncio.wait_for(fr.read_frame(channel), CONNECT_S)
            await self._check_refused(reply)
            if not isinstance(reply, fr.Ack):
                raise fr.ProtocolError(f"expected ACK, got {type(reply).__name__}")
            if reply.durable > agreed:
                raise fr.ProtocolError(f"cut to {agreed}, the follower's log ends at "
                                       f"{reply.durable}")
            sent = reply.durable
        self.acked[follower] = sent
        self._sent[follower] = sent
        acks = asyncio.create_task(self._read_acks(follower, channel))
        self._connected.add(follower)
        try:
            last_sent = time.monotonic()
            while not self.closed and not acks.done() and follower in self.partition.replicas:
                core = self.core
                assert core is not None
                log = core.log
                if sent < log.next_offset and sent - self.acked.get(follower, 0) \
                        < INFLIGHT_RECORDS_MAX:
                    data = log.read_raw(sent, fr.APPEND_BYTES_MAX)
                    channel.send(fr.encode(fr.Append(self.uid, self.epoch, sent,
                                                     self.commit_offset(), data)))
                    sent = self._sent[follower] = batch_end(data)
                    last_sent = time.monotonic()
                    await channel.drain()
                    continue
                if time.monotonic() - last_sent >= HEARTBEAT_S:
                    channel.send(fr.encode(fr.Append(self.uid, self.epoch, sent,
                                                     self.commit_offset(), b"")))
                    last_sent = time.monotonic()
                    await channel.drain()
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_S)
        finally:
            self._connected.discard(follower)
            acks.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acks

    async def _read_acks(self, follower: str, channel: Channel) -> None:
        while True:
            frame = await fr.read_frame(channel)
            await self._check_refused(frame)
            if not isinstance(frame, fr.Ack) or frame.epoch != self.epoch:
                continue
            # A follower cannot have made durable what it was never sent: such an ACK
            # would count records the follower lacks toward the commit offset.
            if frame.durable > self._sent.get(follower, 0):
                raise fr.ProtocolError(f"{follower} acknowledged {frame.durable}, past "
                                       f"the {self._sent.get(follower, 0)} it was sent")
            if frame.durable > self.acked.get(follower, 0):
                self.acked[follower] = frame.durable
                self._settle()

    async def _check_refused(self, frame: fr.Frame) -> None:
        if isinstance(frame, fr.Refuse):
            if frame.epoch > self.epoch:
                self.node.step_down(self.name, f"fenced by epoch {frame.epoch}")
            raise fr.ProtocolError(f"refused: {frame.reason}")


def describe(role: LeaderRole) -> dict[str, Any]:
    """For /v1/cluster: the leader's view of one queue."""
    return {"queue": role.name, "epoch": role.epoch, "replicas": list(role.partition.replicas),
            "isr": list(role.partition.isr), "commit_offset": role.commit_offset(),
            "min_insync": role.min_insync, "under_replicated": role.under_replicated,
            "acked": dict(role.acked), "connected": sorted(role._connected)}
