"""Segment files of a partition log: append, read, flush, sync, recover, truncate.

Policy (rolling, retention, fsync scheduling, configuration) lives in engine/log.py; this
module is about bytes and offsets. docs/FORMAT.md draws the layouts; their constants come
from engine/_format.pxd, which engine/format.py mirrors for Python code, and
tests/engine/test_format.py checks that the two agree.

Concurrency: not thread-safe; the caller serialises every call on one Segment. The one
exception is sync(), which may run in another thread while appends continue, because it
fsyncs a duplicate of the descriptor.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.memoryview cimport PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from libc.errno cimport EINTR, EIO, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy, memset
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec
from posix.types cimport off_t

from engine._format cimport (
    BATCH_BASE_OFFSET_AT,
    BATCH_CHECKSUM_AT,
    BATCH_CHECKSUMMED_FROM,
    BATCH_EPOCH_AT,
    BATCH_FLAGS_AT,
    BATCH_HEADER_BYTES,
    BATCH_MAGIC_AT,
    BATCH_MAGIC_U32,
    BATCH_PAYLOAD_BYTES_AT,
    BATCH_RECORD_COUNT_AT,
    BATCH_RESERVED_AT,
    BATCH_TIMESTAMP_AT,
    BATCH_VERSION,
    BATCH_VERSION_AT,
    FLAG_ZSTD,
    FLAGS_KNOWN,
    INDEX_BASE_OFFSET_AT,
    INDEX_CHECKSUM_AT,
    INDEX_CHECKSUMMED_FROM,
    INDEX_ENTRY_BYTES,
    INDEX_ENTRY_COUNT_AT,
    INDEX_HEADER_BYTES,
    INDEX_MAGIC_AT,
    INDEX_MAGIC_U32,
    INDEX_NEXT_OFFSET_AT,
    INDEX_SEGMENT_BYTES_AT,
    INDEX_VERSION,
    INDEX_VERSION_AT,
    RECORD_LENGTH_BYTES,
    format_constants,
)
from engine._xxh cimport XXH3_64bits

import os

from engine.errors import (
    CorruptSegmentError,
    InvalidBatchError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
)

cdef extern from "<unistd.h>" nogil:
    ssize_t c_pread "pread"(int fd, void* buf, size_t count, off_t offset)
    ssize_t c_pwrite "pwrite"(int fd, const void* buf, size_t count, off_t offset)
    int c_fdatasync "fdatasync"(int fd)
    int c_ftruncate "ftruncate"(int fd, off_t length)
    int c_dup "dup"(int fd)
    int c_close "close"(int fd)


# A read fetches at least this much when it must look past the first batch, so that a
# run of small batches costs one pread.
cdef size_t READ_AHEAD_BYTES = 32 * 1024
# Recovery reads the file in chunks of this size (grown for larger batches).
cdef size_t SCAN_CHUNK_BYTES = 1024 * 1024
# After a flush, a write buffer grown past this (by a large batch) is given back.
cdef size_t BUFFER_KEEP_BYTES = 1024 * 1024

# The constants as compiled here, for test_format.py to compare with engine/format.py.
FORMAT_CONSTANTS = format_constants()


# --- little-endian loads and stores (compile to plain moves on x86) ----------------

cdef inline uint32_t ld32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline uint64_t ld64(const unsigned char* p) noexcept nogil:
    return <uint64_t>ld32(p) | (<uint64_t>ld32(p + 4) << 32)


cdef inline void st32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline void st64(unsigned char* p, uint64_t v) noexcept nogil:
    st32(p, <uint32_t>v)
    st32(p + 4, <uint32_t>(v >> 32))


cdef inline int64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


# --- batch header ---------------------------------------------------------------------

cdef inline void seal_header(unsigned char* p, uint8_t flags, uint64_t base, uint64_t epoch,
                             int64_t ts, uint32_t count, uint32_t payload) noexcept nogil:
    """Fill the header in front of an already written payload, checksum last."""
    st32(p + BATCH_MAGIC_AT, BATCH_MAGIC_U32)
    p[BATCH_VERSION_AT] = BATCH_VERSION
    p[BATCH_FLAGS_AT] = flags
    p[BATCH_RESERVED_AT] = 0
    p[BATCH_RESERVED_AT + 1] = 0
    st64(p + BATCH_BASE_OFFSET_AT, base)
    st64(p + BATCH_EPOCH_AT, epoch)
    st64(p + BATCH_TIMESTAMP_AT, <uint64_t>ts)
    st32(p + BATCH_RECORD_COUNT_AT, count)
    st32(p + BATCH_PAYLOAD_BYTES_AT, payload)
    st64(p + BATCH_CHECKSUM_AT, XXH3_64bits(p + BATCH_CHECKSUMMED_FROM,
                                            BATCH_HEADER_BYTES - BATCH_CHECKSUMMED_FROM + payload))


cdef inline const char* check_header(const unsigned char* p, uint64_t expected_base,
                                     uint32_t batch_bytes_max) noexcept nogil:
    """Why the header cannot start a valid batch at expected_base, or NULL if it can."""
    cdef const char* reason = check_shape(p, batch_bytes_max)
    if reason != NULL:
        return reason
    if ld64(p + BATCH_BASE_OFFSET_AT) != expected_base:
        return "base offset out of sequence"
    return NULL


cdef inline const char* check_shape(const unsigned char* p,
                                    uint32_t batch_bytes_max) noexcept nogil:
    """Every header check but the base offset's (which needs the batch before it)."""
    cdef uint32_t count = ld32(p + BATCH_RECORD_COUNT_AT)
    cdef uint32_t payload = ld32(p + BATCH_PAYLOAD_BYTES_AT)
    if ld32(p + BATCH_MAGIC_AT) != BATCH_MAGIC_U32:
        return "bad magic"
    if p[BATCH_VERSION_AT] != BATCH_VERSION:
        return "unknown batch version"
    if p[BATCH_FLAGS_AT] & ~FLAGS_KNOWN:
        return "unknown flag bits"
    if p[BATCH_RESERVED_AT] or p[BATCH_RESERVED_AT + 1]:
        return "reserved bytes are not zero"
    if count == 0:
        return "empty batch"
    if payload > batch_bytes_max - BATCH_HEADER_BYTES:
        return "batch larger than the batch limit"
    if not (p[BATCH_FLAGS_AT] & FLAG_ZSTD) and count > payload // RECORD_LENGTH_BYTES:
        return "record count does not fit the payload"
    return NULL


cdef inline bint checksum_ok(const unsigned char* p) noexcept nogil:
    cdef uint32_t payload = ld32(p + BATCH_PAYLOAD_BYTES_AT)
    return (XXH3_64bits(p + BATCH_CHECKSUMMED_FROM,
                        BATCH_HEADER_BYTES - BATCH_CHECKSUMMED_FROM + payload)
            == ld64(p + BATCH_CHECKSUM_AT))


cdef int walk_records(const unsigned char* area, uint32_t nbytes, uint32_t count,
                      uint32_t* starts, uint32_t* lengths, uint32_t area_at) noexcept nogil:
    """Check a record area and, if starts is given, note each record's place. 0 if valid."""
    cdef uint32_t pos = 0
    cdef uint32_t n
    cdef uint32_t i
    for i in range(count):
        if nbytes - pos < RECORD_LENGTH_BYTES:
            return -1
        n = ld32(area + pos)
        pos += RECORD_LENGTH_BYTES
        if n > nbytes - pos:
            return -1
        if starts != NULL:
            starts[i] = area_at + pos
            lengths[i] = n
        pos += n
    return 0 if pos == nbytes else -1


# --- small helpers ----------------------------------------------------------------------

cdef int pwrite_all(int fd, const unsigned char* p, size_t n, uint64_t pos) noexcept nogil:
    """pwrite() until done: a short write (a disk filling part-way) carries on from where
    it stopped, and the call that cannot go on returns its errno (ENOSPC, EIO ...), which
    the caller raises and engine/log.py turns into fail-stop. Returns 0 or an errno value.

    Positional, so that no write depends on where a descriptor's file position was left
    (recovery reads with pread, and truncation moves the end).
    """
    cdef ssize_t r
    while n:
        r = c_pwrite(fd, p, n, <off_t>pos)
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        if r == 0:
            return EIO  # never from a regular file; looping on it would spin forever
        p += r
        n -= <size_t>r
        pos += <uint64_t>r
    return 0


cdef int pread_all(int fd, unsigned char* p, size_t n, uint64_t pos) noexcept nogil:
    """pread() exactly n bytes. Returns 0 or an errno value (EIO for a short file)."""
    cdef ssize_t r
    while n:
        r = c_pread(fd, p, n, <off_t>pos)
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        if r == 0:
            return EIO
        p += r
        n -= <size_t>r
        pos += <uint64_t>r
    return 0


cdef inline object os_error(int err, str path):
    return OSError(err, os.strerror(err), path)


cdef Py_ssize_t buffer_length(object obj) except -1:
    cdef Py_buffer view
    if type(obj) is bytes:
        return PyBytes_GET_SIZE(obj)
    PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
    n = view.len
    PyBuffer_Release(&view)
    return n


cdef int copy_record(object obj, unsigned char* dst) except -1:
    """Write one record (u32 length, bytes) at dst."""
    cdef Py_buffer view
    cdef Py_ssize_t n
    if type(obj) is bytes:
        n = PyBytes_GET_SIZE(obj)
        st32(dst, <uint32_t>n)
        memcpy(dst + RECORD_LENGTH_BYTES, PyBytes_AS_STRING(obj), n)
        return 0
    PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
    st32(dst, <uint32_t>view.len)
    memcpy(dst + RECORD_LENGTH_BYTES, view.buf, view.len)
    PyBuffer_Release(&view)
    return 0


def batch_spans(data):
    """Split concatenated batches into ``[(start, end), ...]`` by their header lengths.

    Only framing is checked here; each batch is fully validated when it is appended.
    """
    cdef Py_buffer view
    cdef const unsigned char* p
    cdef size_t pos = 0
    cdef size_t n
    cdef size_t total
    spans = []
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        p = <const unsigned char*>view.buf
        n = <size_t>view.len
        while pos < n:
            if n - pos < BATCH_HEADER_BYTES:
                raise InvalidBatchError("data ends inside a batch header")
            if ld32(p + pos + BATCH_MAGIC_AT) != BATCH_MAGIC_U32:
                raise InvalidBatchError(f"bad magic at byte {pos}")
            total = BATCH_HEADER_BYTES + <size_t>ld32(p + pos + BATCH_PAYLOAD_BYTES_AT)
            if total > n - pos:
                raise InvalidBatchError(f"batch at byte {pos} runs past the end of the data")
            spans.append((pos, pos + total))
            pos += total
    finally:
        PyBuffer_Release(&view)
    return spans


# --- a read result ----------------------------------------------------------------------

cdef class Records:
    """Consecutive records returned by one read, as views into one buffer.

    ``records[i]`` is ``(offset, memoryview)``; iteration yields the same pairs. Nothing is
    built per record until it is asked for. The views stay valid for as long as they are
    referenced, whatever later happens to the log.
    """

    def __cinit__(self):
        self._starts = NULL
        self._lengths = NULL
        self._count = 0

    def __dealloc__(self):
        PyMem_Free(self._starts)
        PyMem_Free(self._lengths)

    cdef int _reserve(self, Py_ssize_t n) except -1:
        self._starts = <uint32_t*>PyMem_Malloc(n * sizeof(uint32_t) + 1)
        self._lengths = <uint32_t*>PyMem_Malloc(n * sizeof(uint32_t) + 1)
        if self._starts == NULL or self._lengths == NULL:
            raise MemoryError()
        return 0

    cdef object payload_at(self, Py_ssize_t i):
        # A new view on the same managed buffer, narrowed to the record before anyone
        # sees it. This is what slicing does internally, minus the slice object and two
        # ints, which were most of the cost of reading small records.
        cdef Py_buffer* narrowed
        if self._view is None:
            self._view = memoryview(self._owner)
        view = PyMemoryView_FromObject(self._view)
        narrowed = PyMemoryView_GET_BUFFER(view)
        narrowed.buf = <char*>narrowed.buf + self._starts[i]
        narrowed.len = self._lengths[i]
        narrowed.shape[0] = self._lengths[i]
        return view

    @property
    def next_offset(self):
        """The offset after the last record here: where the next read continues."""
        return self.first_offset + <uint64_t>self._count

    def __len__(self):
        return self._count

    def __getitem__(self, Py_ssize_t i):
        if i < 0:
            i += self._count
        if i < 0 or i >= self._count:
            raise IndexError("record index out of range")
        return (self.first_offset + <uint64_t>i, self.payload_at(i))

    def __iter__(self):
        return _RecordsIter(self)

    def payload(self, Py_ssize_t i):
        """The i-th record's bytes as a memoryview."""
        return self[i][1]

    def offsets(self):
        return range(self.first_offset, self.first_offset + <uint64_t>self._count)

    @property
    def payload_bytes(self):
        """Total length of the records' payloads."""
        cdef Py_ssize_t i
        cdef uint64_t total = 0
        for i in range(self._count):
            total += self._lengths[i]
        return total

    def payloads(self):
        return [self.payload_at(i) for i in range(self._count)]

    def tolist(self):
        """``[(offset, bytes), ...]``: copies, for callers that keep records around."""
        return [(self.first_offset + <uint64_t>i, bytes(self.payload_at(i)))
                for i in range(self._count)]

    def __repr__(self):
        return f"<Records offsets {self.first_offset}..{self.next_offset} ({self._count})>"


cdef class _RecordsIter:
    cdef Records _records
    cdef Py_ssize_t _i

    def __cinit__(self, Records records):
        self._records = records
        self._i = 0

    def __iter__(self):
        return self

    def __next__(self):
        cdef Py_ssize_t i = self._i
        if i >= self._records._count:
            raise StopIteration
        self._i = i + 1
        return (self._records.first_offset + <uint64_t>i, self._records.payload_at(i))


def concat(Records first, Records second):
    """Records of first followed by those of second, which must continue it."""
    cdef Records out
    cdef Py_ssize_t i
    cdef Py_ssize_t n = first._count
    cdef Py_ssize_t shift
    if second.first_offset != first.first_offset + <uint64_t>n:
        raise ValueError("the second Records does not continue the first")
    out = Records.__new__(Records)
    out.first_offset = first.first_offset
    out._owner = first._owner + second._owner
    if len(out._owner) > 0xFFFFFFFF:
        raise ValueError("joined records exceed 4 GiB")
    out._reserve(n + second._count)
    shift = len(first._owner)
    for i in range(n):
        out._starts[i] = first._starts[i]
        out._lengths[i] = first._lengths[i]
    for i in range(second._count):
        out._starts[n + i] = <uint32_t>(second._starts[i] + shift)
        out._lengths[n + i] = second._lengths[i]
    out._count = n + second._count
    return out


cdef Records empty_records(uint64_t offset):
    cdef Records r = Records.__new__(Records)
    r.first_offset = offset
    r._owner = b""
    return r


# --- a segment --------------------------------------------------------------------------

cdef class Segment:
    """One segment file ``{base_offset:020d}.log`` and its in-memory sparse index.

    A new Segment is not usable until one of ``recover()``, ``rebuild_index()`` or
    ``load_index()`` has established where its batches are. Limits are enforced here;
    the caller picks them (engine/log.py).
    """

    def __cinit__(self, str path, uint64_t base_offset, *, bint writable,
                  uint32_t record_bytes_max, uint32_t batch_bytes_max,
                  uint64_t segment_bytes_max, uint32_t index_interval_bytes,
                  size_t flush_bytes):
        self._fd = -1
        self._buf = NULL
        self._idx_rel = NULL
        self._idx_pos = NULL
        self.path = path
        self.base_offset = base_offset
        self.next_offset = base_offset
        self._writable = writable
        self._record_bytes_max = record_bytes_max
        self._batch_bytes_max = batch_bytes_max
        self._segment_bytes_max = segment_bytes_max
        self._index_interval = index_interval_bytes
        self._flush_bytes = flush_bytes
        self.last_timestamp_ms = -1
        self._ensure_fd()
        self._written = <uint64_t>os.fstat(self._fd).st_size
        self.size = self._written

    def __dealloc__(self):
        if self._fd >= 0:
            c_close(self._fd)
        PyMem_Free(self._buf)
        PyMem_Free(self._idx_rel)
        PyMem_Free(self._idx_pos)

    # -- descriptors ------------------------------------------------------------------

    cdef int _ensure_fd(self) except -1:
        if self._closed:
            raise ValueError(f"segment {self.path} is closed")
        if self._fd < 0:
            flags = os.O_CLOEXEC | (os.O_RDWR | os.O_CREAT if self._writable else os.O_RDONLY)
            self._fd = os.open(self.path, flags, 0o644)
        return 0

    def release_fd(self):
        """Flush and close the descriptor; the next operation that needs it reopens it."""
        if self._fd >= 0:
            self.flush()
            c_close(self._fd)
            self._fd = -1

    @property
    def fd_open(self):
        return self._fd >= 0

    @property
    def writable(self):
        return self._writable

    @property
    def buffered_bytes(self):
        """Bytes appended but not yet handed to the operating system."""
        return self._buf_len

    @property
    def index_entries(self):
        return [(self._idx_rel[i], self._idx_pos[i]) for i in range(self._idx_len)]

    def seal(self):
        """Flush and stop accepting appends; the segment stays readable."""
        self.flush()
        self._writable = False

    def close(self, bint discard=False):
        """Flush what is buffered (or, with discard, drop it) and close. Idempotent."""
        if self._closed:
            return
        try:
            if self._buf_len and not discard:
                self.flush()
        finally:
            if self._fd >= 0:
                c_close(self._fd)
                self._fd = -1
            self._closed = True

    # -- writing ------------------------------------------------------------------------

    cdef int _reserve_buf(self, size_t extra) except -1:
        cdef size_t need = self._buf_len + extra
        cdef size_t cap
        cdef unsigned char* grown
        if need <= self._buf_cap:
            return 0
        cap = self._buf_cap * 2 if self._buf_cap else 4096
        while cap < need:
            cap *= 2
        grown = <unsigned char*>PyMem_Realloc(self._buf, cap)
        if grown == NULL:
            raise MemoryError()
        self._buf = grown
        self._buf_cap = cap
        return 0

    cdef int _index_add(self, uint64_t offset, uint64_t pos) except -1:
        """Index the batch at pos if it is far enough past the last indexed one."""
        if self._idx_len and pos - self._idx_pos[self._idx_len - 1] < self._index_interval:
            return 0
        return self._index_push(<uint32_t>(offset - self.base_offset), <uint32_t>pos)

    cdef int _index_push(self, uint32_t rel, uint32_t pos) except -1:
        cdef size_t cap
        cdef uint32_t* grown
        if self._idx_len == self._idx_cap:
            cap = self._idx_cap * 2 if self._idx_cap else 64
            grown = <uint32_t*>PyMem_Realloc(self._idx_rel, cap * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self._idx_rel = grown
            grown = <uint32_t*>PyMem_Realloc(self._idx_pos, cap * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self._idx_pos = grown
            self._idx_cap = cap
        self._idx_rel[self._idx_len] = rel
        self._idx_pos[self._idx_len] = pos
        self._idx_len += 1
        return 0

    cdef uint64_t _index_lookup(self, uint64_t offset, uint64_t* base_out) noexcept:
        """Byte position and base offset of the last indexed batch at or before offset."""
        cdef uint64_t rel = offset - self.base_offset
        cdef size_t lo = 0
        cdef size_t hi = self._idx_len
        cdef size_t mid
        while lo < hi:
            mid = (lo + hi) // 2
            if self._idx_rel[mid] <= rel:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            base_out[0] = self.base_offset
            return 0
        base_out[0] = self.base_offset + self._idx_rel[lo - 1]
        return self._idx_pos[lo - 1]

    cdef int _commit_batch(self, size_t at, uint64_t base, uint32_t count,
                           int64_t ts, uint64_t epoch, size_t total) except -1:
        """Account for a complete batch placed at _buf[at:at + total]."""
        self._index_add(base, self.size)
        self._buf_len = at + total
        self.size += total
        self.next_offset = base + count
        self.last_timestamp_ms = ts
        self.last_epoch = epoch
        return self._maybe_flush()

    cdef int _maybe_flush(self) except -1:
        if self._buf_len >= self._flush_bytes:
            self.flush()
        return 0

    cdef int _check_append(self, size_t total) except -1:
        if not self._writable:
            raise ValueError(f"segment {self.path} is sealed")
        if total > self._batch_bytes_max:
            raise RecordTooLargeError("batch", total, self._batch_bytes_max)
        return 0

    def append_one(self, payload, int64_t timestamp_ms=-1, uint64_t epoch=0):
        """Append a batch of one record; return its offset, or -1 if the segment is full."""
        cdef Py_buffer view
        cdef bint release = False
        cdef const unsigned char* p
        cdef Py_ssize_t n
        cdef size_t total
        cdef unsigned char* q
        cdef uint64_t base = self.next_offset
        if type(payload) is bytes:
            p = <const unsigned char*>PyBytes_AS_STRING(payload)
            n = PyBytes_GET_SIZE(payload)
        else:
            PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
            release = True
            p = <const unsigned char*>view.buf
            n = view.len
        try:
            if <size_t>n > self._record_bytes_max:
                raise RecordTooLargeError("record", n, self._record_bytes_max)
            total = BATCH_HEADER_BYTES + RECORD_LENGTH_BYTES + <size_t>n
            self._check_append(total)
            if self.size and self.size + total > self._segment_bytes_max:
                return -1
            self._ensure_fd()
            self._reserve_buf(total)
            q = self._buf + self._buf_len
            st32(q + BATCH_HEADER_BYTES, <uint32_t>n)
            memcpy(q + BATCH_HEADER_BYTES + RECORD_LENGTH_BYTES, p, n)
        finally:
            if release:
                PyBuffer_Release(&view)
        if timestamp_ms < 0:
            timestamp_ms = now_ms()
        seal_header(q, 0, base, epoch, timestamp_ms, 1, <uint32_t>(total - BATCH_HEADER_BYTES))
        self._commit_batch(self._buf_len, base, 1, timestamp_ms, epoch, total)
        return base

    def append(self, records, int64_t timestamp_ms=-1, uint64_t epoch=0, compress=None):
        """Append records as one batch; return the first offset, or -1 if it does not fit.

        ``compress``, if given, maps the record area to a zstd frame; the compressed form
        is kept only when it is smaller.
        """
        cdef list seq = records if type(records) is list else list(records)
        cdef Py_ssize_t count = len(seq)
        cdef Py_ssize_t n
        cdef size_t area = 0
        cdef size_t total
        cdef size_t pos
        cdef uint8_t flags = 0
        cdef unsigned char* q
        cdef uint64_t base = self.next_offset
        if count == 0:
            raise ValueError("a batch holds at least one record")
        for r in seq:
            n = buffer_length(r)
            if <size_t>n > self._record_bytes_max:
                raise RecordTooLargeError("record", n, self._record_bytes_max)
            area += RECORD_LENGTH_BYTES + <size_t>n
        total = BATCH_HEADER_BYTES + area
        self._check_append(total)
        if compress is not None:
            packed = self._pack(seq, area, compress)
            if PyBytes_GET_SIZE(packed) < <Py_ssize_t>area:
                flags = FLAG_ZSTD
                area = <size_t>PyBytes_GET_SIZE(packed)
                total = BATCH_HEADER_BYTES + area
        if self.size and self.size + total > self._segment_bytes_max:
            return -1
        self._ensure_fd()
        self._reserve_buf(total)
        q = self._buf + self._buf_len
        if flags & FLAG_ZSTD:
            memcpy(q + BATCH_HEADER_BYTES, PyBytes_AS_STRING(packed), area)
        else:
            pos = BATCH_HEADER_BYTES
            for r in seq:
                copy_record(r, q + pos)
                pos += RECORD_LENGTH_BYTES + ld32(q + pos)
        if timestamp_ms < 0:
            timestamp_ms = now_ms()
        seal_header(q, flags, base, epoch, timestamp_ms, <uint32_t>count, <uint32_t>area)
        self._commit_batch(self._buf_len, base, <uint32_t>count, timestamp_ms, epoch, total)
        return base

    cdef object _pack(self, list seq, size_t area, object compress):
        cdef bytes plain = PyBytes_FromStringAndSize(NULL, area)
        cdef unsigned char* q = <unsigned char*>PyBytes_AS_STRING(plain)
        cdef size_t pos = 0
        for r in seq:
            copy_record(r, q + pos)
            pos += RECORD_LENGTH_BYTES + ld32(q + pos)
        packed = compress(plain)
        if type(packed) is not bytes:
            packed = bytes(packed)
        return packed

    def append_raw(self, batch):
        """Append one complete batch exactly as given (a follower's path).

        The batch must start at next_offset and pass every check a read would make.
        Returns its base offset, or -1 if the segment is full.
        """
        cdef Py_buffer view
        cdef const unsigned char* p
        cdef size_t n
        cdef uint32_t payload
        cdef const char* reason
        cdef uint64_t base
        PyObject_GetBuffer(batch, &view, PyBUF_SIMPLE)
        try:
            p = <const unsigned char*>view.buf
            n = <size_t>view.len
            if n < BATCH_HEADER_BYTES:
                raise InvalidBatchError("shorter than a batch header")
            reason = check_header(p, self.next_offset, self._batch_bytes_max)
            if reason != NULL:
                raise InvalidBatchError(reason.decode())
            payload = ld32(p + BATCH_PAYLOAD_BYTES_AT)
            if BATCH_HEADER_BYTES + <size_t>payload != n:
                raise InvalidBatchError("length does not match the header")
            if not checksum_ok(p):
                raise InvalidBatchError("checksum mismatch")
            if not (p[BATCH_FLAGS_AT] & FLAG_ZSTD) and walk_records(
                    p + BATCH_HEADER_BYTES, payload, ld32(p + BATCH_RECORD_COUNT_AT),
                    NULL, NULL, 0):
                raise InvalidBatchError("record lengths do not match the payload")
            self._check_append(n)
            if self.size and self.size + n > self._segment_bytes_max:
                return -1
            self._ensure_fd()
            self._reserve_buf(n)
            memcpy(self._buf + self._buf_len, p, n)
            base = ld64(p + BATCH_BASE_OFFSET_AT)
            self._commit_batch(self._buf_len, base, ld32(p + BATCH_RECORD_COUNT_AT),
                               <int64_t>ld64(p + BATCH_TIMESTAMP_AT), ld64(p + BATCH_EPOCH_AT), n)
            return base
        finally:
            PyBuffer_Release(&view)

    def flush(self):
        """Hand buffered bytes to the operating system (no fsync)."""
        cdef int err
        cdef size_t n = self._buf_len
        cdef int fd
        if n == 0:
            # Nothing appended since the last flush: the segment is idle, and its buffer
            # is given back (a node keeps thousands of logs open, most of them idle).
            self._free_buf()
            return
        self._ensure_fd()
        fd = self._fd
        with nogil:
            err = pwrite_all(fd, self._buf, n, self._written)
        if err:
            raise os_error(err, self.path)
        self._written += n
        self._buf_len = 0
        # Written through (no write-behind): the buffer only stages one batch, and is made
        # again by the next append. Written behind: kept, unless a large batch grew it.
        if self._flush_bytes == 0 or (self._buf_cap > BUFFER_KEEP_BYTES
                                      and self._buf_cap > 2 * self._flush_bytes):
            self._free_buf()

    cdef void _free_buf(self) noexcept:
        PyMem_Free(self._buf)
        self._buf = NULL
        self._buf_cap = 0

    def dup_fd(self):
        """A duplicate of the descriptor, for an fsync that runs without the caller's lock."""
        self._ensure_fd()
        fd = c_dup(self._fd)
        if fd < 0:
            raise os_error(errno, self.path)
        return fd

    def sync(self):
        """fdatasync what has been flushed. Safe to call from another thread."""
        cdef int fd
        cdef int err = 0
        self._ensure_fd()
        fd = c_dup(self._fd)
        if fd < 0:
            raise os_error(errno, self.path)
        with nogil:
            if c_fdatasync(fd) != 0:
                err = errno
            c_close(fd)
        if err:
            raise os_error(err, self.path)

    # -- index file ---------------------------------------------------------------------

    def index_bytes(self):
        """The sparse index serialised as an .index file (docs/FORMAT.md)."""
        cdef size_t n = INDEX_HEADER_BYTES + self._idx_len * INDEX_ENTRY_BYTES
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
        cdef size_t i
        memset(p, 0, INDEX_HEADER_BYTES)
        st32(p + INDEX_MAGIC_AT, INDEX_MAGIC_U32)
        p[INDEX_VERSION_AT] = INDEX_VERSION
        st64(p + INDEX_BASE_OFFSET_AT, self.base_offset)
        st64(p + INDEX_NEXT_OFFSET_AT, self.next_offset)
        st64(p + INDEX_SEGMENT_BYTES_AT, self.size)
        st32(p + INDEX_ENTRY_COUNT_AT, <uint32_t>self._idx_len)
        for i in range(self._idx_len):
            st32(p + INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES, self._idx_rel[i])
            st32(p + INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES + 4, self._idx_pos[i])
        st64(p + INDEX_CHECKSUM_AT,
             XXH3_64bits(p + INDEX_CHECKSUMMED_FROM, n - INDEX_CHECKSUMMED_FROM))
        return out

    def load_index(self, bytes data, uint64_t expected_next_offset):
        """Adopt a saved index if it is intact and describes this file exactly.

        A checksum only proves the index was written whole, not that it was written for
        these batches, so every entry is checked against the batch header it names (one
        48-byte read each). Returns False, changing nothing, when anything disagrees; the
        caller then rebuilds the index from the log.
        """
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef size_t n = <size_t>PyBytes_GET_SIZE(data)
        cdef unsigned char h[BATCH_HEADER_BYTES]
        cdef uint32_t entries
        cdef size_t i
        cdef uint32_t rel
        cdef uint32_t at
        cdef const unsigned char* entry
        if (n < INDEX_HEADER_BYTES or ld32(p + INDEX_MAGIC_AT) != INDEX_MAGIC_U32
                or p[INDEX_VERSION_AT] != INDEX_VERSION):
            return False
        entries = ld32(p + INDEX_ENTRY_COUNT_AT)
        if n != INDEX_HEADER_BYTES + <size_t>entries * INDEX_ENTRY_BYTES:
            return False
        if (XXH3_64bits(p + INDEX_CHECKSUMMED_FROM, n - INDEX_CHECKSUMMED_FROM)
                != ld64(p + INDEX_CHECKSUM_AT)):
            return False
        if (ld64(p + INDEX_BASE_OFFSET_AT) != self.base_offset
                or ld64(p + INDEX_NEXT_OFFSET_AT) != expected_next_offset
                or ld64(p + INDEX_SEGMENT_BYTES_AT) != self._written or self._buf_len):
            return False
        # The first batch is always indexed, so an index of a non-empty segment starts
        # at (0, 0); the rest must increase strictly and name real batch headers.
        if expected_next_offset > self.base_offset and (
                entries == 0 or ld32(p + INDEX_HEADER_BYTES) != 0
                or ld32(p + INDEX_HEADER_BYTES + 4) != 0):
            return False
        for i in range(entries):
            entry = p + INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES
            rel = ld32(entry)
            at = ld32(entry + 4)
            if i and (rel <= ld32(entry - INDEX_ENTRY_BYTES)
                      or at <= ld32(entry - INDEX_ENTRY_BYTES + 4)):
                return False
            if rel >= expected_next_offset - self.base_offset:
                return False
            if <uint64_t>at + BATCH_HEADER_BYTES > self._written:
                return False
            self._pread_into(h, at, BATCH_HEADER_BYTES)
            if check_header(h, self.base_offset + rel, self._batch_bytes_max) != NULL:
                return False
            if <uint64_t>at + BATCH_HEADER_BYTES + ld32(h + BATCH_PAYLOAD_BYTES_AT) > self._written:
                return False
        self._idx_len = 0
        for i in range(entries):
            entry = p + INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES
            self._index_push(ld32(entry), ld32(entry + 4))
        self.next_offset = expected_next_offset
        self.size = self._written
        return True

    # -- recovery -----------------------------------------------------------------------

    def recover(self, uint64_t durable_offset=0, bint resync=True):
        """Rebuild the index by scanning; cut off a torn tail. Returns the bytes cut.

        A torn tail is a bad final batch with nothing valid after it: a write that never
        completed, which is cut (durably). A bad batch that a valid batch follows, or one
        holding records below ``durable_offset`` (which the caller knows were fsync'd), is
        damage: CorruptSegmentError, and the file is left exactly as it is. docs/FORMAT.md
        ("Torn tail or damage") draws the rule.

        ``resync=False`` is the old rule, which cut at the first bad batch whatever
        followed it. It exists only so that the fault tests can show they catch it.
        """
        if not self._writable:
            raise ValueError(f"segment {self.path} is sealed; use rebuild_index()")
        return self._scan(False, durable_offset, resync)

    def rebuild_index(self):
        """Rebuild the index by scanning; any bad batch raises CorruptSegmentError."""
        self._scan(True, 0, True)

    def survey(self):
        """Every run of valid batches and every damaged range of the file, in file order.

        Returns ``[(start, end, first_offset, next_offset, reason), ...]``: byte range,
        offsets and, for a damaged range, why its first batch is bad (None for a run of
        valid batches). A damaged range ends where the next valid batch starts by the
        resync rule of docs/FORMAT.md, and its next_offset is that batch's base offset;
        when nothing valid follows it ends at the end of the file and next_offset equals
        first_offset (how many records it held is unknown). Reads the whole file and
        changes nothing, on disk or in this object.
        """
        cdef uint64_t file_size = self._written
        cdef uint64_t pos = 0
        cdef uint64_t start
        cdef uint64_t expected = self.base_offset
        cdef uint64_t first
        cdef uint64_t base = 0
        cdef const char* reason = NULL
        cdef int64_t found
        if self._buf_len:
            raise ValueError("cannot survey a segment with unflushed appends")
        self._ensure_fd()
        runs = []
        while True:
            start = pos
            first = expected
            self._walk(&pos, &expected, file_size, False, &reason)
            if pos > start:
                runs.append((start, pos, first, expected, None))
            if reason == NULL:
                return runs
            found = self._resync(pos, expected, file_size, &base)
            if found < 0:
                runs.append((pos, file_size, expected, expected, reason.decode()))
                return runs
            runs.append((pos, <uint64_t>found, expected, base, reason.decode()))
            pos = <uint64_t>found
            expected = base

    cdef int64_t _scan(self, bint strict, uint64_t durable_offset, bint resync) except -2:
        cdef uint64_t file_size = self._written
        cdef uint64_t pos = 0
        cdef uint64_t expected = self.base_offset
        cdef uint64_t base = 0
        cdef const char* reason = NULL
        cdef int64_t found
        if self._buf_len:
            raise ValueError("cannot scan a segment with unflushed appends")
        self._ensure_fd()
        self._idx_len = 0
        self._walk(&pos, &expected, file_size, True, &reason)
        self.next_offset = expected
        if reason == NULL:
            self.size = self._written = pos
            return 0
        if strict:
            raise CorruptSegmentError(self.path, expected, pos, reason.decode())
        if resync:
            if expected < durable_offset:
                raise CorruptSegmentError(
                    self.path, expected, pos,
                    f"{reason.decode()}, in records below offset {durable_offset}, which "
                    "were made durable: damage, not a torn write")
            found = self._resync(pos, expected, file_size, &base)
            if found >= 0:
                raise CorruptSegmentError(
                    self.path, expected, pos,
                    f"{reason.decode()}, and a valid batch (offset {base}) follows at byte "
                    f"{found}: damage, not a torn write")
        self._cut(pos)
        return <int64_t>(file_size - pos)

    cdef int _walk(self, uint64_t* pos_io, uint64_t* expected_io, uint64_t file_size,
                   bint index, const char** reason_out) except -1:
        """Step over valid batches from byte *pos_io, whose batch must hold offset
        *expected_io, to the end of the file or the first bad batch.

        Leaves both where the walk stopped, and in reason_out why (NULL: the end). With
        index, notes batches in the sparse index and the last one's time and epoch.
        """
        cdef uint64_t pos = pos_io[0]
        cdef uint64_t expected = expected_io[0]
        cdef uint64_t chunk_at = 0
        cdef size_t chunk_len = 0
        cdef size_t cap = SCAN_CHUNK_BYTES
        cdef unsigned char* chunk
        cdef unsigned char* h
        cdef const char* reason = NULL
        cdef uint32_t payload
        cdef size_t total
        cdef int err
        cdef int fd = self._fd
        chunk = <unsigned char*>PyMem_Malloc(cap)
        if chunk == NULL:
            raise MemoryError()
        try:
            while pos < file_size:
                if file_size - pos < BATCH_HEADER_BYTES:
                    reason = "torn batch header"
                    break
                if pos < chunk_at or pos + BATCH_HEADER_BYTES > chunk_at + chunk_len:
                    chunk_at = pos
                    chunk_len = <size_t>min(<uint64_t>cap, file_size - pos)
                    with nogil:
                        err = pread_all(fd, chunk, chunk_len, chunk_at)
                    if err:
                        raise os_error(err, self.path)
                h = chunk + (pos - chunk_at)
                reason = check_header(h, expected, self._batch_bytes_max)
                if reason != NULL:
                    break
                payload = ld32(h + BATCH_PAYLOAD_BYTES_AT)
                total = BATCH_HEADER_BYTES + <size_t>payload
                if total > file_size - pos:
                    reason = "torn batch"
                    break
                if pos + total > chunk_at + chunk_len:
                    if total > cap:
                        PyMem_Free(chunk)
                        cap = total
                        chunk = <unsigned char*>PyMem_Malloc(cap)
                        if chunk == NULL:
                            raise MemoryError()
                    chunk_at = pos
                    chunk_len = <size_t>min(<uint64_t>cap, file_size - pos)
                    with nogil:
                        err = pread_all(fd, chunk, chunk_len, chunk_at)
                    if err:
                        raise os_error(err, self.path)
                    h = chunk
                if not checksum_ok(h):
                    reason = "checksum mismatch"
                    break
                if not (h[BATCH_FLAGS_AT] & FLAG_ZSTD) and walk_records(
                        h + BATCH_HEADER_BYTES, payload, ld32(h + BATCH_RECORD_COUNT_AT),
                        NULL, NULL, 0):
                    reason = "record lengths do not match the payload"
                    break
                if index:
                    self._index_add(expected, pos)
                    self.last_timestamp_ms = <int64_t>ld64(h + BATCH_TIMESTAMP_AT)
                    self.last_epoch = ld64(h + BATCH_EPOCH_AT)
                expected += ld32(h + BATCH_RECORD_COUNT_AT)
                pos += total
        finally:
            PyMem_Free(chunk)
        pos_io[0] = pos
        expected_io[0] = expected
        reason_out[0] = reason
        return 0

    cdef int64_t _resync(self, uint64_t bad_pos, uint64_t min_base, uint64_t file_size,
                         uint64_t* base_out) except -2:
        """Byte position of the first batch after the bad one at bad_pos that is valid on
        its own, holding offsets from min_base on; -1 if there is none (docs/FORMAT.md,
        "Torn tail or damage"). Its base offset goes to base_out.

        Where the bad batch's own header says the next batch starts is tried first: when
        only its payload is damaged, that finds the next batch without looking inside the
        payload, where a record that happens to hold a whole batch could be mistaken for
        one. Then every byte after bad_pos is tried.
        """
        cdef unsigned char h[BATCH_HEADER_BYTES]
        cdef unsigned char* chunk
        cdef const unsigned char* hit
        cdef size_t cap = SCAN_CHUNK_BYTES
        cdef size_t n
        cdef size_t i
        cdef uint64_t at
        cdef uint64_t next_pos
        cdef int err
        cdef int fd = self._fd
        if file_size - bad_pos >= BATCH_HEADER_BYTES:
            with nogil:
                err = pread_all(fd, h, BATCH_HEADER_BYTES, bad_pos)
            if err:
                raise os_error(err, self.path)
            if (ld32(h + BATCH_MAGIC_AT) == BATCH_MAGIC_U32
                    and check_shape(h, self._batch_bytes_max) == NULL):
                next_pos = bad_pos + BATCH_HEADER_BYTES + ld32(h + BATCH_PAYLOAD_BYTES_AT)
                if next_pos < file_size and self._valid_at(next_pos, min_base, file_size,
                                                           base_out):
                    return <int64_t>next_pos
        chunk = <unsigned char*>PyMem_Malloc(cap)
        if chunk == NULL:
            raise MemoryError()
        try:
            at = bad_pos + 1
            while at + BATCH_HEADER_BYTES <= file_size:
                n = <size_t>min(<uint64_t>cap, file_size - at)
                with nogil:
                    err = pread_all(fd, chunk, n, at)
                if err:
                    raise os_error(err, self.path)
                # Positions 0 .. n-4 of this chunk can start a magic; the next chunk
                # starts 3 bytes early so that one straddling the boundary is seen.
                i = 0
                while i + 4 <= n:
                    hit = <const unsigned char*>memchr(chunk + i, BATCH_MAGIC_U32 & 0xFF,
                                                       n - 3 - i)
                    if hit == NULL:
                        break
                    i = <size_t>(hit - chunk)
                    if (ld32(hit) == BATCH_MAGIC_U32
                            and self._valid_at(at + i, min_base, file_size, base_out)):
                        return <int64_t>(at + i)
                    i += 1
                at += n - 3
        finally:
            PyMem_Free(chunk)
        return -1

    cdef bint _valid_at(self, uint64_t pos, uint64_t min_base, uint64_t file_size,
                        uint64_t* base_out) except -1:
        """Whether a whole valid batch holding offsets from min_base on starts at pos."""
        cdef unsigned char h[BATCH_HEADER_BYTES]
        cdef unsigned char* batch
        cdef size_t total
        cdef bint ok
        cdef int err
        cdef int fd = self._fd
        if file_size - pos < BATCH_HEADER_BYTES:
            return False
        with nogil:
            err = pread_all(fd, h, BATCH_HEADER_BYTES, pos)
        if err:
            raise os_error(err, self.path)
        if (ld32(h + BATCH_MAGIC_AT) != BATCH_MAGIC_U32
                or check_shape(h, self._batch_bytes_max) != NULL
                or ld64(h + BATCH_BASE_OFFSET_AT) < min_base):
            return False
        total = BATCH_HEADER_BYTES + <size_t>ld32(h + BATCH_PAYLOAD_BYTES_AT)
        if total > file_size - pos:
            return False
        batch = <unsigned char*>PyMem_Malloc(total)
        if batch == NULL:
            raise MemoryError()
        try:
            with nogil:
                err = pread_all(fd, batch, total, pos)
            if err:
                raise os_error(err, self.path)
            ok = checksum_ok(batch) and (
                (batch[BATCH_FLAGS_AT] & FLAG_ZSTD) or walk_records(
                    batch + BATCH_HEADER_BYTES, <uint32_t>(total - BATCH_HEADER_BYTES),
                    ld32(batch + BATCH_RECORD_COUNT_AT), NULL, NULL, 0) == 0)
        finally:
            PyMem_Free(batch)
        if ok:
            base_out[0] = ld64(h + BATCH_BASE_OFFSET_AT)
        return ok

    cdef int _cut(self, uint64_t pos) except -1:
        """Shorten the file to pos and make that durable, so a cut tail cannot return."""
        cdef int err = 0
        cdef int fd = self._fd
        with nogil:
            if c_ftruncate(fd, <off_t>pos) != 0 or c_fdatasync(fd) != 0:
                err = errno
        if err:
            raise os_error(err, self.path)
        self._written = self.size = pos
        while self._idx_len and self._idx_pos[self._idx_len - 1] >= pos:
            self._idx_len -= 1
        return 0

    # -- reading ------------------------------------------------------------------------

    cdef int _pread_into(self, unsigned char* dst, uint64_t pos, size_t n) except -1:
        """Copy n logical bytes at pos, from the file and then from the write buffer."""
        cdef size_t from_file = 0
        cdef int err = 0
        cdef int fd
        if pos + n > self.size:
            raise CorruptSegmentError(self.path, self.next_offset, pos, "read past the end")
        if pos < self._written:
            from_file = <size_t>min(<uint64_t>n, self._written - pos)
            self._ensure_fd()
            fd = self._fd
            with nogil:
                err = pread_all(fd, dst, from_file, pos)
            if err:
                raise os_error(err, self.path)
        if from_file < n:
            memcpy(dst + from_file, self._buf + (pos + from_file - self._written),
                   n - from_file)
        return 0

    cdef bytes _read_span(self, uint64_t pos, size_t n):
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        self._pread_into(<unsigned char*>PyBytes_AS_STRING(out), pos, n)
        return out

    cdef int64_t _find_batch(self, uint64_t offset, uint64_t* base_out) except -1:
        """Byte position of the batch holding offset; its base offset goes to base_out."""
        cdef unsigned char h[BATCH_HEADER_BYTES]
        cdef uint64_t base
        cdef uint64_t pos = self._index_lookup(offset, &base)
        cdef const char* reason
        while pos < self.size:
            self._pread_into(h, pos, BATCH_HEADER_BYTES)
            reason = check_header(h, base, self._batch_bytes_max)
            if reason != NULL:
                raise CorruptSegmentError(self.path, base, pos, reason.decode())
            if offset < base + ld32(h + BATCH_RECORD_COUNT_AT):
                base_out[0] = base
                return <int64_t>pos
            base += ld32(h + BATCH_RECORD_COUNT_AT)
            pos += BATCH_HEADER_BYTES + <uint64_t>ld32(h + BATCH_PAYLOAD_BYTES_AT)
        raise CorruptSegmentError(self.path, base, pos, f"offset {offset} not found")

    cdef bytes _collect(self, uint64_t offset, uint64_t want, size_t max_bytes,
                        BatchRef** refs_out, Py_ssize_t* nrefs_out, uint64_t* base_out):
        """Read whole, verified batches from the one holding offset into one window.

        Stops once ``want`` records from offset on are covered, or the batches reach
        max_bytes (at least one batch is always taken). Fills refs_out with each batch's
        place in the returned window.
        """
        cdef uint64_t base0
        cdef uint64_t pos0 = <uint64_t>self._find_batch(offset, &base0)
        cdef uint64_t avail = self.size - pos0
        cdef unsigned char h[BATCH_HEADER_BYTES]
        cdef size_t first_total
        cdef size_t win_len
        cdef size_t cursor = 0
        cdef size_t total
        cdef uint64_t base = base0
        cdef uint64_t covered = 0
        cdef const unsigned char* w
        cdef const char* reason
        cdef Py_ssize_t n = 0
        cdef Py_ssize_t cap = 8
        cdef BatchRef* refs = <BatchRef*>PyMem_Malloc(cap * sizeof(BatchRef))
        cdef BatchRef* grown
        if refs == NULL:
            raise MemoryError()
        try:
            self._pread_into(h, pos0, BATCH_HEADER_BYTES)
            first_total = BATCH_HEADER_BYTES + ld32(h + BATCH_PAYLOAD_BYTES_AT)
            if base0 + ld32(h + BATCH_RECORD_COUNT_AT) - offset >= want or first_total >= max_bytes:
                win_len = <size_t>min(<uint64_t>first_total, avail)
            else:
                win_len = <size_t>min(avail, <uint64_t>max(first_total,
                                                           min(max_bytes, READ_AHEAD_BYTES)))
            window = self._read_span(pos0, win_len)
            while True:
                w = <const unsigned char*>PyBytes_AS_STRING(window)
                if win_len - cursor < BATCH_HEADER_BYTES:
                    total = BATCH_HEADER_BYTES
                else:
                    reason = check_header(w + cursor, base, self._batch_bytes_max)
                    if reason != NULL:
                        raise CorruptSegmentError(self.path, base, pos0 + cursor,
                                                  reason.decode())
                    total = BATCH_HEADER_BYTES + ld32(w + cursor + BATCH_PAYLOAD_BYTES_AT)
                if cursor + total > win_len:
                    # The next batch is not all in the window: read a larger one.
                    win_len = <size_t>min(avail, <uint64_t>max(cursor + total, 2 * win_len))
                    if cursor + total > win_len:
                        raise CorruptSegmentError(self.path, base, pos0 + cursor,
                                                  "batch runs past the end of the segment")
                    window = self._read_span(pos0, win_len)
                    continue
                if not checksum_ok(w + cursor):
                    raise CorruptSegmentError(self.path, base, pos0 + cursor,
                                              "checksum mismatch")
                if n == cap:
                    cap *= 2
                    grown = <BatchRef*>PyMem_Realloc(refs, cap * sizeof(BatchRef))
                    if grown == NULL:
                        raise MemoryError()
                    refs = grown
                refs[n].at = <uint32_t>cursor
                refs[n].count = ld32(w + cursor + BATCH_RECORD_COUNT_AT)
                refs[n].payload = ld32(w + cursor + BATCH_PAYLOAD_BYTES_AT)
                refs[n].flags = w[cursor + BATCH_FLAGS_AT]
                n += 1
                base += refs[n - 1].count
                covered = base - offset
                cursor += total
                if covered >= want or cursor >= max_bytes or pos0 + cursor >= self.size:
                    break
                if cursor == win_len:
                    win_len = <size_t>min(avail, <uint64_t>max(cursor + READ_AHEAD_BYTES,
                                                               2 * win_len))
                    window = self._read_span(pos0, win_len)
        except BaseException:
            PyMem_Free(refs)
            raise
        refs_out[0] = refs
        nrefs_out[0] = n
        base_out[0] = base0
        return window

    def read(self, uint64_t offset, Py_ssize_t max_records, size_t max_bytes, decompress):
        """Records from offset on: at most max_records, stopping at about max_bytes.

        At least one record is returned when offset < next_offset. ``decompress`` maps a
        zstd frame to the record area; it is only called for compressed batches.
        """
        cdef BatchRef* refs = NULL
        cdef Py_ssize_t nrefs = 0
        cdef uint64_t base0
        cdef Records out
        cdef Py_ssize_t b
        cdef Py_ssize_t filled = 0
        cdef uint64_t skip
        cdef uint32_t area_at
        cdef uint32_t count
        cdef bint packed = False
        cdef Py_ssize_t total_records = 0
        cdef const unsigned char* w
        if offset == self.next_offset:
            return empty_records(offset)
        if offset < self.base_offset or offset > self.next_offset:
            raise OffsetOutOfRangeError(self.path, offset, self.base_offset, self.next_offset)
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        window = self._collect(offset, <uint64_t>max_records, max_bytes, &refs, &nrefs, &base0)
        try:
            out = Records.__new__(Records)
            out.first_offset = offset
            for b in range(nrefs):
                total_records += refs[b].count
                packed = packed or (refs[b].flags & FLAG_ZSTD)
            out._reserve(total_records)
            w = <const unsigned char*>PyBytes_AS_STRING(window)
            if packed:
                window = self._unpack(window, refs, nrefs, base0, decompress)
                w = <const unsigned char*>PyBytes_AS_STRING(window)
            area_at = 0
            for b in range(nrefs):
                count = refs[b].count
                if not packed:
                    area_at = refs[b].at + BATCH_HEADER_BYTES
                if walk_records(w + area_at, refs[b].payload, count,
                                out._starts + filled, out._lengths + filled, area_at):
                    raise CorruptSegmentError(self.path, base0, refs[b].at,
                                              "record lengths do not match the payload")
                filled += count
                if packed:
                    area_at += refs[b].payload
            out._owner = window
            # Records of the first batch that come before offset are not part of the result.
            skip = offset - base0
            if skip:
                for b in range(filled - <Py_ssize_t>skip):
                    out._starts[b] = out._starts[b + <Py_ssize_t>skip]
                    out._lengths[b] = out._lengths[b + <Py_ssize_t>skip]
            out._count = min(filled - <Py_ssize_t>skip, max_records)
            return out
        finally:
            PyMem_Free(refs)

    cdef bytes _unpack(self, bytes window, BatchRef* refs, Py_ssize_t nrefs, uint64_t base,
                       object decompress):
        """Concatenate the record areas of the batches, decompressing where flagged.

        Each ref's payload field is rewritten to the length of its plain record area.
        """
        cdef const unsigned char* w = <const unsigned char*>PyBytes_AS_STRING(window)
        cdef Py_ssize_t b
        parts = []
        for b in range(nrefs):
            area = w[refs[b].at + BATCH_HEADER_BYTES
                     :refs[b].at + BATCH_HEADER_BYTES + refs[b].payload]
            if refs[b].flags & FLAG_ZSTD:
                try:
                    area = decompress(area)
                except Exception as exc:
                    raise CorruptSegmentError(self.path, base, refs[b].at,
                                              f"cannot decompress batch: {exc}") from exc
                if len(area) > self._batch_bytes_max:
                    raise CorruptSegmentError(self.path, base, refs[b].at,
                                              "decompressed batch exceeds the batch limit")
            base += refs[b].count
            refs[b].payload = <uint32_t>len(area)
            parts.append(area)
        return b"".join(parts)

    def read_raw(self, uint64_t offset, size_t max_bytes):
        """Whole batches from the one holding offset, as stored (for shipping to followers).

        At least one batch is returned when offset < next_offset; checksums are verified.
        """
        cdef BatchRef* refs = NULL
        cdef Py_ssize_t nrefs = 0
        cdef uint64_t base0
        cdef size_t end
        if offset == self.next_offset:
            return b""
        if offset < self.base_offset or offset > self.next_offset:
            raise OffsetOutOfRangeError(self.path, offset, self.base_offset, self.next_offset)
        window = self._collect(offset, <uint64_t>-1, max_bytes, &refs, &nrefs, &base0)
        end = refs[nrefs - 1].at + BATCH_HEADER_BYTES + refs[nrefs - 1].payload
        PyMem_Free(refs)
        return window if end == <size_t>PyBytes_GET_SIZE(window) else window[:end]

    def batch_start(self, uint64_t offset):
        """Base offset of the batch holding offset (offset itself when at a boundary)."""
        cdef uint64_t base
        if offset >= self.next_offset:
            return self.next_offset
        self._find_batch(offset, &base)
        return base

    # -- truncation ---------------------------------------------------------------------

    def truncate_after(self, uint64_t offset):
        """Drop every record at or past offset, durably. Returns the new next_offset.

        Batches are never split: a batch holding offset is dropped whole, so the new
        next_offset may be lower than offset.
        """
        cdef uint64_t base
        cdef uint64_t pos
        if offset >= self.next_offset:
            return self.next_offset
        self.flush()
        if offset <= self.base_offset:
            pos = 0
            base = self.base_offset
        else:
            pos = <uint64_t>self._find_batch(offset, &base)
        self._cut(pos)
        self.next_offset = base
        return base
