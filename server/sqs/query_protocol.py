"""SQS's query protocol: form-encoded ``Action=...`` requests and XML responses.

SDKs released before SQS moved to JSON (boto3 1.28 and earlier, and many others) speak
it. Requests flatten lists and maps into numbered fields (``Attribute.1.Name``,
``SendMessageBatchRequestEntry.2.MessageBody``); :func:`parse` turns them into the nested
parameters the JSON protocol carries, so the actions serve both. The element names below
are those of the SQS 2012-11-05 query model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape

from aiohttp import web

from server.errors import MalformedRequestError
from server.web.errors import INTERNAL, ErrorSpec

NAMESPACE = "http://queue.amazonaws.com/doc/2012-11-05/"
CONTENT_TYPE = "text/xml"

# Flattened request lists: query name -> JSON name.
_LISTS = {
    "AttributeName": "AttributeNames",
    "MessageAttributeName": "MessageAttributeNames",
    "MessageSystemAttributeName": "MessageSystemAttributeNames",
    "TagKey": "TagKeys",
    "AWSAccountId": "AWSAccountIds",
    "ActionName": "Actions",
}
_ENTRY_LISTS = {
    "SendMessageBatchRequestEntry",
    "DeleteMessageBatchRequestEntry",
    "ChangeMessageVisibilityBatchRequestEntry",
}
_INDEX = re.compile(r"[1-9]\d{0,5}")
# Fields in one request, at most: far above what any SQS action needs.
FIELDS_MAX = 2000
# Dotted parts of one field name, at most. The deepest SQS needs is seven
# (SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.StringListValue.1); each part
# is a level of the tree parse() builds, so this also bounds the nesting a form can make.
FIELD_PARTS_MAX = 8


def parse(fields: Sequence[tuple[str, str]], action: str) -> dict[str, Any]:
    """Nested JSON-style parameters from flattened query fields."""
    if len(fields) > FIELDS_MAX:
        raise MalformedRequestError(f"more than {FIELDS_MAX} fields")
    tree: dict[str, Any] = {}
    for key, value in fields:
        if key in ("Action", "Version") or key.startswith("X-Amz-") or key == "AWSAccessKeyId":
            continue
        node = tree
        parts = key.split(".", FIELD_PARTS_MAX)
        if len(parts) > FIELD_PARTS_MAX:
            # Entries inside entries would be converted level by level, without end.
            raise MalformedRequestError(f"a field name has at most {FIELD_PARTS_MAX} parts")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise MalformedRequestError(f"field {key!r} conflicts with another")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise MalformedRequestError(f"field {key!r} conflicts with another")
        node[parts[-1]] = value
    return _convert(tree, action)


def _numbered(node: object, name: str) -> list[Any]:
    """The values of a ``Name.1``, ``Name.2`` ... group, in index order."""
    if not isinstance(node, dict) or not all(_INDEX.fullmatch(k) for k in node):
        raise MalformedRequestError(f"{name} must be numbered from 1")
    return [node[k] for k in sorted(node, key=int)]


def _pairs(node: object, name: str, key_field: str, value_field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in _numbered(node, name):
        if not isinstance(item, dict) or key_field not in item:
            raise MalformedRequestError(f"each {name} needs a {key_field}")
        out[item[key_field]] = item.get(value_field, "")
    return out


def _convert(tree: dict[str, Any], action: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "Attribute":
            out["Attributes"] = _pairs(value, key, "Name", "Value")
        elif key == "Tag":
            # CreateQueue names its tags "tags"; TagQueue "Tags".
            out["tags" if action == "CreateQueue" else "Tags"] = _pairs(value, key, "Key",
                                                                         "Value")
        elif key == "MessageAttribute":
            out["MessageAttributes"] = _pairs(value, key, "Name", "Value")
        elif key == "MessageSystemAttribute":
            out["MessageSystemAttributes"] = _pairs(value, key, "Name", "Value")
        elif key in _LISTS:
            out[_LISTS[key]] = _numbered(value, key)
        elif key in _ENTRY_LISTS:
            out["Entries"] = [_convert(entry, action) if isinstance(entry, dict) else entry
                              for entry in _numbered(value, key)]
        elif isinstance(value, dict):
            raise MalformedRequestError(f"unexpected structured field {key!r}")
        else:
            out[key] = value
    return out


# --- responses ------------------------------------------------------------------------------

# XML parsers turn a carriage return into a newline; a message body must keep it.
_ENTITIES = {"\r": "&#xD;"}


def _text(value: object) -> str:
    return escape(str(value), _ENTITIES)


# Result members that are flattened lists, and their element name.
_LIST_ELEMENTS = {
    "QueueUrls": "QueueUrl",
    "queueUrls": "QueueUrl",
    "Messages": "Message",
    "Results": "ListMessageMoveTasksResultEntry",
    "Failed": "BatchResultErrorEntry",
}
# Map members, flattened as <Element><Key>k</Key><Value>v</Value></Element>.
_MAP_ELEMENTS = {
    "Attributes": ("Attribute", "Name", "Value"),
    "Tags": ("Tag", "Key", "Value"),
    "MessageAttributes": ("MessageAttribute", "Name", "Value"),
}


def _xml(name: str, value: object, action: str) -> str:
    if isinstance(value, bool):
        return f"<{name}>{'true' if value else 'false'}</{name}>"
    if isinstance(value, Mapping):
        if name in _MAP_ELEMENTS:
            element, key_name, value_name = _MAP_ELEMENTS[name]
            return "".join(
                f"<{element}><{key_name}>{_text(k)}</{key_name}>"
                f"{_xml(value_name, v, action)}</{element}>" for k, v in value.items())
        return f"<{name}>{''.join(_xml(k, v, action) for k, v in value.items())}</{name}>"
    if isinstance(value, list):
        member = f"{action}ResultEntry" if name == "Successful" else _LIST_ELEMENTS.get(name)
        if member is None:
            raise ValueError(f"no element name for list {name}")
        return "".join(_xml(member, item, action) for item in value)
    return f"<{name}>{_text(value)}</{name}>"


def respond(result: Mapping[str, Any], action: str, request_id: str) -> web.Response:
    inner = "".join(_xml(k, v, action) for k, v in result.items())
    body = (f'<?xml version="1.0"?><{action}Response xmlns="{NAMESPACE}">'
            f"<{action}Result>{inner}</{action}Result>"
            f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
            f"</{action}Response>")
    return web.Response(text=body, content_type=CONTENT_TYPE,
                        headers={"x-amzn-RequestId": request_id})


def error(exc: BaseException, spec: ErrorSpec, request_id: str) -> web.Response:
    fault = "Sender" if spec.sender_fault else "Receiver"
    # Faults stay in the log; "unavailable" says why, so that operators and clients see it.
    message = "internal error" if spec is INTERNAL else str(exc)
    body = (f'<?xml version="1.0"?><ErrorResponse xmlns="{NAMESPACE}"><Error>'
            f"<Type>{fault}</Type><Code>{_text(spec.query_code)}</Code>"
            f"<Message>{_text(message)}</Message><Detail/></Error>"
            f"<RequestId>{request_id}</RequestId></ErrorResponse>")
    return web.Response(status=spec.status, text=body, content_type=CONTENT_TYPE,
                        headers={"x-amzn-RequestId": request_id})
