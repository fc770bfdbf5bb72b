"""The SQS endpoint: one handler for ``POST /`` (and ``GET /`` for the query protocol).

The protocol is chosen by Content-Type: ``application/x-amz-json-1.0`` is JSON 1.0, a
form (or a GET query string) is the query protocol. Requests are accepted with or without
a SigV4 signature; the FrontEnd's authentication decides what a signature must prove.
Everything read here to choose the action is covered by it when one is required: the path
and the query string are in the canonical request, the body is bound by its SHA-256
(UNSIGNED-PAYLOAD is refused), and a JSON request must sign X-Amz-Target and Content-Type
(server/protection/auth.py).
Errors propagate to the error middleware, which frames them for the protocol recorded on
the request.
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from engine.errors import EngineError
from server.errors import MalformedRequestError, UnknownActionError
from server.protection.usage import queue_label
from server.sqs import json_protocol, query_protocol
from server.sqs.actions import ACTIONS, QUEUE_FROM_URL, Context
from server.sqs.query_protocol import FIELDS_MAX
from server.sqs.shapes import parse_queue_url
from server.web import appkeys
from server.web.params import read_body

# The action metrics and the audit line name for a request whose action is not one of ours.
UNKNOWN_ACTION = "unknown"


async def handle(request: web.Request) -> web.Response:
    # The FrontEnd set the protocol from the headers before the body was read, so an
    # error reading it (too large, say) is framed as the client expects.
    json_request = request[appkeys.PROTOCOL] == "sqs-json"
    body = await read_body(request)
    if json_request:
        action = json_protocol.action(request.headers.get("X-Amz-Target"))
        _name_action(request, action)
        params = json_protocol.parse(body)
    else:
        try:
            text = body.decode()  # a form is ASCII; raw UTF-8 is taken, anything else refused
        except UnicodeDecodeError:
            raise MalformedRequestError("the form is not valid UTF-8") from None
        # The raw query: request.query_string is already percent-decoded (by yarl), and
        # parse_qsl decodes again, which would store a MessageBody=%2541 as "A", not the
        # "%41" that was sent and signed.
        fields = _fields(request.rel_url.raw_query_string) + _fields(text)
        # The query protocol's Action comes from the query string or the form, both signed:
        # the first in the canonical request, the second by the payload hash.
        action = next((v for k, v in fields if k == "Action"), "")
        _name_action(request, action)
        params = query_protocol.parse(fields, action)
        if "QueueUrl" not in params and request.path.count("/") == 2:
            params["QueueUrl"] = request.path  # the query protocol may address the queue
    handler = ACTIONS.get(action)
    if handler is None:
        raise UnknownActionError(action)
    service = request.app[appkeys.SERVICE]
    config = request.app[appkeys.CONFIG]
    caller_account = request.get(appkeys.ACCOUNT, config.account_id)
    target = None
    if action in QUEUE_FROM_URL:
        with contextlib.suppress(EngineError):  # the action reports a bad QueueUrl itself
            target = parse_queue_url(params.get("QueueUrl"))
    elif action == "GetQueueUrl" and isinstance(params.get("QueueName"), str):
        owner = params.get("QueueOwnerAWSAccountId") or caller_account
        if isinstance(owner, str):
            target = (owner, params["QueueName"])
    if target is not None:
        await request.app[appkeys.ADMISSION].admit_queue(request, action, *target)
    ctx = Context(service, caller_account,
                  f"{request.scheme}://{request.host}", config.region,
                  request.app[appkeys.RECEIVE_ATTEMPTS], request.get(appkeys.SENDER),
                  target if action in QUEUE_FROM_URL else None,
                  request.app[appkeys.DEPLOYMENT].siblings)
    if appkeys.QUEUE not in request and (label := queue_label(
            ctx.account, params.get("QueueName"))) is not None:
        request[appkeys.QUEUE] = label  # the audit line's and usage's, once it is a name
    result = await handler(ctx, params)
    request[appkeys.MESSAGES] = _messages(action, result)
    request_id = request[appkeys.REQUEST_ID]
    if request[appkeys.PROTOCOL] == "sqs-json":
        return json_protocol.respond(result, request_id)
    return query_protocol.respond(result, action, request_id)


def _messages(action: str, result: dict[str, Any]) -> int:
    """Messages a request moved, for usage data."""
    if action in ("SendMessage", "DeleteMessage", "ChangeMessageVisibility"):
        return 1
    if action == "ReceiveMessage":
        return len(result.get("Messages", ()))
    if action in ("SendMessageBatch", "DeleteMessageBatch", "ChangeMessageVisibilityBatch"):
        return len(result["Successful"])
    return 0


def _fields(text: str) -> list[tuple[str, str]]:
    if not text:
        return []
    try:
        return parse_qsl(text, keep_blank_values=True, strict_parsing=True,
                         encoding="utf-8", errors="strict", max_num_fields=FIELDS_MAX)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequestError(f"the form is not valid: {exc}") from None


def _name_action(request: web.Request, action: str) -> None:
    """Name the request's action for metrics and the audit line: an action the server
    serves, else UNKNOWN_ACTION, so that made-up actions cannot grow the metrics'
    label sets (one per distinct value, kept for the life of the process)."""
    request[appkeys.ACTION] = action if action in ACTIONS else UNKNOWN_ACTION
