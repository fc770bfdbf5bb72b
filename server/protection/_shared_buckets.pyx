# cython: boundscheck=False, wraparound=False
"""Token buckets (GCRA) in memory that the processes of one server share: the rate
limits of ``serve --workers N`` hold for the whole server, not per worker.

A table of SLOTS slots of 16 bytes, ``(key hash u64, TAT i64)``: the key's "theoretical
arrival time" in nanoseconds of CLOCK_MONOTONIC, which every process of a host reads
alike. A slot changes only by a 16-byte compare-and-swap of the pair, so there is no
lock, and a process killed at any instant leaves every slot whole.

A key lives in one of PROBES slots from its hash. A slot whose bucket is full again
(TAT at or before now) holds nothing a fresh bucket would not, so another key may take it
over; with every one of its slots holding a bucket still refilling, a key has no room,
and the caller limits it by other means (:meth:`SharedBuckets.take` returns -1).
"""

from libc.stdint cimport int64_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <time.h>
    typedef unsigned __int128 cvb_pair;

    static inline cvb_pair cvb_make(uint64_t key, int64_t tat) {
        return ((cvb_pair)(uint64_t)tat << 64) | (cvb_pair)key;
    }
    static inline uint64_t cvb_key(cvb_pair pair) { return (uint64_t)pair; }
    static inline int64_t cvb_tat(cvb_pair pair) { return (int64_t)(uint64_t)(pair >> 64); }

    /* The pair now: a compare-and-swap of 0 with 0 fails and returns what is there
       (or succeeds on an empty slot, writing what was there). */
    static inline cvb_pair cvb_load(cvb_pair *slot) {
        return __sync_val_compare_and_swap(slot, (cvb_pair)0, (cvb_pair)0);
    }
    static inline int cvb_cas(cvb_pair *slot, cvb_pair expected, cvb_pair desired) {
        return __sync_bool_compare_and_swap(slot, expected, desired);
    }
    static inline int64_t cvb_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    """
    ctypedef unsigned long long cvb_pair  # opaque here: only passed to the helpers
    cvb_pair cvb_make(uint64_t key, int64_t tat) nogil
    uint64_t cvb_key(cvb_pair pair) nogil
    int64_t cvb_tat(cvb_pair pair) nogil
    cvb_pair cvb_load(cvb_pair *slot) nogil
    int cvb_cas(cvb_pair *slot, cvb_pair expected, cvb_pair desired) nogil
    int64_t cvb_now() nogil

SLOT_BYTES = 16
PROBES = 16


def now_ns():
    """CLOCK_MONOTONIC in nanoseconds, as the buckets read it."""
    return cvb_now()


cdef class SharedBuckets:
    """The table over a writable buffer of ``slots * 16`` bytes, 16-byte aligned (an
    mmap of shared memory: its start is page-aligned)."""

    cdef object _buffer
    cdef cvb_pair *_slots
    cdef Py_ssize_t _count
    cdef readonly Py_ssize_t slots

    def __cinit__(self, buffer):
        cdef unsigned char[::1] view = buffer
        if view.shape[0] < SLOT_BYTES or view.shape[0] % SLOT_BYTES:
            raise ValueError("the buffer must be a whole number of 16-byte slots")
        if (<size_t>&view[0]) % 16:
            raise ValueError("the buffer must be 16-byte aligned")
        self._buffer = buffer
        self._slots = <cvb_pair *>&view[0]
        self.slots = view.shape[0] // SLOT_BYTES

    def take(self, uint64_t key, int64_t interval_ns, int64_t burst_ns):
        """Take one token of key's bucket (``burst_ns``: the time an empty bucket takes
        to fill, ``interval_ns`` per token). 0: granted; above 0: refused, the
        nanoseconds until a token is there; -1: no slot for the key (see the module)."""
        if key == 0:
            key = 1  # 0 marks an empty slot
        cdef Py_ssize_t start = <Py_ssize_t>(key % <uint64_t>self.slots)
        cdef Py_ssize_t i, index, free_index
        cdef cvb_pair pair, free_pair
        cdef int64_t now, tat
        while True:
            now = cvb_now()
            free_index = -1
            free_pair = 0
            for i in range(PROBES):
                index = (start + i) % self.slots
                pair = cvb_load(&self._slots[index])
                if cvb_key(pair) == key:
                    tat = cvb_tat(pair)
                    if tat < now:
                        tat = now
                    tat += interval_ns
                    if tat - now > burst_ns:
                        return tat - now - burst_ns
                    if cvb_cas(&self._slots[index], pair, cvb_make(key, tat)):
                        return 0
                    break  # changed meanwhile: look again
                if free_index < 0 and (cvb_key(pair) == 0 or cvb_tat(pair) <= now):
                    free_index = index
                    free_pair = pair
            else:
                if free_index < 0:
                    return -1
                # A fresh bucket (full at now), less the token taken.
                if cvb_cas(&self._slots[free_index], free_pair,
                           cvb_make(key, now + interval_ns)):
                    return 0
                # Taken meanwhile (by this key too, perhaps): look again.
