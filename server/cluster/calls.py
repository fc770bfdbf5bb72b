"""Calls on one queue partition, made where the partition is led.

The FrontEnd that took a request has already authenticated, authorized and validated it;
what remains is an engine call on a partition (send a batch, receive, delete ...). If this
node leads the partition the call is made in process. Otherwise it goes to the leader
over a persistent TCP connection to the leader's replication port, and the leader makes
it in process: never passed on again, so a leadership change in flight costs the client
a retry (503), never a loop.

A connection opens with ``CVC2`` and the peer handshake (replication.peer): both nodes
prove the cluster's peer key, and every frame after it is sealed. A client on the
network therefore cannot make a call, which would skip authentication, nor answer one.
The frames are msgpack (server/cluster/codec.py) both ways: calls
``[id, op, partition, args]``, replies ``[id, 0, result]`` or ``[id, 1, error]``, and
``[id]`` to cancel a call whose caller no longer waits (a long poll another partition
answered first). Many calls share one connection per leader node. The bytes are drawn
in docs/FORMAT.md, "Partition calls".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine import AsyncQueue, Broker
from engine.errors import EngineError
from replication import frames as fr
from replication.control import NodeInfo
from replication.errors import NotLeaderError
from replication.frames import CALLS_MAGIC
from replication.peer import Channel
from server.cluster.codec import ARGUMENTS, RESULTS, pack, result_value, unpack
from server.errors import (
    DependencyUnavailableError,
    LeaderUnreachableError,
)
from server.protection.breaker import Guard

if TYPE_CHECKING:
    from replication.node import ClusterNode

_log = logging.getLogger("conveyor.server")

# Longer than the longest long poll (20 s) plus a commit wait (10 s).
CALL_TIMEOUT_S = 45.0
# A leader that does not take the connection and the handshake this fast is down.
CONNECT_S = 2.0
# A frame's largest body: a receive of ten 1 MiB messages with their attributes fits.
CALL_FRAME_BYTES_MAX = 16 * 1024 * 1024
_FAILED, _BUG = 1, 2
# What ends a connection of calls: the link, or a frame that is not a call.
_CONNECTION_ERRORS = (*fr.LINK_ERRORS, ValueError, TypeError)


async def _read_frame(channel: Channel) -> Any:
    return unpack(await channel.receive())


def _keep_alive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive probes, so that a leader host gone without a reset (powered off, cut
    off) fails the calls waiting on it in about 11 s, not at their timeout."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):  # Linux names; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _forget(running: dict[int, asyncio.Task[None]], call_id: int, _: object) -> None:
    running.pop(call_id, None)


class _Link:
    """One connection to a leader node, its calls told apart by id."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._reading = asyncio.create_task(self._read())

    @property
    def open(self) -> bool:
        return not self._reading.done()

    async def call(self, op: str, partition: str, args: Sequence[Any]) -> Any:
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        try:
            self.channel.send(pack([call_id, op, partition, list(args)]))
            async with asyncio.timeout(CALL_TIMEOUT_S):
                return await future
        except TimeoutError:
            # A leader that answers nothing this long is gone or cut off: the next call
            # connects again rather than wait on this connection too.
            self.close()
            raise DependencyUnavailableError(
                "partition's leader node", f"no answer in {CALL_TIMEOUT_S:g} s") from None
        finally:
            if self.pending.pop(call_id, None) is not None and self.open:
                # Unanswered (cancelled, or timed out): the leader may stop working on it.
                self.channel.send(pack([call_id]))

    async def _read(self) -> None:
        failure: BaseException | None = None
        try:
            while True:
                call_id, outcome, value = await _read_frame(self.channel)
                future = self.pending.pop(call_id, None)
                if future is None or future.done():
                    continue  # cancelled meanwhile
                if outcome == 0:
                    future.set_result(value)
                elif outcome == _FAILED:
                    future.set_exception(value)
                else:
                    future.set_exception(RuntimeError(f"the leader failed the call: {value}"))
        except _CONNECTION_ERRORS as exc:
            failure = exc
        finally:
            # Sent, perhaps made, answer lost: a caller cannot know what happened.
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(DependencyUnavailableError(
                        "partition's leader node", "the connection to it broke; retry"))
            self.pending.clear()
            self.channel.close()
            if failure is not None:
                _log.info("partition call connection ended: %s", failure)

    def close(self) -> None:
        self._reading.cancel()


class PartitionCalls:
    """Engine calls on partitions: in process where this node leads, else at the leader."""

    def __init__(self, broker: Broker, node: ClusterNode, guard: Guard) -> None:
        self.broker = broker
        self.node = node
        self.guard = guard
        """The engine's bulkhead and breaker: local calls only. A remote leader that
        fails must not open the circuit for the partitions this node leads."""
        self._links: dict[str, _Link] = {}
        """Per leader node id, the connection its calls share."""
        self._connecting: dict[str, asyncio.Lock] = {}
        node.listener.route(CALLS_MAGIC, self.serve, CALL_FRAME_BYTES_MAX)

    async def partition_uids(self, names: list[str]) -> dict[int, int]:
        return await self.node.partition_uids(names)

    # -- making calls --------------------------------------------------------------------

    async def call(self, partition: str, op: str, *args: Any) -> Any:
        """``AsyncQueue(partition).<op>(*args)`` wherever the partition is led."""
        await self.node.opened_here(partition)
        if partition in self.node.leading:
            try:
                return await self.local(partition, op, args)
            except NotLeaderError:  # stepped down meanwhile
                pass
        # Not asking the broker first: a thread hop only to hear it is not the leader.
        leader = self.node.leader_node(partition) or await self.node.locate(partition)
        if leader is None:
            raise NotLeaderError(partition, None)
        link = await self._link(leader)
        value = await link.call(op, partition, args)
        return RESULTS[op](value)

    async def local(self, partition: str, op: str, args: Sequence[Any]) -> Any:
        await self.node.opened_here(partition)
        queue = AsyncQueue(self.broker, partition)
        if op == "set_attributes":
            return await self.guard.run(queue.set_attributes, **args[0])
        method = getattr(queue, op)
        return await self.guard.run(method, *args)

    async def _link(self, leader: NodeInfo) -> _Link:
        link = self._links.get(leader.node_id)
        if link is not None and link.open:
            return link
        lock = self._connecting.setdefault(leader.node_id, asyncio.Lock())
        async with lock:
            link = self._links.get(leader.node_id)
            if link is not None and link.open:
                return link
            try:
                channel = await self.node.peers.connect(
                    leader.replication_address(), leader.node_id, CALLS_MAGIC,
                    CALL_FRAME_BYTES_MAX, CONNECT_S)
            except fr.LINK_ERRORS as exc:
                # The address stays in the log, not in the client's message.
                _log.warning("partition calls to %s at %s: cannot connect: %s",
                             leader.node_id, leader.replication, exc or type(exc).__name__)
                raise LeaderUnreachableError("partition's leader node",
                                             "it could not be reached; retry") from exc
            _keep_alive(channel.writer)
            link = self._links[leader.node_id] = _Link(channel)
            return link

    async def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()

    # -- serving calls -------------------------------------------------------------------

    async def serve(self, channel: Channel) -> None:
        """A connection of calls from another node, authenticated by the listener."""
        running: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                frame = await _read_frame(channel)
                if len(frame) == 1:  # the caller gave up on it
                    task = running.pop(frame[0], None)
                    if task is not None:
                        task.cancel()
                    continue
                call_id, op, partition, args = frame
                task = asyncio.create_task(self._answer(channel, call_id, op, partition,
                                                        args))
                running[call_id] = task
                task.add_done_callback(functools.partial(_forget, running, call_id))
        except _CONNECTION_ERRORS as exc:
            _log.info("partition calls from %s ended: %s", channel.peer,
                      exc or type(exc).__name__)
        finally:
            for task in list(running.values()):
                task.cancel()

    async def _answer(self, channel: Channel, call_id: int, op: str,
                      partition: str, args: list[Any]) -> None:
        try:
            arguments = ARGUMENTS[op](args)
        except (KeyError, ValueError, TypeError) as exc:
            # Sent by a node, so the nodes disagree (a version skew): unavailable, not
            # the client's fault.
            _log.error("cannot read partition call %r on %s: %s", op, partition, exc)
            reply = pack([call_id, _FAILED, DependencyUnavailableError(
                "partition's leader node", f"it could not read the call {op!r}")])
        else:
            try:
                result = await self.local(partition, op, arguments)
                reply = pack([call_id, 0, result_value(op, result)])
            except EngineError as exc:
                reply = pack([call_id, _FAILED, exc])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: logged here, a 500 at the caller
                _log.exception("partition call %s on %s failed", op, partition)
                reply = pack([call_id, _BUG, type(exc).__name__])
        with contextlib.suppress(OSError):
            if not channel.is_closing():
                channel.send(reply)
