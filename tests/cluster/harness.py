"""A real cluster for tests: one etcd and N `conveyor serve --cluster` processes.

Every node listens on loopback ports of its own; a node can be killed, paused (SIGSTOP)
and restarted on the same data directory and ports. ``follower_proxies`` puts a
fault-injecting proxy (tests/support/faultproxy.py) in front of each node's replication port, and
the node advertises the proxy: every byte shipped to that node passes through it.

Nodes run ``workers`` workers each (default: CONVEYOR_TEST_WORKERS, else 1). With more
than one, each worker is a member of the cluster (``n0/w1``): the queues' replicas, ISR
and leaders name members, while a node (a server, killed or paused whole) is ``n0``.
The methods here take either; ``members``, ``node`` and ``data_dir`` translate.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from replication.members import MEMBER_SEPARATOR, host_of
from server.protection import masterkey
from tests.support.certs import Pki
from tests.support.etcd import EtcdCluster, EtcdServer
from tests.support.faultproxy import FaultProxy
from tests.support.server import WORKERS_ENV, Server, free_ports, queue_dir

ACCOUNT = "000000000000"


class Cluster:
    def __init__(self, root: Path, nodes: int = 3, *, lease_ttl: int = 3,
                 fsync: str = "always", proxies: bool = False,
                 extra: tuple[str, ...] = (), etcd_members: int = 1,
                 etcd_tls: Pki | None = None, workers: int | None = None) -> None:
        """etcd_tls: etcd serves TLS and requires client certificates, which every node
        is given (one etcd member only)."""
        self.root = root
        self.workers = workers or int(os.environ.get(WORKERS_ENV, "1"))
        self.etcd: EtcdServer | EtcdCluster = (
            EtcdServer(root / "etcd", tls=etcd_tls) if etcd_members == 1
            else EtcdCluster(root / "etcd", etcd_members))
        self.proxies: dict[str, FaultProxy] = {}
        self.nodes: dict[str, Server] = {}
        self._options = (lease_ttl, fsync, proxies, extra)
        try:
            for i in range(nodes):
                self.add_node(f"n{i}")
        except BaseException:
            self.close()
            raise

    def add_node(self, node_id: str) -> Server:
        """Start another node (it joins the cluster)."""
        lease_ttl, fsync, proxies, extra = self._options
        replication_port = free_ports(self.workers)
        args = [*self.etcd.client_options(), "--node-id", node_id,
                "--replication-port", str(replication_port), "--lease-ttl", str(lease_ttl),
                *extra]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        if "--master-key-file" not in extra:
            # Nodes prove one secret to each other; with a shared master key, its subkey.
            secret = self.root / "cluster.secret"
            masterkey.load_or_create(str(secret))
            args += ["--cluster-secret-file", str(secret)]
        if proxies:
            # Worker i is advertised at the first proxy's port + i.
            first = free_ports(self.workers)
            for i, member in enumerate(self.members_of(node_id)):
                proxy = FaultProxy("127.0.0.1", replication_port + i, first + i)
                proxy.start()
                self.proxies[member] = proxy
            args += ["--replication-advertise", f"127.0.0.1:{first}"]
        self.nodes[node_id] = Server(self.root / node_id, fsync, extra=tuple(args))
        return self.nodes[node_id]

    # -- members and nodes ----------------------------------------------------------------------

    def members_of(self, node_id: str) -> list[str]:
        """The cluster members a node is: itself, or each of its workers."""
        if self.workers == 1:
            return [node_id]
        return [f"{node_id}/w{i}" for i in range(self.workers)]

    def members(self, nodes: list[str] | None = None) -> list[str]:
        """Every member of nodes (default: of every node)."""
        return [m for n in (self.nodes if nodes is None else nodes)
                for m in self.members_of(n)]

    def node_of(self, member: str) -> str:
        return host_of(member)

    def node(self, member: str) -> Server:
        """The server a member (or node id) runs in."""
        return self.nodes[self.node_of(member)]

    def data_dir(self, member: str) -> Path:
        """A member's data directory (a node's own, or its worker's under it)."""
        node, _, worker = member.partition(MEMBER_SEPARATOR)
        return self.root / node / worker if worker else self.root / node

    # -- looking ------------------------------------------------------------------------------

    def state(self, node_id: str | None = None) -> dict[str, Any]:
        """A live node's /v1/cluster view."""
        for candidate in [node_id] if node_id else self.live():
            node = self.node(candidate)
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(node.url + "/v1/cluster", timeout=2) as reply:
                state: dict[str, Any] = json.loads(reply.read())
                return state
        raise RuntimeError("no node answers /v1/cluster")

    def live(self) -> list[str]:
        """The members of the nodes that run (the nodes, with one worker each)."""
        return self.members([n for n, s in self.nodes.items()
                             if s.process is not None and s.process.poll() is None])

    def queue_state(self, queue: str, account: str = ACCOUNT) -> dict[str, Any]:
        state: dict[str, Any] = self.state()["queues"][f"{account}/{queue}"]
        return state

    def leader(self, queue: str, timeout: float = 30, other_than: str | None = None) -> str:
        """The queue's current leader, waiting until it has one (and not other_than)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, KeyError):
                leader = self.queue_state(queue)["leader"]
                if leader is not None and leader != other_than and leader in self.live():
                    return str(leader)
            time.sleep(0.1)
        raise TimeoutError(f"queue {queue} has no leader (other than {other_than})")

    def replicas(self, queue: str) -> list[str]:
        """The members that hold a copy of the queue."""
        return list(self.queue_state(queue)["replicas"])

    def wait_isr(self, queue: str, size: int, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, KeyError):
                isr = self.queue_state(queue)["isr"]
                if len(isr) == size:
                    return list(isr)
            time.sleep(0.1)
        raise TimeoutError(f"queue {queue}: ISR never reached {size} members: "
                           f"{[self.state(n).get('leading') for n in self.live()]}")

    def sqs(self, node_id: str, **config: Any) -> Any:
        return self.node(node_id).sqs(**config)

    # -- acting (on a whole node, given a node or one of its members) ----------------------------

    def kill(self, node_id: str) -> None:
        self.node(node_id).kill()

    def pause(self, node_id: str) -> None:
        self.node(node_id).signal_all(signal.SIGSTOP)

    def resume(self, node_id: str) -> None:
        self.node(node_id).signal_all(signal.SIGCONT)

    def restart(self, node_id: str) -> None:
        node = self.node(node_id)
        if node.process is not None and node.process.poll() is None:
            node.kill()
        node.start()

    def stop_all(self) -> None:
        """SIGTERM every node (a graceful stop: logs flushed, leases revoked)."""
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.signal_all(signal.SIGCONT)
                node.stop()

    def close(self) -> None:
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.signal_all(signal.SIGCONT)
                node.kill()
        for proxy in self.proxies.values():
            proxy.close()
        self.etcd.stop()

    def logs(self) -> str:
        """Every node's log tail, for a failing assertion's message."""
        return "\n".join(f"--- {n}\n{s.log.read_text(errors='replace')[-3000:]}"
                         for n, s in self.nodes.items() if s.log.exists())


@contextlib.contextmanager
def cluster(root: Path, **options: Any) -> Iterator[Cluster]:
    running = Cluster(root, **options)
    try:
        yield running
    finally:
        running.close()


def local_queues(data_dir: Path) -> set[str]:
    """The queues a stopped node holds a copy of (its catalog)."""
    from engine.catalog import Catalog

    catalog = Catalog(str(data_dir / "catalog.sqlite3"))
    try:
        return set(catalog.names())
    finally:
        catalog.close()


def read_log(data_dir: Path, queue: str, account: str = ACCOUNT) -> bytes:
    """Every batch of a stopped node's copy of a queue's log, as stored."""
    from engine.log import Log
    from replication.history import batch_end

    log = Log(queue_dir(data_dir, queue, account) / "log", fsync="never", lock=False)
    try:
        chunks, offset = [], log.first_offset
        assert offset == 0, "a replica keeps its whole log"
        while offset < log.next_offset:
            chunk = log.read_raw(offset, 1 << 20)
            chunks.append(chunk)
            offset = batch_end(chunk)
        return b"".join(chunks)
    finally:
        log.close()


def state_digest(data_dir: Path, queue: str, account: str = ACCOUNT) -> str:
    """The queue state a stopped node's copy replays to (engine.snapshot.state_digest)."""
    from engine import Broker

    with Broker(str(data_dir), fsync="never") as broker:
        return broker.get_queue(f"{account}/{queue}").digest()
