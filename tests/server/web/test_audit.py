"""The access log's writer (server/web/audit.py): one write per turn of the event loop."""

from __future__ import annotations

import asyncio
import io
import json

from server.web.audit import AuditLog


class Counting(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_the_lines_of_one_turn_are_written_together_at_its_end() -> None:
    stream = Counting()
    audit = AuditLog(stream)
    for i in range(5):
        audit.write({"n": i})
    assert stream.writes == 0  # not during the turn
    await asyncio.sleep(0)
    assert stream.writes == 1
    assert [json.loads(line) for line in stream.getvalue().splitlines()] == [
        {"n": i} for i in range(5)]
    audit.write({"n": 5})
    await asyncio.sleep(0)
    assert stream.writes == 2
    assert stream.getvalue().splitlines()[-1] == '{"n":5}'


async def test_a_stream_that_fails_loses_lines_not_requests() -> None:
    stream = io.StringIO()
    stream.close()
    audit = AuditLog(stream)
    audit.write({"n": 1})
    audit.write({"n": 2})
    await asyncio.sleep(0)  # the write fails in the callback, and is counted
    assert audit.dropped == 2
    audit.flush()  # nothing left queued
    assert audit.dropped == 2
