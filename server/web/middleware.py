"""The request path's outer layers: request ids, body limits, admission, errors, audit and
metrics.

:func:`frontend` wraps every request: the application's one middleware. It gives the
request an id, refuses a declared body over REQUEST_BYTES_MAX before reading a byte of
it, admits the caller (server/protection/admission.py), maps any exception to the
response its protocol expects (the one place errors become HTTP), and writes one JSON
audit line and the request metrics.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from engine.errors import MemoryFullError
from server import randomness
from server.config import REQUEST_BYTES_MAX
from server.errors import (
    MetricsUnauthorizedError,
    NotFoundError,
    RequestTooLargeError,
    ThrottledError,
)
from server.sqs import json_protocol, query_protocol
from server.web import appkeys
from server.web.errors import INTERNAL, native_status, spec_for

# The SQS endpoint, and a queue's URL (the query protocol may post to it).
_SQS_PATH = re.compile(r"/|/[0-9]{12}/[^/]+")
_log = logging.getLogger("conveyor.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def frontend(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[appkeys.REQUEST_ID] = randomness.request_id()
    started = time.perf_counter()
    if _SQS_PATH.fullmatch(request.path):
        # Known from the headers alone, so that even a refusal before the SQS handler
        # runs (a bad signature, a rate limit) is framed the way the client parses.
        request[appkeys.PROTOCOL] = json_protocol.protocol_of(request)
    try:
        declared = request.content_length
        if declared is not None and declared > REQUEST_BYTES_MAX:
            raise RequestTooLargeError(declared, REQUEST_BYTES_MAX)
        # Indexed, not .get(): an app without its admission fails closed, never open.
        await request.app[appkeys.ADMISSION].admit(request)
        response = await handler(request)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(request, RequestTooLargeError(None, REQUEST_BYTES_MAX))
    except web.HTTPNotFound:
        response = error_response(request, NotFoundError(f"no route for {request.path}"))
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.text and "json" not in (exc.content_type or ""):
            # aiohttp's own refusals (405, 400 from the parser): keep the status, use our body.
            response = web.json_response(
                {"error": {"code": exc.reason.replace(" ", ""), "message": exc.text}},
                status=exc.status)
        else:
            raise
    except Exception as exc:
        response = error_response(request, exc)
    _account(request, response, time.perf_counter() - started)
    return response


def error_response(request: web.Request, exc: BaseException) -> web.Response:
    """The one mapping of an exception to an HTTP response, framed for the protocol."""
    spec = spec_for(exc)
    if spec is INTERNAL:
        _log.error("request %s failed", request[appkeys.REQUEST_ID], exc_info=exc)
    elif spec.status >= 500:  # unavailable: expected at times, and said by the message
        _log.warning("request %s refused: %s", request[appkeys.REQUEST_ID], exc)
    protocol = request.get(appkeys.PROTOCOL, "native")
    request_id = request[appkeys.REQUEST_ID]
    if protocol == "sqs-json":
        response = json_protocol.error(exc, spec, request_id)
    elif protocol == "sqs-query":
        response = query_protocol.error(exc, spec, request_id)
    else:
        message = "internal error" if spec is INTERNAL else str(exc)
        response = web.json_response(
            {"error": {"code": spec.native_code, "message": message}},
            status=native_status(exc), headers={"X-Request-Id": request_id})
    if isinstance(exc, ThrottledError | MemoryFullError):
        # Whole seconds, rounded up, as RFC 9110 requires; at least 1.
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif isinstance(exc, MetricsUnauthorizedError):
        response.headers["WWW-Authenticate"] = 'Bearer realm="conveyor-metrics"'
    return response


def _account(request: web.Request, response: web.StreamResponse, elapsed: float) -> None:
    protocol = request.get(appkeys.PROTOCOL, "native")
    action = request.get(appkeys.ACTION) or _route_name(request)
    received = request.content_length or 0
    request.app[appkeys.METRICS].requests.record(protocol, action, response.status, elapsed,
                                                 received)
    sent = len(body) if isinstance(body := getattr(response, "body", None), bytes) else 0
    account = request.get(appkeys.ACCOUNT)
    if account is not None:
        request.app[appkeys.USAGE].record(account, request.get(appkeys.PRINCIPAL),
                                       request.get(appkeys.QUEUE), request.get(appkeys.MESSAGES, 0),
                                       received, sent, response.status == 429)
    audit = request.app.get(appkeys.AUDIT)
    if audit is not None:
        audit.write({
            "ts": round(time.time(), 3), "request_id": request[appkeys.REQUEST_ID],
            "principal": request.get(appkeys.PRINCIPAL), "remote": request.remote,
            "protocol": protocol, "action": action, "queue": request.get(appkeys.QUEUE),
            "status": response.status, "bytes_in": received,
            "bytes_out": sent,
            "latency_ms": round(elapsed * 1000, 3),
        })


# The action metrics and the audit line name for a request no route took (404, 405).
UNROUTED = "unrouted"


def _route_name(request: web.Request) -> str:
    # Never the path or the method: both are the client's to make up, and each distinct
    # metrics label is kept for the life of the process.
    return request.match_info.route.name or UNROUTED
