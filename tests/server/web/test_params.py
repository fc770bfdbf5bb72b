"""Client JSON: parsed to a bounded depth, and refused as bad JSON past it (never a 500)."""

from __future__ import annotations

import pytest

from server.config import JSON_DEPTH_MAX
from server.web.params import parse_json, utf8_bytes


def nested(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


def test_the_documented_depth() -> None:
    assert JSON_DEPTH_MAX == 32


@pytest.mark.parametrize("depth", [0, 1, JSON_DEPTH_MAX])
def test_documents_up_to_the_depth_parse(depth: int) -> None:
    text = nested(depth, "1") if depth else "1"
    assert parse_json(text) == parse_json(text.encode())


@pytest.mark.parametrize("depth", [JSON_DEPTH_MAX + 1, 500, 5000, 100_000, 1_000_000])
def test_deeper_documents_are_bad_json(depth: int) -> None:
    for text in (nested(depth), '{"a": ' + nested(depth) + "}",
                 "{" + '"a": {' * (depth - 1) + "}" * depth):
        with pytest.raises(ValueError, match=f"nested deeper than {JSON_DEPTH_MAX}"):
            parse_json(text)
        with pytest.raises(ValueError, match=f"nested deeper than {JSON_DEPTH_MAX}"):
            parse_json(text.encode())


def test_brackets_in_strings_are_not_nesting() -> None:
    text = '{"a": "' + "[" * 10_000 + '", "b": [[1]]}'
    assert parse_json(text)["b"] == [[1]]


def test_wide_documents_are_not_deep() -> None:
    assert len(parse_json("[" + ",".join(["[[1]]"] * 10_000) + "]")) == 10_000


def test_utf8_bytes_counts_lone_surrogates() -> None:
    assert utf8_bytes("aé😀") == 1 + 2 + 4
    assert utf8_bytes("\ud800") == 3
