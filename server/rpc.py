"""Calls on one queue partition, served where the partition is led.

The FrontEnd that took a request has already authenticated, authorized and validated it;
what remains is an engine call on a partition (send a batch, receive, delete ...). If this
node leads the partition the call is made in process. Otherwise it goes to the leader as
``POST /internal/v1/rpc``, and the leader makes it in process: never forwarded again, so a
leadership change in flight costs the client a retry (503), never a loop.

The call and its outcome travel as msgpack: ``[op, partition, args]`` out, and
``[0, result]`` or ``[1, error]`` back. Engine errors keep their class and attributes, so
the FrontEnd answers a remote refusal exactly as it would a local one. The request carries
``X-Conveyor-Internal: <unix ms>.<mac>``, a keyed BLAKE2b over the time and the body under
a key derived from the cluster's shared secret: a client on the public port cannot make an
internal call, which would skip authentication. A call older than RPC_CLOCK_SKEW_S is
refused. The byte layout is drawn in docs/FORMAT.md, "Partition calls".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import msgpack  # type: ignore[import-untyped]
from aiohttp import web

import replication.errors
import server.errors
from engine import AsyncQueue, Broker, Message, QueueAttributes, QueueStats
from engine.errors import EngineError
from engine.records import MessageAttribute
from engine.results import SendEntry, SendResult
from replication.errors import NotLeaderError
from server.breaker import Guard
from server.errors import (
    DependencyUnavailableError,
    LeaderUnreachableError,
    MalformedRequestError,
    SignatureDoesNotMatchError,
)

if TYPE_CHECKING:
    from replication.node import ClusterNode

_log = logging.getLogger("conveyor.server")

RPC_PATH = "/internal/v1/rpc"
AUTH_HEADER = "X-Conveyor-Internal"
# A call signed longer ago than this (or this far in the future) is refused.
RPC_CLOCK_SKEW_S = 30.0
# Longer than the longest long poll (20 s) plus a commit wait (10 s).
RPC_TIMEOUT_S = 45.0
# A leader that does not take the connection this fast is treated as down.
RPC_CONNECT_S = 2.0
_MAC_BYTES = 16
_ERROR_EXT = 1
_CONTENT_TYPE = "application/x-msgpack"


# -- the codec ---------------------------------------------------------------------------

def _error_classes() -> dict[str, type[EngineError]]:
    """Every class of the one hierarchy, by qualified name."""
    found: dict[str, type[EngineError]] = {}
    pending: list[type[EngineError]] = [EngineError]
    while pending:
        cls = pending.pop()
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        pending.extend(cls.__subclasses__())
    return found


# The modules whose error classes must be known by the time the registry is built.
assert server.errors and replication.errors
_ERRORS = _error_classes()
_PLAIN = (str, int, float, bool, bytes, type(None))


def _plain(value: Any) -> Any:
    """An error attribute as msgpack carries it: scalars and lists of them as they are,
    anything else as its text (an attribute is for the message and the error code)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, _PLAIN) for v in value):
        return list(value)
    return str(value)


def _default(obj: Any) -> Any:
    if isinstance(obj, EngineError):
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        fields = {k: _plain(v) for k, v in vars(obj).items()}
        return msgpack.ExtType(_ERROR_EXT, msgpack.packb([name, str(obj), fields],
                                                         use_bin_type=True))
    if isinstance(obj, memoryview):
        return bytes(obj)
    raise TypeError(f"cannot send {type(obj).__name__} in a partition call")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _ERROR_EXT:
        return msgpack.ExtType(code, data)
    name, text, fields = msgpack.unpackb(data, raw=False)
    cls = _ERRORS.get(name, EngineError)
    # Built without its own __init__, whose arguments differ per class: the message and
    # the attributes are what callers read.
    error = cls.__new__(cls)
    Exception.__init__(error, text)
    vars(error).update(fields)
    return error


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, default=_default, use_bin_type=True)
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)


def _attributes(raw: dict[str, list[Any]] | None) -> dict[str, MessageAttribute] | None:
    if raw is None:
        return None
    return {k: MessageAttribute(t, v) for k, (t, v) in raw.items()}


def _send_entry(raw: list[Any]) -> SendEntry:
    body, delay, attributes, group, dedup, sender, system, message_id, overhead = raw
    return SendEntry(body, delay, _attributes(attributes), group, dedup, sender,
                     _attributes(system), message_id, overhead)


def _message(raw: list[Any]) -> Message:
    fields = list(raw)
    fields[6] = _attributes(fields[6]) or {}
    fields[11] = _attributes(fields[11]) or {}
    return Message(*fields)


def _send_results(raw: list[Any]) -> list[SendResult | EngineError]:
    return [r if isinstance(r, EngineError) else SendResult(*r) for r in raw]


# How each call's arguments arrive at the leader, and its result at the caller. Each op
# is the AsyncQueue method of the same name.
_ARGUMENTS: dict[str, Callable[[list[Any]], list[Any]]] = {
    "send_batch": lambda a: [[_send_entry(e) for e in a[0]]],
    "receive": lambda a: a,
    "wait_receivable": lambda a: a,
    "delete_batch": lambda a: a,
    "change_visibility_batch": lambda a: [[(r, s) for r, s in a[0]]],
    "purge": lambda a: a,
    "attributes": lambda a: a,
    "set_attributes": lambda a: a,
    "stats": lambda a: a,
}
_RESULTS: dict[str, Callable[[Any], Any]] = {
    "send_batch": _send_results,
    "receive": lambda r: [_message(m) for m in r],
    "wait_receivable": bool,
    "delete_batch": list,
    "change_visibility_batch": list,
    "purge": lambda r: None,
    "attributes": QueueAttributes.from_dict,
    "set_attributes": QueueAttributes.from_dict,
    "stats": lambda r: QueueStats(**r),
}


def _result_value(op: str, result: Any) -> Any:
    """A result in the shape msgpack carries (NamedTuples go as arrays by themselves)."""
    if isinstance(result, QueueAttributes):
        return result.to_dict()
    if isinstance(result, QueueStats):
        return {f: getattr(result, f) for f in QueueStats.__dataclass_fields__}
    return result


# -- making calls ------------------------------------------------------------------------

class PartitionCalls:
    """Engine calls on partitions: in process where this node leads, else at the leader."""

    def __init__(self, broker: Broker, node: ClusterNode, guard: Guard, secret: bytes) -> None:
        self.broker = broker
        self.node = node
        self.guard = guard
        """The engine's bulkhead and breaker: local calls only. A remote leader that
        fails must not open the circuit for the partitions this node leads."""
        self._key = hashlib.blake2b(secret, digest_size=32, person=b"conveyor-rpc").digest()
        self._session: aiohttp.ClientSession | None = None

    async def call(self, partition: str, op: str, *args: Any) -> Any:
        """``AsyncQueue(partition).<op>(*args)`` wherever the partition is led."""
        try:
            return await self.local(partition, op, args)
        except NotLeaderError as refusal:
            url = refusal.leader_url or await self.node.locate(partition)
            if url is None:
                raise
        return await self._remote(url, partition, op, args)

    async def local(self, partition: str, op: str, args: Sequence[Any]) -> Any:
        queue = AsyncQueue(self.broker, partition)
        if op == "set_attributes":
            return await self.guard.run(queue.set_attributes, **args[0])
        method = getattr(queue, op)
        return await self.guard.run(method, *args)

    async def _remote(self, url: str, partition: str, op: str, args: Sequence[Any]) -> Any:
        body = pack([op, partition, list(args)])
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=RPC_TIMEOUT_S, connect=RPC_CONNECT_S),
                connector=aiohttp.TCPConnector(limit=256))
        headers = {AUTH_HEADER: self.sign(body), "Content-Type": _CONTENT_TYPE}
        try:
            async with self._session.post(url + RPC_PATH, data=body, headers=headers) as reply:
                payload = await reply.read()
                status = reply.status
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            _log.warning("partition call to %s not made: %s", url, exc or type(exc).__name__)
            raise LeaderUnreachableError("partition's leader node",
                                         "it could not be reached; retry") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Sent, perhaps made, answer lost: the caller cannot know what happened.
            # The address stays in the log, not in the client's message.
            _log.warning("partition call to %s failed: %s", url, exc or type(exc).__name__)
            raise DependencyUnavailableError("partition's leader node",
                                             "it could not be reached; retry") from exc
        if status != 200:
            _log.error("partition call %s on %s at %s: HTTP %d: %s", op, partition, url,
                       status, payload[:200])
            raise DependencyUnavailableError("partition's leader node",
                                             f"it answered HTTP {status}")
        failed, value = unpack(payload)
        if failed:
            raise value
        return _RESULTS[op](value)

    def sign(self, body: bytes, now_ms: int | None = None) -> str:
        stamp = str(time.time_ns() // 1_000_000 if now_ms is None else now_ms)
        return f"{stamp}.{self._mac(stamp, body)}"

    def verify(self, header: str, body: bytes) -> bool:
        stamp, _, mac = header.partition(".")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 16 and mac.isascii()):
            return False
        if abs(time.time() - int(stamp) / 1000) > RPC_CLOCK_SKEW_S:
            return False
        return hmac.compare_digest(mac, self._mac(stamp, body))

    def _mac(self, stamp: str, body: bytes) -> str:
        mac = hashlib.blake2b(key=self._key, digest_size=_MAC_BYTES)
        mac.update(stamp.encode() + b"\n")
        mac.update(body)
        return mac.hexdigest()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


# -- serving calls -----------------------------------------------------------------------

async def serve(calls: PartitionCalls, request: web.Request) -> web.Response:
    """The leader's side of a partition call: made here, in process, or refused."""
    body = await request.read()
    if not calls.verify(request.headers.get(AUTH_HEADER, ""), body):
        raise SignatureDoesNotMatchError("internal calls are for the cluster's own nodes")
    try:
        op, partition, args = unpack(body)
        arguments = _ARGUMENTS[op](args)
    except (ValueError, KeyError, TypeError) as exc:
        # Signed by a node, so a bug or a version skew: said plainly, not a 5xx.
        raise MalformedRequestError(f"malformed partition call: {exc}") from exc
    try:
        result = await calls.local(partition, op, arguments)
        reply = pack([0, _result_value(op, result)])
    except EngineError as exc:
        reply = pack([1, exc])
    return web.Response(body=reply, content_type=_CONTENT_TYPE)
