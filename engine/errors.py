"""The one exception hierarchy of Conveyor.

Every error the engine raises on purpose derives from :class:`EngineError`. The server and
the replication layer subclass these rather than starting new roots. Errors from the
operating system stay :class:`OSError`, except where they end a log's life (see
:class:`LogFailedError`).

Errors carry structured attributes (``.path``, ``.offset``, ``.limit`` ...) so that
callers never parse messages.
"""

from __future__ import annotations

import errno
import sqlite3


class EngineError(Exception):
    """Root of every error Conveyor raises on purpose."""


class ConfigError(EngineError, ValueError):
    """A configuration value is malformed or out of range."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        super().__init__(f"invalid {name} {value!r}: {reason}")
        self.name = name
        self.value = value
        self.reason = reason


# --- log ------------------------------------------------------------------------------


class LogError(EngineError):
    """Base for errors about one log directory."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class CorruptDataError(LogError):
    """A file the engine wrote fails its checks: damage, found and left as it is.

    ``path`` is the damaged file, ``position`` the byte where the damage was found and
    ``reason`` what is wrong. Nothing is cut, rewritten or deleted on finding it: repair
    (``conveyor log salvage``, engine/repair.py) is an operator's explicit act.
    """

    def __init__(self, message: str, path: str, position: int, reason: str) -> None:
        super().__init__(message, path)
        self.position = position
        self.reason = reason


class CorruptSegmentError(CorruptDataError):
    """A segment failed its checksum or structure check, at open or on a read.

    ``path`` is the segment file, ``offset`` the log offset where the bad batch was
    expected and ``position`` its byte position in the file. Opening a log raises it for
    any bad batch but a torn tail (docs/FORMAT.md, "Torn tail or damage").
    """

    def __init__(self, path: str, offset: int, position: int, reason: str) -> None:
        super().__init__(
            f"corrupt segment {path} at byte {position} (offset {offset}): {reason}",
            path, position, reason,
        )
        self.offset = offset


class CorruptSnapshotError(CorruptDataError):
    """A queue's snapshot file fails its checksum or does not decode.

    ``path`` is the snapshot file; ``position`` is 0 (a checksum covers the whole file, so
    the damage is somewhere in it) or where decoding stopped.
    """

    def __init__(self, path: str, reason: str, position: int = 0) -> None:
        super().__init__(f"corrupt snapshot {path}: {reason}", path, position, reason)


class CorruptDatabaseError(CorruptDataError):
    """A SQLite database of the engine or the server (the catalog, queue records, keys)
    fails SQLite's structure check or a row's check (engine/sqlite.py).

    ``path`` is the database file. Nothing in it is changed; the operator restores it from
    a backup or rebuilds it (docs/OPERATIONS.md, "A damaged database").
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"damaged database {path}: {reason}", path, 0, reason)


class SalvageRefusedError(LogError):
    """A salvage would not leave a usable log or queue, so it changed nothing.

    ``path`` is the log or queue directory and ``reason`` why (for example, a queue's
    snapshot is damaged and the records it summarised are deleted: only a backup or a
    replica has that state).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot salvage {path}: {reason}", path)
        self.reason = reason


class OffsetOutOfRangeError(LogError, IndexError):
    """An offset outside ``[first_offset, next_offset]`` was asked for."""

    def __init__(self, path: str, offset: int, first_offset: int, next_offset: int) -> None:
        super().__init__(
            f"offset {offset} is outside [{first_offset}, {next_offset}] in {path}", path
        )
        self.offset = offset
        self.first_offset = first_offset
        self.next_offset = next_offset


class RecordTooLargeError(EngineError, ValueError):
    """A record or a batch is larger than its named limit."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")
        self.what = what
        self.size = size
        self.limit = limit


class InvalidBatchError(EngineError, ValueError):
    """A batch handed to ``append_raw`` is malformed, misplaced or fails its checksum."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid batch: {reason}")
        self.reason = reason


class LogClosedError(LogError):
    """The log was closed."""

    def __init__(self, path: str) -> None:
        super().__init__(f"log {path} is closed", path)


class LogFailedError(LogError):
    """A write or fsync failed, so the log stopped accepting writes (fail-stop).

    After a failed fsync the kernel may have dropped dirty pages, so retrying could report
    durability that does not exist. The log must be closed and reopened, which recovers it
    from what is really on disk.
    """

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(f"log {path} failed and refuses writes: {cause}", path)
        self.cause = cause


class LogLockedError(LogError):
    """Another process (or another ``Log`` in this one) holds the log directory."""

    def __init__(self, path: str) -> None:
        super().__init__(f"log directory {path} is in use by another writer", path)


# --- hash ring ------------------------------------------------------------------------


class EmptyRingError(EngineError, LookupError):
    """A lookup on a hash ring that has no nodes."""

    def __init__(self) -> None:
        super().__init__("the hash ring has no nodes")


class NodeNotFoundError(EngineError, KeyError):
    """A node that is not on the ring was named."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node

    def __str__(self) -> str:
        return f"node {self.node!r} is not on the ring"


# --- queues ---------------------------------------------------------------------------


class QueueError(EngineError):
    """Base for errors about one queue; ``queue`` is its name."""

    def __init__(self, message: str, queue: str) -> None:
        super().__init__(message)
        self.queue = queue


class QueueNotFoundError(QueueError, LookupError):
    """No queue by that name exists."""

    def __init__(self, queue: str) -> None:
        super().__init__(f"queue {queue!r} does not exist", queue)


class QueueExistsError(QueueError):
    """A queue by that name exists with different attributes."""

    def __init__(self, queue: str, differing: list[str]) -> None:
        super().__init__(
            f"queue {queue!r} already exists with different {', '.join(differing)}", queue
        )
        self.differing = differing


class QueueUnavailableError(QueueError):
    """The queue's log failed (fail-stop) or the broker is closed; nothing was changed."""

    def __init__(self, queue: str, reason: str) -> None:
        super().__init__(f"queue {queue!r} is unavailable: {reason}", queue)
        self.reason = reason


class StorageFullError(QueueUnavailableError):
    """The queue's disk is full (ENOSPC, or EDQUOT under a quota): a write was refused, so
    the queue stopped (fail-stop) with nothing acknowledged lost. It comes back once space
    is freed and the server restarts (or, if it never opened, on the next use)."""


# The errors that say the disk has no room, rather than that it failed.
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_full(exc: BaseException | None) -> bool:
    """Whether exc, or an error it was raised from, says the disk is full."""
    seen = 0
    while exc is not None and seen < 8:  # a cause chain is short; a cycle must not hang
        if isinstance(exc, OSError) and exc.errno in STORAGE_FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and getattr(
                exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        exc = exc.cause if isinstance(exc, LogFailedError) else exc.__cause__
        seen += 1
    return False


class QueueDamagedError(QueueUnavailableError):
    """The queue's stored data is damaged (a segment or its snapshot fails its checks): the
    queue stays closed, and every other queue serves on, until an operator verifies and
    salvages it (``conveyor log verify`` / ``salvage``, docs/OPERATIONS.md). ``path`` and
    ``position`` say where the damage was found."""

    def __init__(self, queue: str, reason: str, path: str, position: int) -> None:
        super().__init__(queue, reason)
        self.path = path
        self.position = position


def unavailable(queue: str, reason: str, cause: BaseException | None) -> QueueUnavailableError:
    """The error for a queue whose storage failed: StorageFullError when the disk is full,
    QueueDamagedError when its data is damaged (each its own code, so that an operator
    sees the cause), else QueueUnavailableError."""
    if storage_full(cause):
        return StorageFullError(queue, reason)
    if isinstance(cause, CorruptDataError):
        return QueueDamagedError(queue, reason, cause.path, cause.position)
    return QueueUnavailableError(queue, reason)


class InvalidParameterError(EngineError, ValueError):
    """A parameter or attribute value is malformed or out of its documented range."""

    def __init__(self, parameter: str, value: object, reason: str) -> None:
        shown = value if not isinstance(value, (bytes, str)) or len(value) < 80 else "..."
        super().__init__(f"invalid {parameter} {shown!r}: {reason}")
        self.parameter = parameter
        self.value = value
        self.reason = reason


class InvalidAttributeError(InvalidParameterError):
    """A queue or message attribute is unknown or has a bad value."""


class InvalidQueueNameError(InvalidParameterError):
    """A queue name breaks the naming rules (1..80 of [A-Za-z0-9_-], .fifo for FIFO)."""


class MissingParameterError(InvalidParameterError):
    """A parameter the request needs was not given (for example a FIFO message group)."""

    def __init__(self, parameter: str, reason: str) -> None:
        super().__init__(parameter, None, reason)


class MessageTooLargeError(InvalidParameterError):
    """A message (body plus attributes) is larger than the queue's maximum."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("message", f"{size} bytes", f"larger than the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class InvalidMessageContentsError(InvalidParameterError):
    """A message body holds characters outside the allowed set."""


class ReceiptInvalidError(EngineError, ValueError):
    """A receipt handle is malformed, forged, for another queue, or from an older lease.

    ``reason`` is one of "malformed", "forged", "other-queue" or "stale". The message it
    names (if any) is left untouched.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"receipt handle is invalid ({reason})")
        self.reason = reason


class MessageNotInflightError(EngineError):
    """A visibility change named a message that is not currently in flight."""

    def __init__(self) -> None:
        super().__init__("the message is not in flight")


class BatchEntryError(EngineError, ValueError):
    """A batch request is malformed as a whole (too many entries, repeated ids)."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.code = code


class BrokerClosedError(EngineError):
    """The broker was closed."""

    def __init__(self) -> None:
        super().__init__("the broker is closed")


class DataDirectoryLockedError(EngineError):
    """Another process holds the data directory."""

    def __init__(self, path: str) -> None:
        super().__init__(f"data directory {path} is in use by another process")
        self.path = path


class MemoryFullError(EngineError):
    """The queued messages of the broker hold all the memory they may (its
    ``memory_max``): a send is refused with nothing changed. Receives, deletes and
    dead-letter moves go on, and sends are taken again once consumers drain enough.
    ``retry_after_s`` is when to try again."""

    def __init__(self, used: int, limit: int, retry_after_s: float = 1.0) -> None:
        super().__init__(f"queued messages hold {used} bytes of memory, at the bound of "
                         f"{limit}: sends are refused until consumers catch up")
        self.used = used
        self.limit = limit
        self.retry_after_s = retry_after_s
