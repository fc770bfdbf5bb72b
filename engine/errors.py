"""The one exception hierarchy of Conveyor.

Every error the engine raises on purpose derives from :class:`EngineError`. The server and
the replication layer subclass these rather than starting new roots. Errors from the
operating system stay :class:`OSError`, except where they end a log's life (see
:class:`LogFailedError`).

Errors carry structured attributes (``.path``, ``.offset``, ``.limit`` ...) so that
callers never parse messages.
"""

from __future__ import annotations


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


class CorruptSegmentError(LogError):
    """A sealed segment (or a read of any segment) failed its checksum or structure check.

    The segment is left untouched for an operator to inspect: it is never silently
    truncated. ``offset`` is the log offset where the bad batch was expected and
    ``position`` its byte position in the file.
    """

    def __init__(self, path: str, offset: int, position: int, reason: str) -> None:
        super().__init__(
            f"corrupt segment {path} at byte {position} (offset {offset}): {reason}", path
        )
        self.offset = offset
        self.position = position
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
