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
# FIFO ReceiveRequestAttemptId results, shared by every request of the app.
RECEIVE_ATTEMPTS: web.AppKey[dict[tuple[str, str], tuple[float, dict[str, Any]]]] = (
    web.AppKey("receive_attempts"))
