"""Peer authentication on the inter-node port: the real listener on loopback, real
channels, and an attacker who sits on the wire (a relay that forwards, records, replays,
flips or injects bytes) but does not hold the cluster's peer key."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from replication import frames as fr
from replication import listener as listener_module
from replication.listener import Listener
from replication.peer import Channel, Peers, peer_key

KEY = peer_key(b"the cluster secret of these tests")
OTHER_KEY = peer_key(b"a secret that is not the cluster's")
MAGIC = fr.MAGIC
LIMIT = 1 << 16
WAIT_S = 5.0


class Node:
    """An answerer: a listener whose handler echoes each frame back, reversed."""

    def __init__(self, node_id: str, key: bytes | None = KEY) -> None:
        self.listener = Listener(Peers(node_id, key))
        self.listener.route(MAGIC, self._echo, LIMIT)
        self.served: list[str] = []
        """The peer of every connection the handler was given."""
        self.errors: list[BaseException] = []
        self.address = ("127.0.0.1", 0)

    async def _echo(self, channel: Channel) -> None:
        self.served.append(channel.peer)
        try:
            while True:
                frame = await channel.receive()
                channel.send(frame[::-1])
                await channel.drain()
        except fr.LINK_ERRORS as exc:
            self.errors.append(exc)


@contextlib.asynccontextmanager
async def node(node_id: str = "b", key: bytes | None = KEY) -> AsyncIterator[Node]:
    answerer = Node(node_id, key)
    answerer.address = await answerer.listener.start("127.0.0.1", 0)
    try:
        yield answerer
    finally:
        await answerer.listener.close()


async def _connect(address: tuple[str, int], key: bytes | None = KEY, me: str = "a",
                   to: str = "b") -> Channel:
    return await Peers(me, key).connect(address, to, MAGIC, LIMIT, WAIT_S)


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the other end sends until it closes."""
    return await asyncio.wait_for(reader.read(), WAIT_S)


async def _until(condition: Callable[[], object], what: str) -> None:
    """Poll until the node has done something (a fixed sleep fails on a slow machine)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"no {what} in {WAIT_S} s"
        await asyncio.sleep(0.02)


async def test_two_nodes_with_the_key_talk_in_sealed_frames() -> None:
    async with node() as b:
        channel = await _connect(b.address)
        for frame in (b"x", b"hello" * 1000, bytes(LIMIT)):
            channel.send(frame)
            assert await asyncio.wait_for(channel.receive(), WAIT_S) == frame[::-1]
        channel.close()
        assert b.served == ["a"]


@pytest.mark.parametrize("caller_key,answerer_key", [(OTHER_KEY, KEY), (KEY, OTHER_KEY)])
async def test_either_end_without_the_key_is_refused(caller_key: bytes,
                                                     answerer_key: bytes) -> None:
    """The answerer proves the key first, so a caller never talks to an impostor; and a
    caller that cannot prove it is never handed to a protocol."""
    async with node(key=answerer_key) as b:
        with pytest.raises(fr.ProtocolError):
            await _connect(b.address, caller_key)
        await asyncio.sleep(0.1)
        assert b.served == []


async def test_a_connection_meant_for_another_node_is_refused() -> None:
    """An address that leads to the wrong node (etcd can be edited) is not taken for the
    node it names: the handshake binds both node ids."""
    async with node("b") as b:
        with pytest.raises(fr.LINK_ERRORS):
            await _connect(b.address, to="c")
        assert b.served == []


async def test_before_the_caller_proves_the_key_it_learns_nothing() -> None:
    """Whatever a caller without the key sends, it gets at most the answerer's nonce and
    proof (64 bytes), then the connection closes: no epoch, no error, no detail."""
    async with node() as b:
        for sent in (MAGIC + b"\x00" * 200,               # a nonce, then nonsense
                     MAGIC + bytes(32) + b"\x01a\x01b" + bytes(32),  # a wrong proof
                     MAGIC + b"\x01" * (1 << 20),         # a megabyte of it
                     b"XXXX" + bytes(100)):               # no protocol's magic
            reader, writer = await asyncio.open_connection(*b.address)
            writer.write(sent)
            with contextlib.suppress(ConnectionResetError):
                answer = await _closed(reader)
                assert len(answer) in (0, 64), answer
            writer.close()
        assert b.served == []
        assert b.listener.refused == 4


class Relay:
    """A man in the middle: forwards both ways and lets the test act on the bytes that
    pass from caller to answerer."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.upstream: list[bytes] = []
        """Every chunk the caller sent, as it arrived."""
        self.tamper: Callable[[bytes], bytes] | None = None
        self.to_answerer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self.address = ("127.0.0.1", 0)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.address = self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.to_answerer = up_writer

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                       upstream: bool) -> None:
            with contextlib.suppress(OSError):
                while chunk := await source.read(65536):
                    if upstream:
                        self.upstream.append(chunk)
                        if self.tamper is not None:
                            chunk = self.tamper(chunk)
                    sink.write(chunk)
                    await sink.drain()
            sink.close()

        try:
            await asyncio.gather(pump(reader, up_writer, True),
                                 pump(up_reader, writer, False))
        finally:
            writer.close()
            up_writer.close()


@contextlib.asynccontextmanager
async def relay(target: tuple[str, int]) -> AsyncIterator[Relay]:
    middle = Relay(target)
    await middle.start()
    try:
        yield middle
    finally:
        await middle.close()


async def _echoes(channel: Channel) -> None:
    channel.send(b"one")
    assert await asyncio.wait_for(channel.receive(), WAIT_S) == b"eno"


def _sealed(payload_bytes: int) -> int:
    return 4 + payload_bytes + 16


async def test_a_relay_that_forwards_the_handshake_cannot_inject_a_frame() -> None:
    async with node() as b, relay(b.address) as middle:
        channel = await _connect(middle.address)
        await _echoes(channel)
        # The relay holds an authenticated connection to b, and the caller's proof: yet
        # a frame of its own fails authentication and ends the connection.
        assert middle.to_answerer is not None
        middle.to_answerer.write(struct.pack(">I", 20) + bytes(20))
        await _until(lambda: b.errors, "error")
        assert [type(e) for e in b.errors] == [fr.ProtocolError]
        channel.close()


@pytest.mark.parametrize("how", ["replayed", "reordered", "flipped"])
async def test_a_frame_replayed_reordered_or_flipped_ends_the_connection(how: str) -> None:
    async with node() as b, relay(b.address) as middle:
        channel = await _connect(middle.address)
        await _echoes(channel)
        assert middle.to_answerer is not None
        # The last frame the caller sent (its proof may share the chunk).
        recorded = middle.upstream[-1][-_sealed(3):]
        if how == "replayed":
            middle.to_answerer.write(recorded)
        elif how == "reordered":
            # Two frames sent in one order arrive in the other.
            held: list[bytes] = []

            def swap(chunk: bytes) -> bytes:
                held.append(chunk)
                if len(held) < 2:
                    return b""
                return held[1] + held[0]

            middle.tamper = swap
            channel.send(b"two")
            await channel.drain()
            await asyncio.sleep(0.1)
            channel.send(b"three")
        else:
            middle.tamper = lambda chunk: chunk[:6] + bytes((chunk[6] ^ 1,)) + chunk[7:]
            channel.send(b"two")
        await _until(lambda: b.errors, "error")
        assert [type(e) for e in b.errors] == [fr.ProtocolError]
        channel.close()


async def test_a_recorded_handshake_replayed_is_refused() -> None:
    async with node() as b, relay(b.address) as middle:
        channel = await _connect(middle.address)
        await _echoes(channel)
        channel.close()
        # Everything the caller sent, handshake and frame, sent again on a connection of
        # the attacker's: the answerer's fresh nonce makes the recorded proof worthless.
        reader, writer = await asyncio.open_connection(*b.address)
        writer.write(b"".join(middle.upstream))
        with contextlib.suppress(ConnectionResetError):
            assert len(await _closed(reader)) == 64  # the answerer's nonce and proof only
        writer.close()
        assert b.served == ["a"]  # the first connection only
        assert b.listener.refused == 1


async def test_a_frame_over_the_limit_ends_the_connection_before_it_is_read() -> None:
    async with node() as b:
        channel = await _connect(b.address)
        channel.send(bytes(LIMIT + 1))
        await _until(lambda: b.errors, "error")
        assert [type(e) for e in b.errors] == [fr.ProtocolError]
        channel.close()


async def test_an_unfinished_handshake_is_dropped_in_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fr, "HANDSHAKE_S", 0.3)
    async with node() as b:
        reader, writer = await asyncio.open_connection(*b.address)
        writer.write(MAGIC)
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()
        assert b.listener.refused == 1


async def test_past_the_handshake_limit_the_oldest_is_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Handshakes that never finish cannot keep a node out: past HANDSHAKES_MAX (here 8)
    the oldest goes, and a node's handshake (one round trip) gets through."""
    monkeypatch.setattr(listener_module, "HANDSHAKES_MAX", 8)
    async with node() as b:
        idle = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection(*b.address)
            writer.write(MAGIC)
            idle.append((reader, writer))
        channel = await _connect(b.address)
        await _echoes(channel)
        # The first twelve idle ones were closed to make room, oldest first.
        for reader, _ in idle[:12]:
            with contextlib.suppress(ConnectionResetError):  # closed with the magic unread
                assert await _closed(reader) == b""
        for _, writer in idle:
            writer.close()
        channel.close()


async def test_with_authentication_off_the_same_outsider_gets_in() -> None:
    """The negative control of the tests above: a node without the key accepts a caller
    that proves nothing."""
    async with node(key=None) as b:
        reader, writer = await asyncio.open_connection(*b.address)
        writer.write(MAGIC + b"\x01x\x01b" + struct.pack(">I", 3) + b"abc")
        assert await asyncio.wait_for(reader.readexactly(7), WAIT_S) == \
            struct.pack(">I", 3) + b"cba"
        writer.close()
        assert b.served == ["x"]


async def _idle(address: tuple[str, int], host: str = "127.0.0.1"
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends the magic and then nothing."""
    reader, writer = await asyncio.open_connection(*address, local_addr=(host, 0))
    writer.write(MAGIC)
    return reader, writer


async def _closed_now(reader: asyncio.StreamReader) -> bool:
    """Whether the node has closed this connection (it sends nothing before closing)."""
    try:
        await asyncio.wait_for(reader.read(), 0.01)
    except ConnectionResetError:  # closed with the magic unread: a reset
        return True
    except TimeoutError:
        return False
    return True


async def _still_open(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                      settled: int) -> int:
    """How many of the connections the node has not closed: counted once no more than
    ``settled`` are open (or WAIT_S has passed), and again 0.2 s later, so that a node
    that closes too many shows it too."""
    still = [reader for reader, _ in connections]
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while len(still) > settled and asyncio.get_running_loop().time() < deadline:
        still = [reader for reader in still if not await _closed_now(reader)]
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    return len([reader for reader in still if not await _closed_now(reader)])


async def test_a_burst_of_handshakes_is_held_to_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections accepted in one turn of the loop each see the others: a burst leaves no
    more handshakes than the limit, not one eviction per turn."""
    monkeypatch.setattr(listener_module, "HANDSHAKES_MAX", 8)
    async with node() as b:
        burst = await asyncio.gather(*(_idle(b.address) for _ in range(100)))
        try:
            assert await _still_open(list(burst), settled=8) <= 8
            assert b.listener.refused >= 92
        finally:
            for _, writer in burst:
                writer.close()


async def test_one_hosts_flood_evicts_its_own_handshakes_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener_module, "HANDSHAKES_PER_HOST_MAX", 4)
    async with node() as b:
        patient = [await _idle(b.address, "127.0.0.1")]
        flood = [await _idle(b.address, "127.0.0.2") for _ in range(20)]
        try:
            assert await _still_open(flood, settled=4) == 4
            assert await _still_open(patient, settled=1) == 1
        finally:
            for _, writer in patient + flood:
                writer.close()
