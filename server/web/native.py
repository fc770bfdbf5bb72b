"""The native REST/JSON API, version 1 (described by /openapi.json).

Handlers are thin: parse, call the queue service, serialise. Bodies are binary-safe: a
single send takes the raw request body; JSON carries bodies as ``body`` (UTF-8 text) or
``body_base64``, and received messages always carry ``body_base64`` (and ``body`` when the
bytes are valid UTF-8). Errors are ``{"error": {"code", "message"}}`` with REST statuses.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from engine import Message, MessageAttribute, SendEntry
from engine.errors import (
    EngineError,
    InvalidMessageContentsError,
    InvalidParameterError,
    MissingParameterError,
)
from engine.limits import (
    RECEIVE_WAIT_S_MAX,
    VISIBILITY_TIMEOUT_S_MAX,
    QueueAttributes,
)
from server.config import REQUEST_BYTES_MAX
from server.errors import MalformedRequestError, RequestTooLargeError
from server.protection import authz, operator
from server.protection.usage import queue_label
from server.service import QueueService, QueueView
from server.settings import PARTITIONS, RATE_LIMIT, REPLICATION_FACTOR, SSE_MANAGED
from server.web import appkeys
from server.web.errors import spec_for
from server.web.params import int_in_range as _int
from server.web.params import parse_json, read_body
from server.workers.siblings import merge_usage

routes = web.RouteTableDef()

# Entries in one native batch call (SQS allows 10; the engine batches up to 1,000).
NATIVE_BATCH_MAX = 100
_ATTRIBUTE_NAMES = {f.name for f in QueueAttributes.__dataclass_fields__.values()}


def _service(request: web.Request) -> QueueService:
    return request.app[appkeys.SERVICE]


def _account(request: web.Request) -> str:
    """The account of the queue named: the caller's, or ?owner= (admitted by policy)."""
    account: str = (request.get(appkeys.OWNER) or
                    request.get(appkeys.ACCOUNT, request.app[appkeys.CONFIG].account_id))
    return account


def _name(request: web.Request) -> str:
    # Admission has named the request's queue (appkeys.QUEUE) if the name is valid.
    return request.match_info["name"]


async def _json(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        data = parse_json(await read_body(request))
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLargeError(None, REQUEST_BYTES_MAX) from None
    except ValueError as exc:  # UnicodeDecodeError and too deep nesting included
        raise MalformedRequestError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedRequestError("the body must be a JSON object")
    return data


def _str(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidParameterError(name, value, "must be a string")


def _queue_json(request: web.Request, view: QueueView) -> dict[str, Any]:
    record, stats = view.record, view.stats
    return {
        "name": record.name,
        "url": f"{request.scheme}://{request.host}/v1/queues/{record.name}",
        "attributes": view.attributes.to_dict() | {
            "dead_letter_queue": _local(view.attributes.dead_letter_queue)},
        "stats": {
            "visible": stats.visible, "in_flight": stats.in_flight, "delayed": stats.delayed,
            "oldest_age_s": stats.oldest_age_s, "sent": stats.sent,
            "received": stats.received, "deleted": stats.deleted, "expired": stats.expired,
            "moved_to_dead_letter": stats.moved_to_dead_letter, "purged": stats.purged,
        },
        "tags": record.tags,
        "encrypted": record.settings.encrypted,
        "rate_limit": record.extra.get(RATE_LIMIT),
        "replication_factor": record.settings.replication_factor,
        "partitions": record.settings.partitions,
        "created_at": record.created_ms / 1000,
        "modified_at": record.modified_ms / 1000,
    }


def _local(engine_name: str | None) -> str | None:
    return None if engine_name is None else engine_name.partition("/")[2]


def _engine_attributes(request: web.Request, raw: object) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidParameterError("attributes", raw, "must be an object")
    unknown = set(raw) - _ATTRIBUTE_NAMES
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidParameterError(name, raw[name], "is not a queue attribute")
    out = dict(raw)
    if isinstance(out.get("dead_letter_queue"), str):
        out["dead_letter_queue"] = f"{_account(request)}/{out['dead_letter_queue']}"
    return out


def _extra(body: Mapping[str, Any]) -> dict[str, str]:
    """The FrontEnd's queue settings: encryption at rest and a rate-limit override
    (null clears it), kept as their SQS attributes are."""
    extra = {}
    if "encrypted" in body:
        if not isinstance(body["encrypted"], bool):
            raise InvalidParameterError("encrypted", body["encrypted"], "must be true or false")
        extra[SSE_MANAGED] = "true" if body["encrypted"] else "false"
    if "rate_limit" in body:
        value = body["rate_limit"]
        if value is not None and not isinstance(value, str):
            raise InvalidParameterError("rate_limit", value, 'must be a string like "100/s"')
        extra[RATE_LIMIT] = value or ""
    if "replication_factor" in body:
        value = body["replication_factor"]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InvalidParameterError("replication_factor", value,
                                        "must be a whole number or null")
        extra[REPLICATION_FACTOR] = "" if value is None else str(value)
    if "partitions" in body:
        value = body["partitions"]
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidParameterError("partitions", value, "must be a whole number")
        extra[PARTITIONS] = str(value)
    return extra


# --- queues --------------------------------------------------------------------------------


@routes.get("/v1/queues", name="list_queues")
async def list_queues(request: web.Request) -> web.Response:
    limit = _int(request.query.get("limit"), "limit", 1, 1000) or 1000
    names, after = await _service(request).list_queues(
        _account(request), request.query.get("prefix", ""), limit,
        request.query.get("after", ""))
    base = f"{request.scheme}://{request.host}/v1/queues"
    return web.json_response({"queues": [{"name": n, "url": f"{base}/{n}"} for n in names],
                              "next": after})


@routes.post("/v1/queues", name="create_queue")
async def create_queue(request: web.Request) -> web.Response:
    body = await _json(request)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise MissingParameterError("name", "a queue needs a name")
    if (label := queue_label(_account(request), name)) is not None:
        request[appkeys.QUEUE] = label  # only a valid name is kept (usage, audit)
    tags = body.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise InvalidParameterError("tags", tags, "must be an object of strings")
    service = _service(request)
    existed = await service.metadata.get(_account(request), name) is not None
    await service.create_queue(_account(request), name,
                               _engine_attributes(request, body.get("attributes")),
                               _extra(body), tags)
    view = await service.view(_account(request), name)
    return web.json_response(_queue_json(request, view), status=200 if existed else 201)


@routes.get("/v1/queues/{name}", name="get_queue")
async def get_queue(request: web.Request) -> web.Response:
    view = await _service(request).view(_account(request), _name(request))
    return web.json_response(_queue_json(request, view))


@routes.patch("/v1/queues/{name}", name="update_queue")
async def update_queue(request: web.Request) -> web.Response:
    name = _name(request)
    body = await _json(request)
    view = await _service(request).set_attributes(
        _account(request), name, _engine_attributes(request, body.get("attributes")),
        _extra(body))
    return web.json_response(_queue_json(request, view))


@routes.delete("/v1/queues/{name}", name="delete_queue")
async def delete_queue(request: web.Request) -> web.Response:
    await _service(request).delete_queue(_account(request), _name(request))
    return web.Response(status=204)


@routes.post("/v1/queues/{name}/purge", name="purge_queue")
async def purge_queue(request: web.Request) -> web.Response:
    await _service(request).purge(_account(request), _name(request))
    return web.Response(status=204)


# --- messages ------------------------------------------------------------------------------


def _sent(result: object) -> dict[str, Any]:
    if isinstance(result, EngineError):
        return {"error": _error(result)}
    return {"message_id": result.message_id,  # type: ignore[attr-defined]
            "sequence_number": result.sequence_number,  # type: ignore[attr-defined]
            "duplicate": result.duplicate}  # type: ignore[attr-defined]


def _error(exc: BaseException) -> dict[str, str]:
    return {"code": spec_for(exc).native_code, "message": str(exc)}


@routes.post("/v1/queues/{name}/messages", name="send_message")
async def send_message(request: web.Request) -> web.Response:
    """The raw request body is the message; options come as query parameters."""
    name = _name(request)
    try:
        body = await read_body(request)
    except web.HTTPRequestEntityTooLarge:
        raise RequestTooLargeError(None, REQUEST_BYTES_MAX) from None
    dedup_id = request.query.get("dedup_id")
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None:
        if dedup_id is not None and dedup_id != idempotency_key:
            raise InvalidParameterError("Idempotency-Key", idempotency_key,
                                        "differs from the dedup_id parameter")
        dedup_id = idempotency_key
    entry = SendEntry(body,
                      delay_seconds=_int(request.query.get("delay_seconds"), "delay_seconds",
                                         -(2**31), 2**31),
                      group_id=request.query.get("group_id"),
                      dedup_id=dedup_id, sender=request.get(appkeys.SENDER))
    [result] = await _service(request).send(_account(request), name, [entry])
    if isinstance(result, EngineError):
        raise result
    request[appkeys.MESSAGES] = 1
    # A retried send answers 200 with the original id: nothing new was created.
    return web.json_response(_sent(result), status=200 if result.duplicate else 201)


def _entry(raw: object, sender: str | None) -> SendEntry:
    if not isinstance(raw, dict):
        raise InvalidParameterError("messages", raw, "each message must be an object")
    if isinstance(raw.get("body_base64"), str):
        try:
            body = base64.b64decode(raw["body_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameterError("body_base64", "...", "is not valid base64") from None
    elif isinstance(raw.get("body"), str):
        try:
            body = raw["body"].encode()
        except UnicodeEncodeError:
            raise InvalidMessageContentsError("body", "...",
                                              "is not valid Unicode text") from None
    else:
        raise MissingParameterError("body", "each message needs body or body_base64")
    return SendEntry(body, delay_seconds=_int(raw.get("delay_seconds"), "delay_seconds",
                                              -(2**31), 2**31),
                     attributes=_attributes(raw.get("attributes")),
                     group_id=_str(raw.get("group_id"), "group_id"),
                     dedup_id=_str(raw.get("dedup_id"), "dedup_id"), sender=sender)


def _attributes(raw: object) -> dict[str, MessageAttribute] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidParameterError("attributes", raw, "must be an object")
    out = {}
    for name, value in raw.items():
        if not isinstance(value, dict) or not isinstance(value.get("type"), str):
            raise InvalidParameterError(f"attributes.{name}", value,
                                        'must be {"type": ..., "value": ...}')
        if isinstance(value.get("value_base64"), str):
            try:
                data: str | bytes = base64.b64decode(value["value_base64"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidParameterError(f"attributes.{name}", "...",
                                            "value_base64 is not valid base64") from None
        elif isinstance(value.get("value"), str):
            data = value["value"]
        else:
            raise InvalidParameterError(f"attributes.{name}", value,
                                        "needs a string value or value_base64")
        out[name] = MessageAttribute(value["type"], data)
    return out


def _batch(body: Mapping[str, Any], field: str) -> list[Any]:
    items = body.get(field)
    if not isinstance(items, list) or not items:
        raise MissingParameterError(field, f"the request needs a non-empty {field} list")
    if len(items) > NATIVE_BATCH_MAX:
        raise InvalidParameterError(field, len(items), f"at most {NATIVE_BATCH_MAX} entries")
    return items


@routes.post("/v1/queues/{name}/messages/batch", name="send_messages")
async def send_messages(request: web.Request) -> web.Response:
    name = _name(request)
    raw = _batch(await _json(request), "messages")
    await _service(request).record(_account(request), name)  # an unknown queue is a 404
    entries: list[SendEntry | EngineError] = []
    for item in raw:
        try:
            entries.append(_entry(item, request.get(appkeys.SENDER)))
        except EngineError as exc:
            entries.append(exc)
    out = [_sent(r) for r in await _service(request).send(_account(request), name, entries)]
    request[appkeys.MESSAGES] = sum("error" not in r for r in out)
    return web.json_response({"results": out})


def _message_json(message: Message) -> dict[str, Any]:
    try:
        text: str | None = message.body.decode()
    except UnicodeDecodeError:
        text = None
    return {
        "message_id": message.message_id,
        "body": text,
        "body_base64": base64.b64encode(message.body).decode(),
        "receipt": message.receipt,
        "receive_count": message.receive_count,
        "sent_at": message.sent_at,
        "first_received_at": message.first_received_at,
        "attributes": {
            k: ({"type": t, "value_base64": base64.b64encode(v).decode()}
                if isinstance(v, bytes) else {"type": t, "value": v})
            for k, (t, v) in message.attributes.items()
        },
        "group_id": message.group_id,
        "sequence_number": message.sequence_number,
        "dedup_id": message.dedup_id,
    }


@routes.post("/v1/queues/{name}/messages/receive", name="receive_messages")
async def receive_messages(request: web.Request) -> web.Response:
    name = _name(request)
    body = await _json(request)
    count = _int(body.get("max_messages"), "max_messages", 1, NATIVE_BATCH_MAX) or 1
    wait = _int(body.get("wait_seconds"), "wait_seconds", 0, RECEIVE_WAIT_S_MAX)
    visibility = _int(body.get("visibility_timeout"), "visibility_timeout", 0,
                      VISIBILITY_TIMEOUT_S_MAX)
    messages = await _service(request).receive(_account(request), name, count, wait,
                                               visibility)
    request[appkeys.MESSAGES] = len(messages)
    return web.json_response({"messages": [_message_json(m) for m in messages]})


@routes.post("/v1/queues/{name}/messages/delete", name="delete_messages")
async def delete_messages(request: web.Request) -> web.Response:
    name = _name(request)
    receipts = _batch(await _json(request), "receipts")
    if not all(isinstance(r, str) for r in receipts):
        raise InvalidParameterError("receipts", "...", "must be strings")
    results = await _service(request).delete(_account(request), name, receipts)
    request[appkeys.MESSAGES] = sum(r is None for r in results)
    return web.json_response({"results": [None if r is None else _error(r) for r in results]})


@routes.delete("/v1/queues/{name}/messages/{receipt}", name="delete_message")
async def delete_message(request: web.Request) -> web.Response:
    name = _name(request)
    [error] = await _service(request).delete(_account(request), name,
                                             [request.match_info["receipt"]])
    if error is not None:
        raise error
    request[appkeys.MESSAGES] = 1
    return web.Response(status=204)


@routes.post("/v1/queues/{name}/messages/visibility", name="change_visibility")
async def change_visibility(request: web.Request) -> web.Response:
    name = _name(request)
    entries = []
    for item in _batch(await _json(request), "entries"):
        if not isinstance(item, dict) or not isinstance(item.get("receipt"), str):
            raise InvalidParameterError("entries", item, "each entry needs a receipt")
        seconds = _int(item.get("visibility_timeout"), "visibility_timeout", 0,
                       VISIBILITY_TIMEOUT_S_MAX)
        if seconds is None:
            raise MissingParameterError("visibility_timeout", "each entry needs one")
        entries.append((item["receipt"], seconds))
    results = await _service(request).change_visibility(_account(request), name, entries)
    request[appkeys.MESSAGES] = sum(r is None for r in results)
    return web.json_response({"results": [None if r is None else _error(r) for r in results]})


# --- permissions (SQS AddPermission / RemovePermission) -------------------------------------


@routes.get("/v1/queues/{name}/permissions", name="list_permissions")
async def list_permissions(request: web.Request) -> web.Response:
    """The queue's policy statements, one per label."""
    record = await _service(request).record(_account(request), _name(request))
    policy = record.extra.get("Policy")
    statements = authz.parse(policy, limits=False)["Statement"] if policy else []
    return web.json_response({"permissions": statements})


@routes.put("/v1/queues/{name}/permissions/{label}", name="put_permission")
async def put_permission(request: web.Request) -> web.Response:
    """Grant ``actions`` on the queue to ``accounts`` under ``label``."""
    name = _name(request)
    body = await _json(request)
    service = _service(request)
    await service.record(_account(request), name)  # an unknown queue is a 404 first
    accounts, actions = _strings(body, "accounts"), _strings(body, "actions")
    await service.add_permission(_account(request), name, request.app[appkeys.CONFIG].region,
                                 request.match_info["label"], accounts, actions)
    return web.Response(status=204)


def _strings(body: Mapping[str, Any], field: str) -> list[str]:
    value = body.get(field)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidParameterError(field, value, "must be a list of strings")
    return value


@routes.delete("/v1/queues/{name}/permissions/{label}", name="delete_permission")
async def delete_permission(request: web.Request) -> web.Response:
    await _service(request).remove_permission(_account(request), _name(request),
                                               request.match_info["label"])
    return web.Response(status=204)


# --- usage -----------------------------------------------------------------------------------


@routes.get("/v1/usage", name="usage")
async def usage(request: web.Request) -> web.Response:
    """The caller's account's usage counters, per principal and per queue."""
    account = request.get(appkeys.ACCOUNT, request.app[appkeys.CONFIG].account_id)
    siblings = request.app[appkeys.DEPLOYMENT].siblings
    if siblings is None:
        return web.json_response(request.app[appkeys.USAGE].of_account(account))
    return web.json_response(merge_usage(await siblings.gather("usage", account)))


# --- the cluster -----------------------------------------------------------------------------


@routes.get("/v1/cluster", name="cluster")
async def cluster(request: web.Request) -> web.Response:
    """This node's view of the cluster: all of it for an admin; for anyone else, its own
    account's queues and nodes by alias (server/cluster/view.py)."""
    view = request.app[appkeys.DEPLOYMENT].cluster_view
    if view is None:
        return web.json_response({"error": {"code": "NotClustered",
                                            "message": "this server is a single node"}},
                                 status=404)
    server_account = request.app[appkeys.CONFIG].account_id
    account = request.get(appkeys.ACCOUNT, server_account)
    return web.json_response(await view(None if operator.is_admin(account, server_account)
                                        else account))
