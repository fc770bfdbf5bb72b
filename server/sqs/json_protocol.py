"""SQS's JSON 1.0 framing: ``POST /`` with ``X-Amz-Target: AmazonSQS.<Action>``.

Errors are ``{"__type": "com.amazonaws.sqs#<Shape>", "message": ...}`` with the query
protocol's code in the ``x-amzn-query-error`` header, as SQS sends them: current SDKs pick
the exception class from the shape and report the code from the header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from server.errors import MalformedRequestError, UnknownActionError
from server.web.errors import INTERNAL, ErrorSpec
from server.web.params import dump_json, parse_json

CONTENT_TYPE = "application/x-amz-json-1.0"
TARGET_PREFIX = "AmazonSQS."
# The headers a JSON request's action and protocol are read from (:func:`action`,
# :func:`protocol_of`). The body is bound by its hash, but these are only if signed: a
# signed request must name them in SignedHeaders, or its SendMessage could be resent as a
# DeleteQueue under the same signature. botocore always signs both.
SIGNED_HEADERS = ("content-type", "x-amz-target")


def protocol_of(request: web.Request) -> str:
    """"sqs-json" or "sqs-query", from the headers alone (the body may not be read yet)."""
    if request.content_type == CONTENT_TYPE or "X-Amz-Target" in request.headers:
        return "sqs-json"
    return "sqs-query"


def action(target: str | None) -> str:
    if not target:
        raise UnknownActionError("")
    if not target.startswith(TARGET_PREFIX):
        raise UnknownActionError(target)
    return target[len(TARGET_PREFIX):]


def parse(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        params = parse_json(body)
    except ValueError as exc:  # UnicodeDecodeError and too deep nesting included
        raise MalformedRequestError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise MalformedRequestError("the body must be a JSON object")
    return params


def respond(result: Mapping[str, Any], request_id: str) -> web.Response:
    body = dump_json(result)
    return web.Response(body=body, content_type=CONTENT_TYPE,
                        headers={"x-amzn-RequestId": request_id})


def error(exc: BaseException, spec: ErrorSpec, request_id: str) -> web.Response:
    # Faults stay in the log; "unavailable" says why, so that operators and clients see it.
    message = "internal error" if spec is INTERNAL else str(exc)
    body = {"__type": f"com.amazonaws.sqs#{spec.sqs_type}", "message": message}
    fault = "Sender" if spec.sender_fault else "Receiver"
    return web.Response(
        status=spec.status, body=json.dumps(body).encode(), content_type=CONTENT_TYPE,
        headers={"x-amzn-RequestId": request_id,
                 "x-amzn-query-error": f"{spec.query_code};{fault}"},
    )
