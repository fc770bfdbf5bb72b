"""One node of a cluster: its etcd lease, the queues it leads, and those it follows.

The node's view of the cluster (replication.view) is read from etcd once and then kept
current by a watch; each change names the partitions it touched, and only those are
brought in line (``_reconcile_one``), with timers only where time itself decides:

- a queue with no leader gets one from its ISR: the first live member in replica order
  tries at once, the others once ELECTION_GRACE_S has passed (a timer), so leadership
  spreads the way the ring placed the replicas; a node that comes or goes makes every
  leaderless queue be looked at again;
- a leader whose key is gone, or carries another epoch, steps down;
- queues deleted from etcd are deleted here;
- a step that failed for want of etcd is tried again after RETRY_S.

At rest, with nothing changing, the node reads nothing from etcd and loops over nothing:
its cost does not grow with the number of partitions.

The node's lease is kept alive on a thread of its own (replication.lease says why). A node
that cannot prove its lease alive (etcd unreachable, or the process was paused) stops
acknowledging writes at once: ``lease_valid`` is checked before every acknowledgement,
not only by the keeper.

The node owns the inter-node port (replication.listener) and serves replication on it;
the roles reach the node only through their protocols (``LeaderNode``, ``FollowerNode``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import heapq
import logging
import secrets
import time
from typing import Any

from engine import Broker, Log
from engine._ring import HashRing
from engine.errors import (
    ConfigError,
    CorruptDataError,
    EngineError,
    QueueDamagedError,
    QueueNotFoundError,
)
from engine.limits import QueueAttributes, check_queue_name
from engine.queue import QueueCore
from engine.repair import is_mending, mended, set_aside_replica
from replication import frames as fr
from replication.control import ClusterView, Control, NodeInfo, Partition
from replication.errors import ControlUnavailableError, NotLeaderError
from replication.etcd_access import EtcdAccess
from replication.follower import Replica, ReplicationServer, refusal
from replication.leader import LeaderRole, describe
from replication.lease import LeaseKeeper
from replication.link import Links
from replication.listener import Listener
from replication.members import ring_placement
from replication.peer import Peers
from replication.view import Changes, ViewKeeper

_log = logging.getLogger("conveyor.cluster")

ELECTION_GRACE_S = 1.0
LEASE_TTL_S = 5
# A wake-up for a change of members that time makes comes this long after it is due, so
# that the check it wakes sees the change (monotonic clocks compared at a boundary).
MEMBERS_SETTLE_S = 0.1
# A step of reconciling that failed (etcd unreachable, the lease not proven alive) is
# tried again this soon.
RETRY_S = 1.0
# Elections (with the opening of each queue won) under way at once: a node taking over
# thousands of partitions takes them in waves, its loop still answering meanwhile.
ELECTIONS_MAX = 256
# Each step of a shutdown gets this long (see bounded_step).
CLOSE_STEP_S = 3.0
# Partitions reconciled between two yields of the event loop (a whole pass, at start or
# after a compaction, does not hold the loop).
RECONCILE_SLICE = 256
# A leader's OPEN names its epoch, the etcd revision its leader key was made at. The
# follower answers from its watched view once the view has applied that revision (it
# then shows that key, or what replaced it), waiting this long for it; only a refusal,
# or a view that far behind, reads etcd. Reading etcd twice per OPEN made every
# creation and failover of thousands of partitions wait on etcd.
ACCEPT_VIEW_WAIT_S = 2.0
# OPENs waiting for the view at once; past this, they read etcd instead of waiting.
VIEW_WAITS_MAX = 4096
# Threads that make and open this node's copies of queues, apart from the loop's default
# executor (on which they queued behind the rest of the node's blocking work). A light
# open (a new copy, or a followed copy whose log from offset 0 is under HEAVY_OPEN_BYTES:
# every queue being created, and the idle majority of those a node takes over when another
# is lost) is a few fsyncs and a little Python; such opens share one thread, because more
# threads spend more handing the interpreter lock between them than the overlap of their
# fsyncs gains. On three nodes, creating 2,000 queues: 104-109 queues/s and 5.0-5.3 ms of
# CPU per node per queue with 8 threads, 151-154/s and 3.3 ms with one; taking over 3,704
# partitions: 7.3 s with 8, 7.5-8.0 s with one. A heavy open replays a longer log, or a
# snapshot, or a copy whose size is not known without reading the disk (as after a
# restart): heavy opens have threads of their own, so that the light ones are not held up
# behind them.
HEAVY_OPEN_BYTES = 4 << 20
HEAVY_OPEN_THREADS = 4
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2
# How long CreateQueue waits for the new queue's first leader.
CREATE_WAIT_S = 10.0
# A node whose lease has been gone this long counts as having left the cluster, and the
# ring places its replicas on other nodes. Shorter than this is a restart, not a leave:
# moving a queue's data for every restart would cost more than waiting.
NODE_GONE_S = 60.0


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    etcd: EtcdAccess
    """The etcd members, and how to reach them (TLS, credentials)."""
    node_id: str
    http_url: str
    """Where other nodes forward requests for queues this node leads."""
    replication_host: str
    replication_port: int
    replication_advertise: str = ""
    """host:port other nodes connect to ("" for replication_host:replication_port)."""
    lease_ttl_s: int = LEASE_TTL_S
    replication_factor: int = REPLICATION_FACTOR
    min_insync_replicas: int = MIN_INSYNC_REPLICAS
    node_gone_s: float = NODE_GONE_S
    """A node unseen (no live lease) this long has left: its replicas move elsewhere."""
    prefix: str = "/conveyor/"
    peer_secret_file: str | None = None
    """The cluster secret every node proves to the others (replication.peer); None: a
    subkey of the master key, which every node then shares."""
    peer_auth: bool = True
    """False only in tests that show an attack peer authentication stops."""


async def bounded_step(step: str, work: Any) -> None:
    """One step of a node's shutdown, given CLOSE_STEP_S: everything acknowledged is on
    disk already, so a step that hangs (a peer or etcd that stopped answering) is logged
    and passed rather than holding the process up.

    The step runs as a task that is cancelled and left behind when its time is up, never
    awaited again: a step that does not end when cancelled (a library's wait that drops
    a cancellation) cannot hold the shutdown either."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait([task], timeout=CLOSE_STEP_S)
    if not done:
        task.cancel()
        _log.warning("shutting down: %s took more than %g s; going on", step, CLOSE_STEP_S)
    elif not task.cancelled() and task.exception() is not None:
        # A failed step must not keep the others from running.
        _log.warning("shutting down: %s failed: %s", step, task.exception())


def open_is_heavy(followed: Log | None, on_disk: bool) -> bool:
    """Whether opening a queue's copy takes one of the heavy opens' threads (see
    HEAVY_OPEN_BYTES). followed: the log of the copy followed here, if any; on_disk: the
    node has the copy's files."""
    if followed is not None:
        # A log that starts past 0 has a snapshot before it, of a size not known here.
        return followed.size_bytes >= HEAVY_OPEN_BYTES or followed.first_offset > 0
    return on_disk


class ClusterNode:
    """See the module docstring. Also the broker's Leadership: it opens only led queues."""

    def __init__(self, config: ClusterConfig, peers: Peers) -> None:
        self.config = config
        self.peers = peers
        self.node_id = config.node_id
        self.control = Control(config.etcd, config.prefix)
        self.broker: Broker | None = None
        self.keeper = ViewKeeper(self.control, self._changed)
        self.lease = LeaseKeeper(config.etcd, config.prefix, NodeInfo(
            self.node_id, config.http_url, config.replication_advertise
            or f"{config.replication_host}:{config.replication_port}"),
            config.lease_ttl_s, self._lease_lost, self._rejoined)
        self._started_view = False
        self.leading: dict[str, LeaderRole] = {}
        self.replicas: dict[str, Replica] = {}
        self._leaderless_since: dict[str, float] = {}
        self._mending: set[str] = set()
        """Queues whose copy here a repair left short: it leaves their ISR, never leads."""
        self._gone_at: dict[str, float] = {}
        """Nodes seen leaving (their key deleted), and when: members for node_gone_s more."""
        self._rings: dict[tuple[str, ...], HashRing] = {}
        self._started = time.monotonic()
        self._accepted: dict[str, int] = {}
        """Per queue, the partition revision at which a leader's OPEN was last accepted."""
        self._dirty: set[str] = set()
        """Partitions to reconcile: a change named them, or a timer came due."""
        self._deleted: set[str] = set()
        """Partitions seen deleted from etcd, whose copies here are still to go."""
        self._due: dict[str, float] = {}
        self._timers: list[tuple[float, str]] = []
        """(when, name): a heap of partitions to look at again; _due holds the earliest."""
        self._wake = asyncio.Event()
        self._electing: set[str] = set()
        self._recheck: set[str] = set()
        """Partitions that changed while an election for them was under way."""
        self._elections = asyncio.Semaphore(ELECTIONS_MAX)
        self._election_tasks: set[asyncio.Task[None]] = set()
        self._light_opens = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="conveyor-open")
        self._heavy_opens = concurrent.futures.ThreadPoolExecutor(
            HEAVY_OPEN_THREADS, thread_name_prefix="conveyor-open-heavy")
        self._leader_waits: dict[str, list[asyncio.Future[None]]] = {}
        self._view_waits: list[tuple[int, int, asyncio.Future[None]]] = []
        """(revision, id, waiter): a heap of OPENs waiting for the view to apply revision."""
        self._view_lagging = 0
        """A revision an OPEN waited for in vain: until the view passes it, none waits."""
        self._opening: dict[str, asyncio.Event] = {}
        """Queues elected here whose leadership is still opening them."""
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False
        self.listener = Listener(peers)
        """The inter-node port; partition calls add their route (server/cluster/calls.py)."""
        self.listener.route(fr.MAGIC, ReplicationServer(self).serve, fr.FRAME_BYTES_MAX)
        self.links = Links(peers, self.replication_address)
        """This node's connections to the followers of what it leads: one per node, which
        carries every partition led here and followed there (replication.link)."""

    @property
    def view(self) -> ClusterView | None:
        """The cluster as this node sees it (None before it has read it)."""
        return self.keeper.view if self._started_view else None

    # -- start and stop ---------------------------------------------------------------------

    async def connect(self) -> bytes:
        """Connect to etcd; return the cluster's receipt key (the broker needs it)."""
        await self.control.connect()
        return await self.control.receipt_key()

    async def start(self, broker: Broker) -> None:
        """Serve the replication port, join the cluster, and start reconciling."""
        self.broker = broker
        self._mending = await asyncio.to_thread(self._find_mending)
        await self._check_peer_key()
        await self.listener.start(self.config.replication_host, self.config.replication_port)
        await self.lease.start()
        view = await self.keeper.load()
        self._started_view = True
        await self._keep_unknown(view)
        self._dirty |= set(view.partitions)
        self._tasks = [asyncio.create_task(self.keeper.run()),
                       asyncio.create_task(self._reconcile_loop()),
                       asyncio.create_task(self.control.keep_token())]
        # Idle led partitions wait for events (leader.py); these two changes of the
        # members come with time, not with an event, so they get a wake-up of their own.
        self._wake_leading_in(self.config.node_gone_s)  # knows_members() turns true

    async def _check_peer_key(self) -> None:
        """Refuse to start with another peer key than the cluster's: every link to and
        from this node would fail its handshake, one by one, far from the cause."""
        fingerprint = self.peers.fingerprint()
        agreed = await self.control.agreed("peer-key-fingerprint", fingerprint.encode())
        if agreed.decode() != fingerprint:
            raise ConfigError(
                "cluster secret", self.config.peer_secret_file or "from the master key",
                "it is not the one the cluster's other nodes prove (its fingerprint in etcd "
                "differs): start every node with the same --cluster-secret-file, or the "
                "same --master-key-file")

    async def close(self) -> None:
        self._closed = True
        tasks = self._tasks + list(self._election_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await bounded_step("stopping its tasks",
                               asyncio.gather(*tasks, return_exceptions=True))
        for name in list(self.leading):
            self.step_down(name, "shutting down")
        if self._stopping:
            await bounded_step("stepping down", asyncio.gather(
                *self._stopping, return_exceptions=True))
        await bounded_step("closing replication links", self.links.close())
        await bounded_step("closing the inter-node port", self.listener.close())
        for replica in self.replicas.values():
            await asyncio.to_thread(replica.close)
        self.replicas.clear()
        # The elections and the streams that open copies were stopped above; an open
        # still queued is not started.
        self._light_opens.shutdown(wait=False, cancel_futures=True)
        self._heavy_opens.shutdown(wait=False, cancel_futures=True)
        # The lease revoked: leadership passes at once rather than when it runs out.
        await bounded_step("revoking the lease", self.lease.stop())
        await bounded_step("closing the etcd client", self.control.close())

    def lease_valid(self) -> bool:
        return self.lease.valid()

    async def _lease_lost(self) -> None:
        """The lease expired (this process was paused, or etcd unreachable too long):
        everything it held is another node's now (run on this loop by the keeper)."""
        for name in list(self.leading):
            self.step_down(name, "this node's etcd lease expired")

    def _rejoined(self) -> None:
        """A new lease: every partition is looked at again (leaderless ones to lead)."""
        view = self.view
        if view is not None:
            self._mark(view.partitions)

    # -- leadership as the broker sees it ---------------------------------------------------

    def check(self, name: str) -> None:
        role = self.leading.get(name)
        if role is None or role.closed:
            raise NotLeaderError(name, self.leader_url(name))

    def opened(self, core: QueueCore) -> None:
        # The role may have stepped down since check() (the loop does that while the
        # broker opens the queue in a thread): the broker then closes the core.
        role = self.leading.get(core.name)
        if role is None or role.closed:
            raise NotLeaderError(core.name, self.leader_url(core.name))
        role.opened(core)

    def pinned(self, name: str) -> bool:
        # Called by the broker under its lock, from any thread: reads of a few fields.
        role = self.leading.get(name)
        return role is not None and role.pinned()

    def leader_url(self, name: str) -> str | None:
        view = self.view
        if view is None:
            return None
        leader = view.leaders.get(name)
        if leader is None or leader.node_id == self.node_id:
            return None
        node = view.nodes.get(leader.node_id)
        return None if node is None else node.http

    def knows_members(self) -> bool:
        """Whether this node has watched the cluster for node_gone_s: until then a node
        it has not seen may only be restarting, and nothing is moved off it."""
        return time.monotonic() - self._started >= self.config.node_gone_s

    def members(self) -> list[str]:
        """The nodes the ring places replicas on: alive, or gone for less than
        node_gone_s (sorted: every node builds the same ring)."""
        now = time.monotonic()
        alive = set(self.view.nodes) if self.view is not None else set()
        return sorted(alive | {n for n, gone in self._gone_at.items()
                               if now - gone < self.config.node_gone_s})

    def placement(self, name: str, rf: int, members: list[str] | None = None) -> list[str]:
        """The replicas the ring over members (default: self.members()) gives a queue, in
        preference order: at most one per server (replication.members)."""
        members = self.members() if members is None else sorted(members)
        key = tuple(members)
        ring = self._rings.get(key)
        if ring is None:
            # Every leader asks every REBALANCE_S: one ring per membership, not per ask.
            ring = HashRing()
            for node_id in members:
                ring.add(node_id)
            self._rings = {key: ring}
        return ring_placement(ring, name, rf, members)

    def leader_node(self, name: str) -> NodeInfo | None:
        """Where partition calls for the queue go: its leader, as this node's view says
        (None: no leader, or this node)."""
        view = self.view
        leader = view.leaders.get(name) if view is not None else None
        if view is None or leader is None or leader.node_id == self.node_id:
            return None
        return view.nodes.get(leader.node_id)

    async def locate(self, name: str) -> NodeInfo | None:
        """leader_node, read from etcd now: the view follows etcd by a watch, and a queue
        made or failed over a moment ago may have a leader only etcd knows yet."""
        try:
            leader = await self.control.leader(name)
            if leader is None or leader.node_id == self.node_id:
                return None
            view = self.view
            node = view.nodes.get(leader.node_id) if view is not None else None
            if node is None:
                node = await self.control.node(leader.node_id)
        except ControlUnavailableError:
            return None
        return node

    async def partition_uids(self, names: list[str]) -> dict[int, int]:
        """uid -> index in names, for the partitions of one queue (read from etcd for
        those this node's view does not hold yet)."""
        found: dict[int, int] = {}
        view = self.view
        for i, name in enumerate(names):
            partition = view.partitions.get(name) if view is not None else None
            if partition is None:
                with contextlib.suppress(ControlUnavailableError):
                    partition = await self.control.partition(name)
            if partition is not None:
                found[partition.uid] = i
        return found

    def seen_partition(self, name: str) -> Partition | None:
        """The queue's partition record, as of the last reading (None before it)."""
        view = self.view
        return None if view is None else view.partitions.get(name)

    def live_nodes(self) -> set[str] | None:
        """Nodes whose lease is alive, as of the last reading (None before the first)."""
        return None if self.view is None else set(self.view.nodes)

    def replication_address(self, node_id: str) -> tuple[str, int] | None:
        node = self.view.nodes.get(node_id) if self.view is not None else None
        return None if node is None else node.replication_address()

    def step_down(self, name: str, reason: str) -> None:
        """Stop leading a queue: refuse its waiting writes now, close it in the background."""
        role = self.leading.pop(name, None)
        if role is None:
            return
        _log.warning("queue %s: stepping down from epoch %d: %s", name, role.epoch, reason)
        role.close(reason)
        task = asyncio.create_task(self._finish_step_down(role, reason))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _finish_step_down(self, role: LeaderRole, reason: str) -> None:
        await role.stop(reason)
        assert self.broker is not None
        await asyncio.to_thread(self.broker.close_queue, role.name)
        # Give the leader key up at once if it is still ours, so that the next leader
        # need not wait for the lease to run out (a node stepping down everywhere gives
        # them up in a few batched transactions).
        with contextlib.suppress(EngineError):
            await self.control.resign(role.name, role.epoch)

    # -- the follower side ------------------------------------------------------------------

    async def accept_leader(self, name: str, uid: int, epoch: int, node_id: str
                            ) -> tuple[int, str] | None:
        """None if node_id leads queue uid in epoch; else (newest epoch, why).

        Answered by the view once it has applied the epoch's revision
        (ACCEPT_VIEW_WAIT_S). The view then shows the leader key made at that revision
        or a newer one: accepting on it is as good as a read of etcd, which is as stale
        by the time its answer arrives. A refusal reads etcd, which has the last word
        (the view may not list a replica added since)."""
        view = await self._view_at(epoch, ACCEPT_VIEW_WAIT_S)
        leader = partition = None
        refused: tuple[int, str] | None = (0, "")
        if view is not None:
            leader, partition = view.leaders.get(name), view.partitions.get(name)
            refused = refusal(self.node_id, leader, partition, uid, epoch, node_id)
        if refused is not None:
            leader = await self.control.leader(name)
            partition = await self.control.partition(name)
            refused = refusal(self.node_id, leader, partition, uid, epoch, node_id)
            if refused is not None:
                return refused
        assert partition is not None
        self._accepted[name] = partition.revision
        role = self.leading.get(name)
        if role is not None:
            self.step_down(name, f"epoch {epoch} is newer")
        for task in list(self._stopping):
            with contextlib.suppress(Exception):
                await task
        return None

    async def view_at(self, epoch: int) -> None:
        """Return once the view has applied revision epoch, or after ACCEPT_VIEW_WAIT_S
        (accept_leader then reads etcd)."""
        await self._view_at(epoch, ACCEPT_VIEW_WAIT_S)

    async def replica(self, name: str, uid: int, attributes: dict[str, Any]) -> Replica:
        replica = self.replicas.get(name)
        if replica is not None and replica.uid == uid:
            return replica
        if replica is not None:  # the name was deleted and made again
            await asyncio.to_thread(replica.close)
            del self.replicas[name]
        broker = self.broker
        assert broker is not None
        fsync = str(broker.fsync_policy)

        def adopt_and_open() -> Replica:
            # One trip to a thread for both: a node adopts a copy of every queue placed on
            # it, and each trip hands the interpreter lock over (twice).
            return Replica(name, uid, broker.adopt_queue(name, uid, attributes), fsync)

        try:
            replica = await asyncio.get_running_loop().run_in_executor(
                self._opener(name, None), adopt_and_open)
        except CorruptDataError as exc:
            directory = broker.queue_dir(name)
            # This copy is the leader's log, byte for byte, and the leader is asking for
            # it: what follows the first damage is set aside (never deleted), and the
            # leader copies it again from there.
            repair = await asyncio.to_thread(set_aside_replica, directory)
            self._mending.add(name)
            broker.forget_damage(name)  # it may open; it leads only once back in the ISR
            _log.error("queue %s: this follower's copy is damaged (%s); %s", name, exc,
                       repair.describe())
            try:
                replica = await asyncio.to_thread(Replica, name, uid, directory, fsync)
            except CorruptDataError as again:
                if not repair.refetched_from:
                    raise
                # The open saw damage the survey did not: nothing of this copy is kept.
                repair = await asyncio.to_thread(set_aside_replica, directory, False)
                _log.error("queue %s: the kept part of this follower's copy is damaged "
                           "too (%s); %s", name, again, repair.describe())
                replica = await asyncio.to_thread(Replica, name, uid, directory, fsync)
        self.replicas[name] = replica
        if name in self._mending:
            # At once, not at the next reconcile: the leader that just connected is alive.
            await self._leave_isr_while_mending(name)
        return replica

    # -- a repaired copy ----------------------------------------------------------------------

    def _find_mending(self) -> set[str]:
        """The queues whose copy here a repair left short (engine.repair.MENDING_FILE)."""
        broker = self.broker
        assert broker is not None
        return {e.name for e in broker.catalog.entries()
                if is_mending(broker.queue_dir(e.name))}

    def mending(self, name: str) -> None:
        """A follower's copy here started over empty (replication.follower.Replica.truncate,
        which marked it on disk): it leaves the ISR before it may lead, as a repaired copy
        does; the partition's next look (at once) sees to it."""
        self._mending.add(name)
        self._later(name, 0.0)

    async def _leave_isr_while_mending(self, name: str) -> None:
        """Take this node out of the partition's ISR while its copy is short.

        A repaired copy lacks records it had acknowledged, yet the partition's record may
        still count it in sync, and an ISR member may be elected: with its leader gone
        it would lead without committed records. So it leaves the ISR itself (only while
        the leader's epoch stands, as a leader's own change would), and only then forgets
        the mark; the leader adds it back by the usual rule once it holds what the ISR
        has committed. Until then it never leads (``_reconcile_one``).
        """
        broker = self.broker
        assert broker is not None
        try:
            partition = await self.control.partition(name)
            if partition is None or self.node_id not in partition.isr:
                await asyncio.to_thread(mended, broker.queue_dir(name))
                self._mending.discard(name)
                return
            leader = await self.control.leader(name)
            others = tuple(m for m in partition.isr if m != self.node_id)
            if leader is None or leader.node_id == self.node_id or not others:
                return  # no leader to follow: the partition waits, without this copy
            if await self.control.set_members(partition, leader.epoch, partition.replicas,
                                              others) is None:
                return  # the record or the epoch changed meanwhile: again next time
            await asyncio.to_thread(mended, broker.queue_dir(name))
            self._mending.discard(name)
            _log.warning("queue %s: the repaired copy here left the ISR %s; it rejoins once "
                         "it holds what the ISR has committed", name, list(partition.isr))
        except (EngineError, OSError) as exc:
            _log.warning("queue %s: the repaired copy here cannot leave the ISR yet: %s",
                         name, exc)

    async def _release_replica(self, name: str) -> None:
        replica = self._take_replica(name)
        if replica is not None:
            await asyncio.to_thread(replica.close)

    def _opener(self, name: str, replica: Replica | None) -> concurrent.futures.Executor:
        """The threads that open the queue's copy here (replica: the copy followed here,
        if any)."""
        broker = self.broker
        known = broker is not None and broker.catalog.uid_of(name) is not None
        heavy = open_is_heavy(replica.log if replica is not None else None, known)
        return self._heavy_opens if heavy else self._light_opens

    def _take_replica(self, name: str) -> Replica | None:
        """Stop following the queue here: end its stream; the caller closes its log."""
        replica = self.replicas.pop(name, None)
        if replica is not None and replica.session is not None:
            replica.session.close()
        return replica

    # -- reconciling ----------------------------------------------------------------------

    def _changed(self, changes: Changes) -> None:
        """The view changed (replication.view): mark what to look at."""
        now = time.monotonic()
        for node_id in changes.nodes:
            if node_id in changes.gone:
                self._gone_at[node_id] = now
                self._wake_leading_in(self.config.node_gone_s)  # it leaves members()
            else:
                self._gone_at.pop(node_id, None)
        self._deleted |= changes.deleted
        self._mark(changes.partitions | changes.leaders)
        # Idle led partitions check their ISR and placement only when woken (leader.py):
        # a node coming or going wakes every one, a changed record its own.
        if changes.nodes:
            for role in self.leading.values():
                role.wake()
            # Who may lead a leaderless partition depends on which replicas are alive.
            view = self.view or self.keeper.view
            self._mark(name for name in view.partitions if name not in view.leaders)
        else:  # one change at a time, of thousands led: look up only the changed
            for name in changes.partitions:
                if (led := self.leading.get(name)) is not None:
                    led.wake()
        for name in changes.leaders:
            for waiter in self._leader_waits.pop(name, []):
                if not waiter.done():
                    waiter.set_result(None)
        revision = self.keeper.view.revision
        while self._view_waits and self._view_waits[0][0] <= revision:
            waiter = heapq.heappop(self._view_waits)[2]
            if not waiter.done():
                waiter.set_result(None)

    async def _view_at(self, revision: int, timeout_s: float) -> ClusterView | None:
        """The view, once it has applied revision (None: not within timeout_s, or a wait
        for an older revision timed out and the view has not passed it yet: a view that
        lags, a broken watch say, is not waited for by every OPEN in turn)."""
        view = self.view
        if view is None or view.revision >= revision:
            return view
        if view.revision < self._view_lagging:
            return None
        if len(self._view_waits) >= VIEW_WAITS_MAX:
            self._view_waits = [w for w in self._view_waits if not w[2].done()]
            heapq.heapify(self._view_waits)
            if len(self._view_waits) >= VIEW_WAITS_MAX:
                return None
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._view_waits, (revision, id(waiter), waiter))
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            self._view_lagging = max(self._view_lagging, revision)
            return None  # its entry goes when the revision comes, or at the next prune
        return view

    def _wake_leading_in(self, delay_s: float) -> None:
        """Wake every led partition just after delay_s: the members the ring places
        replicas on change then (a gone node drops out after node_gone_s)."""
        def wake() -> None:
            for role in self.leading.values():
                role.wake()

        asyncio.get_running_loop().call_later(delay_s + MEMBERS_SETTLE_S, wake)

    def _mark(self, names: Any) -> None:
        self._dirty.update(names)
        if self._dirty:
            self._wake.set()

    def _later(self, name: str, delay_s: float) -> None:
        """Look at a partition again in delay_s (or sooner, if already due sooner)."""
        when = time.monotonic() + delay_s
        if self._due.get(name, float("inf")) > when:
            self._due[name] = when
            heapq.heappush(self._timers, (when, name))
            self._wake.set()

    def _take_due(self) -> float | None:
        """Move partitions whose time came to the dirty set; seconds until the next."""
        now = time.monotonic()
        while self._timers:
            when, name = self._timers[0]
            if self._due.get(name) != when:
                heapq.heappop(self._timers)  # superseded by an earlier time
            elif when <= now:
                heapq.heappop(self._timers)
                del self._due[name]
                self._dirty.add(name)
            else:
                return when - now
        return None

    async def _reconcile_loop(self) -> None:
        while True:
            wait = self._take_due()
            if not self._dirty:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            names, self._dirty = sorted(self._dirty), set()
            local = self._local_uids(names)
            for i, name in enumerate(names):
                try:
                    await self._reconcile_one(name, local.get(name))
                except (EngineError, OSError) as exc:
                    _log.warning("reconcile %s: %s", name, exc)
                    self._later(name, RETRY_S)
                except Exception:  # a bug: say so, and keep reconciling the others
                    _log.exception("reconcile %s failed", name)
                    self._later(name, RETRY_S)
                if i % RECONCILE_SLICE == RECONCILE_SLICE - 1:
                    await asyncio.sleep(0)

    def _local_uids(self, names: list[str]) -> dict[str, int]:
        """name -> uid of the copies held here, of those names."""
        broker = self.broker
        assert broker is not None
        # The catalog is in memory, and its reads wait for none of its writes: a lookup
        # each, on the loop (never a decode of every entry; after a node is lost,
        # thousands of partitions are looked at a few at a time).
        found = {}
        for name in names:
            uid = broker.catalog.uid_of(name)
            if uid is not None:
                found[name] = uid
        return found

    async def _reconcile_one(self, name: str, local_uid: int | None) -> None:
        """Bring this node in line with the view for one partition (a copy held here has
        uid local_uid)."""
        if name in self._electing:
            self._recheck.add(name)  # after the election: it may have changed meanwhile
            return
        view = self.view
        assert view is not None
        partition = view.partitions.get(name)
        leader = view.leaders.get(name)
        role = self.leading.get(name)
        if role is not None and (leader is None or leader.epoch != role.epoch):
            self.step_down(name, "its leader key is gone or newer")
        if partition is None:
            self._leaderless_since.pop(name, None)
            # Only a deletion seen happen deletes data (see _keep_unknown).
            if name in self._deleted and name not in view.unreadable:
                self._deleted.discard(name)
                if local_uid is not None:
                    await self._drop_copy(name, "the queue was deleted")
            return
        self._deleted.discard(name)
        if local_uid is not None and local_uid != partition.uid:
            await self._drop_copy(name, "the queue was deleted")  # and made again since
            local_uid = None
        if self.node_id not in partition.replicas:
            # Only with a view no older than this node's last accepted OPEN for it (an
            # older one may not list this node among the replicas yet).
            if name not in self.leading and local_uid is not None \
                    and partition.revision >= self._accepted.get(name, 0):
                await self._drop_copy(name, "this node is no longer one of its replicas")
            return
        if name in self._mending:
            await self._leave_isr_while_mending(name)
            if name in self._mending:
                self._later(name, RETRY_S)
                return  # never leads with a short copy
        if leader is not None:
            self._leaderless_since.pop(name, None)
            if leader.node_id == self.node_id and name not in self.leading and \
                    leader.lease != self.lease.lease_id:
                # A key of this node's previous run: its lease is dead; let go now.
                await self.control.resign(name, leader.epoch)
            return
        now = time.monotonic()
        since = self._leaderless_since.setdefault(name, now)
        if self.node_id not in partition.isr:
            return  # a change of the ISR, or of the leader, names it again
        if not self.lease_valid():
            self._later(name, RETRY_S)
            return
        broker = self.broker
        if broker is not None and broker.is_damaged(name):
            # Its copy here refused to open as damaged, and it is the partition's only
            # in-sync copy (else _lead took it out of the ISR): the partition waits for
            # an operator's salvage rather than this node failing to lead it again.
            return
        live = [m for m in partition.replicas if m in partition.isr and m in view.nodes]
        if not live:
            return  # a node coming back names it again
        if live[0] == self.node_id or now - since >= ELECTION_GRACE_S:
            self._electing.add(name)
            task = asyncio.create_task(self._elect(partition))
            self._election_tasks.add(task)
            task.add_done_callback(self._election_tasks.discard)
        else:
            self._later(name, since + ELECTION_GRACE_S - now)

    async def _elect(self, partition: Partition) -> None:
        name = partition.name
        try:
            async with self._elections:
                # Its turn may come seconds later (a node taking over thousands of
                # partitions): if another node has won it meanwhile, the election would
                # be a transaction sure to fail, and each node stood for every partition.
                view = self.view
                if not self._closed and (view is None or name not in view.leaders):
                    await self._lead(partition)
        except EngineError as exc:
            _log.warning("queue %s: cannot stand for leader: %s", name, exc)
            self._later(name, RETRY_S)
        finally:
            self._electing.discard(name)
            if name in self._recheck:
                self._recheck.discard(name)
                self._mark([name])

    async def _lead(self, partition: Partition) -> None:
        lease_id = self.lease.lease_id
        if lease_id is None:
            return
        name = partition.name
        losses = self.lease.losses
        # Registered before the election: the leader key may be seen (by a watch, here
        # or elsewhere) before this task runs again.
        opening = self._opening[name] = asyncio.Event()
        try:
            leader = await self.control.elect(partition, self.node_id, lease_id)
            if leader is None or self.lease.losses != losses:
                return  # lost, or won under a lease lost since (the key went with it)
            _log.warning("queue %s: leading in epoch %d (ISR %s)", name, leader.epoch,
                         list(partition.isr))
            broker = self.broker
            assert broker is not None
            replica = self._take_replica(name)
            role = LeaderRole(self, self.control, partition, leader.epoch,
                              self.config.min_insync_replicas)
            # No await since the check above: a lease lost from here on finds this role
            # among those it steps down.
            self.leading[name] = role
            if replica is not None:
                # A cut its stream started runs on in its thread: the copy is read only
                # once it is done. One that started over empty holds less than it may have
                # acknowledged: it must leave the ISR, not lead.
                await replica.settled()
                if replica.started_over:
                    replica.started_over = False
                    self.mending(name)
                    self.step_down(name, "its copy here started over empty")
                if role.closed:  # that, or a lease lost meanwhile
                    await asyncio.to_thread(replica.close)
                    return

            def take_over() -> None:
                # One trip to a thread for the three steps, not one each: a node taking
                # over thousands of partitions queued them behind each other three times.
                # A copy that was being followed has its catalog entry (the replica was
                # opened for this uid) and records: the configuration record is only for
                # a log still empty, and the broker's lock, which every opening queue
                # takes, is not taken for nothing.
                if replica is not None:
                    held = replica.uid == partition.uid and replica.log.next_offset > 0
                    replica.close()
                    if held:
                        return
                broker.adopt_queue(name, partition.uid, partition.attributes, leader.epoch)

            try:
                await role.start(lambda: broker._core_of(name), take_over,
                                 self._opener(name, replica))
            except QueueDamagedError as exc:
                await self._leave_damaged(partition, leader.epoch, exc)
            except (EngineError, OSError) as exc:
                _log.error("queue %s: cannot lead: %s", name, exc)
                self.step_down(name, f"cannot open the queue: {exc}")
        finally:
            opening.set()
            if self._opening.get(name) is opening:
                del self._opening[name]

    async def opened_here(self, name: str) -> None:
        """Return once an election of this node for the queue is over and, if won, the
        queue opened (at once if none is under way): a call sent as soon as the leader key
        is seen - the answer to CreateQueue - must not find the queue missing on its new
        leader."""
        opening = self._opening.get(name)
        if opening is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CREATE_WAIT_S):
                    await opening.wait()

    async def _leave_damaged(self, partition: Partition, epoch: int,
                             exc: QueueDamagedError) -> None:
        """Elected with a copy that refuses to open as damaged: leave the ISR (while this
        epoch still allows the change) so that an in-sync follower leads, then step down;
        the new leader copies the partition back to this node (``replica``). The only
        in-sync copy stays in the ISR: the partition then waits for an operator."""
        name = partition.name
        others = tuple(m for m in partition.isr if m != self.node_id)
        left = False
        if others:
            with contextlib.suppress(EngineError):
                left = await self.control.set_members(partition, epoch, partition.replicas,
                                                      others) is not None
        _log.error("queue %s: this node's copy is damaged (%s); %s", name, exc,
                   f"it leaves the ISR to {list(others)} and follows" if left else
                   "it is the only in-sync copy: the queue waits for `conveyor log "
                   "salvage` on this node")
        self.step_down(name, "its copy here is damaged")

    async def _keep_unknown(self, view: ClusterView) -> None:
        """At start, local queues etcd does not know are kept and reported: a node pointed
        at the wrong or an emptied etcd must not destroy its data. Only a deletion seen
        happen (in the watch, or between two whole reads) deletes a copy; a queue made
        again under the same name (another uid) replaces its old copy."""
        broker = self.broker
        assert broker is not None
        for name in await asyncio.to_thread(broker.list_queues):
            if name not in view.partitions:
                _log.warning("queue %s is stored here but unknown to etcd: kept", name)

    async def _drop_copy(self, name: str, reason: str) -> None:
        """Delete this node's copy of a queue."""
        broker = self.broker
        assert broker is not None
        _log.warning("queue %s: deleting this node's copy: %s", name, reason)
        self.step_down(name, reason)
        for task in list(self._stopping):
            with contextlib.suppress(Exception):
                await task
        await self._release_replica(name)
        with contextlib.suppress(QueueNotFoundError):
            await asyncio.to_thread(broker.delete_queue, name)

    # -- queues ---------------------------------------------------------------------------

    async def create_queue(self, name: str, attributes: dict[str, Any],
                           replication_factor: int | None = None) -> None:
        """Place a new queue on the ring and wait for its first leader.

        replication_factor: the queue's own (None: the node's --replication-factor).
        """
        rf = replication_factor or self.config.replication_factor
        attrs = QueueAttributes.from_dict(attributes)
        check_queue_name(name, attrs.fifo)
        view = self.view
        # Placed on the nodes alive now (the watched view: a node that just joined counts
        # as soon as its key is written); the leader moves a replica to a node that comes
        # back within node_gone_s, as the ring over all members says.
        replicas = self.placement(name, rf, list(view.nodes)) if view is not None else []
        if not replicas:
            raise ControlUnavailableError("no live nodes to place the queue on")
        uid = secrets.randbits(63) or 1
        await self.control.create_partition(name, uid, attrs.to_dict(), replicas, rf)
        await self._leader_elected(name)

    async def _leader_elected(self, name: str) -> None:
        """Return once the queue has a leader: as the watch reports it, or (should the
        watch be broken) as etcd says, asked once a second."""
        deadline = time.monotonic() + CREATE_WAIT_S
        loop = asyncio.get_running_loop()
        while True:
            view = self.view
            if view is not None and name in view.leaders:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlUnavailableError(
                    f"queue {name!r} got no leader in {CREATE_WAIT_S:g} s")
            waiter: asyncio.Future[None] = loop.create_future()
            waiters = self._leader_waits.setdefault(name, [])
            waiters.append(waiter)
            try:
                async with asyncio.timeout(min(left, 1.0)):
                    await waiter
            except TimeoutError:
                if await self.control.leader(name) is not None:
                    return
            finally:
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters and self._leader_waits.get(name) is waiters:
                    del self._leader_waits[name]

    async def set_replication_factor(self, name: str, replication_factor: int | None) -> None:
        """Change a queue's replication factor; its leader moves replicas to match."""
        rf = replication_factor or self.config.replication_factor
        for _ in range(10):  # a leader changing the ISR meanwhile makes the compare fail
            partition = await self.control.partition(name)
            if partition is None or partition.rf == rf:
                return
            if await self.control.set_rf(partition, rf):
                return
        raise ControlUnavailableError(f"queue {name!r}: its record kept changing")

    async def delete_queue(self, name: str) -> None:
        await self.control.delete_partition(name)

    def describe(self) -> dict[str, Any]:
        """For /v1/cluster: this node's view."""
        view = self.view
        return {
            "node": self.node_id,
            "lease_valid": self.lease_valid(),
            "nodes": {} if view is None else {
                n.node_id: {"http": n.http, "replication": n.replication}
                for n in view.nodes.values()},
            "queues": {} if view is None else {
                name: {"uid": p.uid, "replicas": list(p.replicas), "isr": list(p.isr),
                       "leader": view.leaders[name].node_id if name in view.leaders else None,
                       "epoch": view.leaders[name].epoch if name in view.leaders else None,
                       "leading_here": name in self.leading}
                for name, p in view.partitions.items()},
            "leading": {name: describe(role) for name, role in self.leading.items()},
        }
