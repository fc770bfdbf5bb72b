"""The inter-node port: one listener for every connection another node opens to this one.

A connection's first four bytes, its magic, name its protocol: ``CVR3`` replication
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
import time
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
# ... and at most this many from one host, so that one host's flood evicts its own.
HANDSHAKES_PER_HOST_MAX = 16
# Connections at most, authenticated or not (a descriptor and a task each). Another node
# opens two: one for replication (replication.link), one for partition calls.
CONNECTIONS_MAX = 16384
# Refused connections are logged as a count at most this often.
REFUSALS_LOG_S = 10.0

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
        self._handshaking: dict[asyncio.Task[None], str] = {}
        """Connections not yet authenticated, oldest first, and the host of each."""
        self.refused = 0
        """Connections closed before they authenticated (for tests and the log)."""
        self._unlogged = 0
        self._logged_at = -REFUSALS_LOG_S

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
        peer = writer.get_extra_info("peername")
        if len(self._connections) >= CONNECTIONS_MAX:
            self._refused(peer, "too many connections")
            writer.close()
            return
        self._connections.add(task)
        self._admit(task, str(peer[0]) if isinstance(peer, tuple) else "")
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
            reason = str(exc) or type(exc).__name__
            if self._handshaking.pop(task, None) is not None:
                self._refused(peer, reason)
            else:
                _log.info("inter-node connection from %s ended: %s", peer, reason)
        except asyncio.CancelledError:
            pass  # the node is closing, or this handshake was evicted (and counted then)
        finally:
            self._handshaking.pop(task, None)
            self._connections.discard(task)
            writer.close()

    def _admit(self, task: asyncio.Task[None], host: str) -> None:
        """Count a new handshake in; past the caps, evict the oldest (of its host first).

        Evicted handshakes leave the table here, not when their task next runs: a burst
        of connections accepted in one turn of the loop must each see the others.
        """
        same_host = [t for t, h in self._handshaking.items() if h == host]
        self._handshaking[task] = host
        if len(same_host) >= HANDSHAKES_PER_HOST_MAX:
            self._evict(same_host[0])
        while len(self._handshaking) > HANDSHAKES_MAX:
            self._evict(next(iter(self._handshaking)))

    def _evict(self, task: asyncio.Task[None]) -> None:
        host = self._handshaking.pop(task)
        self._refused(host, "evicted: too many handshakes in progress")
        task.cancel()

    def _refused(self, peer: object, reason: str) -> None:
        """Count a connection that did not authenticate; log a summary now and then, so
        that an outsider cannot choose how much the node logs."""
        self.refused += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSALS_LOG_S:
            _log.warning("refused %d inter-node connection(s) that did not authenticate "
                         "(the latest from %s: %s)", self._unlogged, peer, reason)
            self._unlogged = 0
            self._logged_at = now
