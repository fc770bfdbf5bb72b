"""The replication frames: every frame round-trips, and bad bytes are refused cleanly."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication import frames as fr

u64 = st.integers(0, 2**64 - 1)


@given(st.one_of(
    st.builds(fr.Open, u64, u64, st.text(max_size=80),
              st.dictionaries(st.text(max_size=10), st.integers(), max_size=5)),
    st.builds(fr.Position, u64, u64, u64, st.lists(st.tuples(u64, u64), max_size=20)
              .map(tuple)),
    st.builds(fr.Sync, u64, u64, u64),
    st.builds(fr.Append, u64, u64, u64, u64, st.binary(max_size=300)),
    st.builds(fr.Ack, u64, u64, u64),
    st.builds(fr.Refuse, u64, u64, st.text(max_size=100)),
    st.builds(fr.Close, u64, u64),
    st.just(fr.Heartbeat()),
))
def test_frames_round_trip(frame: fr.Frame) -> None:
    assert fr.decode(fr.encode(frame)) == frame


@pytest.mark.parametrize("kind,body", [
    (fr.ACK, b"\x00" * 23),  # one byte short
    (fr.POSITION, struct.pack(">QQQI", 1, 2, 3, 5) + b"\x00" * 16),  # says 5, holds 1
    (fr.OPEN, struct.pack(">QQH", 1, 2, 3) + b"abc" + struct.pack(">I", 2) + b"[]"),
    (fr.OPEN, struct.pack(">QQH", 1, 2, 1) + b"\xff" + struct.pack(">I", 2) + b"{}"),
    (fr.OPEN, struct.pack(">QQH", 1, 2, 0) + struct.pack(">I", 200_000)
     + b"[" * 100_000 + b"]" * 100_000),  # nested past the parser's recursion limit
    (fr.APPEND, b"\x00" * 31),
    (fr.HEARTBEAT, b"\x00"),  # a heartbeat has no body
    (fr.CLOSE, b"\x00" * 15),
    (99, b""),
])
def test_malformed_frames_are_protocol_errors(kind: int, body: bytes) -> None:
    with pytest.raises(fr.ProtocolError):
        fr.decode(bytes((kind,)) + body)


def test_an_empty_frame_is_a_protocol_error() -> None:
    with pytest.raises(fr.ProtocolError):
        fr.decode(b"")
