"""The fault-injecting proxy itself, against a loopback echo server.

Cluster tests trust the proxy to do exactly what its mode says; a proxy that silently
forwarded while "blackholed" would make partition tests pass for the wrong reason.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.faultproxy import FaultProxy

# Long enough for a loopback round trip on a loaded machine, short enough to keep these fast.
QUIET = 0.5


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass  # the proxy reset the connection: that is what several tests do


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def proxy(echo_port: int) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo_port) as p:
        yield p


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def closed_by_peer(sock: socket.socket) -> bool:
    """True if the peer closed or reset the connection (waits up to the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def test_forwards_both_ways_in_order_and_counts(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert round_trip(sock, b"hello") == b"hello"
        assert proxy.bytes_forwarded == 10  # five bytes each way
        # Large enough to span many chunks in flight at once: order must hold.
        payload = bytes(range(256)) * 4096
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        try:
            assert recv_exactly(sock, len(payload)) == payload
        finally:
            sender.join(5)
        sock.shutdown(socket.SHUT_WR)
        # The half-close travels to the echo server, whose close travels back.
        assert sock.recv(1) == b""
    assert proxy.bytes_forwarded == 10 + 2 * len(payload)
    assert proxy.connections_accepted == 1
    assert proxy.mode == "heal"


def test_delay_holds_back_each_direction_without_serializing(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert round_trip(sock, b"warm") == b"warm"
        proxy.delay(0.3)
        started = time.monotonic()
        assert round_trip(sock, b"slow") == b"slow"
        assert time.monotonic() - started >= 0.6  # 0.3 s out, 0.3 s back

        # Five messages sent 0.05 s apart: each is in flight while the next is read, so all
        # arrive about 0.6 s after the last was sent (serial delivery would take 3 s).
        started = time.monotonic()
        for i in range(5):
            sock.sendall(b"%d" % i)
            time.sleep(0.05)
        assert recv_exactly(sock, 5) == b"01234"
        assert 0.6 <= time.monotonic() - started < 2.5

        proxy.heal()
        assert round_trip(sock, b"fast") == b"fast"


def test_blackhole_goes_quiet_and_heal_recovers(proxy: FaultProxy) -> None:
    with connect(proxy) as old:
        assert round_trip(old, b"before") == b"before"
        proxy.blackhole()
        forwarded = proxy.bytes_forwarded
        old.settimeout(QUIET)
        old.sendall(b"lost")
        with pytest.raises(TimeoutError):
            old.recv(100)
        # New connections are accepted, and swallowed just the same.
        with connect(proxy) as new:
            new.settimeout(QUIET)
            new.sendall(b"lost too")
            with pytest.raises(TimeoutError):
                new.recv(100)
        assert proxy.bytes_forwarded == forwarded

        proxy.heal()
        with connect(proxy) as fresh:
            assert round_trip(fresh, b"after") == b"after"
        # The old connection stayed open throughout; what it sent meanwhile is gone.
        old.settimeout(5)
        assert round_trip(old, b"again") == b"again"
    assert proxy.connections_accepted == 3


def refused(proxy: FaultProxy) -> bool:
    """True if a new connection through the proxy gets closed or reset straight away.

    The reset can beat the client's own connect() back to user space, so connect may
    already report it.
    """
    try:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    except ConnectionResetError:
        return True
    with sock:
        return closed_by_peer(sock)


def test_cut_resets_open_connections_and_refuses_new_until_heal(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert round_trip(sock, b"before") == b"before"
        proxy.cut()
        assert closed_by_peer(sock)
    assert refused(proxy)
    assert refused(proxy)
    proxy.heal()
    with connect(proxy) as sock:
        assert round_trip(sock, b"after") == b"after"
    assert proxy.connections_accepted == 4


def test_unreachable_target_closes_the_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    with FaultProxy("127.0.0.1", dead_port) as proxy:
        assert refused(proxy)


def test_close_ends_everything(echo_port: int) -> None:
    proxy = FaultProxy("127.0.0.1", echo_port)
    proxy.start()
    name = f"faultproxy-{proxy.port}"
    assert any(t.name == name for t in threading.enumerate())
    with connect(proxy) as sock:
        assert round_trip(sock, b"x") == b"x"
        proxy.close()
        assert closed_by_peer(sock)
    assert not any(t.name == name for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    proxy.close()  # idempotent
    proxy.cut()  # harmless once closed
    with pytest.raises(RuntimeError):
        proxy.start()


def test_busy_port_and_bad_delay_fail_loudly(proxy: FaultProxy) -> None:
    with pytest.raises(OSError):
        FaultProxy("127.0.0.1", 1, listen_port=proxy.port).start()
    with pytest.raises(ValueError):
        proxy.delay(-1)
    with pytest.raises(ValueError):
        proxy.delay(float("nan"))
