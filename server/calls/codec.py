"""The values of partition calls (server/calls/) as msgpack, and errors with them.

Engine values travel as arrays of their fields (NamedTuples pack as arrays by themselves;
the receiving side rebuilds them per op), message attributes as maps of name to
``[data_type, value]``. An error of the one hierarchy travels as extension type 1 holding
``[qualified class name, message, attributes]`` and comes out as the same class with the
same attributes, so a remote refusal is answered exactly as a local one. The layout is
drawn in docs/FORMAT.md, "Partition calls".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]

import replication.errors
import server.errors
from engine import Message, QueueAttributes, QueueStats
from engine.errors import EngineError
from engine.records import MessageAttribute, Origin, Send
from engine.results import SendEntry, SendResult

_ERROR_EXT = 1


def _error_classes() -> dict[str, type[EngineError]]:
    """Every class of the one hierarchy, by qualified name."""
    found: dict[str, type[EngineError]] = {}
    pending: list[type[EngineError]] = [EngineError]
    while pending:
        cls = pending.pop()
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        pending.extend(cls.__subclasses__())
    return found


# The modules whose error classes must be known by the time the registry is built.
assert server.errors and replication.errors
_ERRORS = _error_classes()
_PLAIN = (str, int, float, bool, bytes, type(None))


def _plain(value: Any) -> Any:
    """An error attribute as msgpack carries it: scalars and lists of them as they are,
    anything else as its text (an attribute is for the message and the error code)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, _PLAIN) for v in value):
        return list(value)
    return str(value)


def _default(obj: Any) -> Any:
    if isinstance(obj, EngineError):
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        fields = {k: _plain(v) for k, v in vars(obj).items()}
        return msgpack.ExtType(_ERROR_EXT, msgpack.packb([name, str(obj), fields],
                                                         use_bin_type=True))
    if isinstance(obj, memoryview):
        return bytes(obj)
    raise TypeError(f"cannot send {type(obj).__name__} in a partition call")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _ERROR_EXT:
        return msgpack.ExtType(code, data)
    name, text, fields = msgpack.unpackb(data, raw=False)
    cls = _ERRORS.get(name, EngineError)
    # Built without its own __init__, whose arguments differ per class: the message and
    # the attributes are what callers read.
    error = cls.__new__(cls)
    Exception.__init__(error, text)
    vars(error).update(fields)
    return error


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, default=_default, use_bin_type=True)
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)


def _attributes(raw: dict[str, list[Any]] | None) -> dict[str, MessageAttribute] | None:
    if raw is None:
        return None
    return {k: MessageAttribute(t, v) for k, (t, v) in raw.items()}


def _send_entry(raw: list[Any]) -> SendEntry:
    body, delay, attributes, group, dedup, sender, system, message_id, overhead, md5 = raw
    return SendEntry(body, delay, _attributes(attributes), group, dedup, sender,
                     _attributes(system), message_id, overhead, md5)


def _message(raw: list[Any]) -> Message:
    fields = list(raw)
    fields[6] = _attributes(fields[6]) or {}
    fields[11] = _attributes(fields[11]) or {}
    return Message(*fields)


def _moved(raw: list[Any]) -> list[tuple[Origin, bytes, Send]]:
    entries = []
    for origin, message_id, send in raw:
        fields = list(send)
        fields[6] = Origin(*fields[6]) if fields[6] is not None else None
        fields[7] = _attributes(fields[7])
        fields[9] = _attributes(fields[9])
        entries.append((Origin(*origin), message_id, Send(*fields)))
    return entries


def _send_results(raw: list[Any]) -> list[SendResult | EngineError]:
    return [r if isinstance(r, EngineError) else SendResult(*r) for r in raw]


# How each call's arguments arrive at the partition's server, and its result at the
# caller. Each op is the AsyncQueue method of the same name, but for those workers call on
# one another alone: create_queue and delete_queue (the broker's, for one partition),
# accept_moved (dead letters into a partition, durably), and those of
# server/workers/siblings.py: metrics_text, usage and describe (a worker's part of
# /metrics, /v1/usage and /v1/cluster), and sqs_action, attempt_get and attempt_put (made
# at a queue's home).
ARGUMENTS: dict[str, Callable[[list[Any]], list[Any]]] = {
    "send_batch": lambda a: [[_send_entry(e) for e in a[0]]],
    "receive": lambda a: a,
    "wait_receivable": lambda a: a,
    "delete_batch": lambda a: a,
    "change_visibility_batch": lambda a: [[(r, s) for r, s in a[0]]],
    "purge": lambda a: a,
    "attributes": lambda a: a,
    "set_attributes": lambda a: a,
    "stats": lambda a: a,
    "create_queue": lambda a: a,
    "delete_queue": lambda a: a,
    "accept_moved": lambda a: [_moved(a[0])],
    "metrics_text": lambda a: a,
    "usage": lambda a: a,
    "describe": lambda a: a,
    "sqs_action": lambda a: a,
    "attempt_get": lambda a: a,
    "attempt_put": lambda a: a,
}
RESULTS: dict[str, Callable[[Any], Any]] = {
    "send_batch": _send_results,
    "receive": lambda r: [_message(m) for m in r],
    "wait_receivable": bool,
    "delete_batch": list,
    "change_visibility_batch": list,
    "purge": lambda r: None,
    "attributes": QueueAttributes.from_dict,
    "set_attributes": QueueAttributes.from_dict,
    "stats": lambda r: QueueStats(**r),
    "create_queue": lambda r: None,
    "delete_queue": lambda r: None,
    "accept_moved": lambda r: None,
    "metrics_text": bytes,
    "usage": dict,
    "describe": dict,
    "sqs_action": dict,
    "attempt_get": lambda r: r,
    "attempt_put": lambda r: None,
}


def result_value(op: str, result: Any) -> Any:
    """A result in the shape msgpack carries (NamedTuples go as arrays by themselves)."""
    if isinstance(result, QueueAttributes):
        return result.to_dict()
    if isinstance(result, QueueStats):
        return {f: getattr(result, f) for f in QueueStats.__dataclass_fields__}
    return result
