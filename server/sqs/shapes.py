"""SQS values and the engine's: queue attributes, message attributes, digests, names.

Both SQS protocols (JSON 1.0 and query) carry the same values; they differ only in how
requests and responses are framed. This module converts values; server/sqs/actions.py
uses it for both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from engine import Message, MessageAttribute, QueueAttributes, QueueStats
from engine.errors import (
    InvalidAttributeError,
    InvalidMessageContentsError,
    InvalidParameterError,
    MissingParameterError,
)
from engine.limits import FIFO_SUFFIX
from server.config import STORED_ATTRIBUTE_BYTES_MAX
from server.errors import InvalidAddressError, InvalidAttributeNameError
from server.settings import KMS_KEY, PARTITIONS, RATE_LIMIT, REPLICATION_FACTOR, SSE_MANAGED
from server.web.params import as_int, parse_json, utf8_bytes

if TYPE_CHECKING:
    # Only named in annotations: the metadata module compiles queue policies with
    # server/protection/authz.py, which uses this module's ARNs.
    from server.metadata import QueueRecord

# --- names, URLs and ARNs --------------------------------------------------------------

_ACCOUNT = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What a queue name may hold (the full rules are checked where the queue is looked up).
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,80}")


def queue_url(base: str, account: str, name: str) -> str:
    return f"{base}/{account}/{name}"


def parse_queue_url(url: object) -> tuple[str, str]:
    """(account, name) from a queue URL; the host part is not checked (any node serves)."""
    if not isinstance(url, str) or not url:
        raise MissingParameterError("QueueUrl", "the request needs a QueueUrl")
    try:
        path = urlsplit(url).path if "://" in url else url
    except ValueError:
        raise InvalidAddressError(url) from None
    parts = [p for p in path.split("/") if p]
    if len(parts) != 2 or not _ACCOUNT.fullmatch(parts[0]) or not _NAME.fullmatch(parts[1]):
        raise InvalidAddressError(url)
    return parts[0], parts[1]


def queue_arn(region: str, account: str, name: str) -> str:
    return f"arn:aws:sqs:{region}:{account}:{name}"


def parse_arn(arn: object, parameter: str) -> tuple[str, str]:
    """(account, name) from an SQS queue ARN."""
    if not isinstance(arn, str):
        raise InvalidParameterError(parameter, arn, "must be an SQS queue ARN")
    parts = arn.split(":")
    if (len(parts) != 6 or parts[:3] != ["arn", "aws", "sqs"]
            or not _ACCOUNT.fullmatch(parts[4]) or not _NAME.fullmatch(parts[5])):
        raise InvalidParameterError(parameter, arn, "must be arn:aws:sqs:REGION:ACCOUNT:NAME")
    return parts[4], parts[5]


# --- queue attributes ------------------------------------------------------------------

# SQS name -> engine QueueAttributes field, for the attributes that shape message flow.
_ENGINE_INT = {
    "VisibilityTimeout": "visibility_timeout",
    "DelaySeconds": "delay_seconds",
    "MessageRetentionPeriod": "retention_seconds",
    "MaximumMessageSize": "max_message_bytes",
    "ReceiveMessageWaitTimeSeconds": "receive_wait_seconds",
}
_ENGINE_BOOL = {"FifoQueue": "fifo", "ContentBasedDeduplication": "content_based_dedup"}
# Kept as given (in the metadata store): they describe the queue, not message flow.
EXTRA_ATTRIBUTES = frozenset({
    "Policy", KMS_KEY, "KmsDataKeyReusePeriodSeconds", SSE_MANAGED,
    "RedriveAllowPolicy", "DeduplicationScope", "FifoThroughputLimit",
    RATE_LIMIT, REPLICATION_FACTOR, PARTITIONS,  # this server's own (server/settings.py)
})
_READ_ONLY = frozenset({
    "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed", "CreatedTimestamp", "LastModifiedTimestamp",
    "QueueArn",
})
SETTABLE = frozenset(_ENGINE_INT) | frozenset(_ENGINE_BOOL) | EXTRA_ATTRIBUTES | {"RedrivePolicy"}
READABLE = SETTABLE | _READ_ONLY


def _int(name: str, value: object) -> int:
    number = as_int(value)
    if number is None:
        raise InvalidAttributeError(name, value, "must be an integer")
    return number


def _bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidAttributeError(name, value, "must be true or false")


def engine_attributes(attributes: Mapping[str, Any], *, creating: bool
                      ) -> tuple[dict[str, Any], dict[str, str]]:
    """Split SQS attributes into engine QueueAttributes fields and the rest.

    Raises InvalidAttributeName for a name SQS does not know (or cannot set) and
    InvalidAttributeValue for a value it would refuse.
    """
    if not isinstance(attributes, Mapping):
        raise InvalidParameterError("Attributes", attributes, "must be a map")
    engine: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for name, value in attributes.items():
        if name in _ENGINE_INT:
            engine[_ENGINE_INT[name]] = _int(name, value)
        elif name in _ENGINE_BOOL:
            if name == "FifoQueue" and not creating:
                raise InvalidAttributeNameError(name)  # fixed at creation
            engine[_ENGINE_BOOL[name]] = _bool(name, value)
        elif name == "RedrivePolicy":
            engine.update(_redrive(value))
        elif name in EXTRA_ATTRIBUTES:
            if not isinstance(value, str):
                raise InvalidAttributeError(name, value, "must be a string")
            # The Policy has SQS's own limits, checked where it is parsed (authz.parse).
            if name != "Policy" and utf8_bytes(value) > STORED_ATTRIBUTE_BYTES_MAX:
                raise InvalidAttributeError(name, f"{utf8_bytes(value)} bytes",
                                            f"at most {STORED_ATTRIBUTE_BYTES_MAX} bytes")
            if name == "RedriveAllowPolicy" and value:
                _json_object(name, value)
            extra[name] = value
        else:
            raise InvalidAttributeNameError(str(name))
    return engine, extra


def _json_object(name: str, value: str) -> dict[str, Any]:
    try:
        parsed = parse_json(value)
    except ValueError as exc:  # too deep nesting included: a 400, like any bad JSON
        raise InvalidAttributeError(name, value, f"must be a JSON object ({exc})") from None
    if not isinstance(parsed, dict):
        raise InvalidAttributeError(name, value, "must be a JSON object")
    return parsed


def _redrive(value: object) -> dict[str, Any]:
    if value == "":
        return {"dead_letter_queue": None, "max_receive_count": None}
    if not isinstance(value, str):
        raise InvalidAttributeError("RedrivePolicy", value, "must be a JSON string")
    policy = _json_object("RedrivePolicy", value)
    try:
        account, name = parse_arn(policy.get("deadLetterTargetArn"), "deadLetterTargetArn")
    except InvalidParameterError as exc:
        raise InvalidAttributeError("RedrivePolicy", value, exc.reason) from None
    count = policy.get("maxReceiveCount")
    if isinstance(count, str) and count.isdigit():
        count = int(count)
    if not isinstance(count, int) or isinstance(count, bool):
        raise InvalidAttributeError("RedrivePolicy", value, "maxReceiveCount must be a number")
    return {"dead_letter_queue": f"{account}/{name}", "max_receive_count": count}


def sqs_attributes(view_record: QueueRecord, attrs: QueueAttributes, stats: QueueStats,
                   region: str, wanted: set[str]) -> dict[str, str]:
    """The queue's attributes in SQS form, limited to the names asked for ("All": all)."""
    everything = "All" in wanted
    out: dict[str, str] = {}

    def put(name: str, value: object) -> None:
        if everything or name in wanted:
            out[name] = str(value).lower() if isinstance(value, bool) else str(value)

    for sqs_name, field in _ENGINE_INT.items():
        put(sqs_name, getattr(attrs, field))
    put("ApproximateNumberOfMessages", stats.visible)
    put("ApproximateNumberOfMessagesNotVisible", stats.in_flight)
    put("ApproximateNumberOfMessagesDelayed", stats.delayed)
    put("CreatedTimestamp", view_record.created_ms // 1000)
    put("LastModifiedTimestamp", view_record.modified_ms // 1000)
    put("QueueArn", queue_arn(region, view_record.account, view_record.name))
    if attrs.dead_letter_queue is not None:
        account, _, name = attrs.dead_letter_queue.partition("/")
        put("RedrivePolicy", json.dumps({
            "deadLetterTargetArn": queue_arn(region, account, name),
            "maxReceiveCount": attrs.max_receive_count,
        }, separators=(",", ":")))
    put("SqsManagedSseEnabled", view_record.extra.get("SqsManagedSseEnabled", "false"))
    if attrs.fifo:
        put("FifoQueue", True)
        put("ContentBasedDeduplication", attrs.content_based_dedup)
        put("DeduplicationScope", view_record.extra.get("DeduplicationScope", "queue"))
        put("FifoThroughputLimit", view_record.extra.get("FifoThroughputLimit", "perQueue"))
    for name, value in view_record.extra.items():
        if name not in out and (everything or name in wanted):
            out[name] = value
    return out


def check_attribute_names(names: object, allowed: frozenset[str] = READABLE) -> set[str]:
    if names is None:
        return set()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidParameterError("AttributeNames", names, "must be a list of names")
    for name in names:
        if name != "All" and name not in allowed:
            raise InvalidAttributeNameError(name)
    return set(names)


# --- message bodies and attributes -------------------------------------------------------

# The characters SQS accepts in a message body (XML 1.0's Char production).
_BAD_BODY_CHAR = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


# The bytes of UTF-8 text that may stand in a body: all but the control characters other
# than tab, LF and CR. A character outside the set is one of those, a surrogate (which
# UTF-8 cannot encode) or U+FFFE/U+FFFF.
_BODY_BYTES_OK = bytes(b for b in range(256) if b >= 0x20 or b in (0x09, 0x0A, 0x0D))


def body_bytes(body: object) -> bytes:
    """A message body's UTF-8 bytes, once every character is one SQS accepts.

    The check runs at C speed on the bytes (a regular expression over the text cost
    about 3 us per KiB): the bytes left once the allowed ones are deleted, none for a
    good body, and for text beyond ASCII the encoding itself (a surrogate fails it) and
    U+FFFE/U+FFFF. Only a refused body is searched for the character to name.
    """
    if not isinstance(body, str) or body == "":
        raise MissingParameterError("MessageBody", "the request needs a non-empty MessageBody")
    try:
        data: bytes | None = body.encode()
    except UnicodeEncodeError:  # a surrogate
        data = None
    if data is None or data.translate(None, _BODY_BYTES_OK) or (
            not body.isascii() and ("\ufffe" in body or "\uffff" in body)):
        # The two checks refuse the same characters (tests/server/sqs/test_shapes.py).
        bad = _BAD_BODY_CHAR.search(body)
        raise InvalidMessageContentsError(
            "MessageBody", f"U+{ord(bad.group()):04X}" if bad else body[:16],
            "holds a character outside #x9 #xA #xD #x20-#xD7FF #xE000-#xFFFD "
            "#x10000-#x10FFFF")
    return data


def message_attributes(raw: object, parameter: str = "MessageAttributes"
                       ) -> dict[str, MessageAttribute] | None:
    """SQS MessageAttributes ({name: {DataType, StringValue|BinaryValue}}) for the engine.

    Binary values arrive base64-encoded in both protocols.
    """
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidParameterError(parameter, raw, "must be a map")
    out: dict[str, MessageAttribute] = {}
    for name, value in raw.items():
        if not isinstance(value, Mapping):
            raise InvalidParameterError(f"{parameter}.{name}", value, "must be a map")
        data_type = value.get("DataType")
        if not isinstance(data_type, str) or not data_type:
            raise InvalidParameterError(f"{parameter}.{name}.DataType", data_type,
                                        "every message attribute needs a DataType")
        if value.get("StringListValues") or value.get("BinaryListValues"):
            raise InvalidParameterError(f"{parameter}.{name}", "list values",
                                        "list values are reserved and not supported")
        if data_type.startswith("Binary"):
            blob = value.get("BinaryValue")
            if not isinstance(blob, str | bytes):
                raise InvalidParameterError(f"{parameter}.{name}.BinaryValue", blob,
                                            "a Binary attribute needs a BinaryValue")
            out[name] = MessageAttribute(data_type, _b64(blob, f"{parameter}.{name}"))
        else:
            text = value.get("StringValue")
            if not isinstance(text, str):
                raise InvalidParameterError(f"{parameter}.{name}.StringValue", text,
                                            "a String or Number attribute needs a StringValue")
            out[name] = MessageAttribute(data_type, text)
    return out


def _b64(value: str | bytes, parameter: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterError(parameter, value, "is not valid base64") from None


def attributes_out(attributes: Mapping[str, MessageAttribute]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, (data_type, value) in attributes.items():
        if isinstance(value, bytes):
            out[name] = {"DataType": data_type, "BinaryValue": base64.b64encode(value).decode()}
        else:
            out[name] = {"DataType": data_type, "StringValue": value}
    return out


def body_digest(body: bytes) -> bytes:
    """The MD5 of a body: what SQS answers as MD5OfMessageBody and MD5OfBody."""
    return hashlib.md5(body, usedforsecurity=False).digest()


def md5_of_attributes(attributes: Mapping[str, MessageAttribute]) -> str:
    """SQS's digest of message attributes: for each attribute by name, the length-prefixed
    (4-byte big-endian) name and data type, a transport byte (1 string or number, 2
    binary), and the length-prefixed value."""
    digest = hashlib.md5(usedforsecurity=False)
    for name in sorted(attributes):
        data_type, value = attributes[name]
        for part in (name.encode(), data_type.encode()):
            digest.update(struct.pack(">I", len(part)) + part)
        raw = value if isinstance(value, bytes) else value.encode()
        digest.update(b"\x02" if data_type.startswith("Binary") else b"\x01")
        digest.update(struct.pack(">I", len(raw)) + raw)
    return digest.hexdigest()


# --- received messages ----------------------------------------------------------------------

SYSTEM_ATTRIBUTE_NAMES = frozenset({
    "All", "SenderId", "SentTimestamp", "ApproximateReceiveCount",
    "ApproximateFirstReceiveTimestamp", "SequenceNumber", "MessageDeduplicationId",
    "MessageGroupId", "AWSTraceHeader", "DeadLetterQueueSourceArn",
})


def wanted_attribute_names(names: object, parameter: str) -> set[str]:
    if names is None:
        return set()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidParameterError(parameter, names, "must be a list of names")
    return set(names)


def received(message: Message, system_names: set[str], attribute_names: set[str],
             region: str, account: str) -> dict[str, Any]:
    """A received message in SQS form, with the system and message attributes asked for."""
    body = message.body.decode()
    out: dict[str, Any] = {
        "MessageId": message.message_id,
        "ReceiptHandle": message.receipt,
        # Stored at send by the SQS actions; made here for a message sent without it
        # (the native API, an encrypted queue, a record written before it was stored).
        "MD5OfBody": (message.body_md5 if message.body_md5 is not None
                      else body_digest(message.body)).hex(),
        "Body": body,
    }
    system = _system_attributes(message, system_names, region, account)
    if system:
        out["Attributes"] = system
    chosen = _chosen(message.attributes, attribute_names)
    if chosen:
        out["MessageAttributes"] = attributes_out(chosen)
        out["MD5OfMessageAttributes"] = md5_of_attributes(chosen)
    return out


def _system_attributes(message: Message, names: set[str], region: str, account: str
                       ) -> dict[str, str]:
    if not names:
        return {}
    every = "All" in names
    values: dict[str, str | None] = {
        "SenderId": message.sender or account,
        "SentTimestamp": str(round(message.sent_at * 1000)),
        "ApproximateReceiveCount": str(message.receive_count),
        "ApproximateFirstReceiveTimestamp": str(round(message.first_received_at * 1000)),
        "SequenceNumber": message.sequence_number,
        "MessageDeduplicationId": message.dedup_id,
        "MessageGroupId": message.group_id,
    }
    trace = message.system_attributes.get("AWSTraceHeader")
    if trace is not None:
        values["AWSTraceHeader"] = str(trace.value)
    if isinstance(message.dead_letter_source, str):
        source_account, _, source = message.dead_letter_source.partition("/")
        values["DeadLetterQueueSourceArn"] = queue_arn(region, source_account, source)
    return {k: v for k, v in values.items() if v is not None and (every or k in names)}


def _chosen(attributes: Mapping[str, MessageAttribute], names: set[str]
            ) -> dict[str, MessageAttribute]:
    if not attributes or not names:
        return {}
    if "All" in names or ".*" in names:
        return dict(attributes)
    prefixes = tuple(n[:-2] for n in names if n.endswith(".*"))
    return {k: v for k, v in attributes.items()
            if k in names or (prefixes and k.startswith(prefixes))}


def is_fifo_name(name: str) -> bool:
    return name.endswith(FIFO_SUFFIX)
