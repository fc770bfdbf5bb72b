from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef struct BatchRef:
    uint32_t at
    uint32_t count
    uint32_t payload
    unsigned char flags


cdef class Records:
    cdef object _owner
    cdef object _view
    cdef uint32_t* _starts
    cdef uint32_t* _lengths
    cdef Py_ssize_t _count
    cdef readonly uint64_t first_offset

    cdef int _reserve(self, Py_ssize_t n) except -1
    cdef object payload_at(self, Py_ssize_t i)


cdef class Segment:
    cdef readonly str path
    cdef readonly uint64_t base_offset
    cdef readonly uint64_t next_offset
    # Logical size: bytes written to the file plus bytes still in the write buffer.
    cdef readonly uint64_t size
    cdef readonly int64_t last_timestamp_ms
    cdef readonly uint64_t last_epoch
    cdef uint64_t _written
    cdef int _fd
    cdef bint _writable
    cdef bint _closed

    cdef unsigned char* _buf
    cdef size_t _buf_len
    cdef size_t _buf_cap
    cdef size_t _flush_bytes

    cdef uint32_t _record_bytes_max
    cdef uint32_t _batch_bytes_max
    cdef uint64_t _segment_bytes_max

    cdef uint32_t* _idx_rel
    cdef uint32_t* _idx_pos
    cdef size_t _idx_len
    cdef size_t _idx_cap
    cdef uint32_t _index_interval

    cdef int _ensure_fd(self) except -1
    cdef int _reserve_buf(self, size_t extra) except -1
    cdef void _free_buf(self) noexcept
    cdef int _index_add(self, uint64_t offset, uint64_t pos) except -1
    cdef int _index_push(self, uint32_t rel, uint32_t pos) except -1
    cdef uint64_t _index_lookup(self, uint64_t offset, uint64_t* base_out) noexcept
    cdef int _commit_batch(self, size_t at, uint64_t base, uint32_t count,
                           int64_t ts, uint64_t epoch, size_t total) except -1
    cdef int _maybe_flush(self) except -1
    cdef int _check_append(self, size_t total) except -1
    cdef object _pack(self, list seq, size_t area, object compress)
    cdef int64_t _scan(self, bint strict, uint64_t durable_offset, bint resync) except -2
    cdef int _walk(self, uint64_t* pos_io, uint64_t* expected_io, uint64_t file_size,
                   bint index, const char** reason_out) except -1
    cdef int64_t _resync(self, uint64_t bad_pos, uint64_t min_base, uint64_t file_size,
                         uint64_t* base_out) except -2
    cdef bint _valid_at(self, uint64_t pos, uint64_t min_base, uint64_t file_size,
                        uint64_t* base_out) except -1
    cdef int _cut(self, uint64_t pos) except -1
    cdef int _pread_into(self, unsigned char* dst, uint64_t pos, size_t n) except -1
    cdef bytes _read_span(self, uint64_t pos, size_t n)
    cdef int64_t _find_batch(self, uint64_t offset, uint64_t* base_out) except -1
    cdef bytes _collect(self, uint64_t offset, uint64_t want, size_t max_bytes,
                        BatchRef** refs_out, Py_ssize_t* nrefs_out, uint64_t* base_out)
    cdef bytes _unpack(self, bytes window, BatchRef* refs, Py_ssize_t nrefs, uint64_t base,
                       object decompress)
