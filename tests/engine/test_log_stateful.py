"""engine.Log against the plain-Python ReferenceLog, one random operation at a time."""

from __future__ import annotations

import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import Log, format
from engine.errors import OffsetOutOfRangeError, RecordTooLargeError
from tests.support.reference import ReferenceLog

SEGMENT_BYTES_MAX = 1024
records_strategy = st.lists(st.binary(max_size=120), min_size=1, max_size=8)


class LogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="conveyor-stateful-")
        self.log = self._open()
        self.ref = ReferenceLog(SEGMENT_BYTES_MAX)

    def _open(self) -> Log:
        # A tiny index interval makes reads walk from index entries, not just from 0.
        return Log(self.dir, fsync="never", segment_bytes_max=SEGMENT_BYTES_MAX,
                   index_interval_bytes=96, buffer_bytes=512)

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _offset(self, data: st.DataObject, slack: int = 0) -> int:
        return data.draw(st.integers(self.ref.first_offset, self.ref.next_offset + slack))

    @rule(records=records_strategy)
    def append_batch(self, records: list[bytes]) -> None:
        if format.batch_bytes([len(r) for r in records]) > self.log.batch_bytes_max:
            try:
                self.log.append_batch(records)
            except RecordTooLargeError:
                return
            raise AssertionError("an oversized batch was accepted")
        assert self.log.append_batch(records) == self.ref.append_batch(records)

    @rule(record=st.binary(max_size=200))
    def append(self, record: bytes) -> None:
        assert self.log.append(record) == self.ref.append_batch([record])

    @rule(data=st.data(), max_records=st.integers(1, 40))
    def read(self, data: st.DataObject, max_records: int) -> None:
        offset = self._offset(data)
        got = self.log.read(offset, max_records).tolist()
        assert got == self.ref.read(offset, max_records)

    @rule(data=st.data())
    def read_raw_is_whole_batches(self, data: st.DataObject) -> None:
        offset = self._offset(data)
        raw = self.log.read_raw(offset, 300)
        if offset == self.ref.next_offset:
            assert raw == b""
            return
        header = format.decode_batch_header(raw)
        assert header.base_offset <= offset < header.base_offset + header.record_count

    @rule(data=st.data())
    def truncate_before(self, data: st.DataObject) -> None:
        offset = self._offset(data, slack=3)
        assert self.log.truncate_before(offset) == self.ref.truncate_before(offset)

    @rule(data=st.data())
    def truncate_after(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(max(0, self.ref.first_offset - 2),
                                       self.ref.next_offset + 2))
        if offset < self.ref.first_offset:
            try:
                self.log.truncate_after(offset)
            except OffsetOutOfRangeError:
                return
            raise AssertionError("truncated below first_offset")
        assert self.log.truncate_after(offset) == self.ref.truncate_after(offset)

    @rule()
    def flush(self) -> None:
        self.log.flush()
        assert self.log.durable_offset == self.ref.next_offset

    @rule()
    def close_and_reopen(self) -> None:
        self.log.close()
        self.log = self._open()
        assert self.log.recovery.dropped_bytes == 0

    @precondition(lambda self: self.ref.next_offset > self.ref.first_offset)
    @rule()
    def release_handles(self) -> None:
        self.log.release_handles()

    @invariant()
    def same_offsets_and_segments(self) -> None:
        assert self.log.next_offset == self.ref.next_offset
        assert self.log.first_offset == self.ref.first_offset
        assert self.log.segment_count == len(self.ref.segments)

    @invariant()
    def same_records(self) -> None:
        assert list((o, bytes(p)) for o, p in self.log.iter_records()) == self.ref.records()


LogMachine.TestCase.settings = settings(stateful_step_count=40)
TestLog = LogMachine.TestCase
