"""Every queue limit, named once, and the checks that enforce them.

The numbers are Amazon SQS's, so that a client written against SQS behaves the same here.
A value outside its range raises :class:`~engine.errors.InvalidParameterError` (or a
subclass) and changes nothing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from engine.errors import (
    InvalidAttributeError,
    InvalidParameterError,
    InvalidQueueNameError,
    MessageTooLargeError,
    MissingParameterError,
)
from engine.format import SEND_BODY_MD5_BYTES, SEND_MESSAGE_ID_BYTES
from engine.records import MessageAttribute

QUEUE_NAME_CHARS_MAX = 80
NAMESPACE_CHARS_MAX = 64
FIFO_SUFFIX = ".fifo"

VISIBILITY_TIMEOUT_S_MAX = 12 * 60 * 60
DELAY_S_MAX = 15 * 60
RETENTION_S_MIN = 60
RETENTION_S_MAX = 14 * 24 * 60 * 60
RETENTION_S_DEFAULT = 4 * 24 * 60 * 60
MESSAGE_BYTES_MIN = 1024
MESSAGE_BYTES_MAX = 1024 * 1024
RECEIVE_WAIT_S_MAX = 20
RECEIVE_MESSAGES_MAX = 10
BATCH_ENTRIES_MAX = 10
MAX_RECEIVE_COUNT_MAX = 1000
MESSAGE_ATTRIBUTES_MAX = 10
ATTRIBUTE_NAME_CHARS_MAX = 256
ATTRIBUTE_TYPE_CHARS_MAX = 256
GROUP_ID_CHARS_MAX = 128
DEDUP_ID_CHARS_MAX = 128
SENDER_CHARS_MAX = 256
# Bytes a caller may wrap a body in (an encryption envelope) beyond the size limit.
ENVELOPE_BYTES_MAX = 64
# A message id is stored in its SEND record, so its size is the format's.
MESSAGE_ID_BYTES = SEND_MESSAGE_ID_BYTES
BODY_MD5_BYTES = SEND_BODY_MD5_BYTES  # a SendEntry's body_md5, when given

# Patterns are used with fullmatch: "$" would also match before a trailing newline.
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Message group and deduplication ids: alphanumerics and ASCII punctuation.
_TOKEN = re.compile(r"""[A-Za-z0-9!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]+""")
_DATA_TYPE = re.compile(r"(String|Number|Binary)(\.[!-~]+)?")
# SQS numbers: integers or decimals, optional exponent; at most 38 significant digits.
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
NUMBER_DIGITS_MAX = 38


def check_queue_name(name: object, fifo: bool) -> str:
    """A queue name by SQS's rules, optionally namespaced as ``namespace/name``.

    The namespace (1..64 of A-Z a-z 0-9 _ -) lets one broker hold queues of several
    owners, such as SQS accounts, that may each name a queue "jobs".
    """
    if not isinstance(name, str):
        raise InvalidQueueNameError("queue name", name, "must be a string")
    namespace, slash, base = name.rpartition("/")
    if slash and (not 1 <= len(namespace) <= NAMESPACE_CHARS_MAX
                  or not _QUEUE_NAME.fullmatch(namespace)):
        raise InvalidQueueNameError(
            "queue namespace", namespace,
            f"must be 1..{NAMESPACE_CHARS_MAX} characters of A-Z a-z 0-9 _ -")
    _check_base_name(name, base, fifo)
    return name


def _check_base_name(name: str, base: str, fifo: bool) -> None:
    stem = base.removesuffix(FIFO_SUFFIX) if fifo else base
    if not 1 <= len(base) <= QUEUE_NAME_CHARS_MAX or not stem or not _QUEUE_NAME.fullmatch(stem):
        raise InvalidQueueNameError(
            "queue name", name,
            f"must be 1..{QUEUE_NAME_CHARS_MAX} characters of A-Z a-z 0-9 _ -"
            + (" ending in .fifo" if fifo else ""),
        )
    if fifo != base.endswith(FIFO_SUFFIX):
        raise InvalidQueueNameError(
            "queue name", name, "a FIFO queue's name ends in .fifo, and only a FIFO queue's"
        )


def check_int(parameter: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidParameterError(parameter, value, f"must be an integer in {low}..{high}")
    return value


@dataclasses.dataclass(frozen=True)
class QueueAttributes:
    """A queue's configuration. Times are in seconds, as SQS states them."""

    visibility_timeout: int = 30
    delay_seconds: int = 0
    retention_seconds: int = RETENTION_S_DEFAULT
    max_message_bytes: int = MESSAGE_BYTES_MAX
    receive_wait_seconds: int = 0
    dead_letter_queue: str | None = None
    max_receive_count: int | None = None
    fifo: bool = False
    content_based_dedup: bool = False

    def __post_init__(self) -> None:
        def attr(name: str, low: int, high: int) -> None:
            try:
                check_int(name, getattr(self, name), low, high)
            except InvalidParameterError as exc:
                raise InvalidAttributeError(name, exc.value, exc.reason) from None

        attr("visibility_timeout", 0, VISIBILITY_TIMEOUT_S_MAX)
        attr("delay_seconds", 0, DELAY_S_MAX)
        attr("retention_seconds", RETENTION_S_MIN, RETENTION_S_MAX)
        attr("max_message_bytes", MESSAGE_BYTES_MIN, MESSAGE_BYTES_MAX)
        attr("receive_wait_seconds", 0, RECEIVE_WAIT_S_MAX)
        if not isinstance(self.fifo, bool):
            raise InvalidAttributeError("fifo", self.fifo, "must be true or false")
        if not isinstance(self.content_based_dedup, bool):
            raise InvalidAttributeError("content_based_dedup", self.content_based_dedup,
                                        "must be true or false")
        if self.content_based_dedup and not self.fifo:
            raise InvalidAttributeError("content_based_dedup", True, "is for FIFO queues only")
        if (self.dead_letter_queue is None) != (self.max_receive_count is None):
            raise InvalidAttributeError(
                "dead_letter_queue", self.dead_letter_queue,
                "dead_letter_queue and max_receive_count are set together",
            )
        if self.dead_letter_queue is not None:
            target = self.dead_letter_queue
            try:
                check_queue_name(target, isinstance(target, str) and target.endswith(FIFO_SUFFIX))
            except InvalidParameterError as exc:
                raise InvalidAttributeError("dead_letter_queue", target, exc.reason) from None
            if target.endswith(FIFO_SUFFIX) != self.fifo:
                raise InvalidAttributeError("dead_letter_queue", target,
                                            "must be FIFO exactly when this queue is")
            attr("max_receive_count", 1, MAX_RECEIVE_COUNT_MAX)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QueueAttributes:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidAttributeError(name, data[name], "is not a queue attribute")
        return cls(**data)

    def replace(self, **changes: Any) -> QueueAttributes:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidAttributeError(name, changes[name], "is not a queue attribute")
        if "fifo" in changes and changes["fifo"] != self.fifo:
            raise InvalidAttributeError("fifo", changes["fifo"], "cannot change after creation")
        return dataclasses.replace(self, **changes)


def _encodable(parameter: str, value: str) -> str:
    """A str that UTF-8 can encode (JSON can carry lone surrogates that it cannot)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidParameterError(parameter, value, "is not valid Unicode text") from None
    return value


def check_message_attributes(
    attributes: Mapping[str, MessageAttribute] | None,
) -> dict[str, MessageAttribute] | None:
    """Validate message attributes; return them as MessageAttribute tuples (or None)."""
    if not attributes:
        return None
    if not isinstance(attributes, Mapping):
        raise InvalidParameterError("attributes", attributes, "must be a mapping")
    if len(attributes) > MESSAGE_ATTRIBUTES_MAX:
        raise InvalidParameterError("attributes", len(attributes),
                                    f"at most {MESSAGE_ATTRIBUTES_MAX} per message")
    out: dict[str, MessageAttribute] = {}
    for name, attribute in attributes.items():
        _check_attribute_name(name)
        if not isinstance(attribute, tuple) or len(attribute) != 2:
            raise InvalidParameterError(f"attribute {name}", attribute,
                                        "must be a (data_type, value) pair")
        data_type, value = attribute
        if isinstance(value, str):
            _encodable(f"attribute {name}", value)
        if (not isinstance(data_type, str) or len(data_type) > ATTRIBUTE_TYPE_CHARS_MAX
                or not _DATA_TYPE.fullmatch(data_type)):
            raise InvalidParameterError(f"attribute {name} data type", data_type,
                                        "must be String, Number or Binary, with an optional "
                                        ".suffix")
        if data_type.startswith("Binary"):
            if not isinstance(value, bytes):
                raise InvalidParameterError(f"attribute {name}", value,
                                            "a Binary value must be bytes")
        elif not isinstance(value, str):
            raise InvalidParameterError(f"attribute {name}", value,
                                        "a String or Number value must be str")
        elif data_type.startswith("Number") and not _is_number(value):
            raise InvalidParameterError(f"attribute {name}", value, "is not a number")
        if len(value) == 0:
            raise InvalidParameterError(f"attribute {name}", value, "must not be empty")
        out[name] = MessageAttribute(data_type, value)
    return out


def _check_attribute_name(name: object) -> None:
    if (not isinstance(name, str) or not 1 <= len(name) <= ATTRIBUTE_NAME_CHARS_MAX
            or not _ATTRIBUTE_NAME.fullmatch(name) or name.startswith(".") or name.endswith(".")
            or ".." in name or name.lower().startswith(("aws.", "amazon."))):
        raise InvalidParameterError(
            "attribute name", name,
            f"must be 1..{ATTRIBUTE_NAME_CHARS_MAX} of A-Z a-z 0-9 _ - . without leading, "
            "trailing or doubled dots, and not start with AWS. or Amazon.",
        )


def _is_number(value: str) -> bool:
    """A finite decimal number as SQS takes it (no nan, infinity or underscores)."""
    match = _NUMBER.fullmatch(value)
    if match is None:
        return False
    digits = match.group(1).replace(".", "").lstrip("0")
    return len(digits) <= NUMBER_DIGITS_MAX


def message_bytes(body: bytes, attributes: Mapping[str, MessageAttribute] | None) -> int:
    """A message's size as SQS counts it: body plus attribute names, types and values."""
    size = len(body)
    if attributes:
        for name, (data_type, value) in attributes.items():
            size += len(name.encode()) + len(data_type.encode())
            size += len(value) if isinstance(value, bytes) else len(value.encode())
    return size


def check_message_size(size: int, limit: int) -> None:
    if size > limit:
        raise MessageTooLargeError(size, limit)


def check_token(parameter: str, value: object, limit: int) -> str:
    """A message group or deduplication id."""
    if not isinstance(value, str) or not 1 <= len(value) <= limit or not _TOKEN.fullmatch(value):
        raise InvalidParameterError(parameter, value,
                                    f"must be 1..{limit} alphanumeric or punctuation characters")
    return value


def require(parameter: str, value: object, reason: str) -> None:
    if value is None:
        raise MissingParameterError(parameter, reason)
