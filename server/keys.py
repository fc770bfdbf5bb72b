"""Typed keys of the aiohttp application's state: one place for all of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from engine import AsyncBroker
    from server.config import ServerConfig
    from server.metrics import Metrics
    from server.service import QueueService

CONFIG: web.AppKey[ServerConfig] = web.AppKey("config")
BROKER: web.AppKey[AsyncBroker] = web.AppKey("broker")
SERVICE: web.AppKey[QueueService] = web.AppKey("service")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
# Per request, set by the FrontEnd's layers and read by the audit log and handlers.
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
PROTOCOL: web.RequestKey[str] = web.RequestKey("protocol")  # sqs-json, sqs-query, native
ACTION: web.RequestKey[str] = web.RequestKey("action")
QUEUE: web.RequestKey[str] = web.RequestKey("queue")  # account/name, when one is named
ACCOUNT: web.RequestKey[str] = web.RequestKey("account")
PRINCIPAL: web.RequestKey[str] = web.RequestKey("principal")

# FIFO ReceiveRequestAttemptId results, shared by every request of the app.
RECEIVE_ATTEMPTS: web.AppKey[dict[tuple[str, str], tuple[float, dict[str, Any]]]] = (
    web.AppKey("receive_attempts"))
