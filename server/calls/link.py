"""Calls on queue partitions over one connection, made by a server that does not serve
the partition to the one that does: a cluster node to a partition's leader
(server/cluster/calls.py), a worker to the partition's owner (server/workers/).

The FrontEnd that took a request has already authenticated, authorized and validated it;
what remains is an engine call on a partition (send a batch, receive, delete ...). The
callee makes it in process and never passes it on, so a change of owner in flight costs
the client a retry (503), never a loop.

The frames are msgpack (server/calls/codec.py) both ways: calls
``[id, op, partition, args]``, replies ``[id, 0, result]`` or ``[id, 1, error]``, and
``[id]`` to cancel a call whose caller no longer waits (a long poll another partition
answered first). Many calls share one connection. The bytes are drawn in docs/FORMAT.md,
"Partition calls".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from engine.errors import EngineError
from replication import frames as fr
from replication.peer import Channel
from server.calls.codec import ARGUMENTS, pack, result_value, unpack
from server.errors import DependencyUnavailableError, LeaderUnreachableError

_log = logging.getLogger("conveyor.server")

# Longer than the longest long poll (20 s) plus a commit wait (10 s).
CALL_TIMEOUT_S = 45.0
# A frame's largest body: a receive of ten 1 MiB messages with their attributes fits.
CALL_FRAME_BYTES_MAX = 16 * 1024 * 1024
# Bytes a connection may hold unsent for its peer before it refuses more calls (or, on
# the serving side, closes): a peer that stopped reading costs at most this and a frame.
CALL_BUFFER_MAX = 32 * 1024 * 1024
_FAILED, _BUG = 1, 2
# What ends a connection of calls: the link, or a frame that is not a call.
_CONNECTION_ERRORS = (*fr.LINK_ERRORS, ValueError, TypeError)
# A write on a connection whose transport has closed: asyncio's loop drops it, uvloop's
# (the server's) raises RuntimeError ("the handler is closed").
_SEND_ERRORS = (OSError, RuntimeError)

Local = Callable[[str, str, Sequence[Any]], Awaitable[Any]]
"""Make a call in this process: (partition, op, arguments) -> result."""


async def _read_frame(channel: Channel) -> Any:
    return unpack(await channel.receive())


class _Expired(Exception):
    """A call's answer did not come within CALL_TIMEOUT_S."""


def _expire(future: asyncio.Future[Any]) -> None:
    # A timer on the call's future, not asyncio.timeout: its context manager cost a fifth
    # of a call's CPU (both ends, 18 against 14 us), for a deadline that almost never
    # fires.
    if not future.done():
        future.set_exception(_Expired())


def _forget(running: dict[int, asyncio.Task[None]], call_id: int, _: object) -> None:
    running.pop(call_id, None)


class CallLink:
    """One connection of calls to a peer that serves partitions, its calls told apart by
    id. ``peer`` names the peer in errors (\"partition's leader node\", \"worker 1\")."""

    def __init__(self, channel: Channel, peer: str) -> None:
        self.channel = channel
        self.peer = peer
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._reading = asyncio.create_task(self._read())

    @property
    def open(self) -> bool:
        return not self._reading.done()

    async def call(self, op: str, partition: str, args: Sequence[Any]) -> Any:
        if not self.open:
            raise LeaderUnreachableError(self.peer, "its connection has ended; retry")
        if self.channel.buffered() > CALL_BUFFER_MAX:
            # The peer is not reading (stalled): the connection ends, dropping what it
            # held (the calls waiting on it fail), and this call is not sent. The next
            # call connects again.
            self.close()
            raise LeaderUnreachableError(self.peer, "it is not taking calls; retry")
        call_id = next(self._ids)
        frame = pack([call_id, op, partition, list(args)])
        try:
            self.channel.send(frame)
        except _SEND_ERRORS as exc:
            # The connection was closed (reset) before the reader saw it end: the call
            # was not sent, so it is refused as such (retried), and the next connects.
            self.close()
            raise LeaderUnreachableError(self.peer, "its connection has ended; retry") \
                from exc
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.pending[call_id] = future
        timer = loop.call_later(CALL_TIMEOUT_S, _expire, future)
        try:
            return await future
        except _Expired:
            # A peer that answers nothing this long is gone or cut off: the next call
            # connects again rather than wait on this connection too.
            self.close()
            raise DependencyUnavailableError(
                self.peer, f"no answer in {CALL_TIMEOUT_S:g} s") from None
        finally:
            timer.cancel()
            if self.pending.pop(call_id, None) is not None and self.open:
                # Unanswered (cancelled, or timed out): the peer may stop working on it.
                # Best effort: on a connection that has ended, the peer stopped anyway.
                with contextlib.suppress(*_SEND_ERRORS):
                    self.channel.send(pack([call_id]))

    async def _read(self) -> None:
        failure: BaseException | None = None
        try:
            while True:
                call_id, outcome, value = await _read_frame(self.channel)
                future = self.pending.pop(call_id, None)
                if future is None or future.done():
                    continue  # cancelled meanwhile
                if outcome == 0:
                    future.set_result(value)
                elif outcome == _FAILED:
                    future.set_exception(value)
                else:
                    future.set_exception(RuntimeError(f"{self.peer} failed the call: {value}"))
        except _CONNECTION_ERRORS as exc:
            failure = exc
        finally:
            # Sent, perhaps made, answer lost: a caller cannot know what happened.
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(DependencyUnavailableError(
                        self.peer, "the connection to it broke; retry"))
            self.pending.clear()
            self.channel.close()
            if failure is not None:
                _log.info("partition calls to %s ended: %s", self.peer, failure)

    def close(self) -> None:
        """End the connection at once: its calls fail, and nothing it buffered for the
        peer is sent any more (a call the caller was told failed is not made later)."""
        self.channel.abort()
        self._reading.cancel()


async def serve_calls(channel: Channel, local: Local) -> None:
    """Answer the calls of one connection, authenticated already, with ``local``."""
    running: dict[int, asyncio.Task[None]] = {}
    try:
        while True:
            frame = await _read_frame(channel)
            if len(frame) == 1:  # the caller gave up on it
                task = running.pop(frame[0], None)
                if task is not None:
                    task.cancel()
                continue
            call_id, op, partition, args = frame
            task = asyncio.create_task(_answer(channel, local, call_id, op, partition,
                                               args))
            running[call_id] = task
            task.add_done_callback(functools.partial(_forget, running, call_id))
    except _CONNECTION_ERRORS as exc:
        _log.info("partition calls from %s ended: %s", channel.peer,
                  exc or type(exc).__name__)
    finally:
        for task in list(running.values()):
            task.cancel()


async def _answer(channel: Channel, local: Local, call_id: int, op: str,
                  partition: str, args: list[Any]) -> None:
    try:
        arguments = ARGUMENTS[op](args)
    except (KeyError, ValueError, TypeError) as exc:
        # Sent by a peer of this server, so the two disagree (a version skew):
        # unavailable, not the client's fault.
        _log.error("cannot read partition call %r on %s: %s", op, partition, exc)
        reply = pack([call_id, _FAILED, DependencyUnavailableError(
            "partition's server", f"it could not read the call {op!r}")])
    else:
        try:
            result = await local(partition, op, arguments)
            reply = pack([call_id, 0, result_value(op, result)])
        except EngineError as exc:
            reply = pack([call_id, _FAILED, exc])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: logged here, a 500 at the caller
            _log.exception("partition call %s on %s failed", op, partition)
            reply = pack([call_id, _BUG, type(exc).__name__])
    with contextlib.suppress(OSError):
        if channel.is_closing():
            return
        if channel.buffered() > CALL_BUFFER_MAX:
            # The caller is not reading its answers: end the connection, which fails its
            # calls at once, rather than hold answers for it without bound.
            _log.warning("partition calls from %s: answers not read; closing", channel.peer)
            channel.abort()
            return
        channel.send(reply)
