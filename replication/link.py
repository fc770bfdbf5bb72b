"""The leader's side of replication connections: one per follower node, every partition on it.

A node that leads partitions keeps one connection (a link) to each node that follows any
of them, opened with ``CVR3`` and the peer handshake (replication.peer). Each partition's
session with that follower is a stream on the link, named by the partition's uid, which
every frame of it carries (the frames are replication.frames; the stream's rules are the
leader's, ``replication.leader.FollowerStream``). So 10,000 partitions led here and
followed on one node cost one connection, one handshake and one heartbeat, not 10,000.

Duty and invariant: no stream holds up another. What one partition does - a follower disk
slow for it, a follower that stops acknowledging it, a catch-up of its whole log - is paid
for by that partition alone:

- **A window per stream.** A stream may have sent, and not had acknowledged, at most
  INFLIGHT_FRAMES_MAX frames, INFLIGHT_BYTES_MAX bytes of batches and
  INFLIGHT_RECORDS_MAX records (``Window``); past any of them it leaves the writer's turn
  until an ACK gives it room. A stream the follower does not acknowledge therefore stops
  after one window and costs the others nothing more.
- **Turns.** The link's one writer takes the streams that have something to send in turn
  (round robin), one frame each turn: a control frame, or an APPEND of at most
  TURN_BYTES_MAX of batches (one batch alone if it is larger). A catch-up of a long log
  shares the connection with every stream that has a record to ship; none waits for more
  than one turn of each of the others.
- **A bounded write buffer.** After each frame the writer waits until the connection's
  buffer is under WRITE_BUFFER_BYTES_MAX: it holds at most that plus one frame, and a slow
  follower slows the writer, which then sends less, rather than buffering more.
- **Idle costs nothing.** A stream with nothing to send is in no queue and has no timer
  or task: a new record wakes it (``LeaderRole.appended``). The link sends a HEARTBEAT
  when it has sent nothing for HEARTBEAT_S, the follower answers it, and a link that hears
  nothing for IDLE_S is dropped and made again; every stream on it then opens again
  (OPEN, POSITION), as after any broken connection.

Everything the link holds grows only with the streams attached to it: the queue of turns
(a stream at most once), the CLOSE frames not yet sent (one per stream detached).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from engine.errors import EngineError
from replication import frames as fr
from replication.peer import Channel, Peers

_log = logging.getLogger("conveyor.replication")

# A stream's window: sent and not acknowledged, at most this many APPENDs, bytes of
# batches and records. A window of bytes is several turns, so a follower that acknowledges
# after each fsync keeps its stream busy; the frames bound the window's own bookkeeping.
INFLIGHT_FRAMES_MAX = 64
INFLIGHT_BYTES_MAX = 8 * 1024 * 1024
INFLIGHT_RECORDS_MAX = 100_000
# The batches one APPEND carries in one turn, at most (one batch alone if it is larger).
TURN_BYTES_MAX = 256 * 1024
# The connection's write buffer, past which the writer waits (asyncio's high-water mark).
WRITE_BUFFER_BYTES_MAX = 256 * 1024
# A link that has sent nothing for HEARTBEAT_S sends a HEARTBEAT; one that has heard
# nothing (not even the answer) for IDLE_S is dropped. The follower drops a connection
# silent for its own IDLE_S (replication.follower).
HEARTBEAT_S = 0.5
IDLE_S = 10.0
CONNECT_S = 2.0
# After a failed connection, or a stream's refusal, the next try comes this soon.
RETRY_S = 0.2
# A link without streams keeps its connection this long, in case a stream comes back
# (a leadership that moves away and back), then closes.
LINGER_S = 5.0

FLOW_CONTROL = True
"""False only in tests, as the negative control of flow control: no window, and a stream
keeps the writer for as long as it has something to send (a connection shared without
flow control)."""
CONNECTION_PER_STREAM = False
"""True only in tests, as the negative control of sharing: a link per stream (the
protocol's frames unchanged), as replication opened them before one carried them all."""


class Stream(Protocol):
    """What a link needs of one partition's stream (replication.leader.FollowerStream).

    The link calls these on the event loop, one at a time; none of them waits.
    """

    @property
    def uid(self) -> int:
        """The partition's uid: every frame of the stream carries it."""

    def up(self, link: Link) -> None:
        """The connection is up: begin (send OPEN) through ``link.ready``."""

    def down(self) -> None:
        """The connection ended: everything sent on it is forgotten."""

    def wants_turn(self) -> bool:
        """Whether the stream has a frame to send now, with room in its window."""

    def frame(self, turn_bytes: int) -> bytes | None:
        """The stream's next frame, encoded (an APPEND of at most turn_bytes of batches);
        None if it has nothing to send after all."""

    def received(self, frame: fr.StreamFrame) -> None:
        """A frame from the follower for this stream's uid. Raises ProtocolError if the
        frame breaks the stream's rules (the link then restarts the stream alone)."""

    def closing(self) -> bytes | None:
        """The CLOSE to send once the stream is detached (None: nothing was opened)."""

    def restart(self, reason: str) -> None:
        """Start over (OPEN again after RETRY_S): the stream broke, not the link."""


class Window:
    """What one stream has sent and not had acknowledged: APPENDs, bytes and records."""

    def __init__(self) -> None:
        self._frames: collections.deque[tuple[int, int]] = collections.deque()
        """(end offset, bytes of batches) of each APPEND not yet acknowledged, in order."""
        self.bytes = 0

    def clear(self) -> None:
        self._frames.clear()
        self.bytes = 0

    def sent(self, end: int, size: int) -> None:
        self._frames.append((end, size))
        self.bytes += size

    def acknowledged(self, durable: int) -> None:
        frames = self._frames
        while frames and frames[0][0] <= durable:
            self.bytes -= frames.popleft()[1]

    def room(self, sent: int, acknowledged: int) -> bool:
        """Whether another APPEND may go, with records sent up to ``sent`` and
        acknowledged up to ``acknowledged``."""
        if not FLOW_CONTROL:
            return True
        return (len(self._frames) < INFLIGHT_FRAMES_MAX and self.bytes < INFLIGHT_BYTES_MAX
                and sent - acknowledged < INFLIGHT_RECORDS_MAX)


class Links:
    """This node's links, by follower node: made when a stream needs one, closed when
    the last stream has been gone LINGER_S. Owned by the node (replication.node)."""

    def __init__(self, peers: Peers,
                 address: Callable[[str], tuple[str, int] | None]) -> None:
        self.peers = peers
        self.address = address
        """Where a node's inter-node port listens, as the node last read it."""
        self._links: dict[tuple[str, int], Link] = {}
        self._closed = False

    def attach(self, follower: str, stream: Stream) -> None:
        """Carry stream to follower (a stream of the same uid there is replaced)."""
        if self._closed:
            return
        key = (follower, stream.uid if CONNECTION_PER_STREAM else 0)
        link = self._links.get(key)
        if link is None or link.ended:
            link = self._links[key] = Link(self, follower, key)
        link.attach(stream)

    def detach(self, follower: str, stream: Stream) -> None:
        """Stop carrying stream (if it is still the one its link carries for its uid)."""
        link = self._links.get((follower, stream.uid if CONNECTION_PER_STREAM else 0))
        if link is not None:
            link.detach(stream)

    def links(self) -> list[Link]:
        return list(self._links.values())

    def _ended(self, link: Link) -> None:
        if self._links.get(link.key) is link:
            del self._links[link.key]

    async def close(self) -> None:
        self._closed = True
        links = list(self._links.values())
        for link in links:
            link.cancel()
        for link in links:
            await link.wait_ended()


class Link:
    """One connection to a follower node, and the streams it carries."""

    def __init__(self, links: Links, follower: str, key: tuple[str, int]) -> None:
        self.links = links
        self.follower = follower
        self.key = key
        self.streams: dict[int, Stream] = {}
        self.channel: Channel | None = None
        self.ended = False
        self.connections = 0
        """Connections made so far (for tests and the log)."""
        self.frames_sent = 0
        """Frames written so far, heartbeats included (for tests)."""
        self._turns: collections.deque[Stream] = collections.deque()
        self._queued: set[int] = set()
        """ids of the streams in _turns: each is there at most once."""
        self._closes: collections.deque[bytes] = collections.deque()
        self._wake = asyncio.Event()
        self._empty_since = time.monotonic()
        self._task = asyncio.create_task(self._run())

    # -- streams ----------------------------------------------------------------------------

    def attach(self, stream: Stream) -> None:
        previous = self.streams.get(stream.uid)
        if previous is stream:
            return
        if previous is not None:
            self.detach(previous)
        self.streams[stream.uid] = stream
        if self.channel is not None:
            stream.up(self)

    def detach(self, stream: Stream) -> None:
        if self.streams.get(stream.uid) is not stream:
            return
        del self.streams[stream.uid]
        if not self.streams:
            self._empty_since = time.monotonic()
        if self.channel is not None:
            closing = stream.closing()
            if closing is not None:
                self._closes.append(closing)
        stream.down()
        self._wake.set()

    def ready(self, stream: Stream) -> None:
        """stream has something to send: give it a turn (once, however often asked)."""
        if id(stream) in self._queued or self.streams.get(stream.uid) is not stream \
                or self.channel is None:
            return
        self._queued.add(id(stream))
        self._turns.append(stream)
        self._wake.set()

    # -- the connection ---------------------------------------------------------------------

    def cancel(self) -> None:
        self._task.cancel()

    async def wait_ended(self) -> None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _run(self) -> None:
        try:
            while self.streams or time.monotonic() - self._empty_since < LINGER_S:
                address = self.links.address(self.follower)
                if address is None or not self.streams:
                    await asyncio.sleep(RETRY_S)
                    continue
                try:
                    channel = await self.links.peers.connect(
                        address, self.follower, fr.MAGIC, fr.FRAME_BYTES_MAX, CONNECT_S)
                except fr.LINK_ERRORS as exc:
                    _log.info("link to %s: %s", self.follower, exc)
                    await asyncio.sleep(RETRY_S)
                    continue
                try:
                    await self._carry(channel)
                except fr.LINK_ERRORS as exc:
                    _log.info("link to %s: %s", self.follower, exc)
                except Exception:  # a bug: say so, and keep the link trying
                    _log.exception("link to %s failed", self.follower)
                finally:
                    self._disconnected(channel)
                await asyncio.sleep(RETRY_S)
        finally:
            self.ended = True
            for stream in list(self.streams.values()):
                stream.down()
            self.links._ended(self)

    def _disconnected(self, channel: Channel) -> None:
        channel.close()
        self.channel = None
        self._turns.clear()
        self._queued.clear()
        self._closes.clear()
        for stream in list(self.streams.values()):
            stream.down()

    async def _carry(self, channel: Channel) -> None:
        transport = channel.writer.transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES_MAX)
        self.channel = channel
        self.connections += 1
        for stream in list(self.streams.values()):
            stream.up(self)
        # Apart: a writer waiting for a full buffer to drain must not keep the reader from
        # seeing the connection fall silent, nor the reader's wait hold up the writer.
        tasks = [asyncio.create_task(self._read(channel)),
                 asyncio.create_task(self._write(channel))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _write(self, channel: Channel) -> None:
        """The one writer: CLOSEs first, then the streams in turn, heartbeats when idle.
        Returns once the link has had no stream for LINGER_S."""
        sent_at = time.monotonic()
        while True:
            frame = self._closes.popleft() if self._closes else self._next_frame()
            now = time.monotonic()
            if frame is None and now - sent_at >= HEARTBEAT_S:
                frame = fr.encode(fr.Heartbeat())
            if frame is not None:
                channel.send(frame)
                self.frames_sent += 1
                sent_at = now
                await channel.drain()
                continue
            if not self.streams and now - self._empty_since >= LINGER_S:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_S - (now - sent_at)):
                    await self._wake.wait()

    def _next_frame(self) -> bytes | None:
        """The frame of the stream whose turn it is; it goes to the back of the queue if it
        has more to send (without flow control: it keeps the front)."""
        while self._turns:
            stream = self._turns.popleft()
            self._queued.discard(id(stream))
            if self.streams.get(stream.uid) is not stream:
                continue  # detached since it was queued
            try:
                frame = stream.frame(TURN_BYTES_MAX)
            except (EngineError, OSError) as exc:
                # The partition's log (closed by a step-down, say): that stream starts
                # over, and the link carries on with the others.
                stream.restart(f"{type(exc).__name__}: {exc}")
                continue
            if stream.wants_turn():
                self._queued.add(id(stream))
                if FLOW_CONTROL:
                    self._turns.append(stream)
                else:
                    self._turns.appendleft(stream)
            if frame is not None:
                return frame
        return None

    async def _read(self, channel: Channel) -> None:
        while True:
            try:
                async with asyncio.timeout(IDLE_S):
                    frame = await fr.read_frame(channel)
            except TimeoutError:
                raise TimeoutError(f"nothing heard from {self.follower} in {IDLE_S:g} s"
                                   ) from None
            if isinstance(frame, fr.Heartbeat):
                continue
            if not isinstance(frame, fr.Position | fr.Ack | fr.Refuse | fr.Received):
                raise fr.ProtocolError(f"a follower sent {type(frame).__name__}")
            stream = self.streams.get(frame.uid)
            if stream is None:
                continue  # a late answer to a stream detached since
            try:
                stream.received(frame)
            except fr.ProtocolError as exc:
                _log.warning("link to %s: queue uid %d: %s", self.follower, frame.uid, exc)
                stream.restart(str(exc))
