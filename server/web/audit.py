"""The access log: one JSON line per request, on stdout (docs/API.md, docs/OPERATIONS.md).

The lines of the requests answered in one turn of the event loop are written together, in
one call to the stream, early in the next turn. Written one by one through the logging
module (a log record made, a handler's lock, a write and a flush each), the log cost a
SendMessage about 40 µs of server CPU; written a turn at a time, and each line made by
orjson, about 15 (docs/PERFORMANCE.md, "The access log").

What waits to be written is bounded by what one turn of the loop answers: a few requests
(pipelined ones) on each of the connections served at once (``--connections-max``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, TextIO

from server.web.params import dump_json

_log = logging.getLogger("conveyor.server")


class AuditLog:
    """Collects the lines of one turn of the loop; see the module docstring."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        """None: sys.stdout as it is when the lines are written."""
        self._lines: list[str] = []
        self._due = False
        self.dropped = 0
        """Lines lost to a failed write (stdout closed, say)."""

    def write(self, line: dict[str, Any]) -> None:
        """Queue one request's line; on the event loop."""
        self._lines.append(dump_json(line).decode())
        if not self._due:
            asyncio.get_running_loop().call_soon(self.flush)
            self._due = True  # only once scheduled: else no later line would schedule it

    def flush(self) -> None:
        """Write what is queued now (in the turn after the lines', and at shutdown)."""
        lines, self._lines, self._due = self._lines, [], False
        if not lines:
            return
        stream = self._stream or sys.stdout
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: a closed stream
            if not self.dropped:
                _log.warning("access log: cannot write to %s: %s; lines are dropped",
                             getattr(stream, "name", "its stream"), exc)
            self.dropped += len(lines)
