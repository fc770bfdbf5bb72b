"""The cluster's state in etcd: nodes, queue partitions, leaders, and the changes to them.

The keys (nodes, partitions, leaders, queue records, the receipt key) and their values
are drawn in docs/FORMAT.md, "Cluster state in etcd".

Every change that safety rests on is one etcd transaction with a compare: a node becomes
leader only if there is none and it is still in the ISR it read; a leader changes the ISR
only while its own leader key (and so its epoch) is the current one. A leader whose lease
lapsed - paused, partitioned, killed - can change nothing, and its epoch is stale.

Such changes, made by many partitions at once (a node joining or leaving moves replicas
and leaderships by the thousand), share transactions: each change is a transaction of its
own nested in a batch (``_Batcher``), so each keeps its own compares and succeeds or fails
alone, and a batch costs etcd one round and one fsync. etcd refuses a transaction with more
than --max-txn-ops (128 by default) operations at any level, counting a nested
transaction's own against what its parent leaves: a batch holds at most TXN_OPS_MAX less
the widest change (two operations) changes, and at most TXN_BYTES_MAX bytes (etcd's
--max-request-bytes is 1.5 MiB). Changes that touch one key never share a batch, which etcd
would refuse.

A change is made in the background when nothing waits on it: a leader's change of an idle
partition's replicas or ISR. Other changes (an election above all) go first, but never
take the whole of a batch while background changes wait, so these cannot starve. When a
node is lost, each other node changes the ISR of every partition it leads, thousands at
once; in order of making, the elections for the partitions the lost node led waited
behind them all.

The cluster's state is read whole (``view``) only to start, or when a watch cannot
resume; otherwise a node keeps it by a watch (``watch``, used by replication.view).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import secrets
import sys
from collections.abc import Callable
from typing import Any

import aetcd  # type: ignore[import-untyped]
import grpc  # type: ignore[import-untyped]
from aetcd import rpc

from replication.errors import ControlUnavailableError, HistoryCompactedError
from replication.etcd_access import EtcdAccess, parse_url

# Malformed node addresses logged, at most (each once; etcd's writers could make more).
_MALFORMED_LOGGED_MAX = 1024
# One etcd call's time limit.
ETCD_CALL_S = 2
# Failures that say the endpoint itself is gone (down, or cut off), not the request.
_ENDPOINT_FAILURES = (aetcd.exceptions.ConnectionFailedError,
                      aetcd.exceptions.ConnectionTimeoutError)
_ENDPOINT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# etcd's --max-txn-ops default: operations in one transaction, at any level of nesting.
TXN_OPS_MAX = 128
# A batch of changes, at most (etcd's --max-request-bytes is 1.5 MiB by default).
TXN_BYTES_MAX = 512 * 1024
# Changes of a batch kept for background changes when any wait (_Batcher).
BACKGROUND_ROOM = 16
# Keys one range request of a whole read asks for: a page far below gRPC's 4 MiB limit.
RANGE_PAGE_KEYS = 500
# With etcd's users on, a node's token is used at least this often (etcd forgets a token
# unused for --auth-token-ttl, 300 s by default; a node at rest makes no other call).
TOKEN_USE_S = 60.0
# How etcd says, in a cancelled watch, that it refused the node's token.
_TOKEN_REFUSED = "code = Unauthenticated"
# An idle watch asks etcd for a progress report this often; one that gets no answer in
# ETCD_CALL_S counts as broken (a hung member answers nothing, and a stream does not
# time out by itself).
WATCH_PROGRESS_S = 5.0

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


# Distinct attribute sets whose one copy partitions share, at most (beyond it, each
# partition keeps its own copy, as any does whose set has fallen out).
SHARED_ATTRIBUTE_SETS_MAX = 1024


@functools.lru_cache(maxsize=SHARED_ATTRIBUTE_SETS_MAX)
def _shared_attributes(canonical: str) -> dict[str, Any]:
    # A node's view holds a record of every partition, and most queues have one of a few
    # attribute sets: each set is kept once (about 1 KB a partition less at 10,000
    # queues). Nothing changes a partition's attributes in place.
    attributes: dict[str, Any] = json.loads(canonical)
    return attributes


def _partition(name: str, value: bytes, revision: int) -> Partition:
    p = json.loads(value)
    attributes = _shared_attributes(json.dumps(p["attributes"], sort_keys=True))
    # Node ids are few and named in every partition: one string each.
    replicas = tuple(sys.intern(str(r)) for r in p["replicas"])
    return Partition(name, int(p["uid"]), attributes, replicas,
                     tuple(sys.intern(str(m)) for m in p["isr"]), revision,
                     int(p.get("rf", len(replicas))))


@dataclasses.dataclass(frozen=True)
class Leader:
    node_id: str
    epoch: int
    lease: int


@dataclasses.dataclass
class ClusterView:
    """The whole cluster state at one etcd revision: what a full read returns, and what
    replication.view keeps current from a watch (changing it in place)."""

    revision: int
    nodes: dict[str, NodeInfo]
    partitions: dict[str, Partition]
    leaders: dict[str, Leader]
    unreadable: set[str] = dataclasses.field(default_factory=set)
    """Partitions whose record does not decode: kept as last read (or absent), never
    taken for deleted."""


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


def _code(exc: BaseException) -> Any:
    """A gRPC error's status code (None for other failures)."""
    code = getattr(exc, "code", None)
    return code() if isinstance(exc, grpc.RpcError) and callable(code) else None


def _compare(target: str, key: bytes, value: int) -> Any:
    """etcd's compare: the key's version, mod or create revision equals value."""
    field = {"VERSION": "version", "MOD": "mod_revision", "CREATE": "create_revision"}[target]
    return rpc.Compare(result=rpc.Compare.EQUAL, target=getattr(rpc.Compare, target), key=key,
                       **{field: value})


def _put(key: bytes, value: bytes, lease_id: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease_id))


def _delete(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


@dataclasses.dataclass
class _Change:
    """One conditional change, waiting for a batch."""

    request: Any
    """rpc.TxnRequest: its compares, and its operations if they all hold."""
    keys: frozenset[bytes]
    """Every key it compares or writes: no other change of its batch may touch one."""
    width: int
    size: int
    done: asyncio.Future[tuple[bool, int]]


class _Batcher:
    """Conditional changes made while a transaction is in flight go together in the next
    one, each nested as a transaction of its own (see the module docstring): one change
    alone costs one round, as before; a thousand cost a few. A transaction etcd refuses
    whole (an election under a lease that just expired) fails every change in it: each
    caller retries as after any failure of etcd. Background changes go after the others,
    with BACKGROUND_ROOM of each batch kept for them."""

    def __init__(self, send: Callable[[list[Any]], Any]) -> None:
        self._send = send
        self._waiting: list[_Change] = []
        self._background: list[_Change] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, compares: list[Any], ops: list[Any], *,
                     background: bool = False) -> tuple[bool, int]:
        """Apply ops if every compare holds: (whether it did, the revision it was
        applied at, or etcd's revision then)."""
        request = rpc.TxnRequest(compare=compares, success=ops)
        keys = frozenset([c.key for c in compares] + [_op_key(op) for op in ops])
        change = _Change(request, keys, max(len(compares), len(ops)), request.ByteSize(),
                         asyncio.get_running_loop().create_future())
        (self._background if background else self._waiting).append(change)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())
        return await change.done

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _flush(self) -> None:
        while self._waiting or self._background:
            batch = self._take()
            if not batch:
                continue
            try:
                response = await self._send([rpc.RequestOp(request_txn=c.request)
                                             for c in batch])
            except Exception as exc:
                for change in batch:
                    if not change.done.done():
                        change.done.set_exception(exc)
                continue
            except BaseException:
                for change in batch + self._waiting + self._background:
                    if not change.done.done():
                        change.done.set_exception(
                            ControlUnavailableError("etcd: the node is closing"))
                raise
            revision = int(response.header.revision)
            for change, reply in zip(batch, response.responses, strict=True):
                if not change.done.done():
                    change.done.set_result((bool(reply.response_txn.succeeded), revision))

    def _take(self) -> list[_Change]:
        """The next batch: changes in the order made, the others before background ones,
        within etcd's limits, no two touching one key; the rest wait for the next."""
        batch: list[_Change] = []
        keys: set[bytes] = set()
        width = size = 0

        def fill(waiting: list[_Change], room: int) -> list[_Change]:
            nonlocal width, size
            rest: list[_Change] = []
            for change in waiting:
                if change.done.done():
                    continue  # its caller was cancelled before it was sent
                wider = max(width, change.width)
                if batch and (len(batch) + 1 + wider > room
                              or size + change.size > TXN_BYTES_MAX
                              or not keys.isdisjoint(change.keys)):
                    rest.append(change)
                    continue
                batch.append(change)
                keys.update(change.keys)
                width, size = wider, size + change.size
            return rest

        room = TXN_OPS_MAX - BACKGROUND_ROOM if self._background else TXN_OPS_MAX
        self._waiting = fill(self._waiting, room)
        self._background = fill(self._background, TXN_OPS_MAX)
        return batch


def _op_key(op: Any) -> bytes:
    kind = op.WhichOneof("request")
    return bytes(getattr(op, kind).key)


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
        self._batcher = _Batcher(self._txn)

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
        self._batcher.close()
        for task in list(self._closing):
            task.cancel()
        if self.client is not None:
            await self.client.current.close()

    async def _after_failure(self, client: Any, exc: BaseException) -> None:
        code = _code(exc)
        if isinstance(exc, _ENDPOINT_FAILURES) or code in _ENDPOINT_CODES:
            await self.failover(client)
        elif isinstance(exc, aetcd.exceptions.UnauthenticatedError) \
                or code == grpc.StatusCode.UNAUTHENTICATED:
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

    async def _rpc(self, stub: str, method: str, request: Any) -> Any:
        """One call of etcd's gRPC API itself (what aetcd does not offer: a range in
        pages, nested transactions, the revision a transaction wrote at)."""
        client = self.client.current
        try:
            await client.connect()
            return await getattr(getattr(client, stub), method)(
                request, timeout=ETCD_CALL_S, metadata=client.metadata)
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            raise ControlUnavailableError(f"etcd {method}: its connection was closed") from None
        except (aetcd.ClientError, grpc.RpcError, OSError) as exc:
            await self._after_failure(client, exc)
            if _code(exc) == grpc.StatusCode.OUT_OF_RANGE:  # "required revision compacted"
                raise HistoryCompactedError(0) from exc
            raise ControlUnavailableError(f"etcd {method}: {_reason(exc)}") from exc

    async def _txn(self, ops: list[Any]) -> Any:
        return await self._rpc("kvstub", "Txn", rpc.TxnRequest(success=ops))

    # -- leases and nodes ------------------------------------------------------------------

    async def grant(self, ttl: int) -> Any:
        return await self._call("lease", ttl)

    async def refresh(self, lease: Any) -> int:
        """Keep a lease alive; return the TTL left (0 or less: it has expired)."""
        client = self.client.current
        try:
            reply = await client.refresh_lease(lease.id)
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            raise ControlUnavailableError("etcd lease refresh: its connection was closed") \
                from None
        except (aetcd.ClientError, grpc.RpcError, OSError) as exc:
            await self._after_failure(client, exc)
            raise ControlUnavailableError(f"etcd lease refresh: {exc}") from exc
        return int(getattr(reply, "TTL", 0)) if reply is not None else 0

    async def revoke(self, lease: Any) -> None:
        await self._call("revoke_lease", lease.id)

    async def register(self, node: NodeInfo, lease: Any) -> None:
        value = json.dumps({"http": node.http, "replication": node.replication}).encode()
        await self._call("put", self.key("nodes", node.node_id), value, lease=lease)

    async def keep_token(self) -> None:
        """With etcd's users on, use the node's token every TOKEN_USE_S so that etcd does
        not forget it while the node is at rest (the node's stores share this client,
        and the first call after would fail). Until cancelled."""
        if self.access.user is None:
            return
        while True:
            await asyncio.sleep(TOKEN_USE_S)
            with contextlib.suppress(ControlUnavailableError):  # and so logged in again
                await self._call("get", self.key("receipt-key"))

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

    def view_range(self) -> tuple[bytes, bytes]:
        """[start, end) of the view's keys. leaders/, nodes/ and partitions/ sort together
        under the prefix (only master-key-check sorts among them, and the view ignores
        it), so one range reads them, and one watch follows them, without the queue
        records and access keys."""
        return self.prefix + b"leaders/", self.prefix + b"partitions0"  # "0" follows "/"

    async def view(self) -> ClusterView:
        """Nodes, partitions and leaders, read at one revision, RANGE_PAGE_KEYS at a time."""
        for _ in range(3):  # compacted under the read: read again at a newer revision
            with contextlib.suppress(HistoryCompactedError):
                return await self._read_view()
        return await self._read_view()

    async def _read_view(self) -> ClusterView:
        start, end = self.view_range()
        view = ClusterView(0, {}, {}, {})
        while True:
            response = await self._rpc("kvstub", "Range", rpc.RangeRequest(
                key=start, range_end=end, limit=RANGE_PAGE_KEYS, revision=view.revision))
            view.revision = view.revision or int(response.header.revision)
            for kv in response.kvs:
                self.put(view, kv)
            if not response.more or not response.kvs:
                return view
            start = bytes(response.kvs[-1].key) + b"\0"

    def split(self, key: bytes) -> tuple[str, str]:
        """(kind, name) of a key of the view: ("nodes", node id), ("partitions", name)..."""
        kind, _, rest = key[len(self.prefix):].decode().partition("/")
        return kind, rest

    def put(self, view: ClusterView, kv: Any) -> tuple[str, str]:
        """Set a key's new value in view; (kind, name) of the key."""
        kind, name = self.split(bytes(kv.key))
        try:
            if kind == "nodes":
                self._put_node(view, name, kv.value)
            elif kind == "partitions":
                view.partitions[name] = _partition(name, kv.value, kv.mod_revision)
                view.unreadable.discard(name)
            elif kind == "leaders":
                view.leaders[name] = Leader(bytes(kv.value).decode(), kv.create_revision,
                                            kv.lease)
        except (ValueError, KeyError, TypeError) as exc:
            # Written by something other than Conveyor: taken for nothing, and not for a
            # deletion either (a partition's copies stay).
            if kind == "partitions":
                view.unreadable.add(name)
            _log.error("%s/%s in etcd does not decode (%s): ignored", kind, name, exc)
        return kind, name

    def delete(self, view: ClusterView, key: bytes) -> tuple[str, str]:
        """Remove a key from view; (kind, name) of the key."""
        kind, name = self.split(key)
        if kind == "nodes":
            view.nodes.pop(name, None)
        elif kind == "partitions":
            view.partitions.pop(name, None)
            view.unreadable.discard(name)
        elif kind == "leaders":
            view.leaders.pop(name, None)
        return kind, name

    def _put_node(self, view: ClusterView, node_id: str, value: bytes) -> None:
        info = json.loads(value)
        node = NodeInfo(node_id, str(info["http"]), str(info["replication"]))
        try:
            node.replication_address()
        except ValueError:
            # Not a node this one can reach; a link or call to it would fail.
            view.nodes.pop(node_id, None)
            if node.replication not in self._malformed \
                    and len(self._malformed) < _MALFORMED_LOGGED_MAX:
                self._malformed.add(node.replication)
                _log.warning("node %s in etcd has a malformed address %r: ignored",
                             node_id, node.replication)
            return
        view.nodes[node_id] = node

    async def watch(self, start_revision: int, on_events: Callable[[list[Any]], None]
                    ) -> None:
        """Give on_events the changes to the view's keys from start_revision on, each
        revision's at once (etcd's events: ``type`` PUT or DELETE, ``kv``), until the watch
        breaks. Raises HistoryCompactedError when etcd no longer holds a revision it was
        to send, else ControlUnavailableError (after moving off an endpoint that failed or
        answers nothing: WATCH_PROGRESS_S)."""
        client = self.client.current
        start, end = self.view_range()
        requests: asyncio.Queue[Any] = asyncio.Queue()
        requests.put_nowait(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=start, range_end=end, start_revision=start_revision, fragment=True)))

        async def outgoing() -> Any:
            while (request := await requests.get()) is not None:
                yield request

        read: asyncio.Future[Any] | None = None
        call: Any = None
        try:
            await client.connect()
            call = rpc.WatchStub(client.channel).Watch(outgoing(), metadata=client.metadata)
            asked = False
            pending: list[Any] = []
            while True:
                if read is None:
                    read = asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({read}, timeout=ETCD_CALL_S if asked
                                             else WATCH_PROGRESS_S)
                if not done:
                    if asked:
                        await self.failover(client)
                        raise ControlUnavailableError(
                            f"etcd watch: no answer to a progress request in {ETCD_CALL_S} s")
                    requests.put_nowait(rpc.WatchRequest(
                        progress_request=rpc.WatchProgressRequest()))
                    asked = True
                    continue
                response, read, asked = read.result(), None, False
                if response is grpc.aio.EOF:
                    raise ControlUnavailableError("etcd ended the watch")
                if response.compact_revision:
                    raise HistoryCompactedError(int(response.compact_revision))
                if response.canceled:
                    if _TOKEN_REFUSED in response.cancel_reason:  # a restarted member
                        await self.reauthenticate(client)
                    raise ControlUnavailableError(
                        f"etcd cancelled the watch: {response.cancel_reason}")
                pending.extend(response.events)
                if pending and not response.fragment:
                    events, pending = pending, []
                    on_events(events)
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            raise ControlUnavailableError("etcd watch: its connection was closed") from None
        except (aetcd.ClientError, grpc.RpcError, OSError) as exc:
            await self._after_failure(client, exc)
            raise ControlUnavailableError(f"etcd watch: {_reason(exc)}") from exc
        finally:
            requests.put_nowait(None)
            if read is not None:
                read.cancel()
            if call is not None:
                call.cancel()

    async def node(self, node_id: str) -> NodeInfo | None:
        """A node's key, read now (None: no such node alive, or an address not usable)."""
        kv = await self._call("get", self.key("nodes", node_id))
        if kv is None:
            return None
        view = ClusterView(0, {}, {}, {})
        with contextlib.suppress(ValueError, KeyError, TypeError):  # not Conveyor's
            self._put_node(view, node_id, kv.value)
        return view.nodes.get(node_id)

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
        ok, _ = await self._batcher.submit([_compare("VERSION", key, 0)], [_put(key, value)])
        return ok

    async def delete_partition(self, name: str) -> None:
        await self._batcher.submit([], [_delete(self.key("partitions", name)),
                                        _delete(self.key("leaders", name))])

    async def elect(self, partition: Partition, node_id: str, lease_id: int) -> Leader | None:
        """Become the queue's leader if it has none and the ISR read is still current."""
        leader_key = self.key("leaders", partition.name)
        ok, revision = await self._batcher.submit(
            [_compare("VERSION", leader_key, 0),
             _compare("MOD", self.key("partitions", partition.name), partition.revision)],
            [_put(leader_key, node_id.encode(), lease_id)])
        # The key was created by this transaction: its create revision, the epoch, is the
        # transaction's revision.
        return Leader(node_id, revision, lease_id) if ok else None

    async def set_isr(self, partition: Partition, epoch: int,
                      isr: tuple[str, ...]) -> Partition | None:
        """Change the ISR while epoch is the current leader's; None if it is not."""
        return await self.set_members(partition, epoch, partition.replicas, isr)

    async def set_members(self, partition: Partition, epoch: int, replicas: tuple[str, ...],
                          isr: tuple[str, ...], *, background: bool = False
                          ) -> Partition | None:
        """Change replicas and ISR while epoch is the current leader's; None if not.
        background: nothing waits on the change (see _Batcher)."""
        key = self.key("partitions", partition.name)
        ok, revision = await self._batcher.submit(
            [_compare("CREATE", self.key("leaders", partition.name), epoch),
             _compare("MOD", key, partition.revision)],
            [_put(key, partition.value(replicas=list(replicas), isr=list(isr)))],
            background=background)
        if not ok:
            return None
        return dataclasses.replace(partition, replicas=tuple(replicas), isr=tuple(isr),
                                   revision=revision)

    async def resign(self, name: str, epoch: int) -> None:
        """Delete the leader key if it still carries epoch."""
        key = self.key("leaders", name)
        await self._batcher.submit([_compare("CREATE", key, epoch)], [_delete(key)])

    async def set_rf(self, partition: Partition, rf: int) -> bool:
        """Change the replication factor asked for; False if the record changed since."""
        key = self.key("partitions", partition.name)
        ok, _ = await self._batcher.submit([_compare("MOD", key, partition.revision)],
                                           [_put(key, partition.value(rf=rf))])
        return ok
