"""Hot parts of a queue: its state machine, and the leader's per-message work.

engine/queue.py holds the policy (locking, durability waits, dead-letter moves,
snapshots) and calls in here once per batch; what is done once per message is done here.

The state machine is the one replay uses: a record the leader applies here and the same
record decoded from the log on a restart (or on a follower) give the same state, because
:meth:`State.apply` never reads a clock -- every time it needs is in the record.

Byte layouts are those of engine/records.py, the readable reference codec, drawn in
docs/FORMAT.md; tests/engine/test_queue_codec.py checks the two codecs agree. Tags, flags
and fixed-part sizes come from engine/_format.pxd, the same constants engine/format.py
holds for Python code (tests/engine/test_format.py checks the two agree).

Not thread-safe: engine/queue.py serialises every call on one State under its lock.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport (
    PyUnicode_AsUTF8AndSize, PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8)

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

cdef extern from *:
    int __builtin_ctzll(unsigned long long x) nogil

from engine._format cimport (
    QREC_CHANGE_VISIBILITY,
    QREC_DELETE,
    QREC_EXPIRE,
    QREC_LEASE,
    QREC_MOVE_OUT,
    QREC_MOVING,
    QREC_SEND,
    RECEIPTS_FIXED_BYTES,
    SEND_FIXED_BYTES,
    SEND_BODY_MD5_BYTES,
    SEND_HAS_ATTRIBUTES,
    SEND_HAS_BODY_MD5,
    SEND_HAS_DEDUP,
    SEND_HAS_GROUP,
    SEND_HAS_MESSAGE_ID,
    SEND_HAS_ORIGIN,
    SEND_HAS_SENDER,
    SEND_HAS_SYSTEM_ATTRIBUTES,
    SEND_MESSAGE_ID_BYTES,
    SEQS_FIXED_BYTES,
    format_constants,
)
from engine._segment cimport Records

import heapq

from engine import format as fmt
from engine.errors import EngineError, MessageTooLargeError, ReceiptInvalidError
from engine.limits import ENVELOPE_BYTES_MAX, MESSAGE_ID_BYTES, SENDER_CHARS_MAX, check_token
from engine.records import (
    Config,
    MessageAttribute,
    Origin,
    Purge,
    Receipts,
    SendMeta,
    SeqList,
    decode_send,
    encode_attributes,
)
from engine.results import Message, SendResult

# Where a message stands. Only DELAYED and INFLIGHT wait on a timer. MOVING: being
# moved to the dead-letter queue, hidden until the move completes.
cdef enum:
    DELAYED = 0
    VISIBLE = 1
    INFLIGHT = 2
    MOVING = 3
CATEGORIES = {"delayed": DELAYED, "visible": VISIBLE, "in_flight": INFLIGHT, "moving": MOVING}

# The FIFO deduplication window (fixed by SQS at five minutes).
DEDUP_WINDOW_MS = 5 * 60 * 1000
cdef int64_t _DEDUP_WINDOW = DEDUP_WINDOW_MS

# What State.memory_bytes counts for a dict entry (a group's number, a moved message's
# origin): the entry, its tuple and short strings, as measured with tracemalloc for
# 100-character keys.
cdef Py_ssize_t EXTRA_BYTES_ESTIMATE = 400

# The constants as compiled here, for test_format.py to compare with engine/format.py.
FORMAT_CONSTANTS = format_constants()

cdef object _tuple_new = tuple.__new__
cdef object _heappush = heapq.heappush
cdef object _heappop = heapq.heappop


# --- little-endian helpers ----------------------------------------------------------

cdef inline void st16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = v >> 8


cdef inline void st32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = v >> 24


cdef inline void st64(unsigned char* p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = (v >> (8 * i)) & 0xFF


cdef inline uint16_t ld16(const unsigned char* p) noexcept nogil:
    return <uint16_t>p[0] | (<uint16_t>p[1] << 8)


cdef inline uint32_t ld32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline uint64_t ld64(const unsigned char* p) noexcept nogil:
    return <uint64_t>ld32(p) | (<uint64_t>ld32(p + 4) << 32)


# --- message ids ------------------------------------------------------------------------

cdef const char* _HEX = b"0123456789abcdef"


cdef inline void hex_into(char* out, uint64_t value, int digits) noexcept nogil:
    cdef int i
    for i in range(digits - 1, -1, -1):
        out[i] = _HEX[value & 0xF]
        value >>= 4


cpdef str message_id_of(uint64_t queue_uid, uint64_t seq, bytes explicit=None):
    """A message's id, shaped as a UUID: the queue's uid (unique in the broker, never
    reused) and the message's seq (unique in the queue), so unique without a lookup.
    Moved messages keep the id they were sent with, passed as ``explicit``."""
    cdef str text = PyUnicode_New(36, 127)
    cdef char* out = <char*>PyUnicode_DATA(text)
    cdef const unsigned char* raw
    cdef int i
    cdef int j = 0
    if explicit is not None:
        if PyBytes_GET_SIZE(explicit) != 16:
            raise ValueError("an explicit message id is 16 bytes")
        raw = <const unsigned char*>PyBytes_AS_STRING(explicit)
        for i in range(16):
            if i in (4, 6, 8, 10):
                out[j] = b'-'
                j += 1
            out[j] = _HEX[raw[i] >> 4]
            out[j + 1] = _HEX[raw[i] & 0xF]
            j += 2
        return text
    hex_into(out, queue_uid >> 32, 8)
    out[8] = b'-'
    hex_into(out + 9, (queue_uid >> 16) & 0xFFFF, 4)
    out[13] = b'-'
    hex_into(out + 14, queue_uid & 0xFFFF, 4)
    out[18] = b'-'
    out[19] = _HEX[8 | ((seq >> 48) & 3)]
    hex_into(out + 20, (seq >> 50) & 0xFFF, 3)
    out[23] = b'-'
    hex_into(out + 24, seq & 0xFFFFFFFFFFFF, 12)
    return text


def message_id_bytes(uint64_t queue_uid, uint64_t seq):
    """The 16 bytes of a derived message id (stored when a message moves queues)."""
    return bytes.fromhex(message_id_of(queue_uid, seq).replace("-", ""))


cpdef str sequence_number_of(uint64_t seq):
    return f"{seq:020d}"


# --- receipt handles --------------------------------------------------------------------
#
# A handle is the URL-safe base64 (padded) of 41 bytes:
#     version (1) = 1 | queue uid (8) | seq (8) | lease (8) | mac (16)
# where mac = keyed BLAKE2b-128 over the 25 bytes before it (engine/receipts.py). The mac
# covers the seq, so a handle names exactly one lease of exactly one message: any edit is
# refused as forged, rather than quietly naming another message.

cdef enum:
    RECEIPT_VERSION = 1
    RECEIPT_RAW = 41
    RECEIPT_CHARS = 56
    MAC_BODY = 25
RECEIPT_HANDLE_CHARS = RECEIPT_CHARS

cdef const char* _B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
cdef signed char _B64_VALUE[256]


cdef void _init_b64() noexcept:
    cdef int i
    for i in range(256):
        _B64_VALUE[i] = -1
    for i in range(64):
        _B64_VALUE[<unsigned char>_B64[i]] = i


_init_b64()


cdef bytes mac_body(uint64_t queue_uid, uint64_t seq, uint64_t lease):
    cdef unsigned char body[MAC_BODY]
    body[0] = RECEIPT_VERSION
    st64(body + 1, queue_uid)
    st64(body + 9, seq)
    st64(body + 17, lease)
    return PyBytes_FromStringAndSize(<char*>body, MAC_BODY)


cdef str encode_handle(uint64_t queue_uid, uint64_t seq, uint64_t lease,
                       const unsigned char* mac):
    cdef unsigned char raw[42]
    cdef str text = PyUnicode_New(RECEIPT_CHARS, 127)
    cdef char* out = <char*>PyUnicode_DATA(text)
    cdef int i
    cdef int j = 0
    cdef uint32_t triple
    raw[0] = RECEIPT_VERSION
    st64(raw + 1, queue_uid)
    st64(raw + 9, seq)
    st64(raw + 17, lease)
    memcpy(raw + MAC_BODY, mac, 16)
    raw[41] = 0
    for i in range(0, 42, 3):
        triple = (<uint32_t>raw[i] << 16) | (<uint32_t>raw[i + 1] << 8) | raw[i + 2]
        out[j] = _B64[(triple >> 18) & 63]
        out[j + 1] = _B64[(triple >> 12) & 63]
        out[j + 2] = _B64[(triple >> 6) & 63]
        out[j + 3] = _B64[triple & 63]
        j += 4
    # 41 bytes: the last group holds two bytes, so one pad character.
    out[RECEIPT_CHARS - 1] = b'='
    return text


cdef int decode_handle(object handle, unsigned char* raw) except -1:
    """Fill raw[41] from a handle; ReceiptInvalidError("malformed") if it is not one."""
    cdef const unsigned char* p
    cdef int i
    cdef int j = 0
    cdef int a, b, c, d
    cdef uint32_t triple
    # A handle is pure ASCII, which CPython stores one byte per character: read it there.
    if (not isinstance(handle, str) or not PyUnicode_IS_COMPACT_ASCII(handle)
            or PyUnicode_GET_LENGTH(handle) != RECEIPT_CHARS):
        raise ReceiptInvalidError("malformed")
    p = <const unsigned char*>PyUnicode_DATA(handle)
    if p[RECEIPT_CHARS - 1] != b'=':
        raise ReceiptInvalidError("malformed")
    for i in range(0, RECEIPT_CHARS, 4):
        a = _B64_VALUE[p[i]]
        b = _B64_VALUE[p[i + 1]]
        c = _B64_VALUE[p[i + 2]]
        d = 0 if i + 3 == RECEIPT_CHARS - 1 else _B64_VALUE[p[i + 3]]
        if a < 0 or b < 0 or c < 0 or d < 0:
            raise ReceiptInvalidError("malformed")
        triple = (<uint32_t>a << 18) | (<uint32_t>b << 12) | (<uint32_t>c << 6) | <uint32_t>d
        raw[j] = (triple >> 16) & 0xFF
        if j + 1 < RECEIPT_RAW:
            raw[j + 1] = (triple >> 8) & 0xFF
        if j + 2 < RECEIPT_RAW:
            raw[j + 2] = triple & 0xFF
        elif (triple & 0xFF) != 0:
            raise ReceiptInvalidError("malformed")  # non-canonical padding bits
        j += 3
    return 0


cdef inline bint same_mac(const unsigned char* a, const unsigned char* b) noexcept nogil:
    """Compare two macs in time independent of where they differ."""
    cdef unsigned char diff = 0
    cdef int i
    for i in range(16):
        diff |= a[i] ^ b[i]
    return diff == 0


cdef class ReceiptOpener:
    """Checks handles against one queue."""

    def __cinit__(self, object mac, uint64_t queue_uid):
        self._mac = mac
        self._uid = queue_uid

    cpdef tuple open(self, object handle):
        """(seq, lease) of a genuine handle for this queue, else ReceiptInvalidError."""
        cdef unsigned char raw[RECEIPT_RAW]
        cdef bytes expected
        decode_handle(handle, raw)
        if raw[0] != RECEIPT_VERSION:
            raise ReceiptInvalidError("malformed")
        expected = self._mac(PyBytes_FromStringAndSize(<char*>raw, MAC_BODY))
        if not same_mac(raw + MAC_BODY, <const unsigned char*>PyBytes_AS_STRING(expected)):
            raise ReceiptInvalidError("forged")
        if ld64(raw + 1) != self._uid:
            raise ReceiptInvalidError("other-queue")
        return (<int64_t>ld64(raw + 9), <int64_t>ld64(raw + 17))


def handle_queue_uid(object handle):
    """The queue uid a handle names, unchecked (None if it is malformed): enough to route
    it to the queue that will check it. Only that queue's opener tells genuine from
    forged."""
    cdef unsigned char raw[RECEIPT_RAW]
    try:
        decode_handle(handle, raw)
    except ReceiptInvalidError:
        return None
    if raw[0] != RECEIPT_VERSION:
        return None
    return ld64(raw + 1)


def make_handle(object mac, uint64_t queue_uid, uint64_t seq, uint64_t lease):
    """A receipt handle for one lease of one message."""
    cdef bytes m = mac(mac_body(queue_uid, seq, lease))
    return encode_handle(queue_uid, seq, lease, <const unsigned char*>PyBytes_AS_STRING(m))


# --- record encoding --------------------------------------------------------------------

cdef bytes encode_seqs(uint8_t tag, int64_t now, int64_t until, list seqs):
    cdef Py_ssize_t n = len(seqs)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, SEQS_FIXED_BYTES + 8 * n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    p[0] = tag
    st64(p + 1, <uint64_t>now)
    st64(p + 9, <uint64_t>until)
    st16(p + 17, <uint16_t>n)
    for i in range(n):
        st64(p + SEQS_FIXED_BYTES + 8 * i, <uint64_t><int64_t>seqs[i])
    return out


cdef bytes encode_pairs(int64_t now, list pairs):
    cdef Py_ssize_t n = len(pairs)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, RECEIPTS_FIXED_BYTES + 16 * n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    p[0] = QREC_DELETE
    st64(p + 1, <uint64_t>now)
    st16(p + 9, <uint16_t>n)
    for i in range(n):
        st64(p + RECEIPTS_FIXED_BYTES + 16 * i, <uint64_t><int64_t>pairs[i][0])
        st64(p + RECEIPTS_FIXED_BYTES + 16 * i + 8, <uint64_t><int64_t>pairs[i][1])
    return out


cdef bytes _str16(object value):
    cdef bytes data = (<str>value).encode()
    if len(data) > 0xFFFF:
        raise ValueError("string too long for a record")
    return len(data).to_bytes(2, "little") + data


cpdef bytes encode_send(int64_t seq, int64_t sent_at, int64_t visible_at, bytes body,
                        object group=None, object dedup=None, bytes message_id=None,
                        object origin=None, object attributes=None, object sender=None,
                        object system_attributes=None, bytes body_md5=None):
    """The SEND record (same bytes as engine.records.encode_send)."""
    cdef uint8_t flags = 0
    cdef bytes out
    cdef unsigned char* p
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t tail_len = 0
    cdef bytes tail = b""
    if (group is not None or dedup is not None or message_id is not None
            or origin is not None or attributes or sender is not None or system_attributes
            or body_md5 is not None):
        parts = []
        if group is not None:
            flags |= SEND_HAS_GROUP
            parts.append(_str16(group))
        if dedup is not None:
            flags |= SEND_HAS_DEDUP
            parts.append(_str16(dedup))
        if message_id is not None:
            flags |= SEND_HAS_MESSAGE_ID
            parts.append(message_id)
        if origin is not None:
            flags |= SEND_HAS_ORIGIN
            parts.append(origin[0].to_bytes(8, "little") + origin[1].to_bytes(8, "little")
                         + origin[2].to_bytes(4, "little"))
        if attributes:
            flags |= SEND_HAS_ATTRIBUTES
            blob = encode_attributes(attributes)
            parts.append(len(blob).to_bytes(4, "little") + blob)
        if sender is not None:
            flags |= SEND_HAS_SENDER
            parts.append(_str16(sender))
        if system_attributes:
            flags |= SEND_HAS_SYSTEM_ATTRIBUTES
            blob = encode_attributes(system_attributes)
            parts.append(len(blob).to_bytes(4, "little") + blob)
        if body_md5 is not None:
            flags |= SEND_HAS_BODY_MD5
            parts.append(body_md5)
        tail = b"".join(parts)
        tail_len = PyBytes_GET_SIZE(tail)
    out = PyBytes_FromStringAndSize(NULL, SEND_FIXED_BYTES + tail_len + n)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = QREC_SEND
    p[1] = flags
    st64(p + 2, <uint64_t>seq)
    st64(p + 10, <uint64_t>sent_at)
    st64(p + 18, <uint64_t>visible_at)
    if tail_len:
        memcpy(p + SEND_FIXED_BYTES, PyBytes_AS_STRING(tail), tail_len)
    memcpy(p + SEND_FIXED_BYTES + tail_len, PyBytes_AS_STRING(body), n)
    return out


cdef inline bint plain_send(const unsigned char* p, Py_ssize_t n) noexcept:
    """A SEND with no optional fields: the body starts right after the fixed part."""
    return n >= SEND_FIXED_BYTES and p[0] == QREC_SEND and p[1] == 0


@cython.final
cdef class LightSend:
    """The body, sender and body MD5 of a SEND whose only optional fields are a message
    id, a sender and a body MD5: what a sealed body (server-side encryption), an
    authenticated send or any SQS send stores. Decoded here because
    engine.records.decode_send costs microseconds per message."""
    cdef readonly bytes body
    cdef readonly object sender
    cdef readonly object body_md5

    def __cinit__(self, bytes body, object sender, object body_md5):
        self.body = body
        self.sender = sender
        self.body_md5 = body_md5


cdef object light_send(const unsigned char* p, Py_ssize_t n):
    """A LightSend, or None when the record has other fields or does not parse (the full
    decoder then reads it, and reports a malformed one)."""
    cdef Py_ssize_t pos = SEND_FIXED_BYTES
    cdef Py_ssize_t length
    cdef object sender = None
    cdef object body_md5 = None
    if (n < SEND_FIXED_BYTES or p[0] != QREC_SEND
            or p[1] & ~(SEND_HAS_MESSAGE_ID | SEND_HAS_SENDER | SEND_HAS_BODY_MD5)):
        return None
    if p[1] & SEND_HAS_MESSAGE_ID:
        pos += SEND_MESSAGE_ID_BYTES
    if p[1] & SEND_HAS_SENDER:
        if pos + 2 > n:
            return None
        length = ld16(p + pos)
        pos += 2
        if pos + length > n:
            return None
        try:
            sender = (<char*>p)[pos:pos + length].decode("utf-8")
        except UnicodeDecodeError:
            return None
        pos += length
    if p[1] & SEND_HAS_BODY_MD5:
        if pos + SEND_BODY_MD5_BYTES > n:
            return None
        body_md5 = PyBytes_FromStringAndSize(<char*>p + pos, SEND_BODY_MD5_BYTES)
        pos += SEND_BODY_MD5_BYTES
    if pos > n:
        return None
    return LightSend(PyBytes_FromStringAndSize(<char*>p + pos, n - pos), sender, body_md5)


# --- one message's state -------------------------------------------------------------------
#
# A live message costs one 32-byte Rec in its chunk (engine/_queue.pxd): where its body is
# (location, the log offset of its SEND record), sent_at, visible_at, receive_count and
# category. What only some messages need is kept beside it, allocated when first needed:
# per chunk, a Seen (lease, the offset of the LEASE or MOVING record holding it, 0 if never
# leased; leased_at; first_received_at) once one of its messages is received, and 16 bytes
# per message once one carries an explicit message id (sealed and moved messages), and 4
# bytes per message for its group's number once one has a group (12 in a FIFO queue,
# with the link to the next message of its group); per message moved in from another
# queue, a dict entry for its origin. A group's name is kept once, in a table of groups.
# A message's deduplication id is not kept: it is in its SEND record, read with the body
# on receive. So a backlog costs about 32 bytes a message (44 in a FIFO queue), and no
# Python object per message.

cdef enum:
    LIVE = 1
    HAS_ID = 2  # an explicit message id, in the chunk's ids
    HAS_GROUP = 4  # a group, its gid in the chunk's gids
    HAS_ORIGIN = 8  # moved in from another queue (its origin is in State._moved_from)

cdef inline bint _before(Timer a, Timer b) noexcept nogil:
    """Heap order of timers: by due time, then seq (as Python compares the tuples)."""
    return a.due < b.due or (a.due == b.due and a.seq < b.seq)


@cython.no_gc
cdef class Msg:
    """A copy of one live message's state, made when asked for (State.get, take): fields
    seq; location; sent_at and visible_at; lease (0: never leased), leased_at,
    first_received_at; receive_count; category; group; dedup (always None: the SEND
    record holds it); message_id (None: derived from queue uid and seq); origin (where a
    dead-lettered message came from). Changing it changes nothing in the state."""


# --- the deduplication window ------------------------------------------------------------
#
# A FIFO queue remembers every deduplication id sent in the last five minutes. A dict of
# str keys to tuples, with a deque for age order, would cost about 370 bytes an id; here one
# costs its entry in one byte buffer (a 32-byte header, the key's UTF-8 bytes, the explicit
# message id if any, padded to 8) and about 12 bytes of hash index.
#
# Entries are appended in send order and age out oldest first, so the buffer is a queue:
# positions are logical (they only grow), the buffer holds [_base, _base + _cap), live
# entries are [_head, _tail). The index is open addressing with linear probing; a slot
# holds an entry's position + 1 (0: empty). A key sent again after its entry aged (but
# before that entry was pruned) points its slot to the new entry; the old one is then
# dead, skipped when pruned because its slot points elsewhere.

cdef enum:
    WINDOW_BYTES_MIN = 4096
    WINDOW_SLOTS_MIN = 64
    WINDOW_KEY_BYTES_MAX = 65535


cdef inline Py_ssize_t _entry_size(Py_ssize_t key_len, bint has_id) noexcept nogil:
    return (sizeof(WindowEntry) + key_len + (16 if has_id else 0) + 7) & ~(<Py_ssize_t>7)


cdef class DedupWindow:
    """Deduplication ids seen within DEDUP_WINDOW_MS: key -> (seq, sent_at, message_id)."""

    # Nothing is allocated until the first id arrives, and all is freed when the last
    # one ages out: most queues are standard, or FIFO without a recent send.

    def __dealloc__(self):
        free(self._buf)
        free(self._slots)

    def __len__(self):
        return self._count

    cdef WindowEntry* _at(self, int64_t position) noexcept:
        return <WindowEntry*>(self._buf + (position - self._base))

    cdef Py_ssize_t memory_bytes(self) noexcept:
        # The buffer's pages written so far, not its capacity: a doubled buffer's new
        # half costs nothing until it is written.
        return self._touched + self._slot_cap * sizeof(int64_t)

    cdef Py_ssize_t _find(self, const char* key, Py_ssize_t key_len, uint64_t h) noexcept:
        """The slot holding key, or the empty slot where it would go."""
        cdef Py_ssize_t mask = self._slot_cap - 1
        cdef Py_ssize_t i = <Py_ssize_t>(h & <uint64_t>mask)
        cdef WindowEntry* e
        while self._slots[i]:
            e = self._at(self._slots[i] - 1)
            if (e.hash == h and e.key_len == key_len
                    and memcmp(<char*>e + sizeof(WindowEntry), key, key_len) == 0):
                return i
            i = (i + 1) & mask
        return i

    cdef int _resize_slots(self, Py_ssize_t cap) except -1:
        cdef int64_t* old = self._slots
        cdef Py_ssize_t old_cap = self._slot_cap
        cdef Py_ssize_t i, j
        cdef int64_t* slots = <int64_t*>calloc(cap, sizeof(int64_t))
        if slots == NULL:
            raise MemoryError()
        for i in range(old_cap):
            if old[i]:
                j = <Py_ssize_t>(self._at(old[i] - 1).hash & <uint64_t>(cap - 1))
                while slots[j]:
                    j = (j + 1) & (cap - 1)
                slots[j] = old[i]
        self._slots = slots
        self._slot_cap = cap
        free(old)
        return 0

    cdef void _unslot(self, Py_ssize_t i) noexcept:
        """Empty slot i, shifting back the entries after it that probed past it."""
        cdef Py_ssize_t mask = self._slot_cap - 1
        cdef Py_ssize_t j = i
        cdef Py_ssize_t home
        while True:
            j = (j + 1) & mask
            if not self._slots[j]:
                break
            home = <Py_ssize_t>(self._at(self._slots[j] - 1).hash & <uint64_t>mask)
            # The entry at j may move to i if its home is not in (i, j] (cyclically).
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                self._slots[i] = self._slots[j]
                i = j
        self._slots[i] = 0

    cdef int _reserve(self, Py_ssize_t size) except -1:
        """Room for size more bytes at _tail: live entries moved to the buffer's start, and
        the buffer doubled if they fill more than half of it."""
        cdef Py_ssize_t live = self._tail - self._head
        cdef Py_ssize_t cap = max(self._cap, WINDOW_BYTES_MIN)
        cdef unsigned char* buf
        if self._tail + size <= self._base + self._cap:
            return 0
        while live + size > cap // 2:
            cap *= 2
        if live:
            memmove(self._buf, self._buf + (self._head - self._base), live)
        self._base = self._head
        if cap != self._cap:
            buf = <unsigned char*>realloc(self._buf, cap)
            if buf == NULL:
                raise MemoryError()
            self._buf = buf
            self._cap = cap
        return 0

    cdef int reserve(self, str key, object message_id) except -1:
        """Check key and message_id, and allocate what adding them takes: after this,
        add() of them cannot fail, so a send is never half applied (its message in the
        state, its id not in the window)."""
        cdef Py_ssize_t key_len
        PyUnicode_AsUTF8AndSize(key, &key_len)
        if key_len > WINDOW_KEY_BYTES_MAX:
            raise ValueError(f"a deduplication id of {key_len} bytes")
        if message_id is not None and (not isinstance(message_id, bytes)
                                       or len(message_id) != 16):
            raise ValueError("an explicit message id is 16 bytes")
        if self._slots == NULL:
            self._slots = <int64_t*>calloc(WINDOW_SLOTS_MIN, sizeof(int64_t))
            if self._slots == NULL:
                raise MemoryError()
            self._slot_cap = WINDOW_SLOTS_MIN
        elif (self._count + 1) * 4 > self._slot_cap * 3:
            self._resize_slots(self._slot_cap * 2)
        self._reserve(_entry_size(key_len, message_id is not None))
        return 0

    cdef int add(self, str key, int64_t seq, int64_t sent_at, object message_id) except -1:
        cdef Py_ssize_t key_len
        cdef const char* data
        cdef bint has_id = message_id is not None
        cdef Py_ssize_t size
        cdef Py_ssize_t i
        cdef WindowEntry* e
        self.reserve(key, message_id)
        data = PyUnicode_AsUTF8AndSize(key, &key_len)
        size = _entry_size(key_len, has_id)
        e = self._at(self._tail)
        memset(e, 0, size)
        e.sent_at = sent_at
        e.seq = seq
        e.hash = <uint64_t>hash(key)
        e.key_len = <uint16_t>key_len
        e.has_id = has_id
        memcpy(<char*>e + sizeof(WindowEntry), data, key_len)
        if has_id:
            memcpy(<char*>e + sizeof(WindowEntry) + key_len, PyBytes_AS_STRING(message_id), 16)
        i = self._find(data, key_len, e.hash)
        if not self._slots[i]:
            self._count += 1
        self._slots[i] = self._tail + 1
        self._tail += size
        if self._tail - self._base > self._touched:
            self._touched = self._tail - self._base
        return 0

    cdef tuple _value(self, WindowEntry* e):
        cdef object message_id = None
        if e.has_id:
            message_id = PyBytes_FromStringAndSize(
                <char*>e + sizeof(WindowEntry) + e.key_len, 16)
        return (e.seq, e.sent_at, message_id)

    cdef object get(self, str key):
        """(seq, sent_at, message_id) of key's entry, or None."""
        cdef Py_ssize_t key_len
        cdef const char* data = PyUnicode_AsUTF8AndSize(key, &key_len)
        cdef Py_ssize_t i
        if not self._count:
            return None
        i = self._find(data, key_len, <uint64_t>hash(key))
        if not self._slots[i]:
            return None
        return self._value(self._at(self._slots[i] - 1))

    cdef bint aged(self, int64_t now) noexcept:
        return self._head < self._tail and self._at(self._head).sent_at + _DEDUP_WINDOW <= now

    cdef int prune(self, int64_t now) except -1:
        """Drop the entries that aged out by now."""
        cdef WindowEntry* e
        cdef Py_ssize_t i
        cdef Py_ssize_t live, cap
        cdef unsigned char* buf
        if not self.aged(now):
            return 0
        while self._head < self._tail:
            e = self._at(self._head)
            if e.sent_at + _DEDUP_WINDOW > now:
                break
            i = self._find(<char*>e + sizeof(WindowEntry), e.key_len, e.hash)
            if self._slots[i] == self._head + 1:
                self._unslot(i)
                self._count -= 1
            self._head += _entry_size(e.key_len, e.has_id)
        if self._head == self._tail:
            free(self._buf)
            free(self._slots)
            self._buf = NULL
            self._slots = NULL
            self._cap = self._slot_cap = self._touched = 0
            self._base = self._head
            return 0
        # Give back what a burst made the buffer and the index grow to, down to twice
        # what they hold (so that the next burst does not resize them at once).
        live = self._tail - self._head
        if self._cap > WINDOW_BYTES_MIN and live * 4 < self._cap:
            cap = WINDOW_BYTES_MIN
            while cap < live * 2:
                cap *= 2
            memmove(self._buf, self._buf + (self._head - self._base), live)
            self._base = self._head
            buf = <unsigned char*>realloc(self._buf, cap)
            if buf != NULL:
                self._buf = buf
                self._cap = cap
                self._touched = min(self._touched, cap)
        if self._slot_cap > WINDOW_SLOTS_MIN and self._count * 8 < self._slot_cap:
            cap = WINDOW_SLOTS_MIN
            while cap < self._count * 2:
                cap *= 2
            try:
                self._resize_slots(cap)
            except MemoryError:
                pass  # smaller later: the record is applied, and the index still works
        return 0

    def entries(self):
        """[(key, (seq, sent_at, message_id))] of every id in the window, in send order."""
        cdef list result = []
        cdef int64_t position = self._head
        cdef WindowEntry* e
        cdef Py_ssize_t i
        while position < self._tail:
            e = self._at(position)
            i = self._find(<char*>e + sizeof(WindowEntry), e.key_len, e.hash)
            if self._slots[i] == position + 1:
                result.append((PyUnicode_DecodeUTF8(<char*>e + sizeof(WindowEntry),
                                                    e.key_len, NULL), self._value(e)))
            position += _entry_size(e.key_len, e.has_id)
        return result


# --- the state machine ---------------------------------------------------------------------

cdef class State:
    """The canonical state of one queue partition, and the leader's derived indexes.

    Canonical (what digests and snapshots cover): the live messages, next_seq, last_time,
    config, counters and the dedup window. Derived (rebuilt from those, advanced with the
    leader's clock): each message's category, the visible bitmaps, the timers, and for
    FIFO queues the per-group order and locks.
    """

    # Fields are declared in _queue.pxd. _window maps a dedup key to (seq, sent_at,
    # message_id), message_id being the 16 explicit bytes or None for a derived id;
    # origins maps (origin queue uid, origin seq) to seq; each chunk's visible bitmap marks its VISIBLE messages
    # (standard queues deliver lowest seq first, found from _cursor); _timers is a binary
    # heap of (due, seq) for DELAYED and INFLIGHT messages, with stale entries skipped;
    # groups are numbered (gid: _group_ids, _group_names, reused through _free_gids once
    # a group has no message left), and for FIFO queues each Group holds its first and
    # last seq (the messages between are linked in seq order through the chunks' links)
    # and its count in flight; _candidates is a heap of (head seq, gid) that may be free.

    def __cinit__(self, bint fifo):
        self.fifo = fifo
        self.next_seq = 1
        self.config = {}
        self.origins = {}
        self._window = DedupWindow()
        self._moved_from = {}
        self._group_ids = {}
        self._group_names = []
        self._free_gids = []
        self._candidates = []

    def __dealloc__(self):
        cdef int64_t number = self._next_chunk(0)
        while number >= 0:
            self._free_chunk(number)
            number = self._next_chunk(number + 1)
        free(self._dir)
        free(self._timers)
        free(self._groups)

    def __len__(self):
        return self._live

    # -- chunks -----------------------------------------------------------------------------
    #
    # Chunk number n holds seqs [n * CHUNK_SEQS, (n + 1) * CHUNK_SEQS); block number b
    # holds the pointers of chunks [b * BLOCK_CHUNKS, (b + 1) * BLOCK_CHUNKS). The
    # directory is a window of blocks from the lowest live message to the highest, so a
    # gap of seqs with no live message costs one pointer per 65,536 seqs (a message left
    # behind while billions are sent and deleted past it costs megabytes, not gigabytes).

    cdef Chunk* _chunk(self, int64_t number) noexcept:
        """Chunk number, or NULL."""
        cdef int64_t i = (number >> BLOCK_SHIFT) - self._dir_base
        cdef Block* b
        if i < self._dir_lo or i >= self._dir_hi:
            return NULL
        b = self._dir[i]
        return NULL if b == NULL else b.chunks[number & BLOCK_MASK]

    cdef int64_t _next_chunk(self, int64_t number) noexcept:
        """The lowest allocated chunk number at or above number, or -1."""
        cdef int64_t i = (number >> BLOCK_SHIFT) - self._dir_base
        cdef Py_ssize_t k = number & BLOCK_MASK
        cdef Block* b
        if i < self._dir_lo:
            i = self._dir_lo
            k = 0
        while i < self._dir_hi:
            b = self._dir[i]
            if b != NULL:
                while k < BLOCK_CHUNKS:
                    if b.chunks[k] != NULL:
                        return ((self._dir_base + i) << BLOCK_SHIFT) + k
                    k += 1
            i += 1
            k = 0
        return -1

    cdef Chunk* _place(self, int64_t seq) except NULL:
        """The chunk for seq, allocated (and its block, and the directory) if need be."""
        cdef int64_t number = seq >> CHUNK_SHIFT
        cdef int64_t block = number >> BLOCK_SHIFT
        cdef Py_ssize_t i, shift, cap
        cdef Block** grown
        cdef Block* b
        cdef Chunk* c
        if self._dir_lo == self._dir_hi:
            self._dir_base = block - self._dir_lo
        i = <Py_ssize_t>(block - self._dir_base)
        if i < 0 or i >= self._dir_cap:
            # Re-base the live window at the start of an array large enough for it and i.
            # Re-base the live window and i at the start of an array twice their span
            # (so a run of placements past the end costs amortized O(1)).
            shift = -i if i < 0 else -self._dir_lo
            self._resize_dir(2 * max(self._dir_hi, i + 1) + 2 * shift, shift)
            i += shift
        if self._dir_lo == self._dir_hi:
            self._dir_lo = self._dir_hi = i
        if i < self._dir_lo:
            self._dir_lo = i
        if i >= self._dir_hi:
            self._dir_hi = i + 1
        b = self._dir[i]
        if b == NULL:
            b = <Block*>calloc(1, sizeof(Block))
            if b == NULL:
                raise MemoryError()
            self._dir[i] = b
            self._blocks += 1
        c = b.chunks[number & BLOCK_MASK]
        if c == NULL:
            c = <Chunk*>calloc(1, sizeof(Chunk))
            if c == NULL:
                raise MemoryError()
            b.chunks[number & BLOCK_MASK] = c
            b.count += 1
            self._chunks += 1
        return c

    cdef int _resize_dir(self, Py_ssize_t cap, Py_ssize_t shift) except -1:
        """Move the directory's window [_dir_lo, _dir_hi) by shift into a new array of cap
        (at least 16) entries."""
        cdef Block** grown
        cap = max(cap, 16)
        grown = <Block**>calloc(cap, sizeof(Block*))
        if grown == NULL:
            raise MemoryError()
        if self._dir != NULL:
            memcpy(grown + self._dir_lo + shift, self._dir + self._dir_lo,
                   (self._dir_hi - self._dir_lo) * sizeof(Block*))
            free(self._dir)
        self._dir = grown
        self._dir_cap = cap
        self._dir_lo += shift
        self._dir_hi += shift
        self._dir_base -= shift
        return 0

    cdef void _free_chunk(self, int64_t number) noexcept:
        """Free chunk number (and its block, if it was the block's last)."""
        cdef Py_ssize_t i = <Py_ssize_t>((number >> BLOCK_SHIFT) - self._dir_base)
        cdef Block* b = self._dir[i]
        cdef Chunk* c = b.chunks[number & BLOCK_MASK]
        if c.seen != NULL:
            self._seen_arrays -= 1
        if c.ids != NULL:
            self._id_arrays -= 1
        if c.gids != NULL:
            self._gid_arrays -= 1
        if c.links != NULL:
            self._link_arrays -= 1
        free(c.seen)
        free(c.ids)
        free(c.gids)
        free(c.links)
        free(c)
        b.chunks[number & BLOCK_MASK] = NULL
        self._chunks -= 1
        b.count -= 1
        if b.count:
            return
        free(b)
        self._dir[i] = NULL
        self._blocks -= 1
        while self._dir_lo < self._dir_hi and self._dir[self._dir_lo] == NULL:
            self._dir_lo += 1
        while self._dir_hi > self._dir_lo and self._dir[self._dir_hi - 1] == NULL:
            self._dir_hi -= 1
        if self._dir_cap > 64 and self._dir_cap > 8 * (self._dir_hi - self._dir_lo):
            # Give back what a window since narrowed grew (a message left far behind
            # the others, since removed). Failing to is harmless: the old array stays.
            try:
                self._resize_dir(2 * (self._dir_hi - self._dir_lo), -self._dir_lo)
            except MemoryError:
                pass

    cdef Rec* _rec(self, int64_t seq) noexcept:
        """The live message seq, or NULL."""
        cdef Chunk* c
        cdef Rec* r
        if seq < 0:
            return NULL
        c = self._chunk(seq >> CHUNK_SHIFT)
        if c == NULL:
            return NULL
        r = &c.recs[seq & CHUNK_MASK]
        return r if r.flags & LIVE else NULL

    cdef int64_t _next_live(self, int64_t seq) noexcept:
        """The lowest live seq at or above seq, or -1: every walk over the messages in
        seq order is `seq = _next_live(0)` ... `seq = _next_live(seq + 1)`."""
        cdef int64_t number = self._next_chunk(seq >> CHUNK_SHIFT if seq > 0 else 0)
        cdef int64_t j
        cdef Chunk* c
        while number >= 0:
            c = self._chunk(number)
            j = seq - number * CHUNK_SEQS if seq > number * CHUNK_SEQS else 0
            while j < CHUNK_SEQS:
                if c.recs[j].flags & LIVE:
                    return number * CHUNK_SEQS + j
                j += 1
            number = self._next_chunk(number + 1)
        return -1

    cdef Seen* _seen(self, int64_t seq) except NULL:
        """The received side of live message seq, allocated for its chunk if need be."""
        cdef Chunk* c = self._chunk(seq >> CHUNK_SHIFT)
        if c.seen == NULL:
            c.seen = <Seen*>calloc(CHUNK_SEQS, sizeof(Seen))
            if c.seen == NULL:
                raise MemoryError()
            self._seen_arrays += 1
        return &c.seen[seq & CHUNK_MASK]

    cdef int64_t _lease_of(self, int64_t seq) noexcept:
        cdef Chunk* c = self._chunk(seq >> CHUNK_SHIFT)
        return 0 if c.seen == NULL else c.seen[seq & CHUNK_MASK].lease

    cdef Msg _msg(self, int64_t seq, Rec* r):
        cdef Chunk* c = self._chunk(seq >> CHUNK_SHIFT)
        cdef Msg m = Msg.__new__(Msg)
        cdef Seen* s
        m.seq = seq
        m.location = r.location
        m.sent_at = r.sent_at
        m.visible_at = r.visible_at
        m.receive_count = r.receive_count
        m.category = r.category
        if c.seen != NULL:
            s = &c.seen[seq & CHUNK_MASK]
            m.lease = s.lease
            m.leased_at = s.leased_at
            m.first_received_at = s.first_received_at
        if r.flags & HAS_ID:
            m.message_id = PyBytes_FromStringAndSize(
                <char*>c.ids + 16 * (seq & CHUNK_MASK), 16)
        if r.flags & HAS_GROUP:
            m.group = self._group_names[c.gids[seq & CHUNK_MASK]] or None
        if r.flags & HAS_ORIGIN:
            m.origin = self._moved_from[seq]
        return m

    # -- groups ---------------------------------------------------------------------------

    cdef uint32_t _gid(self, object group) except? 0xFFFFFFFF:
        """The number of group (a FIFO message without one is in group ""), counting one
        more message in it."""
        cdef Py_ssize_t cap
        cdef Group* grown
        cdef uint32_t gid
        found = self._group_ids.get(group)
        if found is None:
            if self._free_gids:
                gid = self._free_gids.pop()
                self._group_names[gid] = group
            else:
                gid = len(self._group_names)
                if gid >= self._groups_cap:
                    cap = max(16, 2 * self._groups_cap)
                    grown = <Group*>realloc(self._groups, cap * sizeof(Group))
                    if grown == NULL:
                        raise MemoryError()
                    self._groups = grown
                    self._groups_cap = cap
                self._group_names.append(group)
            memset(&self._groups[gid], 0, sizeof(Group))
            self._group_ids[group] = gid
        else:
            gid = found
        self._groups[gid].count += 1
        return gid

    cdef uint32_t _gid_of(self, int64_t seq) noexcept:
        """The group number of live message seq (which has one)."""
        return self._chunk(seq >> CHUNK_SHIFT).gids[seq & CHUNK_MASK]

    cdef int _drop_gid(self, uint32_t gid) except -1:
        """One message fewer in the group: its number is freed with its last."""
        self._groups[gid].count -= 1
        if self._groups[gid].count == 0:
            del self._group_ids[self._group_names[gid]]
            self._group_names[gid] = None
            self._free_gids.append(gid)
            if not self._group_ids:
                # The last group gone: give back what the most groups at once grew (a
                # producer using a group per message, say). A candidate entry left
                # naming a number past the table is skipped by take.
                free(self._groups)
                self._groups = NULL
                self._groups_cap = 0
                self._group_names = []
                self._free_gids = []
        return 0

    # -- timers: a binary heap of (due, seq) -------------------------------------------------

    cdef int _push_timer(self, int64_t due, int64_t seq) except -1:
        cdef Py_ssize_t i, parent, cap
        cdef Timer* grown
        cdef Timer t
        if self._timer_count == self._timer_cap:
            cap = max(64, 2 * self._timer_cap)
            grown = <Timer*>realloc(self._timers, cap * sizeof(Timer))
            if grown == NULL:
                raise MemoryError()
            self._timers = grown
            self._timer_cap = cap
        t.due = due
        t.seq = seq
        i = self._timer_count
        self._timer_count += 1
        while i > 0:
            parent = (i - 1) >> 1
            if not _before(t, self._timers[parent]):
                break
            self._timers[i] = self._timers[parent]
            i = parent
        self._timers[i] = t
        return 0

    cdef void _sift_down(self, Py_ssize_t i) noexcept:
        cdef Timer* h = self._timers
        cdef Py_ssize_t n = self._timer_count
        cdef Timer t = h[i]
        cdef Py_ssize_t child
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and _before(h[child + 1], h[child]):
                child += 1
            if not _before(h[child], t):
                break
            h[i] = h[child]
            i = child
        h[i] = t

    cdef void _pop_timer(self) noexcept:
        self._timer_count -= 1
        if self._timer_count > 0:
            self._timers[0] = self._timers[self._timer_count]
            self._sift_down(0)

    cdef void _heapify_timers(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self._timer_count // 2 - 1, -1, -1):
            self._sift_down(i)

    # -- counters ---------------------------------------------------------------------

    @property
    def counters(self):
        return {"sent": self._sent, "received": self._received, "deleted": self._deleted,
                "expired": self._expired, "moved": self._moved, "purged": self._purged}

    def set_counters(self, dict counters):
        self._sent = counters["sent"]
        self._received = counters["received"]
        self._deleted = counters["deleted"]
        self._expired = counters["expired"]
        self._moved = counters["moved"]
        self._purged = counters["purged"]

    @property
    def category_counts(self):
        return [self._counts[0], self._counts[1], self._counts[2], self._counts[3]]

    def memory_bytes(self):
        """Bytes this state holds for its messages (chunks, received sides, ids, timers,
        the chunk directory, groups, the deduplication window's written bytes and index,
        and an estimate for the dict entries of groups and moved messages): what a
        server-wide memory bound counts."""
        return (self._chunks * sizeof(Chunk) + self._seen_arrays * CHUNK_SEQS * sizeof(Seen)
                + self._id_arrays * CHUNK_SEQS * 16 + self._timer_cap * sizeof(Timer)
                + self._blocks * sizeof(Block) + self._dir_cap * sizeof(Block*)
                + (self._gid_arrays * 4 + self._link_arrays * 8) * CHUNK_SEQS
                + self._groups_cap * sizeof(Group)
                + (len(self._group_names) + len(self._free_gids)) * 8
                + len(self._group_ids) * EXTRA_BYTES_ESTIMATE
                + len(self._moved_from) * EXTRA_BYTES_ESTIMATE
                + self._window.memory_bytes())

    # -- reading messages -------------------------------------------------------------------

    def get(self, int64_t seq):
        """A copy of live message seq (Msg), or None."""
        cdef Rec* r = self._rec(seq)
        return None if r == NULL else self._msg(seq, r)

    def in_category(self, int category):
        """Copies of the live messages in this category, in seq order (rare paths)."""
        cdef list out = []
        cdef int64_t seq
        cdef Rec* r
        if not 0 <= category <= MOVING:
            raise ValueError(f"no such category: {category}")
        if self._counts[category] == 0:
            return out
        seq = self._next_live(0)
        while seq >= 0:
            r = self._rec(seq)
            if r.category == category:
                out.append(self._msg(seq, r))
            seq = self._next_live(seq + 1)
        return out

    def moved_in(self):
        """(sent_at, seq) of each message moved in from another queue."""
        out = []
        for seq in self._moved_from:
            out.append((self._rec(seq).sent_at, seq))
        return out

    def expirable(self, int64_t cutoff, Py_ssize_t limit):
        """Seqs of up to limit messages sent at or before cutoff, lowest seq first,
        stopping at the first one sent later; moved-in and moving messages are skipped
        (engine/queue.py expires those by their own order)."""
        cdef list out = []
        cdef int64_t seq = self._next_live(0)
        cdef Rec* r
        while seq >= 0:
            r = self._rec(seq)
            if r.sent_at > cutoff or len(out) >= limit:
                break
            if not r.flags & HAS_ORIGIN and r.category != MOVING:
                out.append(seq)
            seq = self._next_live(seq + 1)
        return out

    def stored_in(self, int64_t first, int64_t end):
        """Seqs of the live messages whose SEND record is at an offset in [first, end)."""
        cdef list out = []
        cdef int64_t seq = self._next_live(0)
        cdef Rec* r
        while seq >= 0:
            r = self._rec(seq)
            if first <= r.location < end:
                out.append(seq)
            seq = self._next_live(seq + 1)
        return out

    # -- apply --------------------------------------------------------------------------

    def apply(self, int64_t offset, object record):
        """Apply one decoded record (engine.records) found at log offset ``offset``."""
        cdef int64_t now
        cdef int64_t below
        cdef int tag
        cdef Rec* r
        cdef int64_t seq
        if isinstance(record, SendMeta):
            self.apply_send(offset, record.seq, record.sent_at, record.visible_at,
                            record.group, record.dedup, record.message_id, record.origin)
            return
        if isinstance(record, SeqList):
            tag = record.tag
            if tag == QREC_LEASE:
                self.apply_lease(offset, record.now, record.until, record.seqs)
            else:
                self.apply_seqs(offset, tag, record.now, record.seqs)
            return
        if isinstance(record, Receipts):
            now = record.now
            if record.tag == QREC_DELETE:
                self.apply_deletes(now, record.entries)
            else:
                for seq, lease, visible_at in record.entries:
                    r = self._rec(seq)
                    if r != NULL and self._lease_of(seq) == lease:
                        self._set_visible_at(seq, r, visible_at, now)
                self._after(now)
            return
        if isinstance(record, Purge):
            now = record.now
            below = record.below_seq
            # Lowest seq first, as the messages' dict was walked before: a FIFO group
            # then loses its head before the messages behind it.
            seq = self._next_live(0)
            while 0 <= seq < below:
                self._remove(seq, self._rec(seq), 5)  # may free its chunk
                seq = self._next_live(seq + 1)
            self._after(now)
            return
        if isinstance(record, Config):
            self.config = dict(record.attributes)
            self._after(record.now)
            return
        raise TypeError(f"not a queue record: {record!r}")

    cdef int _new(self, int64_t offset, int64_t seq, int64_t sent_at, int64_t visible_at,
                  uint32_t receive_count, object group, object dedup, object message_id,
                  object origin) except -1:
        """Store a message (its category is set by the caller, with _enter). Its dedup
        key is the window's to keep (apply_send), not the message's."""
        cdef Chunk* c
        cdef Rec* r
        if seq <= 0:
            raise ValueError(f"a message's seq is positive, not {seq}")
        if self._rec(seq) != NULL:
            raise ValueError(f"message {seq} is already in the state")
        if message_id is not None and PyBytes_GET_SIZE(<bytes?>message_id) != 16:
            raise ValueError("an explicit message id is 16 bytes")
        c = self._place(seq)
        r = &c.recs[seq & CHUNK_MASK]
        r.location = offset
        r.sent_at = sent_at
        r.visible_at = visible_at
        r.receive_count = receive_count
        r.category = DELAYED
        r.flags = LIVE
        c.live += 1
        self._live += 1
        if message_id is not None:
            if c.ids == NULL:
                c.ids = <unsigned char*>calloc(CHUNK_SEQS, 16)
                if c.ids == NULL:
                    raise MemoryError()
                self._id_arrays += 1
            memcpy(c.ids + 16 * (seq & CHUNK_MASK), PyBytes_AS_STRING(message_id), 16)
            r.flags |= HAS_ID
        if group is not None or self.fifo:
            if c.gids == NULL:
                c.gids = <uint32_t*>calloc(CHUNK_SEQS, sizeof(uint32_t))
                if c.gids == NULL:
                    raise MemoryError()
                self._gid_arrays += 1
            if self.fifo and c.links == NULL:
                c.links = <int64_t*>calloc(CHUNK_SEQS, sizeof(int64_t))
                if c.links == NULL:
                    raise MemoryError()
                self._link_arrays += 1
            c.gids[seq & CHUNK_MASK] = self._gid("" if group is None else group)
            if self.fifo:
                c.links[seq & CHUNK_MASK] = 0
            r.flags |= HAS_GROUP
        if origin is not None:
            self._moved_from[seq] = origin
            r.flags |= HAS_ORIGIN
            self.origins[(origin[0], origin[1])] = seq
        if seq >= self.next_seq:
            self.next_seq = seq + 1
        return 0

    cpdef apply_send(self, int64_t offset, int64_t seq, int64_t sent_at, int64_t visible_at,
                     object group, object dedup, object message_id, object origin):
        cdef Rec* r
        if dedup is not None:
            self._window.reserve(dedup, message_id)
        self._new(offset, seq, sent_at, visible_at, origin[2] if origin is not None else 0,
                  group, dedup, message_id, origin)
        r = self._rec(seq)
        self._sent += 1
        if dedup is not None:
            self._window.add(dedup, seq, sent_at, message_id)
        self._enter(seq, r, VISIBLE if visible_at <= sent_at else DELAYED)
        self._added(seq, r)
        self._after(sent_at)

    cpdef apply_lease(self, int64_t offset, int64_t now, int64_t until, object seqs):
        cdef Rec* r
        cdef Seen* s
        cdef int64_t seq
        for item in seqs:
            seq = item
            r = self._rec(seq)
            if r == NULL:
                continue
            s = self._seen(seq)
            r.receive_count += 1
            s.lease = offset
            s.leased_at = now
            if not s.first_received_at:
                s.first_received_at = now
            self._received += 1
            self._set_visible_at(seq, r, until, now)
        self._after(now)

    cpdef apply_seqs(self, int64_t offset, int tag, int64_t now, object seqs):
        """MOVING, MOVE_OUT and EXPIRE."""
        cdef Rec* r
        cdef int64_t seq
        for item in seqs:
            seq = item
            r = self._rec(seq)
            if r == NULL:
                continue
            if tag == QREC_MOVING:
                self._seen(seq).lease = offset
                self._move_to(seq, r, MOVING)
            elif tag == QREC_MOVE_OUT:
                self._remove(seq, r, 4)
            elif tag == QREC_EXPIRE:
                self._remove(seq, r, 3)
        self._after(now)

    cpdef apply_deletes(self, int64_t now, object pairs):
        cdef Rec* r
        cdef int64_t seq
        for item, lease in pairs:
            seq = item
            r = self._rec(seq)
            if r != NULL and self._lease_of(seq) == lease:
                self._remove(seq, r, 2)
        self._after(now)

    cdef int _after(self, int64_t now) except -1:
        """What every record does last: advance last_time, prune the dedup window."""
        if now > self.last_time:
            self.last_time = now
        self._window.prune(now)
        return 0

    cdef int _set_visible_at(self, int64_t seq, Rec* r, int64_t visible_at,
                             int64_t now) except -1:
        r.visible_at = visible_at
        if visible_at <= now:
            self._move_to(seq, r, VISIBLE)
        else:
            self._move_to(seq, r, INFLIGHT)
            self._push_timer(visible_at, seq)
        return 0

    cdef int _enter(self, int64_t seq, Rec* r, int category) except -1:
        r.category = category
        self._counts[category] += 1
        if category == DELAYED:
            self._push_timer(r.visible_at, seq)
        return 0

    cdef void _mark_visible(self, int64_t seq, bint on) noexcept:
        cdef int64_t number = seq >> CHUNK_SHIFT
        cdef Chunk* c = self._chunk(number)
        cdef int bit = seq & CHUNK_MASK
        if on:
            c.visible[bit >> 6] |= (<uint64_t>1) << (bit & 63)
            c.visible_count += 1
            if number < self._cursor:
                self._cursor = number
        else:
            c.visible[bit >> 6] &= ~((<uint64_t>1) << (bit & 63))
            c.visible_count -= 1

    cdef int _move_to(self, int64_t seq, Rec* r, int category) except -1:
        cdef int old = r.category
        cdef uint32_t gid
        self._counts[old] -= 1
        self._counts[category] += 1
        r.category = category
        if not self.fifo:
            if old != VISIBLE and category == VISIBLE:
                self._mark_visible(seq, True)
            elif old == VISIBLE and category != VISIBLE:
                self._mark_visible(seq, False)
            return 0
        gid = self._gid_of(seq)
        if old == INFLIGHT or old == MOVING:
            self._release(gid)
        if category == INFLIGHT or category == MOVING:
            self._groups[gid].inflight += 1
        elif category == VISIBLE:
            self._offer(gid)
        return 0

    cdef int _remove(self, int64_t seq, Rec* r, int counter) except -1:
        """counter: 2 deleted, 3 expired, 4 moved, 5 purged. Frees the message's chunk
        if it was the chunk's last."""
        cdef int category = r.category
        cdef Chunk* c = self._chunk(seq >> CHUNK_SHIFT)
        cdef uint32_t gid = 0
        cdef bint grouped = r.flags & HAS_GROUP
        cdef Group* g
        cdef int64_t prev
        self._counts[category] -= 1
        if counter == 2:
            self._deleted += 1
        elif counter == 3:
            self._expired += 1
        elif counter == 4:
            self._moved += 1
        else:
            self._purged += 1
        if r.flags & HAS_ORIGIN:
            origin = self._moved_from.pop(seq)
            self.origins.pop((origin[0], origin[1]), None)
        if grouped:
            gid = c.gids[seq & CHUNK_MASK]
        if self.fifo:
            # Out of its group's list (before its chunk, which holds its link, may go).
            # The messages removed are nearly always at the front: those received, or
            # expired, or purged, lowest seq first.
            g = &self._groups[gid]
            if g.head == seq:
                g.head = c.links[seq & CHUNK_MASK]
                if g.tail == seq:
                    g.tail = 0
            else:
                prev = g.head
                while self._link(prev) != seq:
                    prev = self._link(prev)
                    if prev == 0:
                        raise AssertionError(f"message {seq} is not in its group's list")
                self._set_link(prev, c.links[seq & CHUNK_MASK])
                if g.tail == seq:
                    g.tail = prev
        elif category == VISIBLE:
            self._mark_visible(seq, False)
        memset(r, 0, sizeof(Rec))
        if c.seen != NULL:
            memset(&c.seen[seq & CHUNK_MASK], 0, sizeof(Seen))
        c.live -= 1
        self._live -= 1
        if c.live == 0:
            self._free_chunk(seq >> CHUNK_SHIFT)
        if self.fifo:
            if category == INFLIGHT or category == MOVING:
                self._release(gid)
            elif self._groups[gid].head:
                self._offer(gid)
        if grouped:
            self._drop_gid(gid)
        return 0

    cdef int64_t _link(self, int64_t seq) noexcept:
        return self._chunk(seq >> CHUNK_SHIFT).links[seq & CHUNK_MASK]

    cdef void _set_link(self, int64_t seq, int64_t following) noexcept:
        self._chunk(seq >> CHUNK_SHIFT).links[seq & CHUNK_MASK] = following

    # -- derived indexes ------------------------------------------------------------------

    cdef int _added(self, int64_t seq, Rec* r) except -1:
        cdef uint32_t gid
        cdef Group* g
        if not self.fifo:
            if r.category == VISIBLE:
                self._mark_visible(seq, True)
            return 0
        gid = self._gid_of(seq)
        g = &self._groups[gid]
        # Messages are added in seq order (as sent, or as a snapshot lists them).
        if g.tail:
            self._set_link(g.tail, seq)
        else:
            g.head = seq
        g.tail = seq
        # Only a new head is offered: behind one, the group is on offer already, or
        # locked (its release offers it), or waiting for its head to become visible.
        if r.category == VISIBLE and g.head == seq:
            self._offer(gid)
        return 0

    cdef int _offer(self, uint32_t gid) except -1:
        cdef Group* g = &self._groups[gid]
        if g.head and not g.inflight:
            _heappush(self._candidates, (g.head, gid))
        return 0

    cdef int _release(self, uint32_t gid) except -1:
        cdef Group* g = &self._groups[gid]
        g.inflight -= 1
        if g.inflight <= 0:
            g.inflight = 0
            self._offer(gid)
        return 0

    cdef int _restore(self, int64_t seq, int64_t location, int64_t sent_at,
                      int64_t visible_at, uint32_t receive_count, int64_t lease,
                      int64_t leased_at, int64_t first_received_at, object group,
                      object dedup, object message_id, object origin,
                      bint moving) except -1:
        """Put back a message a snapshot recorded (restore_messages), with the category
        its times give at last_time."""
        cdef int category
        cdef Rec* r
        cdef Seen* s
        self._new(location, seq, sent_at, visible_at, receive_count, group, dedup,
                  message_id, origin)
        r = self._rec(seq)
        if lease or leased_at or first_received_at:
            s = self._seen(seq)
            s.lease = lease
            s.leased_at = leased_at
            s.first_received_at = first_received_at
        if moving:
            category = MOVING
        elif visible_at <= self.last_time:
            category = VISIBLE
        else:
            category = INFLIGHT if lease else DELAYED
        self._enter(seq, r, category)
        self._added(seq, r)
        if category == INFLIGHT:
            self._push_timer(visible_at, seq)
        if self.fifo and (category == INFLIGHT or category == MOVING):
            self._groups[self._gid_of(seq)].inflight += 1
        return 0

    def restore_dedup(self, str key, int64_t seq, int64_t sent_at, bytes message_id=None):
        """Put back a dedup window entry (in oldest-first order)."""
        self._window.add(key, seq, sent_at, message_id)

    cdef int _compact(self) except -1:
        """Drop the timer heap's stale entries once they outnumber the live ones: a
        received-and-deleted message leaves its entry behind until its lease would have
        ended, and at a high rate those pile up.

        The heap is filtered from its own entries, keeping the live ones (every message
        waiting on a timer has its entry there), never rebuilt from every message: that
        walk would cost the whole backlog each time. Filtering costs the entries dropped,
        so each entry pays for its own removal."""
        cdef Py_ssize_t waiting = self._counts[DELAYED] + self._counts[INFLIGHT]
        cdef Py_ssize_t i
        cdef Py_ssize_t kept = 0
        cdef Py_ssize_t cap
        cdef Timer* grown
        cdef Rec* r
        if self._timer_count > 4 * waiting + 4096:
            for i in range(self._timer_count):
                r = self._rec(self._timers[i].seq)
                if r != NULL and r.visible_at == self._timers[i].due and (
                        r.category == DELAYED or r.category == INFLIGHT):
                    self._timers[kept] = self._timers[i]
                    kept += 1
            self._timer_count = kept
            self._heapify_timers()
        if self._timer_cap > 4 * self._timer_count + 256:  # give back what a burst grew
            cap = 2 * self._timer_count + 64
            grown = <Timer*>realloc(self._timers, cap * sizeof(Timer))
            if grown != NULL:  # else keep the larger array
                self._timers = grown
                self._timer_cap = cap
        if self.fifo and len(self._candidates) > 4 * len(self._group_ids) + 4096:
            self._candidates = []
            for gid in self._group_ids.values():
                self._offer(gid)
        return 0

    cpdef advance(self, int64_t now):
        """Make every message whose time has come visible (derived state only)."""
        cdef Rec* r
        cdef int64_t due, seq
        self._compact()
        while self._timer_count and self._timers[0].due <= now:
            due = self._timers[0].due
            seq = self._timers[0].seq
            self._pop_timer()
            r = self._rec(seq)
            if r != NULL and r.visible_at == due and (
                    r.category == DELAYED or r.category == INFLIGHT):
                self._move_to(seq, r, VISIBLE)

    cpdef list take(self, int64_t now, int limit):
        """Copies of up to limit visible messages in delivery order (the leader then
        leases them)."""
        cdef list out = []
        cdef Rec* r
        cdef Chunk* c
        cdef Py_ssize_t w
        cdef int64_t number
        cdef uint64_t bits
        cdef int64_t seq
        cdef Group* g
        self.advance(now)
        if not self.fifo:
            if self._counts[VISIBLE] == 0:
                return out
            number = self._next_chunk(self._cursor)
            while number >= 0 and len(out) < limit:
                c = self._chunk(number)
                if c.visible_count == 0:
                    if not out:
                        self._cursor = number + 1
                    number = self._next_chunk(number + 1)
                    continue
                for w in range(CHUNK_WORDS):
                    bits = c.visible[w]
                    while bits and len(out) < limit:
                        seq = number * CHUNK_SEQS + w * 64 + __builtin_ctzll(bits)
                        out.append(self._msg(seq, &c.recs[seq & CHUNK_MASK]))
                        bits &= bits - 1
                number = self._next_chunk(number + 1)
            return out
        seen = set()
        candidates = self._candidates
        while candidates and len(out) < limit:
            head, gid = _heappop(candidates)
            # A stale entry: its group has a new head, is locked, or is gone (its number
            # maybe reused, by a group whose head is another seq).
            if gid >= len(self._group_names) or gid in seen:
                continue  # numbers given back with the last group (_drop_gid)
            g = &self._groups[<uint32_t>gid]
            if g.head != head or g.inflight:
                continue
            seen.add(gid)
            # Consecutive visible messages from the head of the group, in order.
            seq = head
            while seq and len(out) < limit:
                r = self._rec(seq)
                if r == NULL:
                    raise AssertionError(f"group list links to message {seq}, not live")
                if r.category != VISIBLE:
                    break
                out.append(self._msg(seq, r))
                seq = self._link(seq)
        return out

    def takeable(self, int64_t now):
        """Whether take would return a message now; takes nothing. A FIFO queue's visible
        messages may all be behind a message of their group in flight."""
        cdef Group* g
        self.advance(now)
        if not self.fifo:
            return self._counts[VISIBLE] > 0
        for gid in self._group_ids.values():
            g = &self._groups[<uint32_t>gid]
            if g.head and not g.inflight and self._rec(g.head).category == VISIBLE:
                return True
        return False

    def next_timer(self):
        """When the next delayed or in-flight message becomes visible, if any."""
        return self._timers[0].due if self._timer_count else None

    def dedup_aged(self, int64_t now):
        """Whether the deduplication window holds entries that aged out by now (the next
        record applied drops them)."""
        return self._window.aged(now)

    def duplicate_of(self, str key, int64_t now):
        """(seq, sent_at, message_id) of a send with this dedup key inside the window."""
        entry = self._window.get(key)
        if entry is not None and entry[1] + _DEDUP_WINDOW > now:
            return entry
        return None

    def oldest_sent_at(self):
        """sent_at of the live message with the lowest seq, or None. Called on every
        receive: the lowest chunk holds a live message (an empty chunk is freed), so this
        looks at one chunk at most."""
        cdef int64_t seq = self._next_live(0)
        return None if seq < 0 else self._rec(seq).sent_at

    def oldest_location(self):
        """Lowest log offset a live message's body is stored at."""
        cdef int64_t seq = self._next_live(0)
        cdef int64_t low
        if seq < 0:
            return None
        low = self._rec(seq).location
        while seq >= 0:
            low = min(low, self._rec(seq).location)
            seq = self._next_live(seq + 1)
        return low

    def dedup_entries(self):
        """The dedup window, oldest first (the order pruning needs)."""
        return sorted(self._window.entries(), key=lambda item: (item[1][1], item[0]))

    # -- the leader's per-message work ----------------------------------------------------

    def lead_send(self, object log, uint64_t uid, int64_t now, object entries,
                  Py_ssize_t max_bytes, int64_t delay_ms, object check_entry):
        """Validate, append and apply sends; return per-entry results and the offset to
        wait for (0 when nothing was appended).

        A plain entry (bytes body and nothing else but a sender, a well-formed message_id
        and body_md5, and an overhead, on a standard queue) is checked here; any other goes
        to check_entry, which returns (body, attributes, delay_ms, group, dedup_key, sender,
        system_attributes, message_id, body_md5) or raises an EngineError. An
        explicit message_id (16 bytes) is the caller's: it is stored with the message and
        returned for it, and for any duplicate of it, instead of one derived from the seq.
        """
        cdef list results = []
        cdef list payloads = []
        cdef list pending = []
        cdef dict batch_keys = None
        cdef int64_t seq = self.next_seq
        cdef int64_t visible_at
        cdef int64_t first
        cdef Py_ssize_t i
        cdef object group
        cdef object key
        cdef object attributes
        cdef object sender
        cdef object system_attributes
        cdef object explicit_id
        cdef object body_md5
        cdef int64_t entry_delay
        cdef object overhead
        cdef Py_ssize_t size
        cdef object checked_sender = None  # the entries of a request share one sender
        for entry in entries:
            body = entry.body
            explicit_id = entry.message_id
            overhead = entry.overhead
            body_md5 = entry.body_md5
            # Sealed bodies (server-side encryption) carry an id and an overhead and are
            # otherwise plain: they stay on this path.
            if (type(body) is bytes and not self.fifo and entry.attributes is None
                    and entry.group_id is None and entry.dedup_id is None
                    and entry.delay_seconds is None and entry.system_attributes is None
                    and (explicit_id is None or (type(explicit_id) is bytes and
                         PyBytes_GET_SIZE(explicit_id) == MESSAGE_ID_BYTES))
                    and (body_md5 is None or (type(body_md5) is bytes and
                         PyBytes_GET_SIZE(body_md5) == SEND_BODY_MD5_BYTES))
                    and type(overhead) is int and 0 <= overhead <= ENVELOPE_BYTES_MAX):
                size = PyBytes_GET_SIZE(body) - <Py_ssize_t>overhead
                if size > max_bytes:
                    results.append(MessageTooLargeError(size, max_bytes))
                    continue
                sender = entry.sender
                if sender is not None and sender is not checked_sender:
                    try:
                        sender = check_token("sender", sender, SENDER_CHARS_MAX)
                    except EngineError as exc:
                        results.append(exc)
                        continue
                    checked_sender = sender
                attributes = group = key = system_attributes = None
                entry_delay = delay_ms
            else:
                try:
                    (body, attributes, entry_delay, group, key, sender,
                     system_attributes, explicit_id, body_md5) = check_entry(entry)
                except EngineError as exc:
                    results.append(exc)
                    continue
            if key is not None:
                if batch_keys is None:
                    batch_keys = {}
                earlier = batch_keys.get(key)
                if earlier is None:
                    earlier = self.duplicate_of(key, now)
                if earlier is not None:
                    results.append(_tuple_new(SendResult, (
                        message_id_of(uid, earlier[0], earlier[2]),
                        sequence_number_of(earlier[0]) if self.fifo else None, True)))
                    continue
                batch_keys[key] = (seq, now, explicit_id)
            visible_at = now + entry_delay
            payloads.append(encode_send(seq, now, visible_at, body, group, key, explicit_id,
                                        None, attributes, sender, system_attributes,
                                        body_md5))
            pending.append((seq, visible_at, group, key, explicit_id))
            results.append(_tuple_new(SendResult, (
                message_id_of(uid, seq, explicit_id),
                sequence_number_of(seq) if self.fifo else None, False)))
            seq += 1
        if not payloads:
            return results, 0
        first = log.append_batch(payloads, wait=False)
        for i in range(len(pending)):
            s, visible_at, group, key, explicit_id = pending[i]
            self.apply_send(first + i, s, now, visible_at, group, key, explicit_id, None)
        return results, first + len(payloads)

    def lead_receive(self, object log, uint64_t uid, int64_t now, int limit,
                     int64_t visibility_ms, int max_receive_count, object mac):
        """Lease up to limit visible messages.

        Returns (messages, moving) where moving lists the Msgs that reached
        max_receive_count (-1: no dead-letter queue) and are now marked MOVING, plus the
        offset after the records appended.
        """
        cdef list taken = self.take(now, limit)
        cdef list deliver = []
        cdef list moving = []
        cdef list payloads = []
        cdef Msg m
        cdef int64_t first
        cdef int64_t lease = 0
        cdef bytes mac_bytes
        cdef list messages = []
        cdef dict bodies
        if not taken:
            return messages, moving, 0
        for found in taken:
            m = <Msg>found
            if max_receive_count >= 0 and m.receive_count >= max_receive_count:
                moving.append(m)
            else:
                deliver.append(m)
        deliver_seqs = [(<Msg>x).seq for x in deliver]
        moving_seqs = [(<Msg>x).seq for x in moving]
        if deliver:
            payloads.append(encode_seqs(QREC_LEASE, now, now + visibility_ms, deliver_seqs))
        if moving:
            payloads.append(encode_seqs(QREC_MOVING, now, 0, moving_seqs))
        first = log.append_batch(payloads, wait=False)
        if deliver:
            lease = first
            self.apply_lease(first, now, now + visibility_ms, deliver_seqs)
        if moving:
            self.apply_seqs(first + len(payloads) - 1, QREC_MOVING, now, moving_seqs)
            # Copies made after the records applied, as for the delivered ones below.
            moving = [self._msg(x.seq, self._rec(x.seq)) for x in moving]
        if deliver:
            bodies = read_bodies(log, [(<Msg>x).location for x in deliver])
            for found in deliver:
                # The copy take made predates the lease: its receive count and first
                # receive time are the ones before this receive.
                m = self._msg((<Msg>found).seq, self._rec((<Msg>found).seq))
                mac_bytes = mac(mac_body(uid, <uint64_t>m.seq, <uint64_t>lease))
                messages.append(self._message(m, bodies[m.location], uid, lease, mac_bytes))
        return messages, moving, first + len(payloads)

    cdef object _message(self, Msg m, object body_record, uint64_t uid, int64_t lease,
                         bytes mac_bytes):
        dedup = None  # kept in the SEND record only
        body_md5 = None
        if isinstance(body_record, bytes):
            body = body_record
            attributes = {}
            sender = None
            system_attributes = {}
        elif type(body_record) is LightSend:
            body = (<LightSend>body_record).body
            attributes = {}
            sender = (<LightSend>body_record).sender
            system_attributes = {}
            body_md5 = (<LightSend>body_record).body_md5
        else:
            body = body_record.body
            attributes = dict(body_record.attributes or {})
            sender = body_record.sender
            system_attributes = dict(body_record.system_attributes or {})
            dedup = body_record.dedup
            body_md5 = body_record.body_md5
        return _tuple_new(Message, (
            message_id_of(uid, m.seq, m.message_id), body,
            encode_handle(uid, m.seq, lease, <const unsigned char*>PyBytes_AS_STRING(mac_bytes)),
            m.receive_count, m.sent_at / 1000, m.first_received_at / 1000, attributes,
            m.group, sequence_number_of(m.seq) if self.fifo else None,
            dedup if self.fifo else None, sender, system_attributes,
            m.origin[0] if m.origin is not None else None, body_md5,
        ))

    def lead_delete(self, object log, ReceiptOpener opener, int64_t now, list handles):
        """Delete by receipt. Returns per-handle errors (or None) and the offset to wait
        for. A handle for a message already gone succeeds: deletes are idempotent."""
        cdef list results = []
        cdef dict entries = {}
        cdef int64_t first
        cdef Rec* r
        for handle in handles:
            try:
                seq, lease = opener.open(handle)
            except ReceiptInvalidError as exc:
                results.append(exc)
                continue
            r = self._rec(seq)
            if r != NULL and self._lease_of(seq) != lease:
                results.append(ReceiptInvalidError("stale"))
                continue
            results.append(None)
            if r != NULL:
                entries[seq] = (seq, lease)
        if not entries:
            return results, 0
        pairs = list(entries.values())
        first = log.append_batch([encode_pairs(now, pairs)], wait=False)
        self.apply_deletes(now, pairs)
        return results, first + 1


cdef dict read_bodies(object log, list locations):
    """Bodies of the SEND records at these offsets, reading each run of them once.

    A plain SEND (no optional fields) maps to its body bytes, read straight out of the
    log's buffer; one with only a message id, a sender and a body MD5 to a LightSend; any
    other to its full engine.records.Send.
    """
    cdef list wanted = sorted(set(locations))
    cdef dict found = {}
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t run
    cdef Py_ssize_t k
    cdef int64_t offset
    cdef int64_t end
    cdef Records records
    cdef const unsigned char* base
    cdef const unsigned char* p
    cdef Py_ssize_t n
    while i < len(wanted):
        run = 1
        while i + run < len(wanted) and wanted[i + run] == wanted[i] + run:
            run += 1
        offset = wanted[i]
        end = offset + run
        while offset < end:  # a read may stop short at its byte limit
            records = log.read(offset, end - offset)
            base = <const unsigned char*>PyBytes_AS_STRING(records._owner)
            for k in range(records._count):
                p = base + records._starts[k]
                n = records._lengths[k]
                if plain_send(p, n):
                    found[offset + k] = PyBytes_FromStringAndSize(<char*>p + SEND_FIXED_BYTES,
                                                                  n - SEND_FIXED_BYTES)
                else:
                    light = light_send(p, n)
                    found[offset + k] = (light if light is not None
                                         else decode_send(records.payload_at(k)))
            offset = records.next_offset
        i += run
    return found


# --- a snapshot's messages ---------------------------------------------------------------
#
# The per-message part of a snapshot's state, as docs/FORMAT.md draws it ("Snapshot
# file": per message, in seq order); engine/snapshot.py encodes the rest. Done here
# because a queue holding a backlog has millions of messages: a Python loop over them took
# 3.0 s to encode 2 M and 2.7 s to decode them, and a 10 M reopen 13-15 s. A snapshot's
# state is also what a replica's digest hashes; the digests are pinned in
# tests/engine/test_queue_codec.py, and changing the bytes needs a new snapshot version
# (engine/format.py).

cdef enum:
    SNAP_FIXED = 61  # seq through moving
    SNAP_NO_STR = 0xFFFF  # the length of an absent group or dedup key
    SNAP_ORIGIN = 21  # has_origin through the origin's count


cdef inline unsigned char* _put_str(unsigned char* p, object value):
    cdef Py_ssize_t n
    if value is None:
        st16(p, SNAP_NO_STR)
        return p + 2
    n = PyBytes_GET_SIZE(value)
    st16(p, <uint16_t>n)
    memcpy(p + 2, PyBytes_AS_STRING(value), n)
    return p + 2 + n


def encode_messages(State state):
    """The live messages of the state in seq order (the order every replica applied them
    in), in the layout above. A message's deduplication id is not the state's (its SEND
    record holds it): it is written absent."""
    cdef Py_ssize_t size = state._live * (SNAP_FIXED + 4 + 16 + SNAP_ORIGIN)  # 4: lengths
    cdef list names = []  # each group's name as UTF-8, by gid (None: absent)
    cdef object name
    cdef object origin
    cdef Py_ssize_t gid, j
    cdef int64_t seq
    cdef Chunk* c
    cdef Rec* r
    cdef Seen* s
    for name in state._group_names:
        if name:
            name = (<str?>name).encode()
            if len(<bytes>name) >= SNAP_NO_STR:
                raise ValueError("a group id too long for a snapshot")
        else:
            name = None  # group "": a FIFO message sent without one
        names.append(name)
    # Each message with a group carries its name: a group's count of messages sizes them.
    for gid in range(len(names)):
        if names[gid] is not None:
            size += len(<bytes>names[gid]) * state._groups[gid].count
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    cdef unsigned char* end = p + size
    # The caller holds the queue's lock, which every change to the state takes, so the
    # messages written are those the size counted.
    seq = state._next_live(0)
    while seq >= 0:
        c = state._chunk(seq >> CHUNK_SHIFT)
        j = seq & CHUNK_MASK
        r = &c.recs[j]
        st64(p, <uint64_t>seq)
        st64(p + 8, <uint64_t>r.location)
        st64(p + 16, <uint64_t>r.sent_at)
        st64(p + 24, <uint64_t>r.visible_at)
        st32(p + 32, r.receive_count)
        if c.seen != NULL:
            s = &c.seen[j]
            st64(p + 36, <uint64_t>s.lease)
            st64(p + 44, <uint64_t>s.leased_at)
            st64(p + 52, <uint64_t>s.first_received_at)
        else:
            memset(p + 36, 0, 24)
        p[60] = 1 if r.category == MOVING else 0
        p += SNAP_FIXED
        p = _put_str(p, names[c.gids[j]] if r.flags & HAS_GROUP else None)
        st16(p, SNAP_NO_STR)
        p += 2
        if r.flags & HAS_ID:
            memcpy(p, c.ids + 16 * j, 16)
        else:
            memset(p, 0, 16)
        p += 16
        if r.flags & HAS_ORIGIN:
            origin = state._moved_from[seq]
            p[0] = 1
            st64(p + 1, <uint64_t>origin[0])
            st64(p + 9, <uint64_t>origin[1])
            st32(p + 17, <uint32_t>origin[2])
        else:
            memset(p, 0, SNAP_ORIGIN)
        p += SNAP_ORIGIN
        seq = state._next_live(seq + 1)
    assert p == end
    return out


cdef inline object _get_str(const unsigned char* base, Py_ssize_t* pos, Py_ssize_t n):
    cdef uint16_t length
    if pos[0] + 2 > n:
        raise ValueError("snapshot state is truncated")
    length = ld16(base + pos[0])
    pos[0] += 2
    if length == SNAP_NO_STR:
        return None
    if pos[0] + length > n:
        raise ValueError("snapshot state is truncated")
    pos[0] += length
    return PyUnicode_DecodeUTF8(<const char*>base + pos[0] - length, length, NULL)


def restore_messages(State state, bytes data, Py_ssize_t pos, Py_ssize_t count):
    """Put back count messages encoded from pos in data (encode_messages); returns the
    position after them. Raises ValueError if data ends inside them."""
    cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p
    cdef Py_ssize_t i, j
    cdef bint derived
    cdef object group, dedup, message_id, origin
    for i in range(count):
        if pos + SNAP_FIXED > n:
            raise ValueError("snapshot state is truncated")
        p = base + pos
        pos += SNAP_FIXED
        group = _get_str(base, &pos, n)
        dedup = _get_str(base, &pos, n)
        if pos + 16 + SNAP_ORIGIN > n:
            raise ValueError("snapshot state is truncated")
        derived = True
        for j in range(16):
            if base[pos + j]:
                derived = False
                break
        message_id = None if derived else PyBytes_FromStringAndSize(<char*>base + pos, 16)
        pos += 16
        origin = None
        if base[pos]:
            origin = Origin(ld64(base + pos + 1), ld64(base + pos + 9), ld32(base + pos + 17))
        pos += SNAP_ORIGIN
        state._restore(<int64_t>ld64(p), <int64_t>ld64(p + 8), <int64_t>ld64(p + 16),
                       <int64_t>ld64(p + 24), ld32(p + 32), <int64_t>ld64(p + 36),
                       <int64_t>ld64(p + 44), <int64_t>ld64(p + 52), group, dedup,
                       message_id, origin, p[60] != 0)
    return pos


def messages_floor(bytes data, Py_ssize_t pos, Py_ssize_t count, int64_t floor):
    """(position after the count messages encoded from pos, the lowest of floor and their
    locations), without building them. Raises ValueError if data ends inside them."""
    cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t i, k
    cdef uint16_t length
    cdef int64_t location
    for i in range(count):
        if pos + SNAP_FIXED > n:
            raise ValueError("snapshot state is truncated")
        location = <int64_t>ld64(base + pos + 8)
        if location < floor:
            floor = location
        pos += SNAP_FIXED
        for k in range(2):
            if pos + 2 > n:
                raise ValueError("snapshot state is truncated")
            length = ld16(base + pos)
            pos += 2 + (length if length != SNAP_NO_STR else 0)
        pos += 16 + SNAP_ORIGIN
        if pos > n:
            raise ValueError("snapshot state is truncated")
    return pos, floor
