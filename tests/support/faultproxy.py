"""A fault-injecting TCP proxy for cluster tests: forward, delay, blackhole or cut a link.

Cluster tests are synchronous pytest code that drives subprocesses, yet they need to
change what the network does *while* those processes talk. So the proxy runs its own
asyncio loop on a daemon thread, and the test thread switches its mode at any moment:

* ``heal()``       forward bytes as they come;
* ``delay(s)``     deliver every chunk ``s`` seconds after it was read, in order, without
                   one direction holding up the other;
* ``blackhole()``  keep connections open but read and drop every byte, both ways, so peers
                   see a silent link and must rely on their own timeouts;
* ``cut()``        reset every open connection and refuse new ones until ``heal()``.

Typical use::

    with FaultProxy("127.0.0.1", node_port) as proxy:
        start_peer(connect_to=proxy.port)
        proxy.blackhole()
        ...
        proxy.heal()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from types import TracebackType
from typing import Literal

Mode = Literal["heal", "delay", "blackhole", "cut"]

_CHUNK = 64 * 1024
# Chunks read but not yet delivered, per direction. Reading stops when this many wait, so a
# slow receiver pushes back on its sender as a real link would, instead of the proxy
# buffering without bound. Reads coalesce while the queue is full, so throughput under a
# delay stays near _BACKLOG * _CHUNK bytes per delay period.
_BACKLOG = 256
# How long the test thread waits for the proxy thread to act on cut() or close(). Loopback
# work takes milliseconds; hitting this means the proxy is wedged, which should fail loudly.
_TIMEOUT = 10.0
# struct linger {int l_onoff; int l_linger;}: on, zero seconds, so close() sends RST.
_LINGER_RST = struct.pack("ii", 1, 0)

# Modes in which bytes are read and thrown away rather than delivered.
_DROPPING: frozenset[Mode] = frozenset({"blackhole", "cut"})


class FaultProxy:
    """Forward TCP connections from ``127.0.0.1:port`` to a target, with injectable faults.

    Mode switches (``heal``, ``delay``, ``blackhole``, ``cut``) and the counters are safe
    to use from any thread. ``start`` and ``close`` belong to the thread that owns the
    proxy (the test). The proxy's thread is named ``faultproxy-<port>``.
    """

    def __init__(self, target_host: str, target_port: int, listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._listen_port = listen_port
        # Guards the fault state and the counters: written by the test thread (modes) and
        # the proxy thread (counters), read by both.
        self._lock = threading.Lock()
        self._mode: Mode = "heal"
        self._delay = 0.0
        self._bytes_forwarded = 0
        self._connections_accepted = 0
        self._state: Literal["new", "running", "closed"] = "new"
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Binds to the proxy's loop on first wait; set from other threads via that loop.
        self._stop = asyncio.Event()
        # Open connections and the task serving each; touched only on the proxy thread.
        self._links: dict[asyncio.Task[None], _Link] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the listener and start forwarding on a fresh loop in a daemon thread.

        The listener is bound here, on the caller's thread, so a busy port raises right
        away and ``port`` is valid as soon as this returns.
        """
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"FaultProxy cannot start when {self._state}")
            self._state = "running"
        try:
            listener = socket.create_server(("127.0.0.1", self._listen_port))
        except BaseException:
            with self._lock:
                self._state = "closed"
            raise
        listener.setblocking(False)
        self._port = listener.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(self._loop, listener),
                                        name=f"faultproxy-{self._port}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Reset every connection, stop listening and wait for the proxy thread to end.

        Idempotent, and safe before ``start``. Raises if the thread fails to stop, so a
        wedged proxy shows up as an error rather than as a leaked thread.
        """
        with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread is threading.current_thread():
            raise RuntimeError("FaultProxy.close() cannot run on the proxy's own thread")
        with contextlib.suppress(RuntimeError):  # the loop already ended and was closed
            loop.call_soon_threadsafe(self._stop.set)
        thread.join(_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError(f"{thread.name} did not stop within {_TIMEOUT} s")

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- what the test sees -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port (the one to give peers), known once ``start`` returned."""
        if self._port is None:
            raise RuntimeError("FaultProxy.port is known only after start()")
        return self._port

    @property
    def mode(self) -> Mode:
        with self._lock:
            return self._mode

    @property
    def bytes_forwarded(self) -> int:
        """Bytes handed to a receiver, both directions; dropped bytes do not count."""
        with self._lock:
            return self._bytes_forwarded

    @property
    def connections_accepted(self) -> int:
        """Every accepted connection, including the ones refused while cut."""
        with self._lock:
            return self._connections_accepted

    # -- modes --------------------------------------------------------------------------------

    def heal(self) -> None:
        """Forward normally again; chunks already waiting out a delay keep their due time."""
        self._set_mode("heal", 0.0)

    def delay(self, seconds: float) -> None:
        """Deliver each chunk read from now on ``seconds`` after it was read.

        Chunks are stamped when read and queued per direction, so byte order holds and a
        delay in one direction never slows reading in the other.
        """
        if not seconds >= 0.0 or seconds == float("inf"):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {seconds}")
        self._set_mode("delay", float(seconds))

    def blackhole(self) -> None:
        """Silently drop every byte both ways, including chunks still waiting out a delay.

        Connections stay open and new ones are accepted (and connected to the target), so
        peers see a link that went quiet, not one that failed. Dropped bytes are lost for
        good: a connection that lives through a blackhole has a gap in its stream.
        """
        self._set_mode("blackhole", 0.0)

    def cut(self) -> None:
        """Reset every open connection, both sides, and refuse new ones until ``heal()``.

        Resets use SO_LINGER 0 so peers see ECONNRESET as on a real broken link. Returns
        once the sockets are closed, so the test can assert on the peers' reaction.
        New connections are accepted and reset at once (the kernel completes the
        handshake before the proxy can refuse, as with a crashed process behind a port).
        """
        self._set_mode("cut", 0.0)
        with self._lock:
            loop = self._loop if self._state == "running" else None
        if loop is None:
            return
        if self._thread is threading.current_thread():
            raise RuntimeError("FaultProxy.cut() cannot run on the proxy's own thread")
        asyncio.run_coroutine_threadsafe(self._reset_links(), loop).result(_TIMEOUT)

    def _set_mode(self, mode: Mode, delay: float) -> None:
        with self._lock:
            self._mode, self._delay = mode, delay

    def _fault(self) -> tuple[Mode, float]:
        with self._lock:
            return self._mode, self._delay

    # -- the proxy thread ---------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
        """Thread body: serve until close(), then leave no task, socket or thread behind."""
        try:
            loop.run_until_complete(self._serve(listener))
        finally:
            try:
                # Normally none: _serve awaited every task it made. Only a bug leaves some.
                if leftovers := asyncio.all_tasks(loop):
                    for task in leftovers:
                        task.cancel()
                    loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                listener.close()
                loop.close()

    async def _serve(self, listener: socket.socket) -> None:
        acceptor = asyncio.create_task(self._accept(listener))
        try:
            await self._stop.wait()
        finally:
            acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acceptor
            listener.close()
            await self._reset_links()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError:
                # Out of descriptors or an aborted handshake: keep serving, as a server would.
                await asyncio.sleep(0.01)
                continue
            with self._lock:
                self._connections_accepted += 1
                mode = self._mode
            if mode == "cut":
                _reset_socket(conn)
                continue
            link = _Link(conn)
            task = asyncio.create_task(self._serve_link(link))
            self._links[task] = link
            task.add_done_callback(lambda done: self._links.pop(done, None))

    async def _reset_links(self) -> None:
        """Reset every open connection and wait until its sockets are closed."""
        links = list(self._links.items())
        for task, link in links:
            link.reset()
            task.cancel()
        await asyncio.gather(*(task for task, _ in links), return_exceptions=True)
        for _, link in links:
            # A task cancelled before its first step never ran the code that closes it.
            link.release()

    async def _serve_link(self, link: _Link) -> None:
        """Connect to the target and pump both directions until both ends finished.

        A clean end (EOF both ways) closes both sockets normally; an error on either side
        (reset, refused, unreachable target) resets the other, so the failure propagates
        through the proxy as it would through a wire.
        """
        clean = False
        try:
            client_reader, link.client = await asyncio.open_connection(sock=link.conn)
            target_reader, link.target = await asyncio.open_connection(
                self.target_host, self.target_port)
            async with asyncio.TaskGroup() as pumps:
                pumps.create_task(self._pump(client_reader, link.target))
                pumps.create_task(self._pump(target_reader, link.client))
            clean = True
        except* OSError:
            pass
        finally:
            await link.shut(clean)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy one direction until EOF, then pass the EOF on (half-close stays half-close).

        Reading and delivering are separate tasks joined by a queue: the reader stamps each
        chunk with its due time, the deliverer waits for it. Order is FIFO, so it holds even
        when the delay changes midway.
        """
        loop = asyncio.get_running_loop()
        backlog: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_BACKLOG)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._deliver(backlog, dst))
            while chunk := await src.read(_CHUNK):
                mode, delay = self._fault()
                if mode in _DROPPING:
                    continue
                await backlog.put((loop.time() + delay, chunk))
            await backlog.put(None)

    async def _deliver(self, backlog: asyncio.Queue[tuple[float, bytes] | None],
                       dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while (item := await backlog.get()) is not None:
            due, chunk = item
            # The loop may wake a timer up to its clock resolution early; never deliver early.
            while (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if self._fault()[0] in _DROPPING:
                continue
            with self._lock:
                self._bytes_forwarded += len(chunk)
            dst.write(chunk)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()


class _Link:
    """One proxied connection: the accepted socket and, once connected, both streams."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.client: asyncio.StreamWriter | None = None
        self.target: asyncio.StreamWriter | None = None

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.target) if w is not None]

    def reset(self) -> None:
        """Abort both sides with RST at once; idempotent.

        An accepted socket not yet wrapped only gets SO_LINGER here: a transport may be
        registering it this very moment, so it is closed once its task ended (``release``).
        """
        if self.client is None:
            with contextlib.suppress(OSError):
                self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        for writer in self.writers():
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            writer.transport.abort()

    async def shut(self, clean: bool) -> None:
        """Close both sides (reset them unless the link ended cleanly), wait until closed."""
        if not clean:
            self.reset()
        for writer in self.writers():
            writer.close()
        for writer in self.writers():
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        self.release()

    def release(self) -> None:
        """Close the accepted socket if no transport took it over (else the transport owns it)."""
        if self.client is None:
            self.conn.close()


def _reset_socket(sock: socket.socket) -> None:
    """Close a raw socket with RST (SO_LINGER 0): the peer sees the link cut, not a clean end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()
