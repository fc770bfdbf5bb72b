"""The listening socket: TLS, the connection limit, and the process's serving loop.

aiohttp's ``run_app`` has no connection limit, so the server runs the same steps itself
(an AppRunner that turns SIGTERM and SIGINT into a graceful exit, one TCP site, cleanup on
the way out) with a site whose protocol factory refuses connections beyond
``--connections-max`` (CONNECTIONS_MAX by default): such a connection is closed as soon as
it is accepted, before a byte of it is read, so a flood of idle connections costs the
server nothing but the accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from server import allocator
from server.config import SHUTDOWN_GRACE_S, ServerConfig
from server.gcpolicy import GcPolicy
from server.web import appkeys

# Connections waiting to be accepted; beyond it the kernel refuses them.
BACKLOG = 1024


class _Refused(asyncio.Protocol):
    """What a connection over the limit gets: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class LimitedSite(web.TCPSite):
    """A TCP site serving at most ``limit`` connections at a time."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, limit: int,
                 ssl_context: ssl.SSLContext | None, reuse_port: bool = False) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=BACKLOG,
                         shutdown_timeout=SHUTDOWN_GRACE_S)
        self.limit = limit
        self.reuse_port = reuse_port
        """The port is shared with the server's other workers (SO_REUSEPORT)."""
        self.refused = 0
        self.runner = runner

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would listen
        server = self.runner.server
        assert server is not None

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.limit:
                self.refused += 1
                return _Refused()
            return server()

        # The attribute BaseSite.stop closes.
        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_port=self.reuse_port or None)


def claim_port(host: str, port: int) -> socket.socket:
    """Claim (host, port) for this server among the Conveyor servers of this host: a Unix
    socket bound in the abstract namespace under a name made of the two, which the kernel
    gives to one socket at a time and frees when its last holder dies. SO_REUSEPORT lets
    a server's workers share the port, and so would let another server of the same user
    in beside them, at a moment none of them listens (all restarting); the claim keeps it
    out. Raises OSError if another server holds it."""
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0conveyor-port:{host}:{port}")
    except OSError as exc:
        claim.close()
        raise OSError(exc.errno, f"{host}:{port} is in use by another Conveyor server"
                      ) from None
    return claim


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2 or later, with Python's default (modern) cipher choice."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def run(app: web.Application, config: ServerConfig, loop: asyncio.AbstractEventLoop,
        announce: Callable[[], Any]) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (as run_app would)."""
    asyncio.set_event_loop(loop)
    context = None
    if config.tls_cert is not None and config.tls_key is not None:
        context = tls_context(config.tls_cert, config.tls_key)
    # The process is the server's: its collector freezes old objects (server/gcpolicy.py),
    # and its allocator gives large buffers back (server/allocator.py).
    allocator.fix_policy()
    gc_policy = app[appkeys.GC_POLICY] = GcPolicy()
    gc_policy.start(loop)
    main = loop.create_task(_serve(app, config, context, announce))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        gc_policy.stop()
        if not main.done():
            main.cancel()  # its finally runs the graceful cleanup
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _serve(app: web.Application, config: ServerConfig,
                 context: ssl.SSLContext | None, announce: Callable[[], Any]) -> None:
    runner = web.AppRunner(app, handle_signals=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    # A server of one process claims its port; a supervisor has claimed it for its workers.
    claim = claim_port(config.host, config.port) if config.port and not config.worker else None
    try:
        await LimitedSite(runner, config.host, config.port, config.connections_max, context,
                          reuse_port=config.worker is not None).start()
        announce()
        await asyncio.Event().wait()  # until a signal raises GracefulExit
    finally:
        await runner.cleanup()
        if claim is not None:
            claim.close()
