"""The inter-node port: one listener for every connection another node opens to this one.

A connection's first four bytes, its magic, name its protocol: ``CVR1`` replication
(replication.follower), ``CVC1`` partition calls (server/cluster/calls.py). ``_dispatch``
reads the magic within HANDSHAKE_S and hands the connection to the handler routed for it;
an unknown magic, or none in time, closes the connection. Every inbound connection passes
through ``_dispatch`` and nowhere else, so a handshake that authenticates both ends belongs
there, once, before any handler reads a byte.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from replication import frames as fr

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""Serves one connection whose magic has been read; the listener closes it afterwards."""

# Every protocol's magic is as long as replication's: the listener reads that many bytes
# before it knows which protocol it speaks.
MAGIC_BYTES = len(fr.MAGIC)

_log = logging.getLogger("conveyor.replication")


class Listener:
    """The TCP server of the inter-node port, and its route table: magic -> handler.

    Owned by the node (replication.node.ClusterNode); routes are added before ``start``.
    """

    def __init__(self) -> None:
        self._routes: dict[bytes, Handler] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def route(self, magic: bytes, handler: Handler) -> None:
        """Hand connections that open with magic to handler."""
        if len(magic) != MAGIC_BYTES:
            raise ValueError(f"a magic is {MAGIC_BYTES} bytes, not {len(magic)}")
        if magic in self._routes:
            # One protocol, one handler: a second registration is a bug, not an update.
            raise ValueError(f"connections opening with {magic!r} have a handler already")
        self._routes[magic] = handler

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
        self._connections.add(task)
        try:
            magic = await asyncio.wait_for(reader.readexactly(MAGIC_BYTES), fr.HANDSHAKE_S)
            handler = self._routes.get(magic)
            if handler is None:
                raise fr.ProtocolError(f"no protocol opens with {magic!r}")
            await handler(reader, writer)
        except fr.LINK_ERRORS as exc:
            _log.info("inter-node connection from %s ended: %s",
                      writer.get_extra_info("peername"), exc)
        except asyncio.CancelledError:
            pass  # the node is closing (the only canceller)
        finally:
            self._connections.discard(task)
            writer.close()
