from libc.stdint cimport int32_t, uint64_t


cdef class HashRing:
    cdef readonly int vnodes
    cdef dict _weights
    cdef dict _points
    cdef list _names
    cdef object _positions
    cdef object _owners
    cdef const uint64_t* _pos
    cdef const int32_t* _own
    cdef Py_ssize_t _n

    cdef int _rebuild(self) except -1
    cdef Py_ssize_t _first_at_or_after(self, uint64_t h) noexcept
