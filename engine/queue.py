"""One queue: the leader that turns requests into log records, and its public face.

:class:`QueueCore` decides (it alone reads the clock and the configuration), appends the
records that state its decisions, applies them to the queue's state machine
(:class:`engine._queue.State`) and returns the log offset that must be durable before the
caller is answered. It never blocks on I/O beyond a write to the page cache: waiting is
the caller's business, so the same core serves the blocking :class:`Queue` and the
asyncio ``AsyncQueue``. What is done once per message runs in engine/_queue.pyx.

Records are applied before they are fsync'd, and the caller waits for the fsync after
releasing the queue's lock, so concurrent callers share fsyncs. This keeps the contract:
a send is acknowledged only once durable; a delete is applied in memory before it is
acknowledged, so nothing delivers the message afterwards, and it is acknowledged only
once durable, so a restart does not bring it back. Leases are not waited for: losing one
in a crash only means an earlier redelivery.

Concurrency: every QueueCore method takes the queue's lock; none holds it across a wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any, NoReturn, Protocol, TypeVar

from engine import format as fmt
from engine import install
from engine import records as rec
from engine._queue import CATEGORIES, State, message_id_bytes
from engine.clock import Clock
from engine.errors import (
    EngineError,
    InvalidParameterError,
    LogError,
    MessageNotInflightError,
    QueueUnavailableError,
    ReceiptInvalidError,
    unavailable,
)
from engine.files import TMP_SUFFIX, fsync_dir, write_file
from engine.limits import (
    BODY_MD5_BYTES,
    DEDUP_ID_CHARS_MAX,
    DELAY_S_MAX,
    ENVELOPE_BYTES_MAX,
    GROUP_ID_CHARS_MAX,
    MESSAGE_ID_BYTES,
    RECEIVE_WAIT_S_MAX,
    SENDER_CHARS_MAX,
    VISIBILITY_TIMEOUT_S_MAX,
    QueueAttributes,
    check_int,
    check_message_attributes,
    check_message_size,
    check_token,
    message_bytes,
    require,
)
from engine.log import Log
from engine.memory import MemoryBudget
from engine.receipts import ReceiptCodec
from engine.records import MessageAttribute
from engine.results import Message, QueueStats, SendEntry, SendResult
from engine.snapshot import compress_snapshot, decode_snapshot, state_digest, state_parts

__all__ = ["Message", "Queue", "QueueCore", "QueueStats", "SendEntry", "SendResult"]

_log = logging.getLogger("conveyor.queue")

INFLIGHT = CATEGORIES["in_flight"]
MOVING = CATEGORIES["moving"]

# Log segments of a queue are small so that deleted messages free disk soon.
QUEUE_SEGMENT_BYTES = 16 * 1024 * 1024
# A snapshot is taken once this many bytes have been appended since the last one; it
# bounds replay time and lets segments that hold only dead messages be deleted.
SNAPSHOT_BYTES = 8 * 1024 * 1024
# A snapshot encodes every live message, so with a long backlog the interval grows with
# it (this many log bytes per live message), keeping snapshot work a fraction of appends.
SNAPSHOT_BYTES_PER_LIVE_MESSAGE = 256
# A cluster replica's queue closed with less than this appended since its last snapshot
# takes none (QueueCore.close).
CLOSE_SNAPSHOT_BYTES_MIN = 64 * 1024
SNAPSHOT_FILE = install.SNAPSHOT_FILE
# Library callers may batch more than SQS's 10 per request; this bounds one call.
ENGINE_BATCH_MAX = 1000
# After a move fails because the dead-letter queue is gone, messages are delivered as if
# the queue had none, for this long; then moving is tried again (the queue may be back).
DEAD_LETTER_RETRY_S = 60.0
# One retention sweep expires at most this many messages, to bound a request's latency.
EXPIRE_PER_SWEEP_MAX = 10_000
LEASE_MAX_MS = VISIBILITY_TIMEOUT_S_MAX * 1000

_T = TypeVar("_T")
_A = TypeVar("_A")


def create_queue_log(directory: str, attributes: QueueAttributes, *, fsync: str,
                     clock: Clock, segment_bytes_max: int = QUEUE_SEGMENT_BYTES) -> None:
    """Make a queue's directory and a log whose first record is its configuration."""
    os.makedirs(directory)  # not exist_ok: a directory already there is another queue's
    fsync_dir(os.path.dirname(directory))
    with Log(os.path.join(directory, "log"), fsync=fsync, lock=False,
             segment_bytes_max=segment_bytes_max) as log:
        log.append(rec.encode_config(clock.now_ms(), attributes.to_dict()), wait=False)
        log.flush()


class Replication(Protocol):
    """What a cluster leader's queue waits on before it acknowledges (replication/)."""

    async def committed(self, offset: int) -> None:
        """Return once every record before offset is on all in-sync replicas."""

    def wait_committed(self, offset: int) -> None:
        """The same, from a thread that is not the event loop's."""

    def check_writable(self) -> None:
        """Raise unless a write may be acknowledged now (too few in-sync replicas, say):
        asked before a write is made, so that such a refusal leaves nothing behind."""


def start_queue_log(directory: str, attributes: QueueAttributes, *, fsync: str,
                    clock: Clock, epoch: int) -> None:
    """Write the configuration record into a queue log that is still empty.

    It carries the leader's epoch like every later batch: two nodes that each started the
    log must not look, to replication, as if they share it.
    """
    with Log(os.path.join(directory, "log"), fsync=fsync, lock=False,
             segment_bytes_max=QUEUE_SEGMENT_BYTES) as log:
        if log.next_offset == 0:
            log.epoch = epoch
            log.append(rec.encode_config(clock.now_ms(), attributes.to_dict()), wait=False)
            log.flush()


def read_snapshot(directory: str) -> tuple[State, int] | None:
    """The queue's snapshot (state, offset replay continues from), or None if it has none.

    Raises CorruptSnapshotError if the file is damaged: the state cannot be had otherwise
    once the segments it covers are deleted, so the queue stays closed until an operator
    acts (docs/OPERATIONS.md, "Damage and repair").
    """
    path = os.path.join(directory, SNAPSHOT_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return decode_snapshot(data, path)


def replay(log: Log, snapshot: tuple[State, int] | None) -> tuple[State, int]:
    """The queue's state: the snapshot's, with every record after it applied.

    An empty record is a hole that ``conveyor log salvage`` left where records were lost
    to damage (every queue record starts with a tag, so none is empty): it is skipped.
    """
    if snapshot is None:
        if log.first_offset > 0:
            # Only a snapshot lets records go from the front of a log (retention, or an
            # install in place of them): without it the state before them is not known.
            raise LogError(f"queue log {log.path} starts at offset {log.first_offset} and "
                           "the queue has no snapshot: its state cannot be rebuilt",
                           log.path)
        state, start, fresh = State(False), log.first_offset, True
    else:
        (state, start), fresh = snapshot, False
        if start < log.first_offset:
            raise LogError(f"queue log {log.path} starts at offset {log.first_offset}, "
                           f"after its snapshot's {start}: the records between are "
                           "missing", log.path)
        if start > log.next_offset:
            # The snapshot covers records the log no longer holds (a segment was lost or
            # cut). Its state points at offsets that new records would reuse: their bytes
            # would be read as other messages' bodies.
            raise LogError(f"queue log {log.path} ends at offset {log.next_offset}, "
                           f"before its snapshot's {start}: records the snapshot counts "
                           "on are missing", log.path)
    holes = 0
    for offset, payload in log.iter_records(start):
        if not payload:
            holes += 1
            continue
        try:
            record = rec.decode(payload)
        except rec.RecordError as exc:
            # Its batch passed its checksum, so the bytes are as written: not damage the
            # log can see, but a record this build cannot read.
            raise LogError(f"queue log {log.path}: record at offset {offset} does not "
                           f"decode: {exc}", log.path) from exc
        if fresh and isinstance(record, rec.Config):
            # The first record of every queue is its configuration.
            state = State(bool(record.attributes.get("fifo")))
            fresh = False
        state.apply(offset, record)
    if holes:
        _log.warning("queue log %s: %d records were lost to damage (holes left by a "
                     "salvage) and are skipped", log.path, holes)
    if not state.config:
        raise LogError(f"queue log {log.path} holds no configuration", log.path)
    return state, start


@dataclasses.dataclass(frozen=True, slots=True)
class MovePlan:
    """Messages a receive marked for the dead-letter queue, and what they carry."""

    seqs: tuple[int, ...]
    durable_at: int
    entries: tuple[tuple[rec.Origin, bytes, rec.Send], ...]


class QueueCore:
    """The leader for one queue partition. See the module docstring."""

    def __init__(self, name: str, uid: int, directory: str, *, fsync: str, clock: Clock,
                 codec: ReceiptCodec, segment_bytes_max: int = QUEUE_SEGMENT_BYTES,
                 snapshot_bytes: int = SNAPSHOT_BYTES,
                 name_of_uid: Callable[[int], str | None] = lambda uid: None,
                 on_sync: Callable[[float], None] | None = None,
                 keep_log: bool = False, budget: MemoryBudget | None = None) -> None:
        self.name = name
        self._budget = budget if budget is not None else MemoryBudget()
        self._held = 0
        """The bytes of this state last reported to the budget (_account)."""
        # A cluster replica keeps its whole log (from offset 0, or from the snapshot it was
        # installed from): a follower far behind is sent the log or a snapshot
        # (replication.leader), and a divergent suffix may be cut below a snapshot.
        self._keep_log = keep_log
        self.replication: Replication | None = None
        """Set while this queue leads in a cluster: acknowledgements wait for its commit."""
        self._name_of_uid = name_of_uid
        self.uid = uid
        self.directory = directory
        self._clock = clock
        self._codec = codec
        self._mac = codec.mac
        self._snapshot_bytes = snapshot_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # One snapshot at a time, taken before _lock: a snapshot lets go of _lock while
        # it compresses (maybe_snapshot).
        self._snapshotting = threading.Lock()
        self._version = 0  # bumped whenever a message may have become receivable
        self._thread_waiters = 0
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._failed: str | None = None
        self._failure: BaseException | None = None
        """What stopped the queue (the error behind _failed), so that every refusal after
        it says whether the disk is full."""
        self._closed = False
        self._dead_letter_missing_until = 0.0
        self.last_used = time.monotonic()
        # A replica's install of a snapshot that a crash interrupted is finished first: the
        # snapshot and the log below must be the pair it left (engine/install.py).
        install.finish(directory, fsync=fsync, segment_bytes_max=segment_bytes_max)
        snapshot = read_snapshot(directory)
        # Every record the snapshot covers was fsync'd before it was taken: a bad batch
        # among them is damage, never a torn tail to cut.
        self.log = Log(os.path.join(directory, "log"), fsync=fsync, lock=False,
                       segment_bytes_max=segment_bytes_max, on_sync=on_sync,
                       durable_floor=snapshot[1] if snapshot else 0)
        try:
            self.state, self._snapshot_offset = replay(self.log, snapshot)
        except BaseException:
            self.log.close()
            raise
        # Left by a snapshot a crash interrupted: never read, and it may be large. Removed
        # only once the queue opened (a refused open changes nothing on disk).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, SNAPSHOT_FILE) + TMP_SUFFIX)
        self._size_at_snapshot = self.log.size_bytes
        self.attributes = QueueAttributes.from_dict(self.state.config)
        # Messages moved in from another queue keep their original send time, so they do
        # not expire in seq order; they wait here instead.
        self._aged: list[tuple[int, int]] = self.state.moved_in()
        heapq.heapify(self._aged)
        self._account()

    @property
    def closed(self) -> bool:
        """Closed by its broker (idle, or beyond open_queues_max): reopen it to use it."""
        return self._closed

    # -- bookkeeping ----------------------------------------------------------------------

    def _enter(self, use: bool = True) -> int:
        """Start an operation (lock held): check the queue is usable, return the time.

        use=False for the broker's own maintenance, which must not keep a queue that
        nobody uses from being closed as idle.
        """
        if self._failed is not None:
            raise unavailable(self.name, self._failed, self._failure)
        if self._closed:
            raise QueueUnavailableError(self.name, "closed")
        if use:
            self.last_used = time.monotonic()
        # Record times never go backwards, whatever the clock does.
        now = self._clock.now_ms()
        last: int = self.state.last_time
        return now if now > last else last

    def _fail(self, exc: BaseException) -> QueueUnavailableError:
        """The log failed (fail-stop): refuse everything until the queue is reopened."""
        self._failed = f"log failed: {exc}"
        self._failure = exc
        return unavailable(self.name, self._failed, exc)

    def _append(self, payloads: list[bytes]) -> int:
        """Append records (lock held); return the first offset."""
        try:
            first: int = self.log.append_batch(payloads, wait=False)
        except (LogError, OSError) as exc:
            raise self._fail(exc) from exc
        return first

    def _account(self) -> None:
        """Report the change of the state's memory to the budget (lock held): after every
        operation that can grow or shrink it."""
        held = self.state.memory_bytes()
        if held != self._held:
            self._budget.change(held - self._held)
            self._held = held

    def _notify(self) -> None:
        self._version += 1
        if self._thread_waiters:
            self._cond.notify_all()
        if self._async_waiters:
            waiters, self._async_waiters = self._async_waiters, []
            for loop, future in waiters:
                loop.call_soon_threadsafe(_wake, future)

    def _durable_already(self, offset: int) -> bool:
        # A log closed cleanly (the queue was idle-closed meanwhile) fsync'd everything.
        return (not offset or self.log.fsync_policy.mode != "always"
                or (self.log.closed and not self.log.failed))

    # In a cluster, the replication is read before the local wait: a leader that steps
    # down meanwhile closes this core (fsyncing everything), and the write must then be
    # refused by its replication, not acknowledged as merely durable here.

    def wait_durable(self, offset: int) -> None:
        replication = self.replication
        if not self._durable_already(offset):
            try:
                self.log.wait_durable(offset)
            except (LogError, OSError) as exc:
                raise self._fail(exc) from exc
        if replication is not None and offset:
            replication.wait_committed(offset)

    async def wait_durable_async(self, offset: int) -> None:
        replication = self.replication
        if not self._durable_already(offset):
            try:
                await self.log.durable_async(offset)
            except (LogError, OSError) as exc:
                raise self._fail(exc) from exc
        if replication is not None and offset:
            await replication.committed(offset)

    # -- send -----------------------------------------------------------------------------

    def send(self, entries: Sequence[SendEntry]) -> tuple[list[SendResult | EngineError], int]:
        """Validate and append; return per-entry results and the offset to wait for."""
        if self.replication is not None:
            # A partition that cannot acknowledge now (too few in-sync replicas, no longer
            # led here) refuses before anything is written, so that the refused write
            # does not take effect later; it is checked again before the acknowledgement.
            self.replication.check_writable()
        # acquire/release rather than `with` on the three hot operations: see Log.append.
        self._lock.acquire()
        try:
            now = self._enter()
            self._budget.check()
            attrs = self.attributes
            try:
                results, end = self.state.lead_send(
                    self.log, self.uid, now, entries, attrs.max_message_bytes,
                    attrs.delay_seconds * 1000, lambda entry: _check_entry(entry, attrs))
            except (LogError, OSError) as exc:
                raise self._fail(exc) from exc
            finally:
                self._account()
            if end:
                self._notify()
            return results, end
        finally:
            self._lock.release()

    # -- receive --------------------------------------------------------------------------

    def receive(self, max_messages: int, visibility_timeout: int | None
                ) -> tuple[list[Message], MovePlan | None, int]:
        """Lease up to max_messages; return them, any dead-letter move to complete, and
        the version to wait on if there were none."""
        self._lock.acquire()
        try:
            now = self._enter()
            attrs = self.attributes
            vis = attrs.visibility_timeout if visibility_timeout is None else visibility_timeout
            self._expire(now)
            limit = -1 if attrs.max_receive_count is None else attrs.max_receive_count
            if time.monotonic() < self._dead_letter_missing_until:
                limit = -1  # its dead-letter queue is gone: deliver rather than move
            try:
                messages, moving, end = self.state.lead_receive(
                    self.log, self.uid, now, max_messages, vis * 1000, limit, self._mac)
            except (LogError, OSError) as exc:
                raise self._fail(exc) from exc
            finally:
                self._account()  # leases, and the retention sweep before them
            if self.state.origins:
                # Messages moved in from another queue name it, resolved from its uid.
                messages = [
                    m._replace(dead_letter_source=self._name_of_uid(m.dead_letter_source))
                    if isinstance(m.dead_letter_source, int) else m for m in messages
                ]
            plan = None
            if moving:
                bodies = self._read_sends([m.location for m in moving])
                plan = MovePlan(
                    tuple(m.seq for m in moving), end,
                    tuple((rec.Origin(self.uid, m.seq, m.receive_count),
                           m.message_id or message_id_bytes(self.uid, m.seq),
                           bodies[m.location]) for m in moving),
                )
            return messages, plan, self._version
        finally:
            self._lock.release()

    def _read_sends(self, locations: Iterable[int]) -> dict[int, rec.Send]:
        """Decode the SEND records at these offsets in full (rare paths only)."""
        found: dict[int, rec.Send] = {}
        for location in sorted(set(locations)):
            for offset, payload in self.log.read(location, 1):
                found[offset] = rec.decode_send(payload)
        return found

    def version(self) -> int:
        return self._version

    def wait(self, version: int, timeout: float) -> None:
        """Block until a message may have become receivable since version, or timeout."""
        with self._lock:
            if self._version == version and not self._closed:
                self._thread_waiters += 1
                try:
                    self._cond.wait(timeout)
                finally:
                    self._thread_waiters -= 1

    def waiter(self, version: int) -> asyncio.Future[None]:
        """An asyncio future completed when a message may have become receivable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._version != version or self._closed:
                future.set_result(None)
            else:
                self._async_waiters.append((loop, future))
        return future

    @property
    def has_waiters(self) -> bool:
        """Whether a long poll is waiting on this queue (it must not be closed under it)."""
        return bool(self._async_waiters) or self._thread_waiters > 0

    def seconds_to_next_timer(self) -> float:
        """Real time until the next delayed or leased message is due (for long polls)."""
        with self._lock:
            due = self.state.next_timer()
        if due is None:
            return 3600.0
        return max(0.0, (due - self._clock.now_ms()) / 1000)

    # -- dead-letter moves ----------------------------------------------------------------

    def accept_moved(self, entries: Sequence[tuple[rec.Origin, bytes, rec.Send]]) -> int:
        """Enqueue messages moved here from another queue; idempotent per origin."""
        with self._lock:
            now = self._enter()
            # A moved message costs more here than it frees in its queue (its origin is
            # kept): at the bound, the move waits (see Broker._complete_moves).
            self._budget.check()
            payloads = []
            metas = []
            seq = self.state.next_seq
            for origin, message_id, send in entries:
                if (origin.queue_uid, origin.seq) in self.state.origins:
                    continue  # a move re-driven after a crash: already here
                visible_at = now + self.attributes.delay_seconds * 1000
                payloads.append(rec.encode_send(
                    seq, send.sent_at, visible_at, send.body, group=send.group,
                    dedup=send.dedup, message_id=message_id, origin=origin,
                    attributes=send.attributes, sender=send.sender,
                    system_attributes=send.system_attributes, body_md5=send.body_md5))
                metas.append(rec.SendMeta(seq, send.sent_at, visible_at, send.group,
                                          send.dedup, message_id, origin))
                seq += 1
            if not payloads:
                return 0
            first = self._append(payloads)
            for i, meta in enumerate(metas):
                self.state.apply(first + i, meta)
                heapq.heappush(self._aged, (meta.sent_at, meta.seq))
            self._account()
            self._notify()
            return first + len(payloads)

    def finish_moves(self, seqs: Sequence[int]) -> None:
        with self._lock:
            now = self._enter()
            live = tuple(s for s in seqs if (m := self.state.get(s))
                         and m.category == MOVING)
            if live:
                offset = self._append([rec.encode_seqs(fmt.QREC_MOVE_OUT, now, live)])
                self.state.apply(offset, rec.SeqList(fmt.QREC_MOVE_OUT, now, 0, live))
                self._account()

    def unfinished_moves(self) -> MovePlan | None:
        """Moves a crash interrupted, to be completed again (the target dedups them)."""
        with self._lock:
            moving = self.state.in_category(MOVING)
            if not moving:
                return None
            bodies = self._read_sends([m.location for m in moving])
            return MovePlan(
                tuple(m.seq for m in moving), 0,
                tuple((rec.Origin(self.uid, m.seq, m.receive_count),
                       m.message_id or message_id_bytes(self.uid, m.seq),
                       bodies[m.location]) for m in moving),
            )

    def cancel_moves(self, seqs: Sequence[int]) -> None:
        """Put messages back (visible) when their dead-letter queue is gone or the broker
        is at its memory bound, and deliver rather than move for DEAD_LETTER_RETRY_S
        (else every receive would move them again and fail again)."""
        with self._lock:
            self._dead_letter_missing_until = time.monotonic() + DEAD_LETTER_RETRY_S
            now = self._enter()
            entries = tuple((s, m.lease, now) for s in seqs
                            if (m := self.state.get(s)) and m.category == MOVING)
            if entries:
                offset = self._append([rec.encode_visibility(now, entries)])
                self.state.apply(offset, rec.Receipts(fmt.QREC_CHANGE_VISIBILITY, now,
                                                      entries))
                self._account()
                self._notify()

    # -- delete and visibility -------------------------------------------------------------

    def delete(self, handles: Sequence[str]) -> tuple[list[EngineError | None], int]:
        if self.replication is not None:  # see send
            self.replication.check_writable()
        self._lock.acquire()
        try:
            now = self._enter()
            try:
                results, end = self.state.lead_delete(
                    self.log, self._codec.opener(self.uid), now, list(handles))
            except (LogError, OSError) as exc:
                raise self._fail(exc) from exc
            finally:
                self._account()
            if end and self.state.fifo:
                self._notify()  # a group may be free again
            return results, end
        finally:
            self._lock.release()

    def change_visibility(self, entries: Sequence[tuple[str, int]]
                          ) -> tuple[list[EngineError | None], int]:
        with self._lock:
            now = self._enter()
            self.state.advance(now)
            opener = self._codec.opener(self.uid)
            results: list[EngineError | None] = []
            changes: dict[int, tuple[int, int, int]] = {}
            for handle, seconds in entries:
                try:
                    check_int("visibility_timeout", seconds, 0, VISIBILITY_TIMEOUT_S_MAX)
                    seq, lease = opener.open(handle)
                    message = self.state.get(seq)
                    if message is not None and message.lease != lease:
                        raise ReceiptInvalidError("stale")
                    if message is None or message.category != INFLIGHT:
                        raise MessageNotInflightError()
                    visible_at = now + seconds * 1000
                    if visible_at > message.leased_at + LEASE_MAX_MS:
                        raise InvalidParameterError(
                            "visibility_timeout", seconds,
                            "a message may stay invisible at most 12 hours after it was "
                            "received")
                except EngineError as exc:
                    results.append(exc)
                    continue
                results.append(None)
                changes[seq] = (seq, lease, visible_at)
            if not changes:
                self._account()  # advance may have dropped stale timers
                return results, 0
            triples = tuple(changes.values())
            offset = self._append([rec.encode_visibility(now, triples)])
            self.state.apply(offset, rec.Receipts(fmt.QREC_CHANGE_VISIBILITY, now, triples))
            self._account()
            self._notify()
            return results, 0  # a lost visibility change only moves a redelivery

    def purge(self) -> int:
        if self.replication is not None:  # see send
            self.replication.check_writable()
        with self._lock:
            now = self._enter()
            below = self.state.next_seq
            offset = self._append([rec.encode_purge(now, below)])
            self.state.apply(offset, rec.Purge(now, below))
            self._account()
            self._notify()
            return offset + 1

    # -- retention, configuration, stats ---------------------------------------------------

    def _expire(self, now: int) -> None:
        """Write an EXPIRE record for messages past retention (lock held)."""
        cutoff = now - self.attributes.retention_seconds * 1000
        oldest = self.state.oldest_sent_at()
        if (oldest is None or oldest > cutoff) and not (self._aged and self._aged[0][0] <= cutoff):
            return  # the common case: nothing is that old
        expired = self.state.expirable(cutoff, EXPIRE_PER_SWEEP_MAX)
        aged = self._aged
        while aged and aged[0][0] <= cutoff and len(expired) < EXPIRE_PER_SWEEP_MAX:
            _, seq = heapq.heappop(aged)
            moved_in = self.state.get(seq)
            if moved_in is not None and moved_in.category != MOVING:
                expired.append(seq)
        if expired:
            seqs = tuple(expired)
            offset = self._append([rec.encode_seqs(fmt.QREC_EXPIRE, now, seqs)])
            self.state.apply(offset, rec.SeqList(fmt.QREC_EXPIRE, now, 0, seqs))

    def expire(self) -> None:
        with self._lock:
            now = self._enter(use=False)
            self._expire(now)
            if self.state.dedup_aged(now):
                # Time passes in the state only with a record: an empty EXPIRE carries it,
                # so the deduplication window lets go of what aged out (on every replica
                # alike) on a queue nothing is written to, as at the memory bound.
                offset = self._append([rec.encode_seqs(fmt.QREC_EXPIRE, now, ())])
                self.state.apply(offset, rec.SeqList(fmt.QREC_EXPIRE, now, 0, ()))
            self._account()

    def set_attributes(self, attributes: QueueAttributes) -> int:
        if self.replication is not None:  # see send
            self.replication.check_writable()
        with self._lock:
            self._dead_letter_missing_until = 0.0  # a new redrive policy is tried at once
            now = self._enter()
            config = attributes.to_dict()
            offset = self._append([rec.encode_config(now, config)])
            self.state.apply(offset, rec.Config(now, config))
            self.attributes = attributes
            self._account()
            return offset + 1

    def receivable(self) -> bool:
        """Whether a receive now would get a message (nothing is leased)."""
        with self._lock:
            now = self._enter()
            self._expire(now)
            takeable = bool(self.state.takeable(now))
            self._account()
            return takeable

    def stats(self) -> QueueStats:
        with self._lock:
            now = self._enter()
            self._expire(now)
            self.state.advance(now)
            self._account()
            counts = self.state.category_counts
            counters = self.state.counters
            oldest = self.state.oldest_sent_at()
            return QueueStats(
                visible=counts[1], in_flight=counts[2] + counts[3], delayed=counts[0],
                oldest_age_s=max(0.0, (now - oldest) / 1000) if oldest is not None else 0.0,
                sent=counters["sent"], received=counters["received"],
                deleted=counters["deleted"], expired=counters["expired"],
                moved_to_dead_letter=counters["moved"], purged=counters["purged"],
            )

    def digest(self) -> str:
        with self._lock:
            return state_digest(self.state)

    # -- snapshots --------------------------------------------------------------------------

    def snapshot_due(self) -> bool:
        if self._snapshotting.locked():
            return False  # the one under way will do
        interval = max(self._snapshot_bytes,
                       SNAPSHOT_BYTES_PER_LIVE_MESSAGE * len(self.state))
        return self.log.size_bytes - self._size_at_snapshot >= interval

    def maybe_snapshot(self, force: bool = False) -> bool:
        """Snapshot the state and delete what the log no longer needs. True if it did.

        Only the state's encoding holds the queue's lock; compressing it (as long again)
        does not, so sends and receives go on meanwhile. Snapshots are taken one at a
        time, and only a snapshot moves the log's start, so the one written is still the
        newest and the records it covers are still in the log."""
        if not force and not self.snapshot_due():
            return False
        # A caller that finds one under way leaves it to that one (a send must not wait
        # on another's compression); a forced snapshot waits for it.
        if not self._snapshotting.acquire(blocking=force):
            return False
        try:
            with self._lock:
                if self._failed is not None or self._closed:
                    return False
                taken = self._encode_snapshot()
            if taken is None:
                return False
            end, parts, floor = taken
            del taken
            data = compress_snapshot(parts, end)
            del parts  # the uncompressed state, not kept through the write's fsyncs
            with self._lock:
                if self._failed is not None:
                    return False
                self._write_snapshot(end, data, floor)
                return True
        finally:
            self._snapshotting.release()

    def _snapshot(self) -> bool:
        """A snapshot taken with the lock held throughout (close)."""
        taken = self._encode_snapshot()
        if taken is None:
            return False
        end, parts, floor = taken
        self._write_snapshot(end, compress_snapshot(parts, end), floor)
        return True

    def _encode_snapshot(self) -> tuple[int, list[bytes], int] | None:
        """(offset, state parts, lowest offset the log must keep) of a snapshot of the
        state now, or None if it would be the last one again (lock held)."""
        end = self.log.next_offset
        if end == self._snapshot_offset:
            return None
        try:
            # The snapshot may only describe records that are on disk.
            self.log.flush()
        except (LogError, OSError) as exc:
            self._fail_snapshot(exc)
        oldest = self.state.oldest_location()
        return end, state_parts(self.state), end if oldest is None else min(oldest, end)

    def _write_snapshot(self, end: int, data: bytes, floor: int) -> None:
        """Make the snapshot of offset end durable, then let the log go below floor (lock
        held). Messages that arrived since it was encoded are at end or later."""
        try:
            # Whole or not at all: a snapshot cut short by a full disk must never replace
            # the last good one, nor let the log prefix behind it be deleted.
            write_file(os.path.join(self.directory, SNAPSHOT_FILE), data)
            if not self._keep_log:
                self.log.truncate_before(floor)
        except (LogError, OSError) as exc:
            self._fail_snapshot(exc)
        self._snapshot_offset = end
        self._size_at_snapshot = self.log.size_bytes

    def _fail_snapshot(self, exc: BaseException) -> NoReturn:
        self._failed = f"snapshot failed: {exc}"
        self._failure = exc
        raise unavailable(self.name, self._failed, exc) from exc

    def close(self) -> None:
        """Snapshot (so the next open replays little), wake waiters, close the log.

        A kept log (a cluster replica's) grown by less than CLOSE_SNAPSHOT_BYTES_MIN since
        the last snapshot is not snapshotted: nothing of it would be deleted, and replaying
        it is cheaper than the snapshot's fsyncs, which a node closing hundreds of idle
        queues (beyond open_queues_max, after taking over a lost node's) pays one by one."""
        with self._snapshotting, self._lock:  # after a snapshot being compressed
            if self._closed:
                return
            small = self.log.size_bytes - self._size_at_snapshot < CLOSE_SNAPSHOT_BYTES_MIN
            try:
                if self._failed is None and not (self._keep_log and small):
                    try:
                        self._snapshot()
                    except QueueUnavailableError as exc:
                        # The log holds everything; the next open replays more of it.
                        _log.warning("queue %s: no snapshot at close: %s", self.name,
                                     exc.reason)
            finally:
                self._closed = True
                self._budget.change(-self._held)
                self._held = 0
            self._notify()
        self.log.close()


def _check_entry(entry: SendEntry, attrs: QueueAttributes) -> tuple[Any, ...]:
    """Full validation of one entry: (body, attributes, delay_ms, group, dedup key, sender,
    system attributes, explicit message id, body MD5)."""
    body = entry.body
    if not isinstance(body, bytes):
        if not isinstance(body, (bytearray, memoryview)):
            raise InvalidParameterError("body", type(body).__name__, "must be bytes")
        body = bytes(body)
    attributes = check_message_attributes(entry.attributes)
    system_attributes = check_message_attributes(entry.system_attributes)
    overhead = check_int("overhead", entry.overhead, 0, ENVELOPE_BYTES_MAX)
    check_message_size(message_bytes(body, attributes) - overhead, attrs.max_message_bytes)
    message_id = entry.message_id
    if message_id is not None and (type(message_id) is not bytes
                                   or len(message_id) != MESSAGE_ID_BYTES):
        raise InvalidParameterError("message_id", message_id,
                                    f"must be {MESSAGE_ID_BYTES} bytes")
    body_md5 = entry.body_md5
    if body_md5 is not None and (type(body_md5) is not bytes
                                 or len(body_md5) != BODY_MD5_BYTES):
        raise InvalidParameterError("body_md5", body_md5, f"must be {BODY_MD5_BYTES} bytes")
    sender = None
    if entry.sender is not None:
        sender = check_token("sender", entry.sender, SENDER_CHARS_MAX)
    if entry.delay_seconds is None:
        delay = attrs.delay_seconds
    elif attrs.fifo:
        raise InvalidParameterError("delay_seconds", entry.delay_seconds,
                                    "a FIFO queue delays by its own delay_seconds only")
    else:
        delay = check_int("delay_seconds", entry.delay_seconds, 0, DELAY_S_MAX)
    group = None
    if entry.group_id is not None:
        group = check_token("group_id", entry.group_id, GROUP_ID_CHARS_MAX)
    key = None
    if entry.dedup_id is not None:
        key = check_token("dedup_id", entry.dedup_id, DEDUP_ID_CHARS_MAX)
    if attrs.fifo:
        require("group_id", group, "a FIFO queue needs a message group")
        if key is None:
            if not attrs.content_based_dedup:
                require("dedup_id", None, "this FIFO queue has no content-based "
                        "deduplication, so each message needs a dedup_id")
            key = hashlib.sha256(body).hexdigest()
    # A standard queue deduplicates only sends that carry a dedup id (an idempotency key).
    return (body, attributes, delay * 1000, group, key, sender, system_attributes, message_id,
            body_md5)


def _snapshot_after(core: QueueCore) -> None:
    """A snapshot, if due, after a durable write: the write is answered as done whatever
    the snapshot does; one that fails (a full disk) stops the queue for the calls after."""
    with contextlib.suppress(QueueUnavailableError):
        core.maybe_snapshot()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --- the public, blocking face of a queue ------------------------------------------------


class Queue:
    """A queue of a :class:`~engine.Broker`. Thread-safe; calls block until answered.

    Sends and deletes return once their records are on disk (under fsync="always").
    """

    def __init__(self, name: str, core_of: Callable[[str], QueueCore],
                 complete_moves: Callable[[QueueCore, MovePlan], None],
                 set_attributes: Callable[..., QueueAttributes]) -> None:
        self.name = name
        self._core_of = core_of
        self._complete_moves = complete_moves
        self._set_attributes = set_attributes

    def _run(self, operation: Callable[[QueueCore], _T]) -> _T:
        """Run operation on the queue's core, reopening it if it was idle-closed between
        the lookup and the call (a closed core refuses before changing anything)."""
        for attempt in range(3):
            core = self._core_of(self.name)
            try:
                return operation(core)
            except QueueUnavailableError as exc:
                if exc.reason != "closed" or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @property
    def attributes(self) -> QueueAttributes:
        return self._core_of(self.name).attributes

    @property
    def fifo(self) -> bool:
        return self.attributes.fifo

    def set_attributes(self, **changes: Any) -> QueueAttributes:
        """Change some of the queue's attributes; return the whole new set."""
        return self._set_attributes(self.name, **changes)

    def send(self, body: bytes, delay_seconds: int | None = None,
             attributes: Mapping[str, MessageAttribute] | None = None,
             group_id: str | None = None, dedup_id: str | None = None,
             sender: str | None = None,
             system_attributes: Mapping[str, MessageAttribute] | None = None) -> SendResult:
        result = self.send_batch([SendEntry(body, delay_seconds, attributes, group_id,
                                            dedup_id, sender, system_attributes)])[0]
        if isinstance(result, EngineError):
            raise result
        return result

    def send_batch(self, entries: Sequence[SendEntry | bytes]
                   ) -> list[SendResult | EngineError]:
        """Send several messages in one log write; each entry succeeds or fails alone.

        An entry is a :class:`SendEntry`, or the body alone as bytes."""
        sends = send_entries(entries)
        core, (results, durable_at) = self._on_core(QueueCore.send, sends)
        core.wait_durable(durable_at)
        _snapshot_after(core)
        return results

    def _on_core(self, method: Callable[[QueueCore, _A], _T], arg: _A) -> tuple[QueueCore, _T]:
        """method(core, arg), retried on a reopened core if this one was idle-closed
        between the lookup and the call (a closed core refuses before changing anything).
        Returns the core too, for the wait that follows."""
        for attempt in range(3):
            core = self._core_of(self.name)
            try:
                return core, method(core, arg)
            except QueueUnavailableError as exc:
                if exc.reason != "closed" or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def receive(self, max_messages: int = 1, wait_seconds: int | None = None,
                visibility_timeout: int | None = None) -> list[Message]:
        """Up to max_messages messages, waiting up to wait_seconds for the first one."""
        wait = check_receive(max_messages, wait_seconds, visibility_timeout, self.attributes)
        deadline = time.monotonic() + wait
        while True:
            core = self._core_of(self.name)
            messages, plan, version = self._run(
                lambda core: core.receive(max_messages, visibility_timeout))
            if plan is not None:
                self._complete_moves(core, plan)
            if messages:
                return messages
            if plan is not None:
                # Only messages to move came up, and they are gone now: look again at
                # once. Bounded: a pass either moves messages out of the queue or finds
                # the dead-letter queue gone, after which messages are delivered.
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return messages
            core.wait(version, min(remaining, core.seconds_to_next_timer()))

    def delete(self, receipt: str) -> None:
        error = self.delete_batch([receipt])[0]
        if error is not None:
            raise error

    def delete_batch(self, receipts: Sequence[str]) -> list[EngineError | None]:
        check_batch(receipts)
        core, (results, durable_at) = self._on_core(QueueCore.delete, receipts)
        core.wait_durable(durable_at)
        _snapshot_after(core)
        return results

    def change_visibility(self, receipt: str, seconds: int) -> None:
        error = self.change_visibility_batch([(receipt, seconds)])[0]
        if error is not None:
            raise error

    def change_visibility_batch(self, entries: Sequence[tuple[str, int]]
                                ) -> list[EngineError | None]:
        check_batch(entries)
        return self._run(lambda core: core.change_visibility(entries)[0])

    def purge(self) -> None:
        self._run(lambda core: core.wait_durable(core.purge()))

    def stats(self) -> QueueStats:
        return self._run(lambda core: core.stats())

    def digest(self) -> str:
        """Digest of the queue's state: equal on every replay of the same log."""
        return self._run(lambda core: core.digest())

    def __repr__(self) -> str:
        return f"<Queue {self.name}>"


def send_entries(entries: Sequence[SendEntry | bytes]) -> Sequence[SendEntry]:
    """The entries of a send_batch as SendEntry, a checked batch: bytes stand for a body
    with nothing else; anything else is a TypeError that names it (not an AttributeError
    from the extension, which reads the fields of a SendEntry)."""
    check_batch(entries)
    if all(map(isinstance, entries, repeat(SendEntry))):  # the usual case, at C speed
        return entries  # type: ignore[return-value]
    sends = []
    for i, entry in enumerate(entries):
        if isinstance(entry, SendEntry):
            sends.append(entry)
        elif isinstance(entry, bytes | bytearray | memoryview):
            sends.append(SendEntry(bytes(entry)))
        else:
            raise TypeError(f"entries[{i}] must be bytes or a SendEntry, not "
                            f"{type(entry).__name__}")
    return sends


def check_batch(entries: Sequence[object]) -> None:
    if not entries:
        raise InvalidParameterError("entries", 0, "a batch holds at least one entry")
    if len(entries) > ENGINE_BATCH_MAX:
        raise InvalidParameterError("entries", len(entries),
                                    f"a batch holds at most {ENGINE_BATCH_MAX} entries")


def check_receive(max_messages: int, wait_seconds: int | None, visibility_timeout: int | None,
                  attrs: QueueAttributes) -> int:
    """Validate receive arguments; return how long to wait."""
    check_int("max_messages", max_messages, 1, ENGINE_BATCH_MAX)
    if visibility_timeout is not None:
        check_int("visibility_timeout", visibility_timeout, 0, VISIBILITY_TIMEOUT_S_MAX)
    if wait_seconds is None:
        return attrs.receive_wait_seconds
    return check_int("wait_seconds", wait_seconds, 0, RECEIVE_WAIT_S_MAX)
