"""Calls on one queue partition, made where the partition is led: the router of a
cluster's queues of partitions (server/partitioned.py).

If this node leads the partition the call is made in process. Otherwise it goes to the
leader over a persistent TCP connection to the leader's replication port
(server/calls/link.py), and the leader makes it in process.

A connection opens with ``CVC2`` and the peer handshake (replication.peer): both nodes
prove the cluster's peer key, and every frame after it is sealed. A client on the
network therefore cannot make a call, which would skip authentication, nor answer one.
Many calls share one connection per leader node.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine import Broker
from replication import frames as fr
from replication.control import NodeInfo
from replication.errors import NotLeaderError
from replication.frames import CALLS_MAGIC
from replication.peer import Channel
from server.backend import engine_call
from server.calls.codec import RESULTS
from server.calls.link import CALL_FRAME_BYTES_MAX, CallLink, serve_calls
from server.errors import LeaderUnreachableError
from server.partitioned import WAIT_SLICE_S
from server.protection.breaker import Guard

if TYPE_CHECKING:
    from replication.node import ClusterNode

_log = logging.getLogger("conveyor.server")

# A leader that does not take the connection and the handshake this fast is down.
CONNECT_S = 2.0
_PEER = "partition's leader node"


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


class PartitionCalls:
    """Engine calls on partitions: in process where this node leads, else at the leader."""

    def __init__(self, broker: Broker, node: ClusterNode, guard: Guard) -> None:
        self.broker = broker
        self.node = node
        self.guard = guard
        """The engine's bulkhead and breaker: local calls only. A remote leader that
        fails must not open the circuit for the partitions this node leads."""
        self._links: dict[str, CallLink] = {}
        """Per leader node id, the connection its calls share."""
        self._connecting: dict[str, asyncio.Lock] = {}
        node.listener.route(CALLS_MAGIC, self.serve, CALL_FRAME_BYTES_MAX)

    async def partition_uids(self, names: list[str], fresh: bool = False) -> dict[int, int]:
        # The node's view follows etcd's watch; a partition it does not hold yet is read
        # from etcd.
        return await self.node.partition_uids(names)

    wait_slice_s = WAIT_SLICE_S

    def nearest(self, partitions: list[str]) -> int | None:
        # None: the partitions take turns, whichever node a client calls, which keeps
        # them even however unevenly clients spread over the nodes.
        return None

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
        return await engine_call(self.broker, self.guard, partition, op, args)

    async def _link(self, leader: NodeInfo) -> CallLink:
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
            link = self._links[leader.node_id] = CallLink(channel, _PEER)
            return link

    async def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()

    # -- serving calls -------------------------------------------------------------------

    async def serve(self, channel: Channel) -> None:
        """A connection of calls from another node, authenticated by the listener."""
        await serve_calls(channel, self.local)
