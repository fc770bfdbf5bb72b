"""One connection of partition calls (server/calls/link.py) toward a peer that stops
reading: what it holds for the peer stays bounded, and its calls fail rather than wait."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from replication.peer import Channel
from server.calls import link as link_module
from server.calls.codec import pack, unpack
from server.calls.link import CallLink
from server.errors import DependencyUnavailableError, LeaderUnreachableError


def test_a_peer_that_stops_reading_costs_a_bounded_buffer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "CALL_BUFFER_MAX", 4 << 20)
    monkeypatch.setattr(link_module, "CALL_TIMEOUT_S", 3.0)

    async def run() -> tuple[int, set[str], bool]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        # The peer's end is open, never read: a stalled worker.
        _, peer_writer = await asyncio.open_unix_connection(sock=theirs)
        link = CallLink(Channel(reader, writer, "worker 1", 16 << 20, None), "worker 1")
        body = [b"x" * (1 << 20)]
        most = 0
        outcomes: set[str] = set()
        calls = []
        for _ in range(40):
            calls.append(asyncio.ensure_future(link.call("metrics_text", "", body)))
            await asyncio.sleep(0.01)
            most = max(most, writer.transport.get_write_buffer_size())
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            assert isinstance(outcome, DependencyUnavailableError), outcome
            outcomes.add(type(outcome).__name__)
        peer_writer.close()
        return most, outcomes, link.open

    most, outcomes, still_open = asyncio.run(run())
    assert most <= (4 << 20) + (2 << 20), most  # the bound and one frame
    assert "LeaderUnreachableError" in outcomes  # refused, not sent
    assert not still_open


def test_a_call_on_a_connection_closed_under_it_is_refused_as_not_sent() -> None:
    """The connection's transport is closed (a reset) before the link's reader has seen
    it. uvloop, the server's loop, then raises RuntimeError from the write, as the
    channel does here: the call is refused as never sent (503, which SDKs retry), where
    it was a 500, and the link is closed."""

    async def run() -> tuple[BaseException | None, bool]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        _, peer_writer = await asyncio.open_unix_connection(sock=theirs)
        channel = Channel(reader, writer, "worker 1", 16 << 20, None)
        link = CallLink(channel, "worker 1")

        def closed(frame: bytes) -> None:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True "
                               "reading=False>; the handler is closed")

        channel.send = closed  # type: ignore[method-assign]
        outcome: BaseException | None = None
        try:
            await link.call("metrics_text", "", [])
        except Exception as exc:  # the outcome is what is checked
            outcome = exc
        await asyncio.sleep(0)
        peer_writer.close()
        return outcome, link.open

    outcome, still_open = asyncio.run(run())
    assert isinstance(outcome, LeaderUnreachableError), repr(outcome)
    assert not still_open


def test_a_call_the_peer_never_answers_fails_after_the_call_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that reads calls and answers none (hung): each call fails as unavailable
    once CALL_TIMEOUT_S has passed, and the connection is closed so the next call makes a
    new one. A call answered in time is not touched by its timer."""
    monkeypatch.setattr(link_module, "CALL_TIMEOUT_S", 0.3)

    async def run() -> tuple[BaseException | None, float, bool]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        peer_reader, peer_writer = await asyncio.open_unix_connection(sock=theirs)
        peer = Channel(peer_reader, peer_writer, "us", 16 << 20, None)
        link = CallLink(Channel(reader, writer, "worker 1", 16 << 20, None), "worker 1")

        async def answer_the_first_only() -> None:
            call_id = unpack(await peer.receive())[0]
            peer.send(pack([call_id, 0, "text"]))
            while True:
                await peer.receive()  # read, never answered

        answering = asyncio.ensure_future(answer_the_first_only())
        assert await link.call("metrics_text", "", []) == "text"
        await asyncio.sleep(0.5)  # past the first call's deadline: its timer was cancelled
        assert link.open
        started = time.monotonic()
        outcome: BaseException | None = None
        try:  # bounded here, so that a call with no deadline fails rather than hangs
            await asyncio.wait_for(link.call("metrics_text", "", []), 5)
        except Exception as exc:  # the outcome is what is checked
            outcome = exc
        waited = time.monotonic() - started
        await asyncio.sleep(0)  # the reader's cancellation runs
        answering.cancel()
        peer_writer.close()
        return outcome, waited, link.open

    outcome, waited, still_open = asyncio.run(run())
    assert isinstance(outcome, DependencyUnavailableError), repr(outcome)
    assert "no answer in 0.3 s" in str(outcome)
    assert waited >= 0.3
    assert not still_open
