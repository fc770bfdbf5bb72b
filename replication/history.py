"""A log's epoch history, and the offset where two replicas' logs stop agreeing.

Every batch header carries the epoch of the leader that wrote it (docs/FORMAT.md), so a
log's history - the first offset of each epoch, in order - is read off the log itself and
can never disagree with it. A replica only ever appends a leader's batches after making
its log a prefix of that leader's, and one epoch has one leader, so two logs agree on every
record up to the end of the newest epoch they share: the leader tells a follower to cut
its log there, and whatever an old leader wrote that the new one never had is gone. A log
installed from a snapshot at S starts at S; the history before S comes with the snapshot
and is kept beside it (engine/install.py, ``epochs``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from engine import format as fmt
from engine._segment import batch_spans
from engine.log import Log

_BATCH = struct.Struct("<QQ")  # base offset, epoch: adjacent in the header
_COUNT = struct.Struct("<I")
SCAN_BYTES = 1 << 20

History = list[tuple[int, int]]
"""(epoch, first offset) for each run of batches of one epoch, ascending."""


class EpochHistory:
    """A log's history, read incrementally: only batches appended since the last call."""

    def __init__(self, seed: Sequence[tuple[int, int]] = ()) -> None:
        self.entries: History = list(seed)
        """Seeded with the history before the log's first offset, for a log that starts
        past 0 (installed from a snapshot, engine/install.py: its batches are gone)."""
        self._scanned_to = 0

    def update(self, log: Log) -> History:
        """Read the batches past the last scan; return the whole history."""
        end = log.next_offset
        offset = max(self._scanned_to, log.first_offset)
        while offset < end:
            data = log.read_raw(offset, SCAN_BYTES)
            if not data:
                break
            offset = self.note(data)
        self._scanned_to = max(self._scanned_to, offset)
        return self.entries

    def note(self, data: bytes | memoryview) -> int:
        """Take in whole batches just appended or read; return the offset after them."""
        view = memoryview(data)
        after = self._scanned_to
        for start, _ in batch_spans(view):
            base, epoch = _BATCH.unpack_from(view, start + fmt.BATCH_BASE_OFFSET_AT)
            (count,) = _COUNT.unpack_from(view, start + fmt.BATCH_RECORD_COUNT_AT)
            if not self.entries or self.entries[-1][0] != epoch:
                self.entries.append((epoch, base))
            after = base + count
        self._scanned_to = max(self._scanned_to, after)
        return after

    def truncate(self, offset: int) -> None:
        """The log was cut to end at offset."""
        self.entries = [(e, o) for e, o in self.entries if o < offset]
        self._scanned_to = min(self._scanned_to, offset)


def batch_end(data: bytes | memoryview) -> int:
    """The offset after the last of these whole batches."""
    view = memoryview(data)
    spans = batch_spans(view)
    start = spans[-1][0]
    (base,) = struct.unpack_from("<Q", view, start + fmt.BATCH_BASE_OFFSET_AT)
    (count,) = _COUNT.unpack_from(view, start + fmt.BATCH_RECORD_COUNT_AT)
    return int(base) + int(count)


def batch_base(data: bytes | memoryview) -> int:
    """The base offset of the first of these whole batches."""
    (base,) = struct.unpack_from("<Q", data, fmt.BATCH_BASE_OFFSET_AT)
    return int(base)


def divergence(leader: Sequence[tuple[int, int]], leader_end: int,
               follower: Sequence[tuple[int, int]], follower_end: int) -> int:
    """The offset up to which a follower's log agrees with its leader's.

    The newest epoch in both histories ends, in each log, where the next epoch begins or
    the log ends; the logs agree up to the nearer of the two ends, and not beyond it.
    """
    leader_epochs = {epoch: i for i, (epoch, _) in enumerate(leader)}
    for j in range(len(follower) - 1, -1, -1):
        epoch = follower[j][0]
        i = leader_epochs.get(epoch)
        if i is None:
            continue
        leader_stop = leader[i + 1][1] if i + 1 < len(leader) else leader_end
        follower_stop = follower[j + 1][1] if j + 1 < len(follower) else follower_end
        return min(leader_stop, follower_stop)
    return 0
