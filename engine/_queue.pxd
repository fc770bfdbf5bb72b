from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

# A queue's messages are kept in chunks of CHUNK_SEQS consecutive seqs, a fixed-size
# record each (engine/_queue.pyx, "one message's state"). A chunk is allocated when its
# first message arrives and freed when its last one leaves.
cdef enum:
    CHUNK_SHIFT = 8
    CHUNK_SEQS = 256
    CHUNK_MASK = 255
    CHUNK_WORDS = 4  # 64-bit words of the visible bitmap
    BLOCK_SHIFT = 8
    BLOCK_CHUNKS = 256
    BLOCK_MASK = 255


ctypedef struct Rec:
    int64_t location
    int64_t sent_at
    int64_t visible_at
    uint32_t receive_count
    uint8_t category
    uint8_t flags
    uint16_t unused


ctypedef struct Seen:
    int64_t lease
    int64_t leased_at
    int64_t first_received_at


ctypedef struct Chunk:
    Seen* seen
    unsigned char* ids
    uint32_t* gids  # each message's group (State._group_names), once one has a group
    int64_t* links  # FIFO: the next seq of each message's group (0: none)
    uint64_t visible[CHUNK_WORDS]
    int32_t live
    int32_t visible_count
    Rec recs[CHUNK_SEQS]


ctypedef struct Block:
    Chunk* chunks[BLOCK_CHUNKS]
    int32_t count


ctypedef struct Group:
    int64_t head  # FIFO: the group's lowest seq (0: none)
    int64_t tail  # FIFO: its highest
    int64_t count  # live messages in the group
    int64_t inflight  # FIFO: of those, in flight or moving


ctypedef struct Timer:
    int64_t due
    int64_t seq


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


# One deduplication window entry (engine/_queue.pyx, "the deduplication window"),
# followed by its key's UTF-8 bytes and its explicit message id, if any.
ctypedef struct WindowEntry:
    int64_t sent_at
    int64_t seq
    uint64_t hash
    uint16_t key_len
    uint8_t has_id
    uint8_t unused[5]


cdef class DedupWindow:
    cdef unsigned char* _buf
    cdef Py_ssize_t _cap, _touched
    cdef int64_t _base, _head, _tail
    cdef int64_t* _slots
    cdef Py_ssize_t _slot_cap, _count

    cdef WindowEntry* _at(self, int64_t position) noexcept
    cdef Py_ssize_t memory_bytes(self) noexcept
    cdef Py_ssize_t _find(self, const char* key, Py_ssize_t key_len, uint64_t h) noexcept
    cdef int _resize_slots(self, Py_ssize_t cap) except -1
    cdef void _unslot(self, Py_ssize_t i) noexcept
    cdef int _reserve(self, Py_ssize_t size) except -1
    cdef int reserve(self, str key, object message_id) except -1
    cdef int add(self, str key, int64_t seq, int64_t sent_at, object message_id) except -1
    cdef tuple _value(self, WindowEntry* e)
    cdef object get(self, str key)
    cdef bint aged(self, int64_t now) noexcept
    cdef int prune(self, int64_t now) except -1


cdef class State:
    cdef public bint fifo
    cdef public int64_t next_seq
    cdef public int64_t last_time
    cdef public dict config
    cdef public dict origins
    cdef DedupWindow _window
    cdef int64_t _counts[4]
    cdef int64_t _sent, _received, _deleted, _expired, _moved, _purged
    # The directory: _dir[i] holds block number _dir_base + i (or NULL); every entry
    # outside [_dir_lo, _dir_hi) is NULL.
    cdef Block** _dir
    cdef Py_ssize_t _dir_lo, _dir_hi, _dir_cap
    cdef int64_t _dir_base
    cdef Py_ssize_t _live, _chunks, _blocks, _seen_arrays, _id_arrays, _gid_arrays
    cdef Py_ssize_t _link_arrays
    cdef int64_t _cursor  # a chunk number: no lower chunk holds a visible message
    cdef Timer* _timers
    cdef Py_ssize_t _timer_count, _timer_cap
    cdef dict _moved_from  # seq -> its Origin, for messages moved in from another queue
    cdef dict _group_ids  # group -> its gid
    cdef list _group_names  # gid -> group (None: free)
    cdef list _free_gids
    cdef Group* _groups  # by gid
    cdef Py_ssize_t _groups_cap
    cdef list _candidates

    cdef Chunk* _chunk(self, int64_t number) noexcept
    cdef int64_t _next_chunk(self, int64_t number) noexcept
    cdef Chunk* _place(self, int64_t seq) except NULL
    cdef int _resize_dir(self, Py_ssize_t cap, Py_ssize_t shift) except -1
    cdef void _free_chunk(self, int64_t number) noexcept
    cdef Rec* _rec(self, int64_t seq) noexcept
    cdef int64_t _next_live(self, int64_t seq) noexcept
    cdef Seen* _seen(self, int64_t seq) except NULL
    cdef int64_t _lease_of(self, int64_t seq) noexcept
    cdef Msg _msg(self, int64_t seq, Rec* r)
    cdef uint32_t _gid(self, object group) except? 0xFFFFFFFF
    cdef uint32_t _gid_of(self, int64_t seq) noexcept
    cdef int _drop_gid(self, uint32_t gid) except -1
    cdef int64_t _link(self, int64_t seq) noexcept
    cdef void _set_link(self, int64_t seq, int64_t following) noexcept
    cdef int _push_timer(self, int64_t due, int64_t seq) except -1
    cdef void _sift_down(self, Py_ssize_t i) noexcept
    cdef void _pop_timer(self) noexcept
    cdef void _mark_visible(self, int64_t seq, bint on) noexcept
    cdef void _heapify_timers(self) noexcept
    cdef int _new(self, int64_t offset, int64_t seq, int64_t sent_at, int64_t visible_at,
                  uint32_t receive_count, object group, object dedup, object message_id,
                  object origin) except -1
    cpdef apply_send(self, int64_t offset, int64_t seq, int64_t sent_at, int64_t visible_at,
                     object group, object dedup, object message_id, object origin)
    cpdef apply_lease(self, int64_t offset, int64_t now, int64_t until, object seqs)
    cpdef apply_seqs(self, int64_t offset, int tag, int64_t now, object seqs)
    cpdef apply_deletes(self, int64_t now, object pairs)
    cdef int _after(self, int64_t now) except -1
    cdef int _set_visible_at(self, int64_t seq, Rec* r, int64_t visible_at,
                             int64_t now) except -1
    cdef int _enter(self, int64_t seq, Rec* r, int category) except -1
    cdef int _move_to(self, int64_t seq, Rec* r, int category) except -1
    cdef int _remove(self, int64_t seq, Rec* r, int counter) except -1
    cdef int _added(self, int64_t seq, Rec* r) except -1
    cdef int _offer(self, uint32_t gid) except -1
    cdef int _release(self, uint32_t gid) except -1
    cdef int _restore(self, int64_t seq, int64_t location, int64_t sent_at,
                      int64_t visible_at, uint32_t receive_count, int64_t lease,
                      int64_t leased_at, int64_t first_received_at, object group,
                      object dedup, object message_id, object origin,
                      bint moving) except -1
    cdef int _compact(self) except -1
    cpdef advance(self, int64_t now)
    cpdef list take(self, int64_t now, int limit)
    cdef object _message(self, Msg m, object body_record, uint64_t uid, int64_t lease,
                         bytes mac_bytes)
