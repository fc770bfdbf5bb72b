"""Message bodies as SQS accepts them (server/sqs/shapes.py body_bytes): the check made on
the bytes refuses exactly the characters outside XML 1.0's Char production."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidMessageContentsError
from server.sqs import shapes

# Every kind of character near the edges of the allowed set, and any other.
_EDGES = [chr(c) for c in (0x0, 0x8, 0x9, 0xA, 0xB, 0xC, 0xD, 0xE, 0x1F, 0x20, 0x7F, 0x80,
                           0xFF, 0x100, 0xD7FF, 0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xE000,
                           0xFFFD, 0xFFFE, 0xFFFF, 0x10000, 0x10FFFF)]
# A list of characters joined, not st.text(), which leaves out surrogates.
_TEXT = st.lists(st.one_of(st.sampled_from(_EDGES), st.characters(codec=None)), min_size=1,
                 max_size=40).map("".join)


def _regex_refuses(body: str) -> bool:
    return shapes._BAD_BODY_CHAR.search(body) is not None


@settings(max_examples=3000)
@given(_TEXT)
def test_the_byte_check_refuses_what_the_character_rule_refuses(body: str) -> None:
    try:
        data = shapes.body_bytes(body)
    except InvalidMessageContentsError as exc:
        assert _regex_refuses(body), body
        bad = shapes._BAD_BODY_CHAR.search(body)
        assert bad is not None and f"U+{ord(bad.group()):04X}" in str(exc)
    else:
        assert not _regex_refuses(body), body
        assert data == body.encode()


@pytest.mark.parametrize("char", ["\x00", "\x0b", "\x1f", "\ud800", "\udfff", "\ufffe",
                                  "\uffff"])
def test_each_refused_kind_in_a_long_body_is_found(char: str) -> None:
    # In the middle of a large body, beside text beyond ASCII and without it.
    for filler in ("a" * 100_000, "é" * 50_000, "\U0001F600" * 25_000):
        with pytest.raises(InvalidMessageContentsError, match=f"U\\+{ord(char):04X}"):
            shapes.body_bytes(filler + char + filler)


def test_allowed_edges_pass() -> None:
    body = "\t\n\r \x7f\x80\ud7ff\ue000\ufffd\U00010000\U0010ffff"
    assert shapes.body_bytes(body) == body.encode()
