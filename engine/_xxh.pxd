# The two xxHash entry points the extensions use (vendored in _vendor/xxhash, BSD-2).
from libc.stdint cimport uint64_t

cdef extern from "_xxh.h" nogil:
    uint64_t XXH3_64bits(const void* data, size_t length)
    uint64_t XXH3_64bits_withSeed(const void* data, size_t length, uint64_t seed)
