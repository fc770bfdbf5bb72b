"""A partition's log: a directory of segments, with rolling, retention, recovery and fsync.

The bytes are handled by :mod:`engine._segment`; this module decides when segments roll,
which are deleted, how a directory is recovered on open, and when data is fsync'd.

Durability (``fsync=``):

- ``"always"`` (default): an append returns only after an fdatasync covers it. Appends
  from many threads share fsyncs (group commit): one fsync covers every batch appended
  while the previous one ran. An event loop's waiters start a round once a turn of the
  loop appends nothing more, so that the requests it is handling share it, and the round
  runs on that loop's native sync threads (engine/_syncer.pyx), which never take the GIL;
  the loop takes the outcome itself.
- ``"interval:<ms>"``: appends return once written to the operating system; a background
  sync runs every <ms> milliseconds.
- ``"never"``: appends are buffered in user space and written out by size, every
  ``flush_interval_ms`` and on ``flush()``; nothing is fsync'd on the append path.

Whatever the policy, a sealed segment has been fsync'd before the next one is created, and
``flush()``, ``wait_durable()`` and ``close()`` leave everything appended on disk. An fsync
or write error is fatal (fail-stop): the log refuses further writes until it is reopened,
because after a failed fsync the kernel may have dropped the dirty pages.

Thread-safe: every operation takes the log's lock, except that fsyncs run outside it so
appends continue meanwhile.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import fcntl
import functools
import heapq
import itertools
import logging
import os
import re
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import zstandard

from engine import background, format
from engine._segment import Records, Segment, batch_spans, concat
from engine.errors import (
    ConfigError,
    CorruptSegmentError,
    LogClosedError,
    LogFailedError,
    LogLockedError,
    OffsetOutOfRangeError,
)
from engine.files import TMP_SUFFIX, fsync_dir, make_dirs, write_all

if TYPE_CHECKING:
    from engine._syncer import Syncer

_log = logging.getLogger("conveyor.log")

Buffer = bytes | bytearray | memoryview

# Largest number of records and bytes one read returns, whatever the caller asks for.
READ_RECORDS_MAX = 65536
READ_BYTES_MAX = 16 * 1024 * 1024
READ_BYTES_DEFAULT = 1024 * 1024
# Under fsync="never", appends are written out once this much is buffered.
BUFFER_BYTES_DEFAULT = 256 * 1024
FLUSH_INTERVAL_MS_DEFAULT = 200
# Sealed segments of one log that keep an open descriptor; older ones reopen on demand.
SEALED_FDS_MAX = 2
# When truncate_before covers every record, the active segment is rolled (so it can be
# deleted too) only once it holds at least this much; rolling costs two fsyncs.
TRUNCATE_ROLL_BYTES = 64 * 1024
INTERVAL_MS_MAX = 60_000
# An event loop's round starts once a turn of the loop appended nothing more, so that the
# requests it had already read share the fsync; under a load that appends every turn, it
# starts after this many turns at the latest (each a few tens of microseconds then).
KICK_TURNS_MAX = 8
# A round on a loop's native sync threads whose outcome the loop has not taken within
# this, while others wait, is taken by another thread: the loop may be closed, stopped,
# or busy with long synchronous work.
TAKE_ROUND_AFTER_S = 0.01

# Logs this process closed with every byte fsync'd: by the log's directory, its active
# segment as the close left it (_identity). Opening a log owes an fsync of its active
# segment (a crash may have left bytes in the page cache that no fsync covered), and that
# fsync flushes the device's cache even when nothing is dirty: about a millisecond on a
# virtual disk. A node taking over a lost node's partitions closes and reopens thousands
# of logs at once; an open that finds its active segment as this process left it, closed
# and synced, skips the fsync. Bounded: the oldest entries go first (about 0.5 KB each),
# and an entry missing only costs the fsync.
CLOSED_SYNCED_MAX = 16384
_Identity = tuple[str, int, int, int, int, int]
"""(file name, device, inode, size, mtime ns, ctime ns)"""
_closed_synced: OrderedDict[str, _Identity] = OrderedDict()
_closed_synced_lock = threading.Lock()

_SEGMENT_NAME = re.compile(rf"^(\d{{{format.OFFSET_DIGITS}}})\.log$")
LOCK_FILE = "LOCK"
# Test-only: True brings back the old recovery rule, which cut the active segment at its
# first bad batch whatever followed. The fault tests set it to show that they catch it.
LEGACY_CUT_AT_ANY_BAD_BATCH = False


@dataclasses.dataclass(frozen=True)
class FsyncPolicy:
    """When appended data is fsync'd; parsed from ``"always"``, ``"never"``, ``"interval:<ms>"``."""

    mode: Literal["always", "interval", "never"]
    interval_ms: int = 0

    @classmethod
    def parse(cls, spec: str | FsyncPolicy) -> FsyncPolicy:
        if isinstance(spec, FsyncPolicy):
            return spec
        if spec == "always":
            return cls("always")
        if spec == "never":
            return cls("never")
        if isinstance(spec, str) and spec.startswith("interval:"):
            digits = spec.removeprefix("interval:")
            if digits.isdigit() and 1 <= int(digits) <= INTERVAL_MS_MAX:
                return cls("interval", int(digits))
        raise ConfigError(
            "fsync", spec, f"expected 'always', 'never' or 'interval:<1..{INTERVAL_MS_MAX}>'"
        )

    def __str__(self) -> str:
        return f"interval:{self.interval_ms}" if self.mode == "interval" else self.mode


@dataclasses.dataclass(frozen=True)
class RecoveryReport:
    """What opening the log found and repaired."""

    dropped_bytes: int
    """Bytes cut from the tail of the last segment (a torn tail: a write never finished)."""
    segment: str | None
    """The segment that was cut, if any."""
    indexes_rebuilt: int
    """Sealed segments whose index file was missing or suspect and was rebuilt."""
    fsync_skipped: bool = False
    """The active segment was not fsync'd: this process had closed the log with every
    byte fsync'd, and the segment is as that close left it."""


class Log:
    """An append-only sequence of records, numbered by offset, stored as segments.

    ``append_batch`` writes one batch in one ``write()``; ``read`` returns a
    :class:`~engine.Records` view. See the module docstring for durability.

    Opening recovers the directory. A torn tail (a bad final batch of the last segment
    with nothing valid after it) is cut and reported in ``recovery``; any other bad batch
    is damage, and opening raises CorruptSegmentError naming the file and byte, leaving
    every segment file as it was (docs/FORMAT.md, "Torn tail or damage"). Repair is
    engine/repair.py's, on an operator's request. ``durable_floor``: every record below it
    is known to have been fsync'd (a queue's snapshot covers it), so a bad batch among
    them is damage too, however late in the log.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fsync: str | FsyncPolicy = "always",
        *,
        segment_bytes_max: int = format.SEGMENT_BYTES_MAX,
        record_bytes_max: int = format.RECORD_BYTES_MAX,
        batch_bytes_max: int = format.BATCH_BYTES_MAX,
        compression: Literal["zstd"] | None = None,
        index_interval_bytes: int = format.INDEX_INTERVAL_BYTES,
        buffer_bytes: int = BUFFER_BYTES_DEFAULT,
        flush_interval_ms: int = FLUSH_INTERVAL_MS_DEFAULT,
        lock: bool = True,
        on_sync: Callable[[float], None] | None = None,
        durable_floor: int = 0,
    ) -> None:
        self.path = os.fspath(path)
        self.fsync_policy = FsyncPolicy.parse(fsync)
        _check_range("segment_bytes_max", segment_bytes_max,
                     format.SEGMENT_BYTES_MIN, format.SEGMENT_BYTES_MAX_CAP)
        _check_range("batch_bytes_max", batch_bytes_max,
                     format.SEGMENT_BYTES_MIN, format.SEGMENT_BYTES_MAX_CAP)
        _check_range("record_bytes_max", record_bytes_max, 1, batch_bytes_max)
        _check_range("index_interval_bytes", index_interval_bytes, 1, 1 << 30)
        _check_range("buffer_bytes", buffer_bytes, 0, 1 << 30)
        _check_range("flush_interval_ms", flush_interval_ms, 1, INTERVAL_MS_MAX)
        if compression not in (None, "zstd"):
            raise ConfigError("compression", compression, "expected None or 'zstd'")
        self.segment_bytes_max = segment_bytes_max
        # A batch must fit in an empty segment.
        self.batch_bytes_max = min(batch_bytes_max, segment_bytes_max)
        self.record_bytes_max = min(record_bytes_max,
                                    self.batch_bytes_max - format.BATCH_HEADER_BYTES - 4)
        self.compression = compression
        self._index_interval = index_interval_bytes
        self._flush_bytes = buffer_bytes if self.fsync_policy.mode == "never" else 0
        self._always = self.fsync_policy.mode == "always"
        self._compress = _zstd_compressor() if compression == "zstd" else None
        self._decompress = _zstd_decompressor(self.batch_bytes_max)
        self.epoch = 0
        """Leader epoch stamped on every batch appended from now on (0 on a single node)."""
        self.on_append: Callable[[], None] | None = None
        """Called after every append, in the appending thread, with no lock held; it must
        only note the fact. A cluster leader's replication is woken so to ship the new
        records, whoever appended them (replication.leader.LeaderRole.appended)."""

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._failure: BaseException | None = None
        self._syncing = False
        self._native: Syncer | None = None
        """The native sync threads running the round in flight, if a loop started it."""
        self._native_loop: asyncio.AbstractEventLoop | None = None
        """The loop that started that round, and takes its outcome."""
        self._native_rounds = 0  # native rounds started: which one is in flight
        self._taker_armed = 0  # the native round a late taker is armed for
        self._waiters: list[tuple[int, int, Future[None]]] = []
        self._waiter_seq = itertools.count()
        # asyncio waiters, a heap per event loop: a sync round wakes each loop once and the
        # loop resolves its own futures (one cross-thread wake-up per round, not per caller).
        self._loop_waiters: dict[asyncio.AbstractEventLoop,
                                 list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._loops_woken: set[asyncio.AbstractEventLoop] = set()
        self._wanted = 0  # the highest offset any waiter asked to be durable
        self._kicks: set[asyncio.AbstractEventLoop] = set()  # loops about to start a round
        self._segments: list[Segment] = []
        self._bases: list[int] = []
        self._open_sealed: OrderedDict[int, Segment] = OrderedDict()
        self._sealed_syncs = 0
        """Background fsyncs of sealed segments (fsync="never") not yet done."""
        self._lock_fd: int | None = None
        self.sync_count = 0
        """fsyncs run by group commit, interval syncs and flush() (a monotonic counter)."""
        self.sync_seconds = 0.0
        """Total time spent in those fsyncs."""
        self._on_sync = on_sync

        make_dirs(self.path)
        if lock:
            self._lock_fd = _lock_directory(self.path)
        try:
            self.recovery = self._open_segments(durable_floor)
        except BaseException:
            self._release_everything()
            raise
        self._active = self._segments[-1]
        self._sealed_bytes = sum(int(s.size) for s in self._segments[:-1])
        self._durable = self._active.next_offset
        self._timer: background.Timer | None = None
        if self.fsync_policy.mode == "interval":
            self._timer = background.every(self, self.fsync_policy.interval_ms)
        elif self.fsync_policy.mode == "never":
            self._timer = background.every(self, flush_interval_ms)

    # -- opening ------------------------------------------------------------------------

    def _new_segment(self, base: int, writable: bool) -> Segment:
        return Segment(
            os.path.join(self.path, format.segment_file_name(base)),
            base,
            writable=writable,
            record_bytes_max=self.record_bytes_max,
            batch_bytes_max=self.batch_bytes_max,
            segment_bytes_max=self.segment_bytes_max,
            index_interval_bytes=self._index_interval,
            flush_bytes=self._flush_bytes,
        )

    def _open_segments(self, durable_floor: int) -> RecoveryReport:
        # Taken whatever this open finds: once open, the log may be written.
        closed_synced = _closed_synced_take(self.path)
        names = os.listdir(self.path)
        bases = sorted(int(m.group(1)) for name in names if (m := _SEGMENT_NAME.match(name)))
        if not bases:
            self._tidy(names, set())
            segment = self._new_segment(0, writable=True)
            segment.recover()
            fsync_dir(self.path)
            self._segments, self._bases = [segment], [0]
            return RecoveryReport(0, None, 0)

        rebuilt = []
        for base, next_base in itertools.pairwise(bases):
            segment = self._new_segment(base, writable=False)
            self._segments.append(segment)
            if self._load_sealed(segment, next_base):
                rebuilt.append(segment)
            segment.release_fd()
        self._bases = bases
        active = self._new_segment(bases[-1], writable=True)
        self._segments.append(active)
        # Only a torn tail is cut; damage raises CorruptSegmentError and changes nothing.
        dropped = (active.recover(0, False) if LEGACY_CUT_AT_ANY_BAD_BATCH
                   else active.recover(durable_floor))
        if dropped:
            _log.warning("log %s: cut a torn tail of %d bytes from %s",
                         self.path, dropped, active.path)
        # Files are tidied and indexes rewritten only now that the open has succeeded: an
        # open that refuses damage leaves the directory exactly as it found it.
        self._tidy(names, set(bases))
        for segment in rebuilt:
            _write_index(segment)
        # What survived a crash is on disk as far as the page cache goes; make it durable
        # before anyone is told so (unless this process closed it synced, as it is now).
        skip_sync = not dropped and _unchanged(closed_synced, active.path)
        if not skip_sync:
            active.sync()
        return RecoveryReport(dropped, active.path if dropped else None, len(rebuilt),
                              skip_sync)

    def _load_sealed(self, segment: Segment, next_base: int) -> bool:
        """Adopt a sealed segment's index, or rebuild it in memory (True: rebuilt)."""
        index_path = _index_path(segment.path)
        with contextlib.suppress(FileNotFoundError), open(index_path, "rb") as f:
            if segment.load_index(f.read(), next_base):
                return False
        segment.rebuild_index()
        if segment.next_offset != next_base:
            raise CorruptSegmentError(
                segment.path, segment.next_offset, segment.size,
                f"segment ends at offset {segment.next_offset} but the next one starts "
                f"at {next_base}",
            )
        return True

    def _tidy(self, names: list[str], bases: set[int]) -> None:
        """Delete leftovers of interrupted writes (.tmp) and indexes without a segment."""
        for name in names:
            stem = name.removesuffix(format.INDEX_SUFFIX)
            if name.endswith(TMP_SUFFIX) or (name.endswith(format.INDEX_SUFFIX) and (
                    not stem.isdigit() or int(stem) not in bases)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))

    # -- properties ---------------------------------------------------------------------

    @property
    def first_offset(self) -> int:
        """Offset of the oldest record still stored (equals next_offset when empty)."""
        return int(self._segments[0].base_offset)

    @property
    def next_offset(self) -> int:
        """Offset the next appended record will get."""
        return int(self._active.next_offset)

    @property
    def durable_offset(self) -> int:
        """Every record below this offset has been fsync'd."""
        return self._durable

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def size_bytes(self) -> int:
        """Bytes in all segment files, buffered appends included. O(1): read per batch."""
        return self._sealed_bytes + int(self._active.size)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    # -- appending ----------------------------------------------------------------------

    def append(self, payload: Buffer, *, timestamp_ms: int = -1, wait: bool = True) -> int:
        """Append one record; return its offset.

        With ``wait`` (the default) and fsync="always", return only once it is on disk.
        """
        # acquire/release rather than `with`: this is the hottest path, and here the
        # context-manager protocol costs more than the rest of the append together.
        lock = self._lock
        lock.acquire()
        try:
            if self._closed or self._failure is not None:
                self._check_writable()
            offset: int = self._active.append_one(payload, timestamp_ms, self.epoch)
            if offset < 0:
                self._roll()
                offset = self._active.append_one(payload, timestamp_ms, self.epoch)
        except OSError as exc:
            raise self._fail(exc) from exc
        finally:
            lock.release()
        if self.on_append is not None:
            self.on_append()
        if wait and self._always:
            self.wait_durable(offset + 1)
        return offset

    def append_batch(
        self, records: Sequence[Buffer], *, timestamp_ms: int = -1, wait: bool = True
    ) -> int:
        """Append records as one batch in one write; return the first record's offset.

        With ``wait`` (the default) and fsync="always", return only once it is on disk.
        Use ``wait=False`` with :meth:`durable_future` or :meth:`append_batch_async` to
        wait without blocking a thread.
        """
        lock = self._lock
        lock.acquire()
        try:
            if self._closed or self._failure is not None:
                self._check_writable()
            active = self._active
            first: int = active.append(records, timestamp_ms, self.epoch, self._compress)
            if first < 0:
                self._roll()
                active = self._active
                first = active.append(records, timestamp_ms, self.epoch, self._compress)
            end = int(active.next_offset)
        except OSError as exc:
            raise self._fail(exc) from exc
        finally:
            lock.release()
        if self.on_append is not None:
            self.on_append()
        if wait and self._always:
            self.wait_durable(end)
        return first

    async def append_batch_async(
        self, records: Sequence[Buffer], *, timestamp_ms: int = -1
    ) -> int:
        """Like append_batch, but waits for the fsync without blocking the event loop."""
        first = self.append_batch(records, timestamp_ms=timestamp_ms, wait=False)
        if self._always:
            await self.durable_async(first + len(records))
        return first

    def append_raw(self, data: Buffer, *, wait: bool = True) -> int:
        """Append whole batches exactly as another log stored them; return next_offset.

        The first batch must start at next_offset. Every batch is checked (framing,
        sequence, checksum) before it is written; a bad one raises InvalidBatchError and
        the batches before it stay appended.
        """
        view = memoryview(data)
        with self._lock:
            self._check_writable()
            try:
                for start, end in batch_spans(view):
                    if self._active.append_raw(view[start:end]) < 0:
                        self._roll()
                        self._active.append_raw(view[start:end])
            except OSError as exc:
                raise self._fail(exc) from exc
            end_offset = int(self._active.next_offset)
        if self.on_append is not None:
            self.on_append()
        if wait and self._always:
            self.wait_durable(end_offset)
        return end_offset

    def _check_writable(self) -> None:
        if self._closed:
            raise LogClosedError(self.path)
        if self._failure is not None:
            raise LogFailedError(self.path, self._failure)

    def _roll(self) -> None:
        """Seal the active segment and start a new one at next_offset.

        Under "always" and "interval" the old segment's unsynced tail is small and is
        fsync'd here, before the new segment exists. Under "never" it may be a whole
        segment of dirty pages, so its fsync (and the directory's) runs in the background
        instead of stalling the appender for the length of a writeback.
        """
        old = self._active
        old.flush()
        background_sync = self.fsync_policy.mode == "never"
        if not background_sync:
            old.sync()
        old.seal()
        _write_index(old)
        base = int(old.next_offset)
        path = os.path.join(self.path, format.segment_file_name(base))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale file here could pass for this segment's records
        new = self._new_segment(base, writable=True)
        new.recover()
        self._segments.append(new)
        self._bases.append(base)
        self._active = new
        self._sealed_bytes += int(old.size)
        self._remember_sealed(old)
        if background_sync:
            fd = old.dup_fd()
            self._sealed_syncs += 1
            background.submit(lambda: self._sync_sealed(fd))
        else:
            fsync_dir(self.path)
            self._mark_durable(base)

    def _sync_sealed(self, fd: int) -> None:
        """Background fsync of a segment sealed under "never", then of the directory."""
        try:
            os.fdatasync(fd)
            fsync_dir(self.path)
        except OSError as exc:
            with self._lock:
                self._fail(exc)
        finally:
            os.close(fd)
            with self._lock:
                self._sealed_syncs -= 1

    def _remember_sealed(self, segment: Segment) -> None:
        """Keep at most SEALED_FDS_MAX sealed segments' descriptors open."""
        self._open_sealed[int(segment.base_offset)] = segment
        self._open_sealed.move_to_end(int(segment.base_offset))
        while len(self._open_sealed) > SEALED_FDS_MAX:
            _, oldest = self._open_sealed.popitem(last=False)
            oldest.release_fd()

    # -- reading ------------------------------------------------------------------------

    def read(
        self, offset: int, max_records: int = 100, max_bytes: int = READ_BYTES_DEFAULT
    ) -> Records:
        """Up to max_records consecutive records from offset on, stopping near max_bytes.

        Returns an empty Records at next_offset, and at least one record below it. Whole
        batches are read, so max_bytes may be overrun by up to one batch. Every batch
        read is checked against its checksum; a bad one raises CorruptSegmentError.
        """
        if max_records > READ_RECORDS_MAX:
            max_records = READ_RECORDS_MAX
        if max_bytes > READ_BYTES_MAX:
            max_bytes = READ_BYTES_MAX
        lock = self._lock
        lock.acquire()  # not `with`: see append()
        try:
            if self._closed:
                raise LogClosedError(self.path)
            segment = self._segment_for(offset)
            records: Records = segment.read(offset, max_records, max_bytes, self._decompress)
            if segment is self._active:
                return records
            # A segment boundary is not the caller's business: carry on into the next one.
            while (len(records) < max_records and records.next_offset == segment.next_offset
                   and records.payload_bytes < max_bytes and segment is not self._active):
                self._remember_sealed(segment)
                segment = self._segments[bisect.bisect_right(self._bases,
                                                             records.next_offset) - 1]
                more = segment.read(records.next_offset, max_records - len(records),
                                    max_bytes - records.payload_bytes, self._decompress)
                records = concat(records, more)
            if segment is not self._active:
                self._remember_sealed(segment)
            return records
        finally:
            lock.release()

    def read_raw(self, offset: int, max_bytes: int = READ_BYTES_DEFAULT) -> bytes:
        """Whole stored batches from the one holding offset (for log shipping): at most
        max_bytes of them, or the first alone if it is larger."""
        limit = min(max_bytes, READ_BYTES_MAX)
        with self._lock:
            if self._closed:
                raise LogClosedError(self.path)
            segment = self._segment_for(offset)
            data: bytes = segment.read_raw(offset, limit)
            if segment is not self._active:
                self._remember_sealed(segment)
        if len(data) > limit:
            # The segment reads until its batches *reach* the limit, so the last one may
            # run past it; a leader ships what this returns in frames of a fixed size.
            spans = batch_spans(data)
            end = spans[0][1]
            for _, stop in spans[1:]:
                if stop > limit:
                    break
                end = stop
            data = data[:end]
        return data

    def _segment_for(self, offset: int) -> Segment:
        active = self._active
        if offset >= active.base_offset:  # the common case: reading recent records
            if offset > active.next_offset:
                raise OffsetOutOfRangeError(self.path, offset, self.first_offset,
                                            int(active.next_offset))
            return active
        first = int(self._segments[0].base_offset)
        if offset < first:
            raise OffsetOutOfRangeError(self.path, offset, first, int(active.next_offset))
        return self._segments[bisect.bisect_right(self._bases, offset) - 1]

    # -- durability ---------------------------------------------------------------------

    def flush(self) -> None:
        """Write out everything buffered and fsync it, whatever the policy."""
        with self._lock:
            self._check_writable()
        self.wait_durable(self.next_offset)

    def wait_durable(self, offset: int, timeout: float | None = None) -> None:
        """Block until every record below offset is on disk, syncing if needed.

        Raises TimeoutError if timeout (seconds) passes first.
        """
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._durable < offset:
                self._check_waitable(offset)
                if self._syncing:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"offset {offset} not durable in time")
                    self._wait_round(remaining)
                    continue
                self._syncing = True
                self._sync_round()

    def durable_future(self, offset: int) -> Future[None]:
        """A future that completes once every record below offset is on disk.

        Starts a sync on the shared background pool if none is running, so many callers
        share one fsync. Wrap it with ``asyncio.wrap_future`` to await it.
        """
        future: Future[None] = Future()
        with self._lock:
            if self._settled_now(future, offset):
                return future
            heapq.heappush(self._waiters, (offset, next(self._waiter_seq), future))
            self._want(offset)
        return future

    def durable_async(self, offset: int) -> asyncio.Future[None]:
        """Like durable_future, for the running asyncio event loop (call it there).

        All of a loop's waiters covered by one fsync are woken together, by one callback
        on that loop.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._settled_now(future, offset):
                return future
            heap = self._loop_waiters.setdefault(loop, [])
            heapq.heappush(heap, (offset, next(self._waiter_seq), future))
            if offset > self._wanted:
                self._wanted = offset
            if not self._syncing:
                self._schedule_kick(loop)
            elif self._native_loop is not loop:
                self._arm_taker()
        return future

    def _schedule_kick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have loop start a round soon (lock held, on loop's thread)."""
        if loop not in self._kicks:
            self._kicks.add(loop)
            loop.call_soon(self._kick, loop, self._wanted, 0)

    def _kick(self, loop: asyncio.AbstractEventLoop, seen: int, turns: int) -> None:
        """On loop: start a round, unless the last turn of the loop appended more (seen:
        what was wanted before it). Then the loop is still reading requests that would
        each pay for a round of their own: the round waits for the next turn, at most
        KICK_TURNS_MAX of them. A loop that appends nothing more starts it at once."""
        with self._lock:
            if (self._syncing or self._closed or self._failure is not None
                    or self._wanted <= self._durable):
                # Nothing to do, or the round in flight ends with a look at what is left
                # (_after_round).
                self._kicks.discard(loop)
                return
            if self._wanted > seen and turns < KICK_TURNS_MAX:
                loop.call_soon(self._kick, loop, self._wanted, turns + 1)
                return
            self._kicks.discard(loop)
            self._syncing = True
            self._start_loop_round(loop)

    def _start_loop_round(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a round on loop's native sync threads (lock held, _syncing set, on
        loop's thread); on the shared pool where the loop has none."""
        syncer = background.loop_syncer(loop)
        if syncer is None:
            background.submit(self._background_round)
            return
        segment = self._active
        target = int(segment.next_offset)
        try:
            segment.flush()
            fd = segment.dup_fd()
        except OSError as exc:
            self._syncing = False
            self._fail(exc)
            return
        try:
            syncer.submit(fd, functools.partial(self._loop_round_done, loop, target))
        except Exception:  # no sync thread could start, or no memory: the pool runs it
            os.close(fd)
            background.submit(self._background_round)
            return
        self._native = syncer
        self._native_loop = loop
        self._native_rounds += 1

    def _arm_taker(self) -> None:
        """Have the pool take the native round in flight if its loop has not within
        TAKE_ROUND_AFTER_S (lock held): a waiter other than that loop's needs it."""
        if self._native is not None and self._taker_armed != self._native_rounds:
            self._taker_armed = self._native_rounds
            background.submit(functools.partial(self._take_late, self._native,
                                                self._native_rounds))

    def _take_late(self, syncer: Syncer, round_: int) -> None:
        """On the pool: take round_'s outcome unless its loop has, looking every
        TAKE_ROUND_AFTER_S until it is taken (a slow disk's sync may take longer)."""
        while True:
            time.sleep(TAKE_ROUND_AFTER_S)
            with self._lock:
                if self._native is not syncer or self._native_rounds != round_:
                    return
            background.take_completions(syncer)

    def _loop_round_done(self, loop: asyncio.AbstractEventLoop, target: int, error: int,
                         seconds: float) -> None:
        """A round on loop's native threads has ended: every record below target is on
        disk, unless error (an errno). Normally on loop's thread, which then resolves its
        own waiters here, and starts their next round if one is wanted (_resolve_loop);
        on another thread (TAKE_ROUND_AFTER_S) the loop is woken for them instead."""
        here = _running_loop() is loop
        failure: LogFailedError | None = None
        resolve_here = False
        with self._lock:
            self._native = None
            self._native_loop = None
            self._syncing = False
            self.sync_count += 1
            self.sync_seconds += seconds
            if self._on_sync is not None:
                self._on_sync(seconds)
            if here and self._loop_waiters.get(loop) and loop not in self._loops_woken:
                self._loops_woken.add(loop)  # resolved below, without a wake-up
                resolve_here = True
            if error:
                failure = self._fail(OSError(error, os.strerror(error)))
            else:
                self._mark_durable(target)
            self._cond.notify_all()
            self._after_round()
        if resolve_here:
            self._resolve_loop(loop, failure)

    def _after_round(self) -> None:
        """Start what the waiters left after a round need (lock held): for futures, a
        round on the pool; for each loop's, a wake-up of that loop, which starts its own
        round (_resolve_loop). A loop runs rounds only for waiters of its own: one that
        stops running strands no other's. Threads in wait_durable start their own."""
        if self._failure is not None or self._closed or self._wanted <= self._durable:
            return
        if self._waiters:
            self._syncing = True
            background.submit(self._background_round)
        else:
            self._wake_loops(handover=True)

    def _settled_now(self, future: Future[None] | asyncio.Future[None], offset: int) -> bool:
        """Complete future at once if offset is durable already, or never can be (lock
        held); say whether it was."""
        if self._durable >= offset:
            future.set_result(None)
            return True
        try:
            self._check_waitable(offset)
        except Exception as exc:
            future.set_exception(exc)
            return True
        return False

    def _want(self, offset: int) -> None:
        """Note that a waiter needs offset durable, starting a sync if none runs (lock held)."""
        if offset > self._wanted:
            self._wanted = offset
        if not self._syncing:
            self._syncing = True
            background.submit(self._background_round)
        else:
            self._arm_taker()

    def _wake_loops(self, error: BaseException | None = None, handover: bool = False) -> None:
        """Schedule each event loop with waiters now durable (all with handover, or on
        error) to resolve them (lock held)."""
        for loop, heap in list(self._loop_waiters.items()):
            if not heap or loop in self._loops_woken:
                continue
            if error is None and not handover and heap[0][0] > self._durable:
                continue
            self._loops_woken.add(loop)
            try:
                loop.call_soon_threadsafe(self._resolve_loop, loop, error)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                del self._loop_waiters[loop]
                self._loops_woken.discard(loop)

    def _resolve_loop(self, loop: asyncio.AbstractEventLoop,
                      error: BaseException | None) -> None:
        """On the loop's thread: resolve its waiters that are durable (or all, on error)."""
        with self._lock:
            self._loops_woken.discard(loop)
            heap = self._loop_waiters.get(loop, [])
            ready = []
            while heap and (error is not None or heap[0][0] <= self._durable):
                ready.append(heapq.heappop(heap)[2])
            stopped: list[asyncio.Future[None]] = []
            reason: BaseException | None = None
            if heap and (self._failure is not None or self._closed):
                # Woken for a round (a hand-over) before the log failed or closed: that
                # wake-up skipped this loop, which was woken already.
                reason = (LogFailedError(self.path, self._failure)
                          if self._failure is not None else LogClosedError(self.path))
                stopped = [entry[2] for entry in heap]
                heap.clear()
            if not heap:
                self._loop_waiters.pop(loop, None)
            elif not self._syncing:
                # Waiters beyond the last round, and none running: this loop starts one.
                self._schedule_kick(loop)
        for future in ready:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
        if reason is not None:
            for future in stopped:
                if not future.done():
                    future.set_exception(reason)

    def _check_waitable(self, offset: int) -> None:
        self._check_writable()
        if offset > self._active.next_offset:
            raise OffsetOutOfRangeError(self.path, offset, self.first_offset,
                                        int(self._active.next_offset))

    def _sync_round(self) -> None:
        """One fsync of everything appended so far. Lock held on entry and exit.

        The caller set _syncing; the lock is released during the fsync itself so that
        appends go on, which is what lets the next round cover many of them.
        """
        segment = self._active
        error: OSError | None = None
        target = int(segment.next_offset)
        try:
            segment.flush()
            # A descriptor of our own: the segment may be rolled, deleted or closed by the
            # time the fsync runs, and must not pull the descriptor from under it.
            fd = segment.dup_fd()
        except OSError as exc:
            error = exc
        else:
            self._lock.release()
            started = time.monotonic()
            try:
                os.fdatasync(fd)
            except OSError as exc:
                error = exc
            finally:
                os.close(fd)
                elapsed = time.monotonic() - started
                self._lock.acquire()
            self.sync_count += 1
            self.sync_seconds += elapsed
            if self._on_sync is not None:
                self._on_sync(elapsed)
        self._syncing = False
        if error is not None:
            self._fail(error)
        else:
            self._mark_durable(target)
        self._cond.notify_all()
        self._after_round()
        if error is not None:
            raise LogFailedError(self.path, error) from error

    def _wait_round(self, timeout: float | None) -> None:
        """Wait for the round in flight to end, or timeout (lock held; the caller looks
        again). A round on a loop's native threads is taken by this thread if the loop
        has not taken it within TAKE_ROUND_AFTER_S; at once if this thread is the loop's
        own, blocked here, which cannot take it otherwise."""
        syncer = self._native
        if syncer is None:
            self._cond.wait(timeout)
            return
        step = TAKE_ROUND_AFTER_S if timeout is None else min(timeout, TAKE_ROUND_AFTER_S)
        own_loop = self._native_loop is _running_loop()
        if not own_loop and (self._cond.wait(step) or self._native is not syncer):
            return
        self._lock.release()
        try:
            if own_loop:
                # Bounded: another thread may take the outcome first and reset the count.
                select.select([syncer.fileno()], [], [], step)
            background.take_completions(syncer)
        finally:
            self._lock.acquire()

    def _background_round(self) -> None:
        with self._lock:
            if self._closed or self._failure is not None:
                self._syncing = False
                self._cond.notify_all()
                return
            with contextlib.suppress(LogFailedError):  # reported to the waiters
                self._sync_round()

    def _mark_durable(self, offset: int) -> None:
        if offset > self._durable:
            self._durable = offset
        while self._waiters and self._waiters[0][0] <= self._durable:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
        if self._loop_waiters:
            self._wake_loops()

    def _fail(self, cause: BaseException) -> LogFailedError:
        """Enter fail-stop. Returns the error to raise to the caller that hit it."""
        if self._failure is None:
            self._failure = cause
            _log.error("log %s failed and stops accepting writes: %s", self.path, cause)
        error = LogFailedError(self.path, cause)
        self._drop_waiters(error)
        self._cond.notify_all()
        return error

    def _drop_waiters(self, error: BaseException) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_exception(error)
        if self._loop_waiters:
            self._wake_loops(error)

    def tick(self) -> None:
        """Timer callback: background flush ("never") or sync ("interval")."""
        with self._lock:
            if self._closed or self._failure is not None:
                return
            if self.fsync_policy.mode == "never":
                try:
                    self._active.flush()
                except OSError as exc:
                    self._fail(exc)
            elif not self._syncing and self._durable < self._active.next_offset:
                self._syncing = True
                background.submit(self._background_round)
            elif self._syncing:
                self._arm_taker()

    # -- truncation ---------------------------------------------------------------------

    def truncate_before(self, offset: int) -> int:
        """Delete whole segments that hold only records below offset; return first_offset.

        This is retention: records below offset may remain if they share a segment with
        live ones. Deletions are made durable with a directory fsync.
        """
        with self._lock:
            self._check_writable()
            try:
                if (offset >= self._active.next_offset
                        and self._active.size >= min(TRUNCATE_ROLL_BYTES,
                                                     self.segment_bytes_max)):
                    self._roll()
                doomed = [s for s in self._segments[:-1] if s.next_offset <= offset]
                for segment in doomed:
                    self._forget(segment)
                    os.unlink(segment.path)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_index_path(segment.path))
                if doomed:
                    fsync_dir(self.path)
            except OSError as exc:
                raise self._fail(exc) from exc
            return int(self._segments[0].base_offset)

    def truncate_after(self, offset: int) -> int:
        """Durably drop every record at or past offset; return the new next_offset.

        Batches are not split: a batch holding offset goes whole, so the result may be
        below offset. This is how a follower discards a divergent, uncommitted suffix.
        """
        with self._lock:
            self._check_writable()
            while self._syncing:
                self._wait_round(None)
            first = int(self._segments[0].base_offset)
            if offset >= self._active.next_offset:
                return int(self._active.next_offset)
            if offset < first:
                raise OffsetOutOfRangeError(self.path, offset, first,
                                            int(self._active.next_offset))
            try:
                new_next = self._truncate_after_locked(offset)
            except OSError as exc:
                raise self._fail(exc) from exc
            self._durable = min(self._durable, new_next)
            return new_next

    def _truncate_after_locked(self, offset: int) -> int:
        # Drop later segments newest first, so a crash part-way leaves a valid log.
        while len(self._segments) > 1 and self._segments[-1].base_offset >= offset:
            doomed = self._segments[-1]
            self._forget(doomed)
            os.unlink(doomed.path)
            self._active = self._segments[-1]
        if self._active.writable is False:
            sealed = self._active
            self._forget(sealed)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_index_path(sealed.path))
            reopened = self._new_segment(int(sealed.base_offset), writable=True)
            reopened.recover()
            self._segments.append(reopened)
            self._bases.append(int(reopened.base_offset))
            self._active = reopened
        new_next = int(self._active.truncate_after(offset))
        fsync_dir(self.path)
        # Rare enough to recount rather than track through the branches above.
        self._sealed_bytes = sum(int(s.size) for s in self._segments[:-1])
        return new_next

    def restart_at(self, offset: int) -> None:
        """Drop every record and start the log over, empty, at offset: the next record
        appended gets offset. Durable on return.

        For a cluster replica that installs a snapshot of the queue's state at offset in
        place of the records before it (engine/install.py, whose journal finishes this
        after a crash). Segments go newest first, so a crash part-way leaves a prefix of
        the old log, which opens as a valid log; the new segment is made only once they
        are gone. Not thread-safe with appends; one writer per partition.
        """
        with self._lock:
            self._check_writable()
            while self._syncing:
                self._wait_round(None)
            try:
                for segment in reversed(self._segments):
                    segment.close(discard=True)
                    os.unlink(segment.path)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(_index_path(segment.path))
                self._segments, self._bases = [], []
                self._open_sealed.clear()
                fsync_dir(self.path)
                fresh = self._new_segment(offset, writable=True)
                fresh.recover()
                fsync_dir(self.path)
            except OSError as exc:
                raise self._fail(exc) from exc
            self._segments, self._bases = [fresh], [offset]
            self._active = fresh
            self._sealed_bytes = 0
            self._durable = offset

    def approx_bytes(self, start: int, end: int) -> int:
        """About how many bytes of batches hold the records from start to end: exact over
        whole segments, pro rata by records within one. O(segments); for a leader deciding
        whether a snapshot is cheaper to send than the log (replication.leader)."""
        with self._lock:
            total = 0
            for segment in self._segments:
                base, after = int(segment.base_offset), int(segment.next_offset)
                low, high = max(start, base), min(end, after)
                if high > low:
                    total += int(segment.size) * (high - low) // (after - base)
            return total

    def _forget(self, segment: Segment) -> None:
        index = self._segments.index(segment)
        if segment is not self._active:
            self._sealed_bytes -= int(segment.size)
        del self._segments[index]
        del self._bases[index]
        self._open_sealed.pop(int(segment.base_offset), None)
        segment.close()

    # -- maintenance --------------------------------------------------------------------

    def verify(self) -> int:
        """Check every batch of every segment against its checksum; return records seen.

        Raises CorruptSegmentError at the first bad batch. Reads the whole log.
        """
        with self._lock:
            if self._closed:
                raise LogClosedError(self.path)
            self._active.flush()
            total = 0
            for segment in self._segments:
                probe = self._new_segment(int(segment.base_offset), writable=False)
                try:
                    probe.rebuild_index()
                    total += int(probe.next_offset - probe.base_offset)
                finally:
                    probe.close()
            return total

    def iter_records(self, offset: int | None = None) -> Iterator[tuple[int, memoryview]]:
        """Every record from offset (default: first_offset) to the current end."""
        offset = self.first_offset if offset is None else offset
        end = self.next_offset
        while offset < end:
            records = self.read(offset, READ_RECORDS_MAX)
            yield from records
            offset = records.next_offset

    def release_handles(self) -> None:
        """Flush and close every file descriptor; they reopen on the next use.

        For holders of many idle logs, to bound open files.
        """
        with self._lock:
            if self._closed:
                return
            try:
                for segment in self._segments:
                    segment.release_fd()
            except OSError as exc:
                raise self._fail(exc) from exc
            self._open_sealed.clear()

    def close(self) -> None:
        """Write out and fsync what is buffered, then close. Idempotent."""
        with self._lock:
            if self._closed:
                return
            while self._syncing:
                self._wait_round(None)
            error: OSError | None = None
            if self._failure is None:
                try:
                    if self._durable < self._active.next_offset:
                        self._active.flush()
                        self._active.sync()
                    self._mark_durable(int(self._active.next_offset))
                except OSError as exc:
                    error = exc
                    self._fail(exc)
            self._closed = True
            self._drop_waiters(LogClosedError(self.path))
            self._cond.notify_all()
            self._release_everything()
            # Everything appended is durable, unless a segment sealed under "never" is
            # still being synced: a cut can have made it the active one again.
            if self._failure is None and not self._sealed_syncs:
                _closed_synced_note(self.path, self._active.path, int(self._active.size))
        if error is not None:
            raise LogFailedError(self.path, error) from error

    def _release_everything(self) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
        for segment in self._segments:
            # After a failure, what is still buffered was never acknowledged: drop it.
            segment.close(discard=self._failure is not None)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Log:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "failed" if self._failure else "open"
        return (f"<Log {self.path} {state} offsets {self.first_offset}..{self.next_offset} "
                f"fsync={self.fsync_policy}>")


# --- helpers --------------------------------------------------------------------------


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(name, value, f"must be an integer in {low}..{high}")


def segment_bases(path: str) -> list[int]:
    """Base offsets of the segment files in a log directory, in order."""
    return sorted(int(m.group(1)) for name in os.listdir(path)
                  if (m := _SEGMENT_NAME.match(name)))


def _index_path(segment_path: str) -> str:
    return segment_path.removesuffix(format.LOG_SUFFIX) + format.INDEX_SUFFIX


def _write_index(segment: Segment) -> None:
    """Save a sealed segment's index. Neither the file nor its directory entry is fsync'd:
    it is checked on load and rebuilt when missing or suspect."""
    path = _index_path(segment.path)
    tmp = path + TMP_SUFFIX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            write_all(fd, segment.index_bytes(), tmp)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a partial file holds on to the space whose lack failed it
        raise


def _lock_directory(path: str) -> int:
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LogLockedError(path) from None
    return fd


def _zstd_compressor() -> Callable[[bytes], bytes]:
    # Level 3 is zstd's default: most of the ratio at a few hundred MB/s per core.
    compress: Callable[[bytes], bytes] = zstandard.ZstdCompressor(level=3).compress
    return compress


# One decompression context per thread, made on first use: a context holds about 9 KB of
# native memory, and a cluster node keeps thousands of logs open that are rarely (or never)
# compressed. A context must not be shared between threads at once.
_decompressors = threading.local()


def _zstd_decompressor(limit: int) -> Callable[[bytes], bytes]:
    def decompress(frame: bytes) -> bytes:
        decompressor: zstandard.ZstdDecompressor | None = getattr(_decompressors, "dctx", None)
        if decompressor is None:
            decompressor = _decompressors.dctx = zstandard.ZstdDecompressor()
        data: bytes = decompressor.decompress(frame, max_output_size=limit)
        return data

    return decompress


def _identity(path: str) -> _Identity:
    """A segment file as the registry of synced closes knows it. The change time too:
    a copy made with its times kept (cp -p) can reuse a deleted file's inode and size
    and mtime, but not its ctime."""
    st = os.stat(path)
    return (os.path.basename(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns)


def _closed_synced_note(log_path: str, active_path: str, size: int) -> None:
    """The log at log_path was just closed with every byte fsync'd, its active segment
    size bytes long."""
    try:
        identity = _identity(active_path)
    except OSError:
        return
    if identity[3] != size:  # the file is not what this log wrote and synced
        return
    with _closed_synced_lock:
        _closed_synced[log_path] = identity
        _closed_synced.move_to_end(log_path)
        while len(_closed_synced) > CLOSED_SYNCED_MAX:
            _closed_synced.popitem(last=False)


def _closed_synced_take(log_path: str) -> _Identity | None:
    with _closed_synced_lock:
        return _closed_synced.pop(log_path, None)


def _unchanged(noted: _Identity | None, active_path: str) -> bool:
    """Whether the active segment is the one a synced close noted, unchanged since."""
    if noted is None:
        return False
    try:
        return noted == _identity(active_path)
    except OSError:
        return False
