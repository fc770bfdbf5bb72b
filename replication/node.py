"""One node of a cluster: its etcd lease, the queues it leads, and those it follows.

A reconcile loop reads the cluster state from etcd (one range read) every RECONCILE_S
and brings this node in line with it:

- a queue with no leader gets one from its ISR (the first live member in replica order
  tries at once, the others after ELECTION_GRACE_S, so leadership spreads the way the
  ring placed the replicas);
- a leader whose key is gone, or carries another epoch, steps down;
- queues deleted from etcd are deleted here.

The node's lease is refreshed every third of its TTL. A node that cannot prove its lease
alive (etcd unreachable, or the process was paused) stops acknowledging writes at once:
``lease_valid`` is checked before every acknowledgement, not only by the loop.

The node owns the inter-node port (replication.listener) and serves replication on it;
the roles reach the node only through their protocols (``LeaderNode``, ``FollowerNode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from typing import Any

from engine import Broker
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
from replication.link import Links
from replication.listener import Listener
from replication.peer import Peers

_log = logging.getLogger("conveyor.cluster")

RECONCILE_S = 0.2
ELECTION_GRACE_S = 1.0
# A lease counts as alive until this long before etcd would expire it: the margin covers
# the time a refresh spends in flight.
LEASE_MARGIN_S = 0.5
LEASE_TTL_S = 5
# After a failed lease refresh, the next try comes this soon.
LEASE_RETRY_S = 0.2
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


class ClusterNode:
    """See the module docstring. Also the broker's Leadership: it opens only led queues."""

    def __init__(self, config: ClusterConfig, peers: Peers) -> None:
        self.config = config
        self.peers = peers
        self.node_id = config.node_id
        self.control = Control(config.etcd, config.prefix)
        self.broker: Broker | None = None
        self.view: ClusterView | None = None
        self.leading: dict[str, LeaderRole] = {}
        self.replicas: dict[str, Replica] = {}
        self._lease: Any = None
        self._lease_deadline = 0.0
        self._leaderless_since: dict[str, float] = {}
        self._ring: tuple[tuple[str, ...], HashRing] | None = None
        self._seen_members: frozenset[str] = frozenset()
        self._mending: set[str] = set()
        """Queues whose copy here a repair left short: it leaves their ISR, never leads."""
        self._last_seen: dict[str, float] = {}
        self._started = time.monotonic()
        self._accepted: dict[str, int] = {}
        """Per queue, the partition revision at which a leader's OPEN was last accepted."""
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False
        self.listener = Listener(peers)
        """The inter-node port; partition calls add their route (server/cluster/calls.py)."""
        self.listener.route(fr.MAGIC, ReplicationServer(self).serve, fr.FRAME_BYTES_MAX)
        self.links = Links(peers, self.replication_address)
        """This node's connections to the followers of what it leads: one per node, which
        carries every partition led here and followed there (replication.link)."""

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
        await self._join()
        self.view = await self.control.view()
        self._saw(self.view)
        await self._drop_deleted(self.view, None)
        self._tasks = [asyncio.create_task(self._keep_lease()),
                       asyncio.create_task(self._reconcile_loop())]

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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for name in list(self.leading):
            self.step_down(name, "shutting down")
        for task in list(self._stopping):
            with contextlib.suppress(Exception):
                await task
        await self.links.close()
        await self.listener.close()
        for replica in self.replicas.values():
            await asyncio.to_thread(replica.close)
        self.replicas.clear()
        if self._lease is not None:
            # Leadership passes at once rather than when the lease runs out.
            with contextlib.suppress(EngineError):
                await self.control.revoke(self._lease)
        await self.control.close()

    async def _join(self) -> None:
        lease = await self.control.grant(self.config.lease_ttl_s)
        granted = time.monotonic()
        advertise = self.config.replication_advertise or \
            f"{self.config.replication_host}:{self.config.replication_port}"
        await self.control.register(NodeInfo(self.node_id, self.config.http_url, advertise),
                                    lease)
        self._lease = lease
        self._lease_deadline = granted + self.config.lease_ttl_s - LEASE_MARGIN_S

    def lease_valid(self) -> bool:
        return time.monotonic() < self._lease_deadline

    async def _keep_lease(self) -> None:
        interval = self.config.lease_ttl_s / 3
        wait = interval
        while True:
            await asyncio.sleep(wait)
            sent = time.monotonic()
            try:
                left = await self.control.refresh(self._lease)
            except ControlUnavailableError as exc:
                # Again soon, not after a whole interval: the failure may have moved the
                # client to another etcd member, and the lease is running out meanwhile.
                _log.warning("lease refresh failed: %s", exc)
                wait = LEASE_RETRY_S
                continue
            wait = interval
            if left > 0 and time.monotonic() < self._lease_deadline + LEASE_MARGIN_S:
                self._lease_deadline = sent + left - LEASE_MARGIN_S
                continue
            # The lease expired (this process was paused, or etcd unreachable too long):
            # everything it held is another node's now. Start over with a new lease.
            _log.warning("node lease lost; stepping down everywhere and rejoining")
            self._lease_deadline = 0.0
            for name in list(self.leading):
                self.step_down(name, "this node's etcd lease expired")
            with contextlib.suppress(ControlUnavailableError):
                await self._join()

    # -- leadership as the broker sees it ---------------------------------------------------

    def check(self, name: str) -> None:
        role = self.leading.get(name)
        if role is None or role.closed:
            raise NotLeaderError(name, self.leader_url(name))

    def opened(self, core: QueueCore) -> None:
        self.leading[core.name].opened(core)

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
        return sorted(n for n, seen in self._last_seen.items()
                      if now - seen < self.config.node_gone_s)

    def placement(self, name: str, rf: int, members: list[str] | None = None) -> list[str]:
        """The replicas the ring over members (default: self.members()) gives a queue, in
        preference order."""
        members = self.members() if members is None else sorted(members)
        count = min(rf, len(members))
        if not count:
            return []
        key = tuple(members)
        if self._ring is None or self._ring[0] != key:
            # Every led partition asks once a second: the ring is built once per membership.
            ring = HashRing()
            for node_id in members:
                ring.add(node_id)
            self._ring = (key, ring)
        return self._ring[1].preference_list(name, count)

    def _saw(self, view: ClusterView) -> None:
        now = time.monotonic()
        for node_id in view.nodes:
            self._last_seen[node_id] = now
        # Idle led partitions check their ISR and placement only when woken (leader.py):
        # a node coming or going wakes every one, a changed record its own.
        members = frozenset(view.nodes)
        changed, self._seen_members = members != self._seen_members, members
        for name, role in self.leading.items():
            seen = view.partitions.get(name)
            if changed or (seen is not None and seen.revision != role.partition.revision):
                role.wake()

    def leader_node(self, name: str) -> NodeInfo | None:
        """Where partition calls for the queue go: its leader, as this node's view says
        (None: no leader, or this node)."""
        view = self.view
        leader = view.leaders.get(name) if view is not None else None
        if view is None or leader is None or leader.node_id == self.node_id:
            return None
        return view.nodes.get(leader.node_id)

    async def locate(self, name: str) -> NodeInfo | None:
        """leader_node, read from etcd now: the view is up to RECONCILE_S old, and a
        queue made or failed over since has a leader only etcd knows yet."""
        try:
            leader = await self.control.leader(name)
            if leader is None or leader.node_id == self.node_id:
                return None
            view = self.view
            node = view.nodes.get(leader.node_id) if view is not None else None
            if node is None:
                node = (await self.control.view()).nodes.get(leader.node_id)
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
        # need not wait for the lease to run out.
        with contextlib.suppress(EngineError):
            current = await self.control.leader(role.name)
            if current is not None and current.epoch == role.epoch:
                await self.control.resign(role.name, role.epoch)

    # -- the follower side ------------------------------------------------------------------

    async def accept_leader(self, name: str, uid: int, epoch: int, node_id: str
                            ) -> tuple[int, str] | None:
        """None if node_id leads queue uid in epoch; else (newest epoch, why)."""
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

    async def replica(self, name: str, uid: int, attributes: dict[str, Any]) -> Replica:
        replica = self.replicas.get(name)
        if replica is not None and replica.uid == uid:
            return replica
        if replica is not None:  # the name was deleted and made again
            await asyncio.to_thread(replica.close)
            del self.replicas[name]
        broker = self.broker
        assert broker is not None
        directory = await asyncio.to_thread(broker.adopt_queue, name, uid, attributes)
        fsync = str(broker.fsync_policy)
        try:
            replica = await asyncio.to_thread(Replica, name, uid, directory, fsync)
        except CorruptDataError as exc:
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

    async def _leave_isr_while_mending(self, name: str) -> None:
        """Take this node out of the partition's ISR while its copy is short.

        A repaired copy lacks records it had acknowledged, yet the partition's record may
        still count it in sync, and an ISR member may be elected: with its leader gone
        it would lead without committed records. So it leaves the ISR itself (only while
        the leader's epoch stands, as a leader's own change would), and only then forgets
        the mark; the leader adds it back by the usual rule once it holds what the ISR
        has committed. Until then it never leads (``_reconcile``).
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
        replica = self.replicas.pop(name, None)
        if replica is not None:
            if replica.session is not None:
                replica.session.close()
            await asyncio.to_thread(replica.close)

    # -- reconciling ----------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_S)
            try:
                view = await self.control.view()
            except ControlUnavailableError as exc:
                _log.warning("cannot read the cluster state: %s", exc)
                continue
            previous, self.view = self.view, view
            self._saw(view)
            try:
                await self._reconcile(view)
                await self._drop_deleted(view, previous)
            except EngineError as exc:
                _log.warning("reconcile: %s", exc)

    async def _reconcile(self, view: ClusterView) -> None:
        now = time.monotonic()
        for name, role in list(self.leading.items()):
            leader = view.leaders.get(name)
            if leader is None or leader.epoch != role.epoch:
                self.step_down(name, "its leader key is gone or newer")
        held = await asyncio.to_thread(self._held, view)
        for name, partition in view.partitions.items():
            if self.node_id not in partition.replicas:
                if name not in self.leading and name in held:
                    await self._drop_copy(name, "this node is no longer one of its replicas")
                continue
            if name in self._mending:
                await self._leave_isr_while_mending(name)
                if name in self._mending:
                    continue  # never leads with a short copy
            leader = view.leaders.get(name)
            if leader is not None:
                self._leaderless_since.pop(name, None)
                if leader.node_id == self.node_id and name not in self.leading and \
                        leader.lease != getattr(self._lease, "id", None):
                    # A key of this node's previous run: its lease is dead; let go now.
                    with contextlib.suppress(EngineError):
                        await self.control.resign(name, leader.epoch)
                continue
            since = self._leaderless_since.setdefault(name, now)
            if self.node_id not in partition.isr or not self.lease_valid():
                continue
            broker = self.broker
            if broker is not None and broker.is_damaged(name):
                # Its copy here refused to open as damaged, and it is the partition's only
                # in-sync copy (else _lead took it out of the ISR): the partition waits
                # for an operator's salvage rather than this node failing to lead it again
                # every RECONCILE_S.
                continue
            live = [m for m in partition.replicas if m in partition.isr and m in view.nodes]
            if live and (live[0] == self.node_id or now - since >= ELECTION_GRACE_S):
                await self._lead(partition)

    async def _lead(self, partition: Partition) -> None:
        leader = await self.control.elect(partition, self.node_id, self._lease)
        if leader is None:
            return
        name = partition.name
        _log.warning("queue %s: leading in epoch %d (ISR %s)", name, leader.epoch,
                     list(partition.isr))
        await self._release_replica(name)
        broker = self.broker
        assert broker is not None
        role = LeaderRole(self, self.control, partition, leader.epoch,
                          self.config.min_insync_replicas)
        self.leading[name] = role
        try:
            await asyncio.to_thread(broker.adopt_queue, name, partition.uid,
                                    partition.attributes, leader.epoch)
            await role.start(lambda: broker._core_of(name))
        except QueueDamagedError as exc:
            await self._leave_damaged(partition, leader.epoch, exc)
        except (EngineError, OSError) as exc:
            _log.error("queue %s: cannot lead: %s", name, exc)
            self.step_down(name, f"cannot open the queue: {exc}")

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

    async def _drop_deleted(self, view: ClusterView, previous: ClusterView | None) -> None:
        """Delete local copies of queues deleted from etcd (or made again under a new uid).

        Only a deletion seen happen - a queue in the previous reading and not in this one
        - deletes data. At start (no previous reading) local queues etcd does not know are
        kept and reported: a node pointed at the wrong or an emptied etcd must not destroy
        its data. A queue made again under the same name replaces its old copy.
        """
        broker = self.broker
        assert broker is not None
        for name in await asyncio.to_thread(broker.list_queues):
            partition = view.partitions.get(name)
            entry = broker.catalog.get(name)
            if partition is None and previous is None:
                _log.warning("queue %s is stored here but unknown to etcd: kept", name)
                continue
            gone = partition is None and previous is not None and name in previous.partitions
            replaced = partition is not None and entry is not None and entry.uid != partition.uid
            if gone or replaced:
                await self._drop_copy(name, "the queue was deleted")

    def _held(self, view: ClusterView) -> set[str]:
        """Queues with a copy here, as of a view no older than this node's last accepted
        OPEN for them (an older view may not list this node among replicas yet)."""
        assert self.broker is not None
        return {name for name in self.broker.catalog.names()
                if name in view.partitions
                and view.partitions[name].revision >= self._accepted.get(name, 0)}

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
        view = await self.control.view()  # fresh: a node that just joined counts
        self._saw(view)
        # Placed on the nodes alive now; the leader moves a replica to a node that comes
        # back within node_gone_s, as the ring over all members says.
        replicas = self.placement(name, rf, list(view.nodes))
        if not replicas:
            raise ControlUnavailableError("no live nodes to place the queue on")
        uid = secrets.randbits(63) or 1
        await self.control.create_partition(name, uid, attrs.to_dict(), replicas, rf)
        deadline = time.monotonic() + CREATE_WAIT_S
        while time.monotonic() < deadline:
            if await self.control.leader(name) is not None:
                return
            await asyncio.sleep(0.05)
        raise ControlUnavailableError(f"queue {name!r} got no leader in {CREATE_WAIT_S:g} s")

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
