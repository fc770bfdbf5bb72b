"""Slow, obviously right versions of the engine's structures, for tests to compare against.

Nothing here is fast or durable; everything is a list or a dict. The stateful tests drive
the real implementation and these side by side and compare after every step.
"""

from __future__ import annotations

import bisect
import dataclasses

import xxhash

from engine import format
from engine.log import TRUNCATE_ROLL_BYTES


@dataclasses.dataclass
class _Batch:
    base: int
    records: list[bytes]
    size: int


@dataclasses.dataclass
class _Segment:
    base: int
    batches: list[_Batch] = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(b.size for b in self.batches)

    @property
    def next_offset(self) -> int:
        if not self.batches:
            return self.base
        last = self.batches[-1]
        return last.base + len(last.records)


class ReferenceLog:
    """A log as a list of segments of batches of records (uncompressed sizes)."""

    def __init__(self, segment_bytes_max: int) -> None:
        self.segment_bytes_max = segment_bytes_max
        self.segments = [_Segment(0)]

    @property
    def next_offset(self) -> int:
        return self.segments[-1].next_offset

    @property
    def first_offset(self) -> int:
        return self.segments[0].base

    def append_batch(self, records: list[bytes]) -> int:
        size = format.batch_bytes([len(r) for r in records])
        active = self.segments[-1]
        if active.batches and active.size + size > self.segment_bytes_max:
            self._roll()
            active = self.segments[-1]
        first = active.next_offset
        active.batches.append(_Batch(first, list(records), size))
        return first

    def _roll(self) -> None:
        self.segments.append(_Segment(self.next_offset))

    def records(self) -> list[tuple[int, bytes]]:
        return [
            (batch.base + i, record)
            for segment in self.segments
            for batch in segment.batches
            for i, record in enumerate(batch.records)
        ]

    def read(self, offset: int, max_records: int) -> list[tuple[int, bytes]]:
        return [(o, r) for o, r in self.records() if o >= offset][:max_records]

    def truncate_before(self, offset: int) -> int:
        active = self.segments[-1]
        if offset >= self.next_offset and active.size >= min(
            TRUNCATE_ROLL_BYTES, self.segment_bytes_max
        ):
            self._roll()
        while len(self.segments) > 1 and self.segments[0].next_offset <= offset:
            del self.segments[0]
        return self.first_offset

    def truncate_after(self, offset: int) -> int:
        if offset >= self.next_offset:
            return self.next_offset
        while len(self.segments) > 1 and self.segments[-1].base >= offset:
            del self.segments[-1]
        active = self.segments[-1]
        while active.batches and active.batches[-1].base + len(active.batches[-1].records) > offset:
            active.batches.pop()
        return self.next_offset


class ReferenceRing:
    """A consistent-hash ring as a sorted list of (position, node) and bisect."""

    def __init__(self, vnodes: int = 128) -> None:
        self.vnodes = vnodes
        self.weights: dict[str, float] = {}

    def add(self, node: str, weight: float = 1) -> None:
        self.weights[node] = weight

    def remove(self, node: str) -> None:
        del self.weights[node]

    def _points(self) -> list[tuple[int, str]]:
        points = []
        for node, weight in self.weights.items():
            count = max(1, round(self.vnodes * weight))
            points += [(xxhash.xxh3_64_intdigest(f"{node}#{i}".encode()), node)
                       for i in range(count)]
        return sorted(points)

    def lookup(self, key: str) -> str:
        return self.preference_list(key, 1)[0]

    def preference_list(self, key: str, n: int) -> list[str]:
        if n == 0:
            return []
        points = self._points()
        h = xxhash.xxh3_64_intdigest(key.encode())
        start = bisect.bisect_left(points, (h, ""))
        out: list[str] = []
        for step in range(len(points)):
            node = points[(start + step) % len(points)][1]
            if node not in out:
                out.append(node)
            if len(out) == min(n, len(self.weights)):
                break
        return out
