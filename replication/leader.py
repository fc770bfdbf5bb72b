"""A queue this node leads: ship its log to the followers, and say what is committed.

Each follower has a stream (``FollowerStream``) on the node's one connection to the
follower's node (replication.link), which carries every partition this node leads there.
The stream opens with the follower's position, cuts the follower's log back to where it
agrees with ours (replication.history), then ships whole batches as they are appended,
without waiting for acknowledgements, within its window (link.Window: bounded frames,
bytes and records), in its turn with the link's other streams. The follower appends,
fsyncs and acknowledges its durable offset. A new record wakes the streams
(``appended``, called by the engine): an idle partition has no timer and sends nothing.

The commit offset is the least durable offset over the in-sync replicas (ISR), this
node's included. A client's write is acknowledged once the commit offset passes it
(``committed``). A follower that falls REPLICA_LAG_S behind is taken out of the ISR by an
etcd transaction *before* the commit offset stops counting it; one that catches up is put
back. A follower not yet heard from in this epoch (a leader just elected) counts as
behind only once a write waits for it. With fewer than min_insync replicas, writes are
refused (503), never acknowledged.

The node is reached only through ``LeaderNode`` and etcd only through ``LeaderControl``,
so a leader runs in a test against a control plane held in memory.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from engine import install
from engine.errors import EngineError
from engine.queue import SNAPSHOT_FILE
from engine.snapshot import log_floor
from replication import frames as fr
from replication import link as link_module
from replication.control import Leader, Partition
from replication.errors import (
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    ReplicationUnavailableError,
)
from replication.history import EpochHistory, batch_base, batch_end, divergence
from replication.link import Link, Links, Window
from replication.members import rebalance_target, servers

if TYPE_CHECKING:
    from engine.queue import QueueCore

_log = logging.getLogger("conveyor.replication")

# A follower whose durable offset stays behind what the leader had REPLICA_LAG_S ago
# leaves the ISR. Longer tolerates slower disks; shorter stalls writes less on a failure.
REPLICA_LAG_S = 2.0
# How often the ISR is checked, and the placement, while records are in flight.
MONITOR_S = 0.1
REBALANCE_S = 1.0
# How long an idle partition's check waits for a reason to look (an append, a follower's
# stream opening or closing, a change of the cluster's view, a gone node leaving the
# members: ClusterNode._wake_leading_in) before it looks anyway. Every reason is an
# event; this is the net under one missed. At rest a node leading 3,000 queues woke
# 600 of them a second at 5 s, 12% of a core.
IDLE_MONITOR_S = 60.0
# A write not committed in this long is answered 503: its outcome is unknown.
COMMIT_WAIT_S = 10.0
# A follower is sent the queue's snapshot, and then the log from the oldest live message's
# body (at most the snapshot's offset), rather than the whole log, when the log that saves
# it (from where it stands to there) is at least SNAPSHOT_SHIP_RATIO times the snapshot's
# size and at least SNAPSHOT_SHIP_LOG_BYTES_MIN (the rule "log saved >= ratio x
# snapshot"); and always when this log no longer holds where the follower stands. Below
# the minimum the log is cheap to send, and the follower keeps a whole log (one a repair
# can keep a prefix of, engine/repair.py). A queue with churn has a log many times its
# state: a new replica is then sent the state, not its history.
SNAPSHOT_SHIP_RATIO = 2
SNAPSHOT_SHIP_LOG_BYTES_MIN = 1024 * 1024

SHIP_ABOVE_COMMIT = False
"""True only in tests, as the negative control of the rule that a shipped snapshot's
offset is at most the commit offset: records above it may still be cut by a later leader,
and a follower installed from a snapshot of them could not cut them."""


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

    @property
    def links(self) -> Links:
        """This node's connections to other nodes, which carry the streams."""

    def step_down(self, name: str, reason: str) -> None:
        """Stop leading the queue: close this role now, and the queue soon after."""

    def knows_members(self) -> bool:
        """Whether the node has watched the cluster long enough to move replicas."""

    def placement(self, name: str, rf: int) -> list[str]:
        """The replicas the ring over the cluster's members gives the queue."""


class LeaderControl(Protocol):
    """What a leader changes and reads in etcd (replication.control.Control)."""

    async def set_members(self, partition: Partition, epoch: int, replicas: tuple[str, ...],
                          isr: tuple[str, ...], *, background: bool = False
                          ) -> Partition | None:
        """Change replicas and ISR while epoch is the current leader's; None if not.
        background: nothing waits on the change; others go first."""

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
        self._streams: dict[str, FollowerStream] = {}
        """Per follower replica, this partition's stream on the link to it."""
        self._kick_due = False
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._history = EpochHistory()
        self._tasks: list[asyncio.Task[None]] = []
        self._isr_busy = False
        self._monitor_wake = asyncio.Event()
        self._rebalance_owed = True
        """A wake-up asked for a look at the placement, which REBALANCE_S has put off:
        the partition is not idle until it is taken."""
        self._open_core: Callable[[], QueueCore] | None = None
        self._reopening = False
        self._connected: set[str] = set()
        """Followers whose stream is past its opening: shipping, acknowledging."""
        self._rebalanced_at = 0.0

    @property
    def min_insync(self) -> int:
        """min_insync_replicas, capped by the servers the partition's replicas are on:
        fewer only when the cluster had fewer servers than the replication factor when
        the replicas were placed (a gone node's replica is kept until it is replaced, see
        _rebalance)."""
        return min(self._min_insync, servers(self.partition.replicas))

    @property
    def in_sync(self) -> int:
        """The servers the ISR is on: what a write counts toward min_insync_replicas (two
        workers of one server are one copy against its loss; replication.members)."""
        return servers(self.partition.isr)

    @property
    def under_replicated(self) -> bool:
        """Fewer replicas in sync (on distinct servers) than the replication factor asks."""
        return self.in_sync < self.partition.rf

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, open_core: Callable[[], QueueCore],
                    prepare: Callable[[], None] | None = None,
                    executor: concurrent.futures.Executor | None = None) -> None:
        """Open the queue (replaying its log) and start the links and the ISR monitor.
        prepare (making the queue's files ready) runs first, in the same thread of
        executor (None: the loop's default)."""
        self._open_core = open_core

        def open_prepared() -> None:
            if prepare is not None:
                prepare()
            open_core()

        await asyncio.get_running_loop().run_in_executor(executor, open_prepared)
        self._ensure_streams()
        self._tasks.append(asyncio.create_task(self._monitor()))

    def _ensure_streams(self) -> None:
        """A stream to every follower replica (new ones too, after a rebalance), and none
        to a node that is no longer one."""
        if self.closed:
            return
        me = self.node.node_id
        wanted = {r for r in self.partition.replicas if r != me}
        for follower in wanted - self._streams.keys():
            stream = self._streams[follower] = FollowerStream(self, follower)
            self.node.links.attach(follower, stream)
        for follower in self._streams.keys() - wanted:
            stream = self._streams.pop(follower)
            self.node.links.detach(follower, stream)
            stream.down()

    def _set_partition(self, partition: Partition) -> None:
        self.partition = partition
        self._ensure_streams()

    def opened(self, core: QueueCore) -> None:
        """The broker opened (or reopened) the queue: stamp our epoch on its batches."""
        core.log.epoch = self.epoch
        core.log.on_append = self.appended
        core.replication = self
        self.core = core
        if not self._history.entries and core.log.first_offset > 0:
            # A log installed from a snapshot: the history before it was kept beside it.
            self._history = EpochHistory(install.read_epochs(core.directory))

    def close(self, reason: str) -> None:
        """Step down at once: refuse every waiting write (the links stop in ``stop``)."""
        if not self.closed:
            self.closed = True
            self.reason = reason
            self._fail_waiters(reason)

    async def stop(self, reason: str) -> None:
        """Step down: refuse every waiting write and stop shipping."""
        self.close(reason)
        for follower, stream in self._streams.items():
            self.node.links.detach(follower, stream)
            stream.down()
        self._streams.clear()
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
        if self.in_sync < self.min_insync:
            raise NotEnoughReplicasError(
                self.name, f"{len(self.partition.isr)} in-sync replicas "
                f"({', '.join(self.partition.isr)}), on fewer servers than "
                f"min_insync_replicas {self.min_insync}")
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
                async with asyncio.timeout(COMMIT_WAIT_S):
                    await asyncio.shield(future)
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
        for stream in self._streams.values():
            stream.kick()

    def appended(self) -> None:
        """Records were appended to the queue's log (from any thread: Log.on_append): wake
        the streams. Records no client waits for (a receive's lease, a visibility change)
        reach the followers so, without a poll. One wake per turn of the event loop,
        however many appends."""
        if not self._kick_due:
            self._kick_due = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to ship
                self._loop.call_soon_threadsafe(self._kicked)

    def _kicked(self) -> None:
        # Cleared before the streams look at the log: an append that saw it set had
        # written its records already, and this kick reads past them.
        self._kick_due = False
        self._kick()
        self._monitor_wake.set()

    def pinned(self) -> bool:
        """Whether the broker must keep the queue open although idle: a write waits, a
        follower's stream is finding where to start (it reads the log), or a connected
        follower has not acknowledged the whole log (its stream reads it). A node that
        takes over thousands of partitions opens more than open_queues_max at once; a
        stream whose queue was closed before it was positioned would open it again, and
        close another's, over and over."""
        core = self.core
        if core is None or core.closed:
            return False
        end = core.log.next_offset
        # tuple(): one step under the GIL (called from the broker's threads, while the
        # loop may change the set and the map).
        return bool(self._waiters) or any(self.acked.get(m, -1) < end
                                          for m in tuple(self._connected)) \
            or any(s.state in _FINDING for s in tuple(self._streams.values()))

    def log_core(self) -> QueueCore | None:
        """The open queue, for its log; None while the broker has it closed (idle), and
        then it is opened again in the background for the streams that need it."""
        core = self.core
        if core is not None and not core.closed:
            return core
        if not self._reopening and not self.closed and self._open_core is not None:
            self._reopening = True
            asyncio.get_running_loop().create_task(self._reopen())
        return None

    async def _reopen(self) -> None:
        assert self._open_core is not None
        try:
            await asyncio.to_thread(self._open_core)  # the broker calls opened()
        except (EngineError, OSError) as exc:
            _log.warning("queue %s: cannot open it again for its followers: %s",
                         self.name, exc)
        finally:
            self._reopening = False
            self._kick()

    def wake(self) -> None:
        """Something the ISR check depends on changed (the cluster's view, a follower's
        stream): check now, not at the idle partition's next look, and look at the
        placement too (the ring may have changed)."""
        self._rebalance_owed = True
        self._monitor_wake.set()

    def _idle(self, end: int) -> bool:
        """Nothing for the ISR check to watch: every live replica has acknowledged the whole
        log and no write waits. Lag is then impossible, and what else changes the ISR or
        the placement (a follower, a node, the ring) wakes the check."""
        if self._waiters or self._isr_busy or self._rebalance_owed:
            return False
        me = self.node.node_id
        isr = self.partition.isr
        # A connected follower outside the ISR is watched until it rejoins: it rejoins
        # when a check sees it hold what the ISR has committed, an ACK away.
        if any(m not in isr for m in self._connected):
            return False
        # A member not heard from in this epoch (its stream is still finding its place)
        # is waited for: its stream's start wakes the check, as does the first write.
        return all(m == me or m not in self.acked or self.acked[m] >= end for m in isr)

    # -- the ISR ----------------------------------------------------------------------------

    async def _monitor(self) -> None:
        while not self.closed:
            core = self.core
            # A wake-up set while the last check ran (its own ISR change, say) is not
            # lost: it is cleared only here, before the check that answers it.
            # A change of the members made outside this loop (leave_isr, before a
            # snapshot is shipped) wakes it when done: checking meanwhile could change
            # nothing, and the change may queue behind thousands in etcd.
            if (self._isr_busy or (core is not None and self._idle(core.log.next_offset))) \
                    and not self._monitor_wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_MONITOR_S):
                        await self._monitor_wake.wait()
            self._monitor_wake.clear()
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
                self._set_partition(seen)
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
            # once; one that is alive but behind gets REPLICA_LAG_S to catch up. One not
            # heard from in this epoch is behind only once a write waits for it: a node
            # taking over thousands of partitions positions their streams in seconds, and
            # took healthy followers of idle partitions out of their ISR meanwhile (and
            # back in: two etcd writes each, and the partition refusing writes between).
            keep = tuple(m for m in isr if m == me or (
                (live is None or m in live) and (
                    self.acked.get(m, 0) >= threshold
                    or (m not in self.acked and not self._waiters))))
            # A follower rejoins once it holds everything the members kept have made
            # durable: the commit offset then cannot go back when it starts counting again.
            # Over the kept members, not the ISR: a laggard still in the ISR holds the ISR's
            # commit back to its own offset, so it would always qualify, and a follower
            # that stays connected but stops acknowledging would never leave.
            # Over those heard from in this epoch, and this node: a member not heard from
            # yet (a leader just elected) counts 0 toward the commit offset, and a
            # follower far behind (one installing a snapshot, say) would rejoin at once,
            # and could be elected. A member heard from holds everything committed (it is
            # in the ISR, and its log agrees with this one up to where its stream
            # started), so the bar over them is no lower than what the ISR committed.
            commit = self.commit_offset(tuple(m for m in keep if m in self.acked))
            wanted = keep + tuple(m for m in self.partition.replicas
                                  if m not in keep and self.acked.get(m, -1) >= commit
                                  and m in self._connected)
            if set(wanted) != set(isr) and not self._isr_busy:
                await self._change_members(self.partition.replicas, wanted)
            elif now - self._rebalanced_at >= REBALANCE_S and not self._isr_busy:
                self._rebalanced_at = now
                self._rebalance_owed = False
                await self._rebalance()
            if self.in_sync < self.min_insync:
                self._fail_waiters(f"{len(self.partition.isr)} in-sync replicas, on fewer "
                                   f"servers than min_insync_replicas {self.min_insync}",
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
        target = rebalance_target(self.node.placement(self.name, self.partition.rf),
                                  replicas, self.partition.rf)
        if not target or set(target) == set(replicas):
            return
        # Added only on a live member: one that is gone (a restart, for node_gone_s) is
        # copied to once it is back. (The workers of a killed server leave one by one,
        # as their leases run out: the ring over the last of them is no place to add to.)
        live = self.node.live_nodes() or set()
        missing = tuple(n for n in target if n not in replicas and n in live)
        if missing:
            _log.warning("queue %s: adding replicas %s", self.name, list(missing))
            await self._change_members(replicas + missing, self.partition.isr)
            return
        if all(n in self.partition.isr for n in target):
            _log.warning("queue %s: replicas %s -> %s", self.name, list(replicas), target)
            isr = tuple(n for n in target if n in self.partition.isr)
            if await self._change_members(tuple(target), isr) and me not in target:
                self.node.step_down(self.name, "the ring placed this queue elsewhere")

    async def leave_isr(self, follower: str) -> bool:
        """Take follower out of the ISR, in etcd, before it is sent a snapshot: while it
        installs it holds less than it may have acknowledged, and it must not be counted,
        nor elected. True once it is out. It rejoins by the usual rule, once caught up."""
        if follower not in self.partition.isr:
            return True
        if self._isr_busy:
            return False
        isr = tuple(m for m in self.partition.isr if m != follower)
        await self._change_members(self.partition.replicas, isr)
        return follower not in self.partition.isr

    async def _change_members(self, replicas: tuple[str, ...], isr: tuple[str, ...]) -> bool:
        """Record new replicas and ISR in etcd; only then does the commit offset follow.
        True if it was recorded."""
        self._isr_busy = True
        try:
            ordered = tuple(m for m in replicas if m in isr)
            # With no write waiting on it, the change yields to elections in etcd: when a
            # node is lost, the others change thousands of ISRs at once (control.py).
            updated = await self.control.set_members(self.partition, self.epoch, replicas,
                                                     ordered, background=not self._waiters)
            if updated is None:
                current = await self.control.leader(self.name)
                if current is None or current.epoch != self.epoch:
                    self.node.step_down(self.name, "another leader took over")
                    return False
                fresh = await self.control.partition(self.name)
                if fresh is not None:
                    self._set_partition(fresh)
                return False
            if updated.isr != self.partition.isr:
                _log.warning("queue %s: ISR %s -> %s", self.name, list(self.partition.isr),
                             list(updated.isr))
            self._set_partition(updated)
            self._settle()
            return True
        except EngineError as exc:
            _log.warning("queue %s: ISR change failed: %s", self.name, exc)
            return False
        finally:
            self._isr_busy = False
            # A move of replicas takes steps, and a failed change is tried again: look
            # again soon rather than at the idle partition's next look.
            self._monitor_wake.set()

class FollowerStream:
    """One partition's session with one follower: a stream on the link to the follower's
    node (replication.link), which calls it; nothing here waits, and nothing runs while
    the stream is idle.

    OPEN is answered POSITION (or REFUSE); the follower's log is cut back with SYNC,
    answered ACK, if it diverges from ours; then APPENDs go out within the window, each
    answered in time by an ACK of the follower's durable offset. A follower far behind
    (SNAPSHOT_SHIP_RATIO) is sent the queue's snapshot instead, at an offset S no higher
    than the commit offset, once it is out of the ISR: SNAPSHOT chunks within the window
    (each answered by RECEIVED), then INSTALL, answered by ACK(S); APPENDs follow from S.
    A REFUSE, a broken rule or a broken connection starts the stream over (OPEN again)
    after link.RETRY_S.
    """

    def __init__(self, role: LeaderRole, follower: str) -> None:
        self.role = role
        self.follower = follower
        self.uid = role.uid
        self.state = _DOWN
        self.opens = 0
        """OPENs sent (for tests and the log)."""
        self._link: Link | None = None
        self._pending: bytes | None = None
        """A control frame (OPEN, SYNC) waiting for the stream's turn."""
        self._opened = False
        """Whether an OPEN went out on the current connection (a CLOSE then ends it)."""
        self._sent = 0
        self._agreed = 0
        self._window = Window()
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._shipment: _Shipment | None = None
        """The snapshot being sent (state _SNAPSHOT), its file held open."""
        self.snapshots = 0
        """Snapshots sent whole, INSTALL included (for tests and the log)."""

    # -- what the link calls ----------------------------------------------------------------

    def up(self, link: Link) -> None:
        self._link = link
        self._opened = False
        self._open()

    def down(self) -> None:
        self._link = None
        self._stop(_DOWN)

    def wants_turn(self) -> bool:
        role = self.role
        if role.closed:
            return False
        if self._pending is not None:
            return True
        if self.state == _SNAPSHOT:
            shipment = self._shipment
            assert shipment is not None
            if shipment.at < shipment.size:
                return self._window.room(0, 0)
            return True  # the INSTALL
        if self.state != _STREAMING:
            return False
        core = role.log_core()
        return (core is not None and self._sent < core.log.next_offset
                and self._window.room(self._sent, role.acked.get(self.follower, 0)))

    def frame(self, turn_bytes: int) -> bytes | None:
        role = self.role
        if role.closed:
            return None
        if self._pending is not None:
            frame, self._pending = self._pending, None
            if self.state == _OPENING:
                self._opened = True
                self.opens += 1
            return frame
        if not self.wants_turn():
            return None
        if self.state == _SNAPSHOT:
            return self._snapshot_frame(turn_bytes)
        core = role.log_core()
        assert core is not None
        data = core.log.read_raw(self._sent, min(turn_bytes, fr.APPEND_BYTES_MAX))
        frame = fr.encode(fr.Append(self.uid, role.epoch, self._sent, role.commit_offset(),
                                    data))
        end = batch_end(data)
        self._window.sent(end, len(data))
        self._sent = role._sent[self.follower] = end
        return frame

    def received(self, frame: fr.StreamFrame) -> None:
        role = self.role
        if isinstance(frame, fr.Received):
            if frame.epoch == role.epoch and self.state in (_SNAPSHOT, _INSTALLING):
                shipment = self._shipment
                assert shipment is not None
                if frame.received > shipment.at:
                    raise fr.ProtocolError(f"{self.follower} received {frame.received} "
                                           f"bytes of the snapshot, {shipment.at} were sent")
                self._window.acknowledged(frame.received)
                self._ready()
            return
        if isinstance(frame, fr.Refuse):
            if frame.epoch > role.epoch:
                role.node.step_down(role.name, f"fenced by epoch {frame.epoch}")
            if self.state not in (_DOWN, _WAITING):
                _log.info("queue %s: %s refused: %s", role.name, self.follower, frame.reason)
                self._wait()
        elif isinstance(frame, fr.Position):
            if self.state == _OPENING and frame.epoch == role.epoch:
                self.state = _POSITIONED
                self._task = asyncio.create_task(self._positioned(frame))
        elif isinstance(frame, fr.Ack) and frame.epoch == role.epoch:
            if self.state == _POSITIONED:
                # After its POSITION the follower acknowledges only a SYNC or an APPEND,
                # and none was sent: an ACK now claims what it was never sent. (Before its
                # POSITION, ACKs of the stream's previous opening may still come: moot.)
                raise fr.ProtocolError(f"{self.follower} acknowledged {frame.durable} "
                                       "before it was sent anything")
            if self.state == _SYNCING:
                if frame.durable > self._agreed:
                    raise fr.ProtocolError(f"cut to {self._agreed}, the follower's log ends "
                                           f"at {frame.durable}")
                if frame.durable < self._agreed:
                    # It started over (it could not rebuild its state at the cut): the
                    # choice of snapshot or log is made again.
                    self.state = _POSITIONED
                    self._task = asyncio.create_task(self._catch_up(frame.durable,
                                                                    frame.durable))
                else:
                    self._ship_from(frame.durable)
            elif self.state == _SNAPSHOT:
                raise fr.ProtocolError(f"{self.follower} acknowledged {frame.durable} "
                                       "before it was sent INSTALL")
            elif self.state == _INSTALLING:
                shipment = self._shipment
                assert shipment is not None
                if frame.durable != shipment.log_from:
                    raise fr.ProtocolError(f"{self.follower} acknowledged {frame.durable} "
                                           f"for a log to start at {shipment.log_from}")
                self.snapshots += 1
                _log.info("queue %s: %s installed the snapshot at %d (%d bytes)", role.name,
                          self.follower, shipment.offset, shipment.size)
                self._ship_from(shipment.log_from)
            elif self.state == _STREAMING:
                self._acknowledged(frame.durable)

    def closing(self) -> bytes | None:
        return fr.encode(fr.Close(self.uid, self.role.epoch)) if self._opened else None

    def restart(self, reason: str) -> None:
        if self.state not in (_DOWN, _WAITING):
            _log.info("queue %s: stream to %s starts over: %s", self.role.name, self.follower,
                      reason)
            self._wait()

    # -- what the role calls ----------------------------------------------------------------

    def kick(self) -> None:
        """Records were appended: take a turn if there is room."""
        if self._link is not None and self.wants_turn():
            self._link.ready(self)

    # -- the stream's states ----------------------------------------------------------------

    def _open(self) -> None:
        role = self.role
        self._stop(_OPENING)
        self._pending = fr.encode(fr.Open(role.epoch, self.uid, role.name,
                                          role.partition.attributes))
        self._ready()

    async def _positioned(self, position: fr.Position) -> None:
        role = self.role
        core = role.log_core()
        try:
            if core is None:
                raise fr.ProtocolError("the queue is not open here (it is being opened)")
            # Where the logs agree and whether a snapshot is to be sent, in one trip to a
            # thread: a queue just made has every follower positioned at once.
            agreed, shipment = await _in_thread(_plan_catch_up, role._history, core,
                                                position)
        except (EngineError, OSError) as exc:
            self.restart(f"{type(exc).__name__}: {exc}")
            return
        await self._catch_up(agreed, position.next_offset, (shipment,))

    async def _catch_up(self, agreed: int, follower_end: int,
                        planned: tuple[_Shipment | None] | None = None) -> None:
        """The follower's log agrees with ours up to agreed and ends at follower_end: send
        it the snapshot (which replaces its whole log), or cut it back (SYNC), or ship
        the log from where it stands. planned: the snapshot to send, if already chosen."""
        role = self.role
        core = role.log_core()
        shipment = planned[0] if planned is not None else None
        try:
            if core is None:
                raise fr.ProtocolError("the queue is not open here (it is being opened)")
            if planned is None:
                shipment = await _in_thread(_shipment_for, role._history, core, agreed)
        except (EngineError, OSError) as exc:
            if shipment is not None:
                shipment.close()
            self._task = None
            self.restart(f"{type(exc).__name__}: {exc}")
            return
        if self.state != _POSITIONED or self._task is not asyncio.current_task():
            if shipment is not None:
                shipment.close()
            return  # started over meanwhile
        if shipment is None:
            self._task = None
            if agreed < core.log.first_offset:
                self.restart(f"{self.follower} stands at {agreed}, before this log's first "
                             f"offset {core.log.first_offset}, and no snapshot is here")
            elif agreed < follower_end:
                self.state, self._agreed = _SYNCING, agreed
                self._pending = fr.encode(fr.Sync(self.uid, role.epoch, agreed))
                self._ready()
            else:
                self._ship_from(agreed)
            return
        await self._ship_snapshot(shipment)

    async def _ship_snapshot(self, shipment: _Shipment) -> None:
        role = self.role
        try:
            out = await role.leave_isr(self.follower)
        except BaseException:
            shipment.close()
            raise
        commit = role.commit_offset()
        if self.state != _POSITIONED or self._task is not asyncio.current_task():
            shipment.close()
            return
        self._task = None
        if not out:
            shipment.close()
            self.restart(f"{self.follower} is to be sent a snapshot and is still in the ISR")
            return
        if shipment.offset > commit and not SHIP_ABOVE_COMMIT:
            # Records above the commit offset may be cut by a later leader; a follower
            # whose log starts past them could not cut them. It is tried again soon: the
            # commit offset moves on as the in-sync followers acknowledge.
            shipment.close()
            self.restart(f"the snapshot at {shipment.offset} is above the commit offset "
                         f"{commit}")
            return
        _log.info("queue %s: sending %s the snapshot at %d (%d bytes) in place of the log "
                  "before it", role.name, self.follower, shipment.offset, shipment.size)
        self.state = _SNAPSHOT
        self._shipment = shipment
        self._window.clear()
        self._ready()

    def _snapshot_frame(self, turn_bytes: int) -> bytes:
        """The next SNAPSHOT chunk, or, once all are sent, the INSTALL."""
        shipment = self._shipment
        assert shipment is not None
        role = self.role
        if shipment.at < shipment.size:
            want = min(max(turn_bytes, 1), fr.APPEND_BYTES_MAX, shipment.size - shipment.at)
            data = os.pread(shipment.open_fd, want, shipment.at)
            if not data:
                raise fr.ProtocolError(f"the snapshot being sent ends at {shipment.at}")
            frame = fr.encode(fr.Snapshot(self.uid, role.epoch, shipment.offset,
                                          shipment.size, shipment.at, data))
            shipment.at += len(data)
            self._window.sent(shipment.at, len(data))
            return frame
        self.state = _INSTALLING
        return fr.encode(fr.Install(self.uid, role.epoch, shipment.offset, shipment.log_from,
                                    shipment.history))

    def _ship_from(self, offset: int) -> None:
        role = self.role
        if self._shipment is not None:
            self._shipment.close()
            self._shipment = None
        self._window.clear()
        self.state = _STREAMING
        self._sent = role._sent[self.follower] = offset
        role.acked[self.follower] = offset
        role._connected.add(self.follower)
        role.wake()  # it may rejoin the ISR, or be behind
        self._ready()

    def _acknowledged(self, durable: int) -> None:
        role = self.role
        # A follower cannot have made durable what it was never sent: such an ACK would
        # count records the follower lacks toward the commit offset.
        if durable > self._sent:
            raise fr.ProtocolError(f"{self.follower} acknowledged {durable}, past the "
                                   f"{self._sent} it was sent")
        self._window.acknowledged(durable)
        if durable > role.acked.get(self.follower, 0):
            role.acked[self.follower] = durable
            role._settle()
        self._ready()  # the window has room again

    def _ready(self) -> None:
        if self._link is not None and self.wants_turn():
            self._link.ready(self)

    def _wait(self) -> None:
        """Refused or broken: open again after link.RETRY_S (if still on a link)."""
        self._stop(_WAITING)
        self._retry = self.role._loop.call_later(link_module.RETRY_S, self._reopen)

    def _reopen(self) -> None:
        self._retry = None
        if self.state == _WAITING and self._link is not None and not self.role.closed:
            self._open()

    def _stop(self, state: str) -> None:
        """Forget what is in flight, and enter state."""
        self.state = state
        self._pending = None
        self._window.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._shipment is not None:
            self._shipment.close()
            self._shipment = None
        self.role._connected.discard(self.follower)
        self.role.wake()


# A stream's states: no connection; OPEN queued or sent; POSITION taken, the divergence
# (and whether to send a snapshot) being found; SYNC queued or sent; shipping; sending a
# snapshot; INSTALL sent; refused or broken, opening again soon.
_DOWN, _OPENING, _POSITIONED, _SYNCING, _STREAMING, _WAITING = (
    "down", "opening", "positioned", "syncing", "streaming", "waiting")
_SNAPSHOT, _INSTALLING = "snapshot", "installing"
# States in which a stream has yet to start shipping from its place in the log.
_FINDING = frozenset((_OPENING, _POSITIONED, _SYNCING, _SNAPSHOT, _INSTALLING))


class _Shipment:
    """A snapshot file being sent, held open: the leader's next snapshot replaces the
    file by a rename, and this one still reads the one it began with."""

    def __init__(self, fd: int, size: int, offset: int, log_from: int) -> None:
        self.fd: int | None = fd
        self.size = size
        self.offset = offset
        self.log_from = log_from
        """Where the follower's log starts over: the oldest live message's body, at most
        the snapshot's offset."""
        self.at = 0
        """Bytes sent."""
        self.history: tuple[tuple[int, int], ...] = ()

    @property
    def open_fd(self) -> int:
        assert self.fd is not None
        return self.fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_T = TypeVar("_T")


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """fn(*args) in a thread, as asyncio.to_thread, for the steps that may open a snapshot
    to ship. A stream stopped meanwhile cancels its task, and to_thread would then drop
    the result, and with it an open file descriptor: here the thread's result is closed
    once it comes (a thread cannot be stopped)."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_dropped)
        raise


def _close_dropped(future: asyncio.Future[Any]) -> None:
    """Close any shipment in the result of a thread nobody waits for any more."""
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    for item in result if isinstance(result, tuple) else (result,):
        if isinstance(item, _Shipment):
            item.close()


def _plan_catch_up(history: EpochHistory, core: QueueCore, position: fr.Position
                   ) -> tuple[int, _Shipment | None]:
    """Where the follower's log (its POSITION) agrees with ours, and the snapshot to send
    it, if any (_shipment_for). Reads the log: called in a thread."""
    entries = history.update(core.log)
    agreed = min(divergence(entries, core.log.next_offset, position.history,
                            position.next_offset), position.next_offset)
    return agreed, _shipment_for(history, core, agreed)


def _shipment_for(history: EpochHistory, core: QueueCore, agreed: int) -> _Shipment | None:
    """The snapshot to send a follower whose log agrees with ours up to agreed, with the
    epoch history before the log it needs; None if it is to be sent the log."""
    shipment = _snapshot_to_ship(core, agreed)
    if shipment is not None:
        try:
            # Read past the snapshot's offset: the INSTALL carries the history before it.
            entries = history.update(core.log)
        except BaseException:
            shipment.close()
            raise
        shipment.history = tuple((e, o) for e, o in entries if o < shipment.log_from)
    return shipment


def _snapshot_to_ship(core: QueueCore, offset: int) -> _Shipment | None:
    """The queue's snapshot, opened and checked, if a follower whose log agrees with ours
    up to offset is to be sent it (SNAPSHOT_SHIP_RATIO); None if it is to be sent the log.
    A stat and the log's segment sizes decide most cases before the file is read."""
    log = core.log
    path = os.path.join(core.directory, SNAPSHOT_FILE)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    floor = max(SNAPSHOT_SHIP_LOG_BYTES_MIN, SNAPSHOT_SHIP_RATIO * size)
    behind = offset < log.first_offset
    if not behind and log.approx_bytes(offset, log.next_offset) < floor:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        # Checked whole, and the log it needs read off its own state (the oldest body of
        # a message it holds): what records after it delete may yet be cut.
        at, needed = log_floor(data, path)
        del data
    except BaseException:
        os.close(fd)
        raise
    log_from = max(needed, log.first_offset)
    if log_from < log.next_offset:
        # needed is a record's offset, which may be inside a batch (sent ten at once);
        # the follower's log takes whole batches only, so it starts at that batch's base.
        try:
            log_from = batch_base(log.read_raw(log_from, 1))
        except BaseException:
            os.close(fd)
            raise
    if log_from <= offset or not (behind or log.approx_bytes(offset, log_from) >= floor):
        os.close(fd)
        return None
    return _Shipment(fd, size, at, log_from)


def describe(role: LeaderRole) -> dict[str, Any]:
    """For /v1/cluster: the leader's view of one queue."""
    return {"queue": role.name, "epoch": role.epoch, "replicas": list(role.partition.replicas),
            "isr": list(role.partition.isr), "commit_offset": role.commit_offset(),
            "min_insync": role.min_insync, "under_replicated": role.under_replicated,
            "acked": dict(role.acked), "connected": sorted(role._connected)}
