"""The cluster's state in etcd: nodes, queue partitions, leaders, and the changes to them.

The keys (nodes, partitions, leaders, queue records, the receipt key) and their values
are drawn in docs/FORMAT.md, "Cluster state in etcd".

Every change that safety rests on is one etcd transaction with a compare: a node becomes
leader only if there is none and it is still in the ISR it read; a leader changes the ISR
only while its own leader key (and so its epoch) is the current one. A leader whose lease
lapsed - paused, partitioned, killed - can change nothing, and its epoch is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
from typing import Any

import aetcd  # type: ignore[import-untyped]
import grpc  # type: ignore[import-untyped]

from replication.errors import ControlUnavailableError
from replication.etcd_access import EtcdAccess, parse_url

# Malformed node addresses logged, at most (each once; etcd's writers could make more).
_MALFORMED_LOGGED_MAX = 1024
# One etcd call's time limit.
ETCD_CALL_S = 2
# Failures that say the endpoint itself is gone (down, or cut off), not the request.
_ENDPOINT_FAILURES = (aetcd.exceptions.ConnectionFailedError,
                      aetcd.exceptions.ConnectionTimeoutError)

_log = logging.getLogger("conveyor.cluster")


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    node_id: str
    http: str
    replication: str

    def replication_address(self) -> tuple[str, int]:
        """(host, port); ValueError if the address is not HOST:PORT."""
        host, _, port = self.replication.rpartition(":")
        number = int(port)
        if not host or not 0 < number < 65536:
            raise ValueError(f"not HOST:PORT: {self.replication!r}")
        return host, number


@dataclasses.dataclass(frozen=True)
class Partition:
    name: str
    uid: int
    attributes: dict[str, Any]
    replicas: tuple[str, ...]
    isr: tuple[str, ...]
    revision: int
    """The key's mod revision: the compare of every change made from this reading."""
    rf: int
    """The replication factor asked for; replicas may be fewer while nodes are few."""

    def value(self, **changes: Any) -> bytes:
        fields = {"uid": self.uid, "attributes": self.attributes, "rf": self.rf,
                  "replicas": list(self.replicas), "isr": list(self.isr)}
        fields.update(changes)
        return json.dumps(fields, sort_keys=True).encode()


def _partition(name: str, value: bytes, revision: int) -> Partition:
    p = json.loads(value)
    return Partition(name, int(p["uid"]), p["attributes"], tuple(p["replicas"]),
                     tuple(p["isr"]), revision, int(p.get("rf", len(p["replicas"]))))


@dataclasses.dataclass(frozen=True)
class Leader:
    node_id: str
    epoch: int
    lease: int


@dataclasses.dataclass(frozen=True)
class ClusterView:
    """The whole cluster state at one etcd revision."""

    revision: int
    nodes: dict[str, NodeInfo]
    partitions: dict[str, Partition]
    leaders: dict[str, Leader]


def parse_endpoints(url: str) -> list[tuple[str, int]]:
    """``etcd[s]://HOST:PORT[,HOST:PORT...]`` -> [(host, port), ...]."""
    return list(parse_url(url)[1])


def _reason(exc: BaseException | None) -> str:
    """A failure in a line: a grpc error's details, not its multi-line repr."""
    details = getattr(exc, "details", None)
    if callable(details):
        with contextlib.suppress(Exception):
            return str(details())
    return str(exc)


async def _close_later(client: Any) -> None:
    await asyncio.sleep(ETCD_CALL_S + 1)
    await client.close()


def _cancelled_here() -> bool:
    """Whether a CancelledError was meant for this task, rather than raised by a gRPC
    channel closed under the call (a failure of etcd, to report as one)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class SharedClient:
    """The etcd client a node and its stores share: every call goes to the endpoint that
    answered last, and Control.failover moves them all to another at once."""

    def __init__(self, client: Any, index: int) -> None:
        self.current = client
        self.index = index
        """Which of the endpoints ``current`` is connected to."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)


class Control:
    """A node's connection to etcd, and the cluster's keys and transactions.

    Of several endpoints (the members of one etcd cluster), the first that answers is
    used; when it stops answering, the next call that fails moves the connection to the
    next member that does. The failed call is not repeated (a transaction may have been
    applied before the connection broke): its caller retries as it would any failure.
    """

    def __init__(self, access: EtcdAccess, prefix: str = "/conveyor/") -> None:
        self.access = access
        self.endpoints = list(access.endpoints)
        self.prefix = prefix.encode()
        self.client: Any = None
        self._moving = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._malformed: set[str] = set()
        """Node addresses found malformed and logged (each once)."""

    async def connect(self) -> None:
        """Connect to the first endpoint that answers."""
        try:
            index, client = await self._connect_from(0)
        except ControlUnavailableError as exc:
            if not self.access.tls:
                raise
            # grpc's reasons for a failed handshake name TLS internals, not the cause.
            raise ControlUnavailableError(
                f"{exc} (over TLS, etcd's certificate must chain to --etcd-ca and name the "
                "host of the URL, and an etcd run with --client-cert-auth needs "
                "--etcd-cert and --etcd-key)") from None
        self.client = SharedClient(client, index)

    async def _connect_from(self, start: int) -> tuple[int, Any]:
        last: BaseException | None = None
        for step in range(len(self.endpoints)):
            index = (start + step) % len(self.endpoints)
            client = self.access.client(index, ETCD_CALL_S)
            try:
                await client.connect()
                await client.status()
            except (aetcd.ClientError, grpc.RpcError, OSError) as exc:
                last = exc
                await client.close()
                continue
            return index, client
        raise ControlUnavailableError(
            f"no etcd endpoint of {self.access.url} answers: {_reason(last)}")

    async def failover(self, failed: Any) -> None:
        """Move the shared client off ``failed`` (the connection a call just failed on)
        to the next endpoint that answers; nothing if another call moved it already."""
        if len(self.endpoints) > 1:
            await self._replace(failed, 1, "failed")

    async def reauthenticate(self, failed: Any) -> None:
        """Replace ``failed``, whose etcd auth token was refused, by a new connection
        (one that authenticates again), to the same endpoint if it answers.

        etcd's tokens live in the member's memory: a restarted member, or a token unused
        for --auth-token-ttl, refuses every later call made with the old one, and aetcd
        never asks for a new token by itself."""
        if self.access.user is not None:
            await self._replace(failed, 0, "refused this node's auth token")

    async def _replace(self, failed: Any, step: int, why: str) -> None:
        async with self._moving:
            shared = self.client
            if shared is None or shared.current is not failed:
                return
            try:
                index, client = await self._connect_from(shared.index + step)
            except ControlUnavailableError as exc:
                _log.warning("etcd endpoint %s:%d %s, and no endpoint answers: %s",
                             *self.endpoints[shared.index], why, exc)
                return
            _log.warning("etcd endpoint %s:%d %s; now using %s:%d",
                         *self.endpoints[shared.index], why, *self.endpoints[index])
            shared.current, shared.index = client, index
            # Closed later, not now: closing a channel cancels the calls still on it, and
            # their callers (the lease keeper, the reconcile loop) must see a failure they
            # handle, not a cancellation that ends them.
            task = asyncio.create_task(_close_later(failed))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        if self.client is not None:
            await self.client.current.close()

    async def _after_failure(self, client: Any, exc: BaseException) -> None:
        if isinstance(exc, _ENDPOINT_FAILURES):
            await self.failover(client)
        elif isinstance(exc, aetcd.exceptions.UnauthenticatedError):
            await self.reauthenticate(client)

    def key(self, *parts: str) -> bytes:
        return self.prefix + "/".join(parts).encode()

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self.client.current
        try:
            return await getattr(client, method)(*args, **kwargs)
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            raise ControlUnavailableError(f"etcd {method}: its connection was closed") from None
        except (aetcd.ClientError, grpc.RpcError, OSError) as exc:
            await self._after_failure(client, exc)
            raise ControlUnavailableError(f"etcd {method}: {exc}") from exc

    # -- leases and nodes ------------------------------------------------------------------

    async def grant(self, ttl: int) -> Any:
        return await self._call("lease", ttl)

    async def refresh(self, lease: Any) -> int:
        """Keep a lease alive; return the TTL left (0 or less: it has expired)."""
        client = self.client.current
        try:
            responses = [r async for r in await client.refresh_lease(lease.id)]
        except TypeError:  # an older client returns the response itself
            responses = [await client.refresh_lease(lease.id)]
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            raise ControlUnavailableError("etcd lease refresh: its connection was closed") \
                from None
        except (aetcd.ClientError, grpc.RpcError, OSError) as exc:
            await self._after_failure(client, exc)
            raise ControlUnavailableError(f"etcd lease refresh: {exc}") from exc
        return int(getattr(responses[-1], "TTL", 0)) if responses else 0

    async def revoke(self, lease: Any) -> None:
        await self._call("revoke_lease", lease.id)

    async def register(self, node: NodeInfo, lease: Any) -> None:
        value = json.dumps({"http": node.http, "replication": node.replication}).encode()
        await self._call("put", self.key("nodes", node.node_id), value, lease=lease)

    async def receipt_key(self) -> bytes:
        """The cluster's receipt key, made by whichever node asks first."""
        stored = await self.agreed("receipt-key", secrets.token_bytes(32).hex().encode())
        return bytes.fromhex(stored.decode())

    async def agreed(self, name: str, candidate: bytes) -> bytes:
        """The cluster-wide value of key name: candidate if no node has set it yet."""
        key = self.key(name)
        t = self.client.transactions
        await self._call("transaction", compare=[t.version(key) == 0],
                         success=[t.put(key, candidate)], failure=[])
        stored = await self._call("get", key)
        return bytes(stored.value)

    # -- reading ---------------------------------------------------------------------------

    async def view(self) -> ClusterView:
        """Nodes, partitions and leaders, read in one range at one revision."""
        result = await self._call("get_prefix", self.prefix)
        nodes: dict[str, NodeInfo] = {}
        partitions: dict[str, Partition] = {}
        leaders: dict[str, Leader] = {}
        n = len(self.prefix)
        for kv in result:
            kind, _, rest = kv.key[n:].decode().partition("/")
            if kind == "nodes":
                info = json.loads(kv.value)
                node = NodeInfo(rest, str(info["http"]), str(info["replication"]))
                try:
                    node.replication_address()
                except ValueError:
                    # Not a node this one can reach; a link or call to it would fail.
                    if node.replication not in self._malformed \
                            and len(self._malformed) < _MALFORMED_LOGGED_MAX:
                        self._malformed.add(node.replication)
                        _log.warning("node %s in etcd has a malformed address %r: ignored",
                                     rest, node.replication)
                    continue
                nodes[rest] = node
            elif kind == "partitions":
                partitions[rest] = _partition(rest, kv.value, kv.mod_revision)
            elif kind == "leaders":
                leaders[rest] = Leader(kv.value.decode(), kv.create_revision, kv.lease)
        return ClusterView(result.header.revision, nodes, partitions, leaders)

    async def partition(self, name: str) -> Partition | None:
        kv = await self._call("get", self.key("partitions", name))
        return None if kv is None else _partition(name, kv.value, kv.mod_revision)

    async def leader(self, name: str) -> Leader | None:
        kv = await self._call("get", self.key("leaders", name))
        return None if kv is None else Leader(kv.value.decode(), kv.create_revision, kv.lease)

    # -- transactions ----------------------------------------------------------------------

    async def create_partition(self, name: str, uid: int, attributes: dict[str, Any],
                               replicas: list[str], rf: int) -> bool:
        """Create a queue's partition record; False if one exists already."""
        key = self.key("partitions", name)
        value = json.dumps({"uid": uid, "attributes": attributes, "replicas": replicas,
                            "isr": replicas, "rf": rf}, sort_keys=True).encode()
        t = self.client.transactions
        ok, _ = await self._call("transaction", compare=[t.version(key) == 0],
                                 success=[t.put(key, value)], failure=[])
        return bool(ok)

    async def delete_partition(self, name: str) -> None:
        t = self.client.transactions
        await self._call("transaction", compare=[],
                         success=[t.delete(self.key("partitions", name)),
                                  t.delete(self.key("leaders", name))], failure=[])

    async def elect(self, partition: Partition, node_id: str, lease: Any) -> Leader | None:
        """Become the queue's leader if it has none and the ISR read is still current."""
        leader_key = self.key("leaders", partition.name)
        t = self.client.transactions
        ok, _ = await self._call(
            "transaction",
            compare=[t.version(leader_key) == 0,
                     t.mod(self.key("partitions", partition.name)) == partition.revision],
            success=[t.put(leader_key, node_id.encode(), lease)], failure=[])
        if not ok:
            return None
        leader = await self.leader(partition.name)
        return leader if leader is not None and leader.lease == lease.id else None

    async def set_isr(self, partition: Partition, epoch: int,
                      isr: tuple[str, ...]) -> Partition | None:
        """Change the ISR while epoch is the current leader's; None if it is not."""
        return await self.set_members(partition, epoch, partition.replicas, isr)

    async def set_members(self, partition: Partition, epoch: int, replicas: tuple[str, ...],
                          isr: tuple[str, ...]) -> Partition | None:
        """Change replicas and ISR while epoch is the current leader's; None if not."""
        key = self.key("partitions", partition.name)
        t = self.client.transactions
        ok, _ = await self._call(
            "transaction",
            compare=[t.create(self.key("leaders", partition.name)) == epoch,
                     t.mod(key) == partition.revision],
            success=[t.put(key, partition.value(replicas=list(replicas), isr=list(isr)))],
            failure=[])
        if not ok:
            return None
        return await self.partition(partition.name)

    async def resign(self, name: str, epoch: int) -> None:
        """Delete the leader key if it still carries epoch."""
        key = self.key("leaders", name)
        t = self.client.transactions
        await self._call("transaction", compare=[t.create(key) == epoch],
                         success=[t.delete(key)], failure=[])

    async def set_rf(self, partition: Partition, rf: int) -> bool:
        """Change the replication factor asked for; False if the record changed since."""
        key = self.key("partitions", partition.name)
        t = self.client.transactions
        ok, _ = await self._call("transaction", compare=[t.mod(key) == partition.revision],
                                 success=[t.put(key, partition.value(rf=rf))], failure=[])
        return bool(ok)
