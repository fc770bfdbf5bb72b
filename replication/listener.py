"""The inter-node port: one listener for every connection another node opens to this one.

A connection's first four bytes, its magic, name its protocol: ``CVR2`` replication
(replication.follower), ``CVC2`` partition calls (server/cluster/calls.py). ``_dispatch``
reads the magic, then runs the peer handshake (replication.peer) that authenticates both
ends, all within HANDSHAKE_S, and only then hands the connection, as a channel of sealed
frames, to the handler routed for the magic. An unknown magic, a failed proof or a
handshake not finished in time closes the connection; the peer has been told nothing.
Every inbound connection passes through ``_dispatch`` and nowhere else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from replication import frames as fr
from replication.peer import Channel, Peers

Handler = Callable[[Channel], Awaitable[None]]
"""Serves one authenticated connection; the listener closes it afterwards."""

# Every protocol's magic is as long as replication's: the listener reads that many bytes
# before it knows which protocol it speaks.
MAGIC_BYTES = len(fr.MAGIC)
# Connections still in their handshake, at most. Past it the oldest is closed: a flood of
# connections that never prove anything then cannot keep the cluster's nodes out, since
# a node's handshake takes one round trip and the flood's each wait up to HANDSHAKE_S.
HANDSHAKES_MAX = 64
# Connections at most, authenticated or not (a descriptor and a task each). A node opens
# one per queue it leads and follower, and one for partition calls.
CONNECTIONS_MAX = 16384

_log = logging.getLogger("conveyor.replication")


@dataclasses.dataclass(frozen=True)
class _Route:
    handler: Handler
    frame_bytes_max: int


class Listener:
    """The TCP server of the inter-node port, and its route table: magic -> handler.

    Owned by the node (replication.node.ClusterNode); routes are added before ``start``.
    """

    def __init__(self, peers: Peers) -> None:
        self.peers = peers
        self._routes: dict[bytes, _Route] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._handshaking: dict[asyncio.Task[None], None] = {}
        """Connections not yet authenticated, oldest first."""
        self.refused = 0
        """Connections closed before they authenticated (for tests and the log)."""

    def route(self, magic: bytes, handler: Handler, frame_bytes_max: int) -> None:
        """Hand connections that open with magic to handler, in frames of at most
        frame_bytes_max bytes."""
        if len(magic) != MAGIC_BYTES:
            raise ValueError(f"a magic is {MAGIC_BYTES} bytes, not {len(magic)}")
        if magic in self._routes:
            # One protocol, one handler: a second registration is a bug, not an update.
            raise ValueError(f"connections opening with {magic!r} have a handler already")
        self._routes[magic] = _Route(handler, frame_bytes_max)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; return the address bound (port 0 takes a free one)."""
        self._server = await asyncio.start_server(self._dispatch, host, port)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        """Stop listening and end every connection (its handler sees a cancellation)."""
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _dispatch(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= CONNECTIONS_MAX:
            self.refused += 1
            writer.close()
            return
        self._connections.add(task)
        self._handshaking[task] = None
        if len(self._handshaking) > HANDSHAKES_MAX:
            next(iter(self._handshaking)).cancel()
        try:
            async with asyncio.timeout(fr.HANDSHAKE_S):
                magic = await reader.readexactly(MAGIC_BYTES)
                route = self._routes.get(magic)
                if route is None:
                    raise fr.ProtocolError("no protocol opens with that magic")
                channel = await self.peers.accept(reader, writer, magic, route.frame_bytes_max)
            del self._handshaking[task]
            await route.handler(channel)
        except fr.LINK_ERRORS as exc:
            if task in self._handshaking:
                self.refused += 1
            _log.info("inter-node connection from %s ended: %s",
                      writer.get_extra_info("peername"), exc or type(exc).__name__)
        except asyncio.CancelledError:
            # The node is closing, or this handshake was the oldest of too many.
            if task in self._handshaking:
                self.refused += 1
        finally:
            self._handshaking.pop(task, None)
            self._connections.discard(task)
            writer.close()
