"""Parameters as every protocol receives them: JSON documents, and integers (JSON numbers,
or decimal text from query strings and form bodies); and JSON as the server writes it
(:func:`dump_json`)."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from aiohttp import web

from engine.errors import InvalidParameterError
from server.config import JSON_DEPTH_MAX
from server.errors import IncompleteBodyError

# ASCII digits only: str.isdigit and "\d" also accept other scripts' digits, which int()
# would then read. Twelve digits cover every limit with room to spare.
_INT_TEXT = re.compile(r"-?[0-9]{1,12}")


def as_int(value: object) -> int | None:
    """value as an integer (an int that is not a bool, or its decimal text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    return None


def int_in_range(value: object, name: str, low: int, high: int) -> int | None:
    """An optional integer parameter within low..high; None when absent."""
    if value is None:
        return None
    number = as_int(value)
    if number is None or not low <= number <= high:
        raise InvalidParameterError(name, value, f"must be an integer in {low}..{high}")
    return number


def parse_json(data: str | bytes, depth_max: int = JSON_DEPTH_MAX) -> Any:
    """A JSON document a client sent, nested at most ``depth_max`` levels; ValueError
    (with the reason) for one that is not JSON or is nested deeper.

    orjson parses it: about five times faster than the standard library's parser on a
    large message body, which on the SQS JSON protocol arrives as one JSON string. What
    orjson refuses, the standard library parses or refuses as before, so the documents
    accepted are the same; only an integer past 64 bits comes back as a float, which every
    integer parameter refuses as it refused the integer. The standard library's parser
    recurses once per level: a document nested deeper than the interpreter's stack
    allows raises RecursionError, which becomes a ValueError here. A document that parses
    is then held to ``depth_max``, so later code (error messages, the policy compiler)
    never recurses through client nesting either.
    """
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        # The standard library decides what orjson refuses: it accepts some of it (a lone
        # surrogate escape, NaN), which the action then refuses as SQS does, in a batch
        # for its entry alone.
        try:
            document = json.loads(data)
        except RecursionError:
            raise ValueError(f"nested deeper than {depth_max} levels") from None
    if not isinstance(document, dict | list):
        return document
    # Each level opens a bracket: a small document with few brackets needs no walk. A large
    # one is walked, which looks at its containers only: counting its brackets would read
    # every byte of a big message body once more.
    if len(data) > _BRACKETS_COUNTED_MAX:
        deep = _deeper_than(document, depth_max)
    else:
        opened = (data.count(b"[") + data.count(b"{") if isinstance(data, bytes)
                  else data.count("[") + data.count("{"))
        deep = opened > depth_max and _deeper_than(document, depth_max)
    if deep:
        raise ValueError(f"nested deeper than {depth_max} levels")
    return document


# Written by the standard library, which refuses them, rather than serialised quietly by
# orjson: a value holding one is a bug to surface.
_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def dump_json(value: Any) -> bytes:
    """Compact JSON of value, in UTF-8: an SQS answer, an access-log line.

    orjson writes it, about 30 times the standard library's speed on a received message's
    body (4 µs an access-log line against 0.3). What orjson refuses, the standard library
    writes: a lone surrogate (a client may send one escaped, in a tag say; parse_json takes
    it), an integer past 64 bits. The two differ only in that orjson writes text beyond
    ASCII as UTF-8 where the standard library escapes it.
    """
    try:
        return orjson.dumps(value, option=_PASSTHROUGH)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


# Documents up to this size have their brackets counted before any walk (see parse_json).
_BRACKETS_COUNTED_MAX = 16 * 1024


def _deeper_than(document: Any, depth_max: int) -> bool:
    """True if a parsed document nests more than ``depth_max`` levels: walked a level at a
    time without recursion, looking only at containers, and no deeper than one level
    past the limit."""
    level = [document] if isinstance(document, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > depth_max:
            return True
        below = []
        for container in level:
            values = container.values() if isinstance(container, dict) else container
            below += [value for value in values if isinstance(value, dict | list)]
        level = below
    return False


def utf8_bytes(text: str) -> int:
    """The bytes of ``text`` in UTF-8, as SQS counts an attribute's size. A lone surrogate
    (JSON can escape one) counts its three bytes rather than failing the count."""
    return len(text.encode("utf-8", "surrogatepass"))


async def read_body(request: web.Request) -> bytes:
    """The request's whole body. A client that leaves before it has sent all it declared
    sent a malformed request (400, and nothing was done), not a server fault."""
    try:
        return await request.read()
    except ConnectionResetError:  # aiohttp: the connection was lost mid-body
        raise IncompleteBodyError(request.content_length) from None
