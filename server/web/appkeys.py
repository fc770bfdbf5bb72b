"""Typed keys of the aiohttp application's state: one place for all of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.deployment import Deployment
    from server.gcpolicy import GcPolicy
    from server.metrics import Exposition, Metrics
    from server.protection.admission import Admission
    from server.protection.usage import Usage
    from server.service import QueueService
    from server.sqs.attempts import ReceiveAttempts
    from server.web.audit import AuditLog

CONFIG: web.AppKey[ServerConfig] = web.AppKey("config")
DEPLOYMENT: web.AppKey[Deployment] = web.AppKey("deployment")
SERVICE: web.AppKey[QueueService] = web.AppKey("service")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
EXPOSITION: web.AppKey[Exposition] = web.AppKey("exposition")
ADMISSION: web.AppKey[Admission] = web.AppKey("admission")
USAGE: web.AppKey[Usage] = web.AppKey("usage")
# The access log, when it is on (ServerConfig.access_log).
AUDIT: web.AppKey[AuditLog] = web.AppKey("audit")
# The process's collector policy, when the app runs as the server process (listener.run).
GC_POLICY: web.AppKey[GcPolicy] = web.AppKey("gc_policy")
# Per request, set by the FrontEnd's layers and read by the audit log and handlers.
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
PROTOCOL: web.RequestKey[str] = web.RequestKey("protocol")  # sqs-json, sqs-query, native
ACTION: web.RequestKey[str] = web.RequestKey("action")
QUEUE: web.RequestKey[str] = web.RequestKey("queue")  # account/name, when one is named
ACCOUNT: web.RequestKey[str] = web.RequestKey("account")  # the caller's
OWNER: web.RequestKey[str] = web.RequestKey("owner")  # the named queue's (native API)
MESSAGES: web.RequestKey[int] = web.RequestKey("messages")  # sent, received or deleted
PRINCIPAL: web.RequestKey[str] = web.RequestKey("principal")
# The SenderId stored with a sent message: the principal, or None when unauthenticated
# (SQS then reports the owning account, as it does for an account's root).
SENDER: web.RequestKey[str | None] = web.RequestKey("sender")

# FIFO ReceiveRequestAttemptId answers, shared by every request of the app.
RECEIVE_ATTEMPTS: web.AppKey[ReceiveAttempts] = web.AppKey("receive_attempts")
