"""engine/_queue.pyx against the readable reference codec in engine/records.py."""

from __future__ import annotations

import base64
import struct
import uuid

import hypothesis.strategies as st
import pytest
import xxhash
import zstandard
from hypothesis import given

from engine import Broker, ManualClock, format
from engine import records as rec
from engine._queue import State, encode_send, message_id_of
from engine.errors import CorruptSnapshotError, ReceiptInvalidError
from engine.receipts import HANDLE_CHARS, ReceiptCodec
from engine.snapshot import (
    decode_snapshot,
    decode_state,
    encode_snapshot,
    encode_state,
    state_digest,
)

tokens = st.text(alphabet="abcXYZ019-_!.", min_size=1, max_size=40)
attribute_values = st.one_of(st.text(min_size=1, max_size=20).map(lambda s: ("String", s)),
                             st.binary(min_size=1, max_size=20).map(lambda b: ("Binary", b)))


@given(
    seq=st.integers(0, 2**62), sent_at=st.integers(0, 2**50), delay=st.integers(0, 900_000),
    body=st.binary(max_size=300), group=st.none() | tokens, dedup=st.none() | tokens,
    message_id=st.none() | st.binary(min_size=16, max_size=16),
    origin=st.none() | st.tuples(st.integers(1, 2**63 - 1), st.integers(1, 2**62),
                                 st.integers(0, 1000)),
    attributes=st.none() | st.dictionaries(tokens, attribute_values, max_size=4),
    sender=st.none() | tokens,
    system=st.none() | st.dictionaries(tokens, attribute_values, max_size=2),
    body_md5=st.none() | st.binary(min_size=16, max_size=16),
)
def test_send_encoding_agrees_and_round_trips(
    seq: int, sent_at: int, delay: int, body: bytes, group: str | None, dedup: str | None,
    message_id: bytes | None, origin: tuple[int, int, int] | None,
    attributes: dict[str, tuple[str, str | bytes]] | None, sender: str | None,
    system: dict[str, tuple[str, str | bytes]] | None, body_md5: bytes | None,
) -> None:
    o = rec.Origin(*origin) if origin else None
    attrs = {k: rec.MessageAttribute(*v) for k, v in attributes.items()} if attributes else None
    sys_attrs = {k: rec.MessageAttribute(*v) for k, v in system.items()} if system else None
    reference = rec.encode_send(seq, sent_at, sent_at + delay, body, group=group, dedup=dedup,
                                message_id=message_id, origin=o, attributes=attrs,
                                sender=sender, system_attributes=sys_attrs, body_md5=body_md5)
    fast = encode_send(seq, sent_at, sent_at + delay, body, group, dedup, message_id, o, attrs,
                       sender, sys_attrs, body_md5)
    assert fast == reference
    decoded = rec.decode_send(fast)
    assert (decoded.seq, decoded.sent_at, decoded.visible_at, decoded.body) == (
        seq, sent_at, sent_at + delay, body)
    assert (decoded.group, decoded.dedup, decoded.message_id, decoded.origin) == (
        group, dedup, message_id, o)
    assert (decoded.attributes or None) == attrs
    assert (decoded.sender, decoded.system_attributes or None) == (sender, sys_attrs)
    assert decoded.body_md5 == body_md5


def test_message_ids_are_uuid_shaped_and_unique() -> None:
    ids = {message_id_of(uid, seq) for uid in (1, 2**63 - 1, 77) for seq in range(1, 2000)}
    assert len(ids) == 3 * 1999
    for text in list(ids)[:100]:
        assert uuid.UUID(text).variant == uuid.RFC_4122
    # The id names the queue and the message: uid in front, seq at the end.
    assert message_id_of(0x1234, 5).startswith("00000000-0000-1234-")
    assert message_id_of(0x1234, 5).endswith("-000000000005")
    raw = bytes(range(16))
    assert message_id_of(1, 1, raw) == str(uuid.UUID(bytes=raw))


def mac_of(key: bytes) -> ReceiptCodec:
    return ReceiptCodec(key)


def test_receipt_handles_round_trip() -> None:
    codec = mac_of(b"k" * 32)
    handle = codec.make(42, 7, 99)
    assert len(handle) == HANDLE_CHARS
    assert base64.urlsafe_b64decode(handle)[0] == 1  # version
    assert codec.open(handle, 42) == (7, 99)


@pytest.mark.parametrize("mutate", ["mac", "lease", "uid", "version", "padding", "char"])
def test_tampered_handles_are_refused(mutate: str) -> None:
    codec = mac_of(b"k" * 32)
    raw = bytearray(base64.urlsafe_b64decode(codec.make(42, 7, 99)))
    handle = None
    if mutate == "mac":
        raw[-1] ^= 1
    elif mutate == "lease":
        raw[17] ^= 1
    elif mutate == "uid":
        raw[1] ^= 1
    elif mutate == "version":
        raw[0] = 2
    elif mutate == "padding":
        good = codec.make(42, 7, 99)
        handle = good[:-1] + "A"
    elif mutate == "char":
        good = codec.make(42, 7, 99)
        handle = good[:10] + "*" + good[11:]
    if handle is None:
        handle = base64.urlsafe_b64encode(bytes(raw)).decode()
    with pytest.raises(ReceiptInvalidError) as info:
        codec.open(handle, 42)
    assert info.value.reason in ("forged", "malformed")


def test_other_key_and_other_queue_are_refused() -> None:
    handle = mac_of(b"k" * 32).make(42, 7, 99)
    with pytest.raises(ReceiptInvalidError) as forged:
        mac_of(b"j" * 32).open(handle, 42)
    assert forged.value.reason == "forged"
    with pytest.raises(ReceiptInvalidError) as other:
        mac_of(b"k" * 32).open(handle, 43)
    assert other.value.reason == "other-queue"


@pytest.mark.parametrize("junk", ["", "x" * HANDLE_CHARS, "é" * HANDLE_CHARS, "A" * 500])
def test_junk_is_malformed(junk: str) -> None:
    with pytest.raises(ReceiptInvalidError) as info:
        mac_of(b"k" * 32).open(junk, 42)
    assert info.value.reason == "malformed"


def test_editing_the_seq_of_a_handle_is_forgery(tmp_path: object) -> None:
    # The mac covers the seq: a handle names one message, and an edited one names none.
    clock = ManualClock()
    with Broker(str(tmp_path), fsync="never", clock=clock) as broker:
        queue = broker.create_queue("q")
        for i in range(4):
            queue.send(b"%d" % i)
        received = queue.receive(max_messages=4)
        raw = bytearray(base64.urlsafe_b64decode(received[0].receipt))
        other_seq = int.from_bytes(base64.urlsafe_b64decode(received[1].receipt)[9:17],
                                   "little")
        raw[9:17] = other_seq.to_bytes(8, "little")
        with pytest.raises(ReceiptInvalidError) as info:
            queue.delete(base64.urlsafe_b64encode(bytes(raw)).decode())
        assert info.value.reason == "forged"
        assert queue.stats().in_flight == 4


def test_snapshot_round_trip_keeps_the_digest(tmp_path: object) -> None:
    clock = ManualClock()
    with Broker(str(tmp_path), fsync="never", clock=clock) as broker:
        queue = broker.create_queue("s.fifo", fifo=True, content_based_dedup=True,
                                    dead_letter_queue=None)
        for i in range(20):
            queue.send(b"m%d" % i, group_id=f"g{i % 3}",
                       attributes={"n": rec.MessageAttribute("Number", str(i))})
        received = queue.receive(max_messages=5)
        queue.delete(received[0].receipt)
        clock.advance(10)
        core = broker._core_of("s.fifo")
        data = encode_snapshot(core.state, 1234)
        restored, offset = decode_snapshot(data)
        assert offset == 1234
        assert state_digest(restored) == state_digest(core.state)
        assert restored.category_counts == core.state.category_counts
        damaged = bytearray(data)
        damaged[-1] ^= 1
        with pytest.raises(CorruptSnapshotError, match="checksum mismatch"):
            decode_snapshot(bytes(damaged))


def _with_version(snapshot: bytes, version: int) -> bytes:
    """The snapshot file with its header's version changed, and its checksum made again
    (docs/FORMAT.md: xxh3-64 of everything after the checksum field)."""
    data = bytearray(snapshot)
    data[12] = version
    struct.pack_into("<Q", data, 4, xxhash.xxh3_64_intdigest(bytes(data[12:])))
    return bytes(data)


def test_snapshots_of_earlier_versions_are_read_and_later_ones_refused() -> None:
    """Version 3 has version 2's layout; it tells a build from before the body MD5 of SEND
    records that the log may hold them, so that such a build refuses the queue."""
    state = _every_kind_of_message(False)
    written = encode_snapshot(state, 77)
    assert written[12] == format.SNAPSHOT_VERSION == 3
    restored, offset = decode_snapshot(_with_version(written, 2))
    assert (state_digest(restored), offset) == (state_digest(state), 77)
    with pytest.raises(CorruptSnapshotError, match="version 4 is not one this build reads"):
        decode_snapshot(_with_version(written, 4))


def _every_kind_of_message(fifo: bool) -> State:
    """A state holding messages of every shape a snapshot records: visible, delayed, in
    flight, deleted, moving to a dead-letter queue, with explicit message ids, with an
    origin, and (FIFO) groups and non-ASCII deduplication ids."""
    state = State(fifo)
    now = 1_700_000_000_000
    offset = 0
    for seq in range(1, 41):
        offset += 97
        state.apply_send(offset, seq, now, now + 60_000 if seq % 6 == 0 else now,
                         f"g{seq % 3}" if fifo else None, f"d-é{seq}" if fifo else None,
                         bytes(range(seq, seq + 16)) if seq % 5 == 0 else None,
                         rec.Origin(0x1234567890ABCDEF, seq * 7, seq % 4) if seq % 7 == 0
                         else None)
    state.apply_lease(offset + 50, now + 10, now + 30_000, [1, 2, 3, 9])
    state.apply_seqs(offset + 100, format.QREC_MOVING, now + 20, [10])
    state.apply_deletes(now + 30, [(2, offset + 50)])
    return state


FIFO_DIGEST = "2e3be899a3e7e9fe19bac6163d28c340c5a2234d6685211d27ef0b303b0efd63"


@pytest.mark.parametrize(("fifo", "digest"), [
    (False, "c155a9fc180bdcca2d303504307526f08396fd3e4e0729a2c145ad8f5eeabab1"),
    (True, FIFO_DIGEST),
])
def test_snapshot_state_bytes_are_pinned(fifo: bool, digest: str) -> None:
    """Replicas compare digests of this encoding, and snapshots written by earlier builds
    are read with it: its bytes must not change without a new snapshot version. The
    standard digest was taken from the encoder before it moved into engine/_queue.pyx;
    the FIFO one changed when messages stopped keeping their dedup keys (written absent,
    in the same layout), and its bytes decode and re-encode unchanged with the encoder
    from before."""
    state = _every_kind_of_message(fifo)
    assert state_digest(state) == digest
    restored = decode_state(encode_state(state))
    assert state_digest(restored) == digest
    assert restored.category_counts == state.category_counts


# The same FIFO state as written by the encoder from before, each message with its dedup
# key (zstd, base64).
_FIFO_STATE_V2 = (
    "KLUv/WBAFnUVANZWVyww2wHAIDvWUEMzxASR1Jpg/G9Ga0O974moU1G0ckiZkl7XdV3XdV3XKJNDpksASwBNAA57"
    "9js6rd8YlwHMAYvuymwAmADycDQYC0UCcTAUCAPBfHvubBMDn44/cq+b0lSuz/XOsKDFWrrfujAI6HGgk3rvo97j"
    "4pXL0/RSHBPvCTNJjKx9DI58PB3OhvZJSGvwHznWgXtfoxYwGF2TwVwsNz0/FwCc7QFzTPFrb8IHjIjAqR96hTKR"
    "ROhaEC+MVUNL7hVymUCQ67S9IJFaCuooV+hEuGIOsRJLkAz2Nb1S3V9OvD4fsfV8xLDzERzOP0Q3KdTJVKL/oaYx"
    "hDPT3KDEGFyXQtZCGolCoNsXgBXbFyiU76EBhRYhH+AC1nzPJNoO2KOWKA/hH8T63B678zn+b2oN/eWfaWHyC25h"
    "VW6KPfkSH6khtAf4+dFy5A2cwVrcCjvxEf5Qxzjrtn+A5qihcHhhjWkM4FJBkjQdQhAMDKcAIcAIEgwjUBgGIUZA"
    "BIQQQfHG3ANE5QzQHwXrpdRQOUBmyFbxNNqFYdkrd+z6pZeEisWkS0BDV4yuFqXMKmmu0O2qxOyEsGS6oqwviT7z"
    "dO7/fO74adPTiNVJmKynyuGK+/9UjmPBfEBIF4tZrUIYuAPWoYNOVZAviSFkdUEakGB1b8xPLKWUZARmAzl6N8FV"
    "6qvjSGAl7kB7LMJREDf3xpADPvmJyVpxO4YEIySCxS3gY6MAydz+sAX5VRdwzAyJeEeBYWsk4L3kQCkBxcOZuInJ"
    "w/YzSXDGBbA32EADEaVe4Fv8jsjGBCeB49pJxogYl4TiK8QEwttP8v9SAAuKBAtQz47FHr+SQ6eIR8NymY85Xgmb"
    "0lHdbRDuwNkYNxi7nkZG5wbN8gsJp6FAJTMpPabwvQKvMMUP"
)


def test_an_older_snapshot_state_is_read_without_its_messages_dedup_keys() -> None:
    data = zstandard.ZstdDecompressor().decompress(base64.b64decode("".join(_FIFO_STATE_V2)))
    assert "d-é7".encode() in data  # the keys are there, and dropped when read
    state = decode_state(data)
    assert state_digest(state) == FIFO_DIGEST
    assert state.category_counts == _every_kind_of_message(True).category_counts


@pytest.mark.parametrize("fifo", [False, True])
def test_truncated_snapshot_state_is_refused_at_every_length(fifo: bool) -> None:
    """The state is parsed in C: a cut anywhere (a file that passed its checksum, from a
    build that wrote it differently, say) is refused as a ValueError, which
    decode_snapshot reports as a damaged snapshot."""
    data = encode_state(_every_kind_of_message(fifo))
    for cut in range(len(data)):
        with pytest.raises((ValueError, struct.error)):
            decode_state(data[:cut])


def test_state_applies_reference_records_like_the_leader() -> None:
    # Replay path: decoded records from engine.records drive the Cython state machine.
    state = State(False)
    state.apply(0, rec.Config(1000, {"fifo": False}))
    state.apply(1, rec.decode(rec.encode_send(1, 1000, 1000, b"a")))
    state.apply(2, rec.decode(rec.encode_send(2, 1000, 5000, b"b")))
    assert state.category_counts == [1, 1, 0, 0]
    state.apply(3, rec.decode(rec.encode_seqs(format.QREC_LEASE, 2000, [1], 9000)))
    message = state.get(1)
    assert message is not None and message.lease == 3 and message.receive_count == 1
    state.apply(4, rec.decode(rec.encode_deletes(3000, [(1, 3)])))
    assert state.get(1) is None and state.counters["deleted"] == 1
    state.apply(5, rec.decode(rec.encode_purge(4000, 3)))
    assert not len(state) and state.counters["purged"] == 1
