# The on-disk byte layouts, for the Cython extensions: the one place _segment.pyx and
# _queue.pyx take their offsets, sizes, flags, tags and magic numbers from.
#
# docs/FORMAT.md draws the layouts and engine/format.py holds the same constants for
# Python code, under the same names. tests/engine/test_format.py checks that every name in
# the enum below has the same value in format.py, as compiled into each extension.
#
# An enum, because its members are compile-time constants: every use compiles to a literal,
# so naming a constant here costs nothing at run time. Nothing here exists at run time
# either (no engine._format module), so the file holds only the enum and an inline function.

cdef enum:
    # --- record batch: one write(); offsets are byte positions in the batch header ------
    BATCH_MAGIC_U32 = 0x42595643  # "CVYB" read as a little-endian u32
    BATCH_VERSION = 1
    BATCH_HEADER_BYTES = 48
    BATCH_MAGIC_AT = 0  # 4 bytes
    BATCH_CHECKSUM_AT = 4  # u64: xxh3-64 over [BATCH_CHECKSUMMED_FROM, end of batch)
    BATCH_VERSION_AT = 12  # u8
    BATCH_FLAGS_AT = 13  # u8
    BATCH_RESERVED_AT = 14  # u16, must be zero
    BATCH_BASE_OFFSET_AT = 16  # u64
    BATCH_EPOCH_AT = 24  # u64
    BATCH_TIMESTAMP_AT = 32  # i64
    BATCH_RECORD_COUNT_AT = 40  # u32
    BATCH_PAYLOAD_BYTES_AT = 44  # u32
    BATCH_CHECKSUMMED_FROM = 12
    FLAG_ZSTD = 0x01
    FLAGS_KNOWN = FLAG_ZSTD
    RECORD_LENGTH_BYTES = 4  # the u32 before each record in the record area

    # --- sparse offset index (.index file) ----------------------------------------------
    INDEX_MAGIC_U32 = 0x49595643  # "CVYI" read as a little-endian u32
    INDEX_VERSION = 1
    INDEX_HEADER_BYTES = 48
    INDEX_ENTRY_BYTES = 8
    INDEX_MAGIC_AT = 0
    INDEX_CHECKSUM_AT = 4  # u64: xxh3-64 over [INDEX_CHECKSUMMED_FROM, end of file)
    INDEX_VERSION_AT = 12  # u8
    INDEX_BASE_OFFSET_AT = 16  # u64
    INDEX_NEXT_OFFSET_AT = 24  # u64
    INDEX_SEGMENT_BYTES_AT = 32  # u64
    INDEX_ENTRY_COUNT_AT = 40  # u32
    INDEX_CHECKSUMMED_FROM = 12

    # --- queue records: tags ------------------------------------------------------------
    QREC_SEND = 1
    QREC_LEASE = 2
    QREC_DELETE = 3
    QREC_CHANGE_VISIBILITY = 4
    QREC_PURGE = 5
    QREC_MOVING = 6
    QREC_MOVE_OUT = 7
    QREC_EXPIRE = 8
    QREC_CONFIG = 9

    # --- queue records: SEND flags (which optional fields follow the fixed part) --------
    SEND_HAS_GROUP = 0x01
    SEND_HAS_DEDUP = 0x02
    SEND_HAS_ATTRIBUTES = 0x04
    SEND_HAS_MESSAGE_ID = 0x08
    SEND_HAS_ORIGIN = 0x10
    SEND_HAS_SENDER = 0x20
    SEND_HAS_SYSTEM_ATTRIBUTES = 0x40
    SEND_HAS_BODY_MD5 = 0x80
    SEND_FLAGS_KNOWN = 0xFF

    # --- queue records: sizes of the fixed parts (what precedes the variable fields) ----
    SEND_FIXED_BYTES = 26  # tag u8, flags u8, seq u64, sent_at i64, visible_at i64
    SEND_MESSAGE_ID_BYTES = 16  # the optional message id field
    SEND_BODY_MD5_BYTES = 16  # the optional body MD5 field
    SEQS_FIXED_BYTES = 19  # LEASE, MOVING, MOVE_OUT, EXPIRE: tag, now i64, until i64, count u16
    RECEIPTS_FIXED_BYTES = 11  # DELETE, CHANGE_VISIBILITY: tag u8, now i64, count u16
    PURGE_BYTES = 17  # tag u8, now i64, below_seq u64
    CONFIG_FIXED_BYTES = 9  # tag u8, now i64; the JSON follows


cdef inline dict format_constants():
    """Every name above with its value as compiled: each extension exports this, and
    test_format.py compares it, name by name, with engine/format.py."""
    return {
        "BATCH_MAGIC_U32": BATCH_MAGIC_U32,
        "BATCH_VERSION": BATCH_VERSION,
        "BATCH_HEADER_BYTES": BATCH_HEADER_BYTES,
        "BATCH_MAGIC_AT": BATCH_MAGIC_AT,
        "BATCH_CHECKSUM_AT": BATCH_CHECKSUM_AT,
        "BATCH_VERSION_AT": BATCH_VERSION_AT,
        "BATCH_FLAGS_AT": BATCH_FLAGS_AT,
        "BATCH_RESERVED_AT": BATCH_RESERVED_AT,
        "BATCH_BASE_OFFSET_AT": BATCH_BASE_OFFSET_AT,
        "BATCH_EPOCH_AT": BATCH_EPOCH_AT,
        "BATCH_TIMESTAMP_AT": BATCH_TIMESTAMP_AT,
        "BATCH_RECORD_COUNT_AT": BATCH_RECORD_COUNT_AT,
        "BATCH_PAYLOAD_BYTES_AT": BATCH_PAYLOAD_BYTES_AT,
        "BATCH_CHECKSUMMED_FROM": BATCH_CHECKSUMMED_FROM,
        "FLAG_ZSTD": FLAG_ZSTD,
        "FLAGS_KNOWN": FLAGS_KNOWN,
        "RECORD_LENGTH_BYTES": RECORD_LENGTH_BYTES,
        "INDEX_MAGIC_U32": INDEX_MAGIC_U32,
        "INDEX_VERSION": INDEX_VERSION,
        "INDEX_HEADER_BYTES": INDEX_HEADER_BYTES,
        "INDEX_ENTRY_BYTES": INDEX_ENTRY_BYTES,
        "INDEX_MAGIC_AT": INDEX_MAGIC_AT,
        "INDEX_CHECKSUM_AT": INDEX_CHECKSUM_AT,
        "INDEX_VERSION_AT": INDEX_VERSION_AT,
        "INDEX_BASE_OFFSET_AT": INDEX_BASE_OFFSET_AT,
        "INDEX_NEXT_OFFSET_AT": INDEX_NEXT_OFFSET_AT,
        "INDEX_SEGMENT_BYTES_AT": INDEX_SEGMENT_BYTES_AT,
        "INDEX_ENTRY_COUNT_AT": INDEX_ENTRY_COUNT_AT,
        "INDEX_CHECKSUMMED_FROM": INDEX_CHECKSUMMED_FROM,
        "QREC_SEND": QREC_SEND,
        "QREC_LEASE": QREC_LEASE,
        "QREC_DELETE": QREC_DELETE,
        "QREC_CHANGE_VISIBILITY": QREC_CHANGE_VISIBILITY,
        "QREC_PURGE": QREC_PURGE,
        "QREC_MOVING": QREC_MOVING,
        "QREC_MOVE_OUT": QREC_MOVE_OUT,
        "QREC_EXPIRE": QREC_EXPIRE,
        "QREC_CONFIG": QREC_CONFIG,
        "SEND_HAS_GROUP": SEND_HAS_GROUP,
        "SEND_HAS_DEDUP": SEND_HAS_DEDUP,
        "SEND_HAS_ATTRIBUTES": SEND_HAS_ATTRIBUTES,
        "SEND_HAS_MESSAGE_ID": SEND_HAS_MESSAGE_ID,
        "SEND_HAS_ORIGIN": SEND_HAS_ORIGIN,
        "SEND_HAS_SENDER": SEND_HAS_SENDER,
        "SEND_HAS_SYSTEM_ATTRIBUTES": SEND_HAS_SYSTEM_ATTRIBUTES,
        "SEND_HAS_BODY_MD5": SEND_HAS_BODY_MD5,
        "SEND_FLAGS_KNOWN": SEND_FLAGS_KNOWN,
        "SEND_FIXED_BYTES": SEND_FIXED_BYTES,
        "SEND_MESSAGE_ID_BYTES": SEND_MESSAGE_ID_BYTES,
        "SEND_BODY_MD5_BYTES": SEND_BODY_MD5_BYTES,
        "SEQS_FIXED_BYTES": SEQS_FIXED_BYTES,
        "RECEIPTS_FIXED_BYTES": RECEIPTS_FIXED_BYTES,
        "PURGE_BYTES": PURGE_BYTES,
        "CONFIG_FIXED_BYTES": CONFIG_FIXED_BYTES,
    }
