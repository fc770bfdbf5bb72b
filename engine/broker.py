"""The library's entry point: a data directory holding any number of queues.

::

    with Broker("./data") as broker:
        jobs = broker.create_queue("jobs", visibility_timeout=30)
        jobs.send(b"hello")
        for msg in jobs.receive(max_messages=10, wait_seconds=1):
            jobs.delete(msg.receipt)

Layout of the data directory::

    LOCK              flock()ed while a broker has the directory open
    receipt.key       32 random bytes (0600): the key receipt handles are signed with
    catalog.sqlite3   which queues exist (engine/catalog.py)
    queues/<uid>/     one directory per queue: log/ (its segment log), snapshot and
                      queue.json (its name and uid)
    orphaned/         queue directories the catalog did not name when the broker opened,
                      set aside rather than deleted (engine/orphans.py)

Queues open lazily, on first use, and at most ``open_queues_max`` stay open: the least
recently used idle ones are snapshotted and closed. That bounds memory and open files
(about two descriptors per open queue) however many queues exist; a closed queue costs
one catalog row and its files on disk. One shared timer, not a thread per queue, runs
retention and snapshots for the open queues.

A queue is opened, closed and adopted (a cluster's copy made) outside the broker's lock,
which guards only the maps: many queues open at once (a cluster node taking over
thousands of partitions opens them on several threads), and one slow to open, or a copy's
files being fsynced, holds up only its own callers. A queue is marked busy meanwhile, and
nothing else opens, closes or changes it until that is done.

Thread-safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Protocol

from engine import background, orphans
from engine import records as rec
from engine.catalog import Catalog
from engine.clock import Clock, SystemClock
from engine.errors import (
    BrokerClosedError,
    CorruptDataError,
    DataDirectoryLockedError,
    EngineError,
    InvalidAttributeError,
    LogError,
    MemoryFullError,
    QueueDamagedError,
    QueueExistsError,
    QueueNotFoundError,
    QueueUnavailableError,
    unavailable,
)
from engine.files import fsync_dir, make_dirs, rename
from engine.limits import QueueAttributes, check_queue_name
from engine.log import FsyncPolicy
from engine.memory import MemoryBudget
from engine.orphans import DELETED_SUFFIX, Orphan, OrphanError
from engine.queue import (
    QUEUE_SEGMENT_BYTES,
    SNAPSHOT_BYTES,
    MovePlan,
    Queue,
    QueueCore,
    create_queue_log,
    start_queue_log,
)
from engine.receipts import ReceiptCodec, load_or_create_key

_log = logging.getLogger("conveyor.broker")

OPEN_QUEUES_MAX = 512
MAINTENANCE_INTERVAL_MS = 1000
# A queue is closed for being least recently used only once idle this long, so that a
# caller holding it between two calls rarely finds it closed (and then just reopens it).
IDLE_BEFORE_CLOSE_S = 5.0
# Past open_queues_max, idle queues are closed down to 1/this below it: a node taking
# over thousands of partitions opens each in turn, and sorted every open queue for each.
EVICT_SLACK_DIVISOR = 16


class Leadership(Protocol):
    """Which queues this node may open for writing: in a cluster, those it leads."""

    def check(self, name: str) -> None:
        """Raise (an EngineError) unless this node leads the queue now."""

    def opened(self, core: QueueCore) -> None:
        """A led queue was opened: stamp its epoch, attach its replication. Raises (an
        EngineError) if it is no longer led; the broker then closes it."""

    def pinned(self, name: str) -> bool:
        """Whether the queue must stay open although idle: its replication still reads
        its log (a follower behind)."""


class Partitions(Protocol):
    """How the server splits a queue into engine queues, its partitions
    (server/partitioned.py). The broker asks it two things, and without it each queue is
    one engine queue of its own name."""

    def dead_letter_partition(self, catalog: Catalog, target: str, group_id: str | None
                              ) -> str:
        """The engine queue that takes a dead letter of message group group_id (None on a
        standard queue) for the queue target, whose partitions catalog lists."""

    def queue_of(self, name: str) -> str:
        """The queue an engine queue is a partition of: what a moved message reports as
        its dead-letter source."""

    def accept_elsewhere(self, name: str,
                         entries: list[tuple[rec.Origin, bytes, rec.Send]]) -> bool:
        """Enqueue moved messages durably in the engine queue ``name`` if another process
        serves it (a worker's sibling), and say so; False if this broker serves it.
        Raises an EngineError if that process refuses or cannot be reached."""


class Broker:
    """Queues in one data directory. See the module docstring."""

    def __init__(self, path: str | os.PathLike[str], fsync: str = "always", *,
                 clock: Clock | None = None, open_queues_max: int = OPEN_QUEUES_MAX,
                 segment_bytes_max: int = QUEUE_SEGMENT_BYTES,
                 snapshot_bytes: int = SNAPSHOT_BYTES,
                 maintenance_interval_ms: int = MAINTENANCE_INTERVAL_MS,
                 on_sync: Callable[[float], None] | None = None,
                 leadership: Leadership | None = None,
                 receipt_key: bytes | None = None,
                 memory_max: int | None = None,
                 partitions: Partitions | None = None,
                 shared: bool = False) -> None:
        self.path = os.fspath(path)
        self.memory = MemoryBudget(memory_max)
        """What the open queues' messages hold in memory; sends are refused (MemoryFull)
        while it is at memory_max (None: no bound). See engine/memory.py."""
        self.fsync_policy = FsyncPolicy.parse(fsync)
        self.clock: Clock = clock or SystemClock()
        self.open_queues_max = open_queues_max
        make_dirs(os.path.join(self.path, "queues"))
        self.shared = shared
        """Other processes of one server (its workers) open the directory too, each only
        the queues it owns (``leadership``). The server holds the directory's lock for
        all of them (:func:`lock_directory`), and set strays aside before they started;
        the catalog reads what the others wrote when a lookup misses."""
        self._lock_fd = -1 if shared else lock_directory(self.path)
        self._lock = threading.RLock()
        self._settled = threading.Condition(self._lock)
        """Notified whenever a queue stops being busy (``_settle``)."""
        self._evict_over = 0
        """Opens evict only past open_queues_max and this many more: 0, or more after an
        eviction that pinned queues kept above the limit (see _evict)."""
        self._busy: set[str] = set()
        """Queues being opened or closed outside the lock (see the module docstring)."""
        self._closed = False
        self._maintaining = False
        self._cores: dict[str, QueueCore] = {}
        self._damaged: dict[str, tuple[str, str, int]] = {}
        """Queues found damaged when opened: (reason, path, position). They stay closed
        until the process restarts (after an operator's salvage)."""
        try:
            # A cluster's nodes share one key (from etcd): a receipt handle made by one
            # leader must open on the next.
            self._codec = ReceiptCodec(receipt_key or load_or_create_key(
                os.path.join(self.path, "receipt.key")))
            catalog_path = os.path.join(self.path, "catalog.sqlite3")
            new_catalog = not os.path.exists(catalog_path)
            self.catalog = Catalog(catalog_path, shared=shared)
            if new_catalog:
                # SQLite fsyncs its files, not the directory entry of a database it made.
                fsync_dir(self.path)
            self._partitions = partitions
            self._core_options: dict[str, Any] = {
                "fsync": str(self.fsync_policy), "clock": self.clock, "codec": self._codec,
                "segment_bytes_max": segment_bytes_max, "snapshot_bytes": snapshot_bytes,
                "name_of_uid": self._source_name, "on_sync": on_sync,
                "keep_log": leadership is not None, "budget": self.memory,
            }
            self._leadership = leadership
            if not shared:
                self.set_aside_strays()
        except BaseException:
            self._unlock()
            raise
        self._timer = background.every(self, maintenance_interval_ms)

    def _source_name(self, uid: int) -> str | None:
        """The queue a moved message came from, by the uid of the engine queue it left."""
        name = self.catalog.name_of(uid)
        if name is None or self._partitions is None:
            return name
        return self._partitions.queue_of(name)

    def _queue_dir(self, uid: int) -> str:
        return os.path.join(self.path, "queues", f"{uid:016x}")

    def queue_dir(self, name: str) -> str:
        """The directory of a queue in the catalog."""
        entry = self.catalog.get(name)
        if entry is None:
            raise QueueNotFoundError(name)
        return self._queue_dir(entry.uid)

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)

    def set_aside_strays(self) -> None:
        """Move queue directories the catalog does not name to orphaned/.

        One may be a create that a crash interrupted (the catalog row is its commit point),
        or a whole queue whose catalog entry was lost (a catalog replaced, or restored
        without its -wal): nothing here can tell which, so nothing is deleted. Only a
        directory that delete_queue renamed, after removing its entry, is removed.
        """
        known = {f"{uid:016x}" for uid in self.catalog.uids()}
        root = os.path.join(self.path, "queues")
        for name in sorted(os.listdir(root)):
            if name in known:
                continue
            path = os.path.join(root, name)
            if name.endswith(DELETED_SUFFIX):
                _log.info("finishing the delete of %s", path)
                shutil.rmtree(path, ignore_errors=True)
                continue
            orphans.set_aside(self.path, path, "the catalog names no queue with this uid")

    # -- queues ---------------------------------------------------------------------------

    def create_queue(self, name: str, uid: int | None = None, **attributes: Any) -> Queue:
        """Create a queue, or return the existing one if its attributes are the same.

        uid: the queue's id, chosen by the caller (a cluster names a queue's replicas by
        one id, which receipt handles carry); None picks a new one.
        """
        attrs = QueueAttributes.from_dict(attributes)
        check_queue_name(name, attrs.fifo)
        with self._lock:
            self._check_open()
            self._wait_idle(name)
            existing = self.catalog.get(name)
            if existing is not None:
                current = QueueAttributes.from_dict(existing.attributes)
                differing = [k for k, v in attrs.to_dict().items() if current.to_dict()[k] != v]
                if differing:
                    raise QueueExistsError(name, differing)
                return self._queue(name)
            self._check_dead_letter(name, attrs)
            uid = self._new_uid() if uid is None else uid
            directory = self._queue_dir(uid)
            existed = os.path.lexists(directory)
            try:
                create_queue_log(directory, attrs, fsync=str(self.fsync_policy),
                                 clock=self.clock,
                                 segment_bytes_max=self._core_options["segment_bytes_max"])
                orphans.write_identity(directory, name, uid)
            except (LogError, OSError) as exc:
                if not existed and os.path.isdir(directory):
                    # Made by this call a moment ago, named by no catalog entry, holding
                    # nothing anyone was told of: removing it is no guess.
                    shutil.rmtree(directory, ignore_errors=True)
                raise unavailable(name, f"its log cannot be created: {exc}", exc) from exc
            with self._catalog_write(name):
                self.catalog.add(name, uid, attrs.to_dict(), self.clock.now_ms())
        return self._queue(name)

    def adopt_queue(self, name: str, uid: int, attributes: dict[str, Any],
                    start_epoch: int = 0) -> str:
        """Make a catalog entry and an empty log for a queue of a cluster.

        A follower's log is filled by replication, byte for byte from the leader's first
        record, so it writes no configuration record of its own. ``start_epoch``: this node
        leads the queue in that epoch, and a log still empty gets its configuration
        record now.
        Returns the queue's directory.
        """
        with self._lock:
            self._check_open()
            self._wait_idle(name)
            entry = self.catalog.get(name)
            if entry is not None and entry.uid != uid:
                raise QueueExistsError(name, ["uid"])
            directory = self._queue_dir(uid)
            # The files are made outside the lock, the queue marked busy: their fsyncs
            # held it, and every other queue created on this node waited for them.
            self._busy.add(name)
        try:
            if entry is None:
                make_dirs(os.path.join(directory, "log"))
                orphans.write_identity(directory, name, uid)
                self.catalog.add(name, uid, attributes, self.clock.now_ms())
            if start_epoch:
                try:
                    start_queue_log(directory, QueueAttributes.from_dict(attributes),
                                    fsync=str(self.fsync_policy), clock=self.clock,
                                    epoch=start_epoch)
                except CorruptDataError as exc:
                    with self._lock:
                        raise self._note_damage(name, directory, exc) from exc
        finally:
            self._settle(name)
        return directory

    def _note_damage(self, name: str, directory: str, exc: CorruptDataError
                     ) -> QueueDamagedError:
        """Remember that the queue's files are damaged; the error to raise."""
        error = QueueDamagedError(name, f"its log cannot be opened: {exc}", exc.path,
                                  exc.position)
        if name not in self._damaged:
            _log.error("queue %s is damaged and stays closed (every other queue serves "
                       "on): %s; see `conveyor log verify %s`", name, exc, directory)
        self._damaged[name] = (error.reason, error.path, error.position)
        return error

    def is_damaged(self, name: str) -> bool:
        """Whether the queue refused to open here as damaged (QueueDamagedError)."""
        return name in self._damaged

    def forget_damage(self, name: str) -> None:
        """The queue's damaged files were set aside (a cluster follower's copy, copied again
        from its leader): it may be opened again."""
        with self._lock:
            self._damaged.pop(name, None)

    def close_queue(self, name: str) -> None:
        """Close a queue's open core, if any (a leader stepping down)."""
        with self._lock:
            # No check that the broker is open: closing a queue of a closed one is moot.
            self._wait_idle(name, check_open=False)
            core = self._take(name)
        if core is not None:
            # core.replication stays: writes still waiting on it must be refused by it.
            self._close_taken([core])

    def _new_uid(self) -> int:
        taken = self.catalog.uids()
        while True:
            uid = secrets.randbits(63) or 1
            if uid not in taken and not os.path.exists(self._queue_dir(uid)):
                return uid

    def _check_dead_letter(self, name: str, attrs: QueueAttributes) -> None:
        target = attrs.dead_letter_queue
        if target is None:
            return
        if target == name:
            raise InvalidAttributeError("dead_letter_queue", target,
                                        "a queue cannot be its own dead-letter queue")
        entry = self.catalog.get(target)
        if entry is None:
            raise InvalidAttributeError("dead_letter_queue", target, "no such queue")
        if bool(entry.attributes.get("fifo")) != attrs.fifo:
            raise InvalidAttributeError("dead_letter_queue", target,
                                        "must be FIFO exactly when this queue is")

    def _queue(self, name: str) -> Queue:
        return Queue(name, self._core_of, self._complete_moves, self.set_queue_attributes)

    def get_queue(self, name: str) -> Queue:
        with self._lock:
            self._check_open()
            if self.catalog.get(name) is None:
                raise QueueNotFoundError(name)
        return self._queue(name)

    def list_queues(self, prefix: str = "") -> list[str]:
        self._check_open()
        return self.catalog.names(prefix)

    def set_queue_attributes(self, name: str, **changes: Any) -> QueueAttributes:
        """Change some attributes of a queue; return the whole new set."""
        core = self._core_of(name)
        attrs = core.attributes.replace(**changes)
        with self._lock:
            self._check_dead_letter(name, attrs)
            core.wait_durable(core.set_attributes(attrs))
            with self._catalog_write(name):
                self.catalog.update(name, attrs.to_dict(), self.clock.now_ms())
        return attrs

    def dead_letter_sources(self, name: str) -> list[str]:
        """Queues whose dead-letter queue is name."""
        self._check_open()
        if self.catalog.get(name) is None:
            raise QueueNotFoundError(name)
        return [e.name for e in self.catalog.entries()
                if e.attributes.get("dead_letter_queue") == name]

    def delete_queue(self, name: str) -> None:
        """Delete a queue and its messages. Receipts of the old queue stay invalid even if
        a queue of the same name is created again."""
        with self._lock:
            self._check_open()
            self._wait_idle(name)
            entry = self.catalog.get(name)
            if entry is None:
                raise QueueNotFoundError(name)
            with self._catalog_write(name):
                self.catalog.remove(name)
            self._damaged.pop(name, None)  # a queue made again under the name is another
            core = self._cores.pop(name, None)
            if core is not None:
                core.close()
            directory = self._queue_dir(entry.uid)
            doomed = directory + DELETED_SUFFIX
            # Durably renamed before any file goes: a crash part-way leaves a directory
            # that says it was deleted on purpose, finished at the next open, rather than
            # a half-deleted one that would pass for an orphan.
            with contextlib.suppress(FileNotFoundError):
                rename(directory, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # -- orphaned queue directories -------------------------------------------------------

    def orphans(self) -> list[Orphan]:
        """The directories under orphaned/ (engine/orphans.py)."""
        self._check_open()
        return orphans.listing(self.path)

    def set_aside_queue(self, name: str, reason: str) -> str:
        """Remove a queue from the catalog and move its directory, untouched, to
        orphaned/ (for a queue its owner does not know: the server's record of it is
        missing). Returns its name there."""
        with self._lock:
            self._check_open()
            self._wait_idle(name)
            entry = self.catalog.get(name)
            if entry is None:
                raise QueueNotFoundError(name)
            core = self._cores.pop(name, None)
            if core is not None:
                core.close()
            directory = self._queue_dir(entry.uid)
            if orphans.read_identity(directory) is None and os.path.isdir(directory):
                # A queue made before queue.json existed: its name is known only now.
                orphans.write_identity(directory, name, entry.uid)
            with self._catalog_write(name):
                self.catalog.remove(name)
            return orphans.set_aside(self.path, directory, f"{reason} (queue {name!r})")

    def adopt_orphan(self, directory: str, name: str | None = None) -> str:
        """Bring a directory under orphaned/ back as a queue; return the queue's name.

        name: the queue's name, needed only when its queue.json does not give it (a
        queue made before the file existed), or to adopt it under another. The queue is
        opened (its log replayed) before anything changes, so a damaged one is refused
        and stays where it is.
        """
        with self._lock:
            self._check_open()
            orphan = orphans.find(self.path, directory)
            name = name or orphan.name
            if name is None:
                raise OrphanError(directory, "it has no queue.json naming its queue: "
                                  "give the queue's name")
            if orphan.uid is None:
                raise OrphanError(directory, "neither queue.json nor the directory's name "
                                  "gives the queue's uid")
            self._wait_idle(name)
            uid = orphan.uid
            if self.catalog.get(name) is not None:
                raise OrphanError(directory, f"a queue named {name!r} exists")
            if uid in self.catalog.uids() or os.path.lexists(self._queue_dir(uid)):
                raise OrphanError(directory, f"uid {uid:016x} belongs to another queue")
            if not orphan.has_log:
                raise OrphanError(directory, "it holds no log/")
            try:
                core = QueueCore(name, uid, orphan.path, **self._core_options)
            except (EngineError, OSError, ValueError) as exc:
                raise OrphanError(directory, f"its queue does not open: {exc}") from exc
            attributes = core.attributes
            core.close()
            check_queue_name(name, attributes.fifo)
            orphans.write_identity(orphan.path, name, uid)
            rename(orphan.path, self._queue_dir(uid))
            self.catalog.add(name, uid, attributes.to_dict(), self.clock.now_ms())
            _log.warning("adopted %s/%s as queue %r", orphans.ORPHANED_DIR, directory, name)
            return name

    def discard_orphan(self, directory: str) -> None:
        """Delete a directory under orphaned/ and everything in it (an operator's act)."""
        with self._lock:
            self._check_open()
            orphan = orphans.find(self.path, directory)
            shutil.rmtree(orphan.path)
            fsync_dir(os.path.dirname(orphan.path))
            _log.warning("discarded %s/%s", orphans.ORPHANED_DIR, directory)

    @contextlib.contextmanager
    def _catalog_write(self, name: str) -> Iterator[None]:
        """A catalog write whose failure (a full disk, say) is the queue's, not the
        caller's: "unavailable", with the disk's reason."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise unavailable(name, f"the catalog refused a write: {exc}", exc) from exc

    # -- the open-queue cache -----------------------------------------------------------------

    def _core_of(self, name: str) -> QueueCore:
        # The hot path: a dict lookup, atomic under the GIL. Recency for eviction comes
        # from core.last_used, so nothing here needs the broker's lock.
        core = self._cores.get(name)
        if core is not None and not self._closed:
            return core
        with self._lock:
            while True:
                self._check_open()
                core = self._cores.get(name)
                if core is not None:
                    return core
                if name not in self._busy:
                    break
                self._settled.wait()  # opened, or closed, by another thread meanwhile
            if self._leadership is not None:
                # Raises unless this node leads the queue, which a node that holds no
                # copy of it may not know from its catalog.
                self._leadership.check(name)
            entry = self.catalog.get(name)
            if entry is None:
                raise QueueNotFoundError(name)
            damaged = self._damaged.get(name)
            if damaged is not None:
                # Found damaged already: not read again (a large log takes long to scan)
                # until an operator has salvaged it, which needs this process stopped.
                raise QueueDamagedError(name, *damaged)
            self._busy.add(name)
        try:
            core = self._open(name, entry.uid)
        except BaseException:
            self._settle(name)
            raise
        with self._lock:
            # The mark goes in the same hold of the lock as the queue enters the map: in
            # between, an eviction could take the queue, and its close run unmarked.
            try:
                if self._closed:
                    core.close()
                    raise BrokerClosedError()
                if self._leadership is not None:
                    try:
                        self._leadership.opened(core)
                    except BaseException:
                        core.close()  # no longer led: closed, not left open with no owner
                        raise
                self._cores[name] = core
            finally:
                self._busy.discard(name)
                self._settled.notify_all()
            if core.attributes.to_dict() != entry.attributes:
                # The log is the authority on a queue's configuration. A catalog too full
                # to take the copy does not keep the queue from opening: it is copied
                # again on the next open.
                with contextlib.suppress(sqlite3.OperationalError):
                    self.catalog.update(name, core.attributes.to_dict(), self.clock.now_ms())
            victims = self._evict(keep=name)
        self._close_taken(victims)
        plan = core.unfinished_moves()
        if plan is not None:
            self._complete_moves(core, plan)
        return core

    def _open(self, name: str, uid: int) -> QueueCore:
        """Open a queue's core (the queue marked busy, the lock not held): replay its log."""
        directory = self._queue_dir(uid)
        try:
            return QueueCore(name, uid, directory, **self._core_options)
        except (LogError, OSError) as exc:
            # A damaged log, or a disk too full to rebuild an index, fails this queue
            # alone, as a log failing later does: its callers get "unavailable", not
            # an error of their own or of the server. A disk too full is tried again
            # on the next call (once space is freed, it opens); damage is remembered.
            if isinstance(exc, CorruptDataError):
                with self._lock:
                    raise self._note_damage(name, directory, exc) from exc
            raise unavailable(name, f"its log cannot be opened: {exc}", exc) from exc

    def _wait_idle(self, name: str, check_open: bool = True) -> None:
        """With the lock held: wait until the queue is not being opened or closed; then
        raise if the broker was closed meanwhile (unless not check_open)."""
        while name in self._busy:
            self._settled.wait()
        if check_open:
            self._check_open()

    def _take(self, name: str) -> QueueCore | None:
        """With the lock held: take an open queue out of the map to close it outside the
        lock (``_close_taken``), marked busy until then."""
        core = self._cores.pop(name, None)
        if core is not None:
            self._busy.add(name)
        return core

    def _close_taken(self, cores: list[QueueCore]) -> None:
        """Close queues taken by ``_take``, the lock not held."""
        for core in cores:
            try:
                core.close()
            except Exception:
                _log.exception("closing queue %s failed", core.name)
            finally:
                self._settle(core.name)

    def _settle(self, name: str) -> None:
        """The queue is no longer busy: wake whoever waits for it."""
        with self._lock:
            self._busy.discard(name)
            self._settled.notify_all()

    def open_cores(self) -> list[QueueCore]:
        """The queues open now (for metrics: reading them opens nothing)."""
        return list(self._cores.values())

    def open_core(self, name: str) -> QueueCore | None:
        """The queue's core if it is open already (never opens: no replay, no blocking)."""
        return None if self._closed else self._cores.get(name)

    def _evict(self, keep: str | None = None) -> list[QueueCore]:
        """With the lock held: take open queues beyond open_queues_max, least recently used
        first, for the caller to close once it has let the lock go (``_close_taken``).

        Queues idle for IDLE_BEFORE_CLOSE_S go first; if that is not enough, recently used
        ones go too (a caller that held one simply reopens it). Only a queue with a long
        poll waiting on it, one whose replication still reads its log (a cluster leader's
        follower behind: Leadership.pinned), and ``keep`` (the one being opened), stay
        open regardless. keep None is the maintenance pass, which looks even when the last
        eviction left pinned queues above the limit.
        """
        limit = self.open_queues_max
        taken: list[QueueCore] = []
        if len(self._cores) <= limit + (0 if keep is None else self._evict_over):
            return taken
        now = time.monotonic()
        by_age = sorted(self._cores.items(), key=lambda item: item[1].last_used)
        # Open queues go down to a little below the limit (EVICT_SLACK_DIVISOR), so that
        # the sort and the scan are paid once per that many opens: idle ones first, then
        # recently used ones (a node taking over thousands of partitions has used every
        # one it opened within seconds, and scanned them all for each open).
        floor = limit - limit // EVICT_SLACK_DIVISOR
        chosen: dict[str, QueueCore] = {}
        # Chosen first and taken after: a check that raises leaves every queue as it was.
        for idle_only in (True, False):
            for name, core in by_age:
                if len(self._cores) - len(chosen) <= floor:
                    break
                if name == keep or name in chosen or name in self._busy or (
                        idle_only and now - core.last_used < IDLE_BEFORE_CLOSE_S):
                    continue
                if core.has_waiters or (
                        self._leadership is not None and self._leadership.pinned(name)):
                    continue
                chosen[name] = core
        for name, core in chosen.items():
            self._take(name)
            taken.append(core)
        # Pinned queues may keep the count above the limit (a node taking over thousands
        # of partitions pins each until its followers' streams start). Opens then scan
        # them all again only once as many more are open (or at the maintenance pass):
        # scans every few opens held the lock for seconds of such a takeover.
        over = len(self._cores) - limit
        self._evict_over = 0 if over <= 0 else over + max(limit // EVICT_SLACK_DIVISOR, over)
        return taken

    def _complete_moves(self, core: QueueCore, plan: MovePlan) -> None:
        """Finish moving messages to the dead-letter queue: durably marked as moving,
        durably enqueued there (idempotent per origin), then removed here."""
        core.wait_durable(plan.durable_at)
        target = core.attributes.dead_letter_queue
        if target is None:
            core.cancel_moves(plan.seqs)
            return
        shares: dict[str, list[tuple[rec.Origin, bytes, rec.Send]]] = {}
        for entry in plan.entries:
            name = target if self._partitions is None else (
                self._partitions.dead_letter_partition(self.catalog, target, entry[2].group))
            shares.setdefault(name, []).append(entry)
        try:
            cores = []
            for name, entries in shares.items():
                if self._partitions is not None and self._partitions.accept_elsewhere(
                        name, entries):
                    continue  # durably there
                cores.append((self._core_of(name), entries))
        except EngineError as exc:
            # Gone, or (served by another process) unreachable or full: the messages are
            # delivered here again for DEAD_LETTER_RETRY_S, and moved by a later receive.
            if not isinstance(exc, QueueNotFoundError):
                _log.warning("dead letters of %s not moved now: %s", core.name, exc)
            core.cancel_moves(plan.seqs)
            return
        try:
            # A partition that took its share before another refused keeps it: the
            # messages are delivered here again, and a later move skips what is there.
            accepted = [(dead_letter, dead_letter.accept_moved(entries))
                        for dead_letter, entries in cores]
        except MemoryFullError:
            # The broker is at its memory bound: the messages are delivered again for
            # DEAD_LETTER_RETRY_S rather than moved (each move adds memory), and moved
            # once a later receive finds room.
            core.cancel_moves(plan.seqs)
            return
        for dead_letter, position in accepted:
            dead_letter.wait_durable(position)
        core.finish_moves(plan.seqs)

    def accept_moved(self, name: str, entries: list[tuple[rec.Origin, bytes, rec.Send]]
                     ) -> None:
        """Enqueue messages another process moved out of a queue it serves, durably;
        idempotent per origin (Partitions.accept_elsewhere, at the serving end)."""
        core = self._core_of(name)
        core.wait_durable(core.accept_moved(entries))

    # -- maintenance ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Timer callback: start a maintenance pass unless one is running."""
        with self._lock:
            if self._closed or self._maintaining:
                return
            self._maintaining = True
        background.submit(self._maintain)

    def _maintain(self) -> None:
        try:
            with self._lock:
                cores = list(self._cores.values())
            for core in cores:
                try:
                    core.expire()
                    core.maybe_snapshot()
                except QueueUnavailableError:
                    continue  # closed meanwhile, or failed: reported to its callers
            with self._lock:
                victims = [] if self._closed else self._evict()
            self._close_taken(victims)
        except Exception:
            _log.exception("broker maintenance failed")
        finally:
            self._maintaining = False

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosedError()

    def close(self) -> None:
        """Snapshot and close every open queue and release the directory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._timer.cancel()
            # Opens under way see the broker closed and close what they opened; closes
            # under way finish: the catalog and the directory are still theirs till then.
            while self._busy:
                self._settled.wait()
            cores = list(self._cores.values())
            self._cores.clear()
        for core in cores:
            try:
                core.close()
            except Exception:
                _log.exception("closing queue %s failed", core.name)
        self.catalog.close()
        self._unlock()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def lock_directory(path: str) -> int:
    """Lock the data directory (its LOCK file) for this process, or raise
    DataDirectoryLockedError; the lock lasts while the returned descriptor is open, in
    this process or any it passed it to."""
    fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirectoryLockedError(path) from None
    return fd
