"""Admission: the FrontEnd layers a request passes before it reaches a queue.

:meth:`Admission.admit` (called by :func:`server.web.middleware.frontend` before the
request's handler) authenticates the caller and applies the per-principal rate limit; a
scrape of /metrics proves the metrics token instead (server/protection/operator.py).
:meth:`Admission.admit_queue` runs once the queue a request names is known (from the path
on the native API, from the parameters on the SQS protocols): the queue's policy is
checked, and the per-queue rate limit. Both refuse before anything changes.

The queue's record, which holds its policy (compiled once per record) and rate override,
comes from the metadata cache, so admitting a request to a known queue costs dictionary
lookups only.
"""

from __future__ import annotations

from aiohttp import web

from engine.errors import InvalidParameterError, QueueNotFoundError
from server.metadata import CachedMetadata, QueueRecord
from server.protection import authz
from server.protection._shared_buckets import SharedBuckets
from server.protection.auth import Authenticator
from server.protection.operator import MetricsGate
from server.protection.ratelimit import (
    PRINCIPALS_SEED,
    QUEUES_SEED,
    Limiter,
    Rate,
    SharedLimiter,
)
from server.protection.usage import queue_label
from server.web import appkeys

# Paths served to anyone: liveness and readiness probes, the API schema.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
# Scrapes prove the metrics token, not an access key (server/protection/operator.py).
METRICS_PATH = "/metrics"

# The SQS action each native route performs on its queue, for policies and metrics.
NATIVE_ACTIONS = {
    "get_queue": "GetQueueAttributes", "update_queue": "SetQueueAttributes",
    "delete_queue": "DeleteQueue", "purge_queue": "PurgeQueue",
    "send_message": "SendMessage", "send_messages": "SendMessage",
    "receive_messages": "ReceiveMessage", "delete_messages": "DeleteMessage",
    "delete_message": "DeleteMessage", "change_visibility": "ChangeMessageVisibility",
    "list_permissions": "GetQueueAttributes", "put_permission": "AddPermission",
    "delete_permission": "RemovePermission",
}


class Admission:
    def __init__(self, authenticator: Authenticator, metadata: CachedMetadata,
                 principal_rate: Rate | None, queue_rate: Rate | None,
                 metrics_gate: MetricsGate, buckets: SharedBuckets | None = None) -> None:
        """``buckets``: the table the server's workers share their rate limits in; None
        for a server of one process."""
        self.authenticator = authenticator
        self.metrics_gate = metrics_gate
        self.metadata = metadata
        self.principal_rate = principal_rate
        self.queue_rate = queue_rate
        self.principals: Limiter | SharedLimiter = (
            Limiter() if buckets is None else SharedLimiter(buckets, PRINCIPALS_SEED))
        self.queues: Limiter | SharedLimiter = (
            Limiter() if buckets is None else SharedLimiter(buckets, QUEUES_SEED))

    async def admit_queue(self, request: web.Request, action: str, owner: str,
                          name: str) -> QueueRecord | None:
        """Check the caller may do ``action`` on the queue, within its rate; return the
        queue's record (None when the caller's own queue does not exist: the action
        reports that itself, as it would without authentication)."""
        caller_account = request.get(appkeys.ACCOUNT)
        if not isinstance(caller_account, str):
            caller_account = request.app[appkeys.CONFIG].account_id
        record = self.metadata.cached(owner, name)
        if record is None:
            # Checked before the name is kept anywhere (usage, the audit line) or looked
            # up: a made-up name of any length must cost nothing that outlives the request.
            label = queue_label(owner, name)
            if label is None:
                return None  # not a queue name: the action refuses it
            request[appkeys.QUEUE] = label
            record = await self.metadata.get(owner, name)
        else:
            request[appkeys.QUEUE] = record.engine_name  # a record's name is a valid one
        if record is None:
            if owner != caller_account:
                raise QueueNotFoundError(name)
            return None
        if owner != caller_account:  # the owner's requests never compile the policy
            authz.check(owner, name, caller_account, action, record.policy)
        self.queues.check(record.engine_name, record.settings.rate_or(self.queue_rate),
                          f"queue {name}")
        return record


    async def admit(self, request: web.Request) -> None:
        """Everything checked before the request's handler runs (its route resolved):
        the caller, the principal's rate, and for a native route its queue. Raises the
        refusal. A method the FrontEnd calls, not a middleware of its own: each
        middleware is another coroutine around every request."""
        path = request.path
        if path in OPEN_PATHS:
            return
        if path == METRICS_PATH:
            self.metrics_gate.check(request)
            return
        caller = await self.authenticator.authenticate(request)
        request[appkeys.PRINCIPAL] = caller.principal
        request[appkeys.ACCOUNT] = caller.account
        request[appkeys.SENDER] = (caller.principal if caller.access_key_id is not None
                                   else None)
        self.principals.check(f"{caller.account}/{caller.principal}", self.principal_rate,
                              f"principal {caller.principal}")
        route = request.match_info.route.name
        if route in NATIVE_ACTIONS:
            owner = request.query.get("owner", caller.account)
            if not authz.is_account(owner):
                raise InvalidParameterError("owner", owner, "must be a 12-digit account id")
            request[appkeys.OWNER] = owner
            await self.admit_queue(request, NATIVE_ACTIONS[route], owner,
                                   request.match_info["name"])
