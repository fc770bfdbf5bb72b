"""The workers' partition calls to one another, over Unix sockets.

Each worker serves the partitions it owns on ``run_dir/w{i}.sock`` and connects to each
sibling at its first call there, one connection per sibling that all its calls share
(server/calls/link.py). The frames are the cluster's partition calls, unsealed: the
peer is authenticated by the kernel instead. The socket's directory is the server's
(mode 0700), and a connection is served only if its process runs as this server's user
(SO_PEERCRED), who could read the data directory, and so every message, anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct

from replication.peer import Channel
from server.calls.link import CALL_FRAME_BYTES_MAX, CallLink, Local, serve_calls
from server.config import WORKERS_MAX
from server.errors import LeaderUnreachableError
from server.workers.ownership import WorkerPlace

_log = logging.getLogger("conveyor.server")

# A sibling that does not take the connection this fast is down (or restarting).
CONNECT_S = 2.0
CONNECTIONS_MAX = 4 * WORKERS_MAX
"""Call connections a worker serves at once: one per sibling, with room for siblings
restarted while their old connections close."""
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    pid, uid, _ = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


class Mesh:
    """This worker's call socket, and its connections to its siblings'."""

    def __init__(self, place: WorkerPlace, local: Local) -> None:
        self.place = place
        self._local = local
        self._server: asyncio.AbstractServer | None = None
        self._served: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._links: dict[int, CallLink] = {}
        self._connecting: dict[int, asyncio.Lock] = {}

    async def start(self) -> None:
        path = self.place.socket_path(self.place.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous run
        self._server = await asyncio.start_unix_server(self._accept, path)
        os.chmod(path, 0o600)

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid = peer_credentials(sock)
        if uid != os.getuid() or len(self._served) >= CONNECTIONS_MAX:
            _log.warning("refused a partition call connection from pid %d (uid %d): %s",
                         pid, uid, "another user" if uid != os.getuid()
                         else f"{CONNECTIONS_MAX} connections already")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._served[writer] = task
        try:
            channel = Channel(reader, writer, f"worker process {pid}", CALL_FRAME_BYTES_MAX,
                              None)
            await serve_calls(channel, self._local)
        finally:
            self._served.pop(writer, None)
            writer.close()

    async def link(self, index: int) -> CallLink:
        """The connection to worker index, made now if there is none open."""
        link = self._links.get(index)
        if link is not None and link.open:
            return link
        lock = self._connecting.setdefault(index, asyncio.Lock())
        async with lock:
            link = self._links.get(index)
            if link is not None and link.open:
                return link
            peer = f"worker {index}"
            try:
                async with asyncio.timeout(CONNECT_S):
                    reader, writer = await asyncio.open_unix_connection(
                        self.place.socket_path(index))
            except (OSError, TimeoutError) as exc:
                raise LeaderUnreachableError(peer, "it is not serving calls (restarting?); "
                                                   "retry") from exc
            _, uid = peer_credentials(writer.get_extra_info("socket"))
            if uid != os.getuid():
                writer.close()
                raise LeaderUnreachableError(peer, f"its socket is served by uid {uid}")
            link = self._links[index] = CallLink(
                Channel(reader, writer, peer, CALL_FRAME_BYTES_MAX, None), peer)
            return link

    async def reachable(self) -> list[int]:
        """The siblings that take a connection now (a readiness check)."""
        up = []
        for index in range(self.place.count):
            if index == self.place.index:
                continue
            with contextlib.suppress(LeaderUnreachableError):
                await self.link(index)
                up.append(index)
        return up

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.place.socket_path(self.place.index))
        for link in self._links.values():
            link.close()
        self._links.clear()
        # Each served connection ends when its socket closes (cancelling its task instead
        # would have asyncio log the cancellation as an error).
        served = list(self._served.values())
        for writer in list(self._served):
            writer.close()
        await asyncio.gather(*served, return_exceptions=True)
