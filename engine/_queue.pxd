from libc.stdint cimport int64_t, uint64_t


cdef class Msg:
    cdef public int64_t seq
    cdef public int64_t location
    cdef public int64_t sent_at
    cdef public int64_t visible_at
    cdef public int64_t lease
    cdef public int64_t leased_at
    cdef public int64_t first_received_at
    cdef public int receive_count
    cdef public int category
    cdef public object group
    cdef public object dedup
    cdef public object message_id
    cdef public object origin


cdef class ReceiptOpener:
    cdef object _mac
    cdef uint64_t _uid

    cpdef tuple open(self, object handle)


cdef class State:
    cdef public bint fifo
    cdef public dict messages
    cdef public int64_t next_seq
    cdef int64_t _low  # no live message has a lower seq (oldest_sent_at)
    cdef public int64_t last_time
    cdef public dict config
    cdef public dict dedup
    cdef public dict origins
    cdef object _dedup_order
    cdef int64_t _counts[4]
    cdef int64_t _sent, _received, _deleted, _expired, _moved, _purged
    cdef list _ready
    cdef list _timers
    cdef dict _groups
    cdef dict _inflight
    cdef list _candidates

    cpdef apply_send(self, int64_t offset, int64_t seq, int64_t sent_at, int64_t visible_at,
                     object group, object dedup, object message_id, object origin)
    cpdef apply_lease(self, int64_t offset, int64_t now, int64_t until, object seqs)
    cpdef apply_seqs(self, int64_t offset, int tag, int64_t now, object seqs)
    cpdef apply_deletes(self, int64_t now, object pairs)
    cdef void _after(self, int64_t now)
    cdef void _set_visible_at(self, Msg m, int64_t visible_at, int64_t now)
    cdef void _enter(self, Msg m, int category)
    cdef void _move_to(self, Msg m, int category)
    cdef void _remove(self, Msg m, int counter)
    cdef void _added(self, Msg m)
    cdef void _offer(self, object group)
    cdef void _release(self, object group)
    cdef void _restore(self, Msg m, bint moving)
    cdef void _compact(self)
    cpdef advance(self, int64_t now)
    cpdef list take(self, int64_t now, int limit)
    cdef object _message(self, Msg m, object body_record, uint64_t uid, int64_t lease,
                         bytes mac_bytes)
