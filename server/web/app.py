"""The application factory: ``create_app(config)`` builds the whole FrontEnd.

Resources (the deployment: engine, metadata store and queue backend; the keyring; the
queue service) are opened and closed in a ``cleanup_ctx``: aiohttp stops accepting, lets
requests in flight finish, and only then closes them, so a graceful shutdown loses nothing
that was acknowledged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from engine.files import make_dirs
from server.config import HEADER_BYTES_MAX, HEADERS_MAX, REQUEST_BYTES_MAX, ServerConfig
from server.deployment import open_deployment
from server.metrics import Exposition, Metrics
from server.protection import masterkey, sse
from server.protection.admission import Admission
from server.protection.auth import Authenticator
from server.protection.keystore import KeyCache
from server.protection.operator import MetricsGate, load_metrics_token
from server.protection.ratelimit import PURGES_SEED, SharedLimiter, parse_rate
from server.protection.sse import Keyring
from server.protection.usage import Usage
from server.sealing import Sealer
from server.service import QueueService
from server.sqs import handler as sqs
from server.sqs.actions import ACTIONS, Context
from server.sqs.attempts import ReceiveAttempts
from server.web import appkeys, native, openapi
from server.web.audit import AuditLog
from server.web.middleware import frontend
from server.workers.siblings import Siblings, merge_metrics


def create_app(config: ServerConfig) -> web.Application:
    app = web.Application(
        middlewares=[frontend],
        client_max_size=REQUEST_BYTES_MAX,
        handler_args={"max_line_size": HEADER_BYTES_MAX, "max_field_size": HEADER_BYTES_MAX,
                      "max_headers": HEADERS_MAX},
    )
    app[appkeys.CONFIG] = config
    app[appkeys.METRICS] = Metrics()
    app[appkeys.USAGE] = Usage()
    app[appkeys.RECEIVE_ATTEMPTS] = ReceiveAttempts()
    if config.access_log:
        app[appkeys.AUDIT] = AuditLog()
        # First in, so last out, and run even if a later context fails its cleanup.
        app.cleanup_ctx.append(_audit_flushed)
    app.cleanup_ctx.append(_resources)
    app.router.add_routes(native.routes)
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/openapi.json", openapi_json, name="openapi")
    # The SQS protocols: JSON and query at "/", and the query protocol at a queue's URL.
    app.router.add_post("/", sqs.handle, name="sqs")
    app.router.add_get("/", sqs.handle, name="sqs_get")
    # Account ids are 12 digits, which keeps /v1/... and other paths out of this route.
    app.router.add_post("/{account:[0-9]{12}}/{queue}", sqs.handle, name="sqs_queue")
    return app


async def _audit_flushed(app: web.Application) -> AsyncIterator[None]:
    yield
    app[appkeys.AUDIT].flush()  # the last turn's lines, if the loop stops before they go


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[appkeys.CONFIG]
    metrics = app[appkeys.METRICS]
    make_dirs(config.data_dir)  # durably: the databases and keys made in it next rely on it
    master = masterkey.load_or_create(config.master_key_path)
    metrics_token = (load_metrics_token(config.metrics_token_file)
                     if config.metrics_token_file else None)
    async with contextlib.AsyncExitStack() as stack:
        deployment = await stack.enter_async_context(
            open_deployment(config, master, metrics.fsync.observe))
        keyring = Keyring(os.path.join(config.data_dir, sse.FILE_NAME), master,
                          rotate_period_s=config.sse_rotation_s)
        stack.callback(keyring.close)
        queue_rate = parse_rate(config.queue_rate, "queue rate")
        service = QueueService(deployment.backend, deployment.metadata, Sealer(keyring),
                               queue_rate, standard_partitions=standard_partitions(config),
                               queue_locks=deployment.queue_locks,
                               purges=None if deployment.rate_buckets is None else
                               SharedLimiter(deployment.rate_buckets, PURGES_SEED))
        stack.push_async_callback(service.close)
        key_cache = KeyCache(deployment.access_keys) if deployment.access_keys else None
        metrics.watch(deployment.broker.broker)
        metrics.watch_source(app[appkeys.USAGE])
        for source in deployment.metrics_sources:
            metrics.watch_source(source)
        if (gc_policy := app.get(appkeys.GC_POLICY)) is not None:
            metrics.watch_source(gc_policy)
        metrics.watch_protection((deployment.metadata.guard, deployment.engine_guard),
                                 lambda: service.sealer.unopened)
        # Closed first (the stack unwinds in reverse): no render reads a closing engine.
        exposition = Exposition(metrics)
        stack.push_async_callback(exposition.close)
        app[appkeys.EXPOSITION] = exposition
        app[appkeys.DEPLOYMENT] = deployment
        app[appkeys.SERVICE] = service
        app[appkeys.ADMISSION] = Admission(Authenticator(key_cache, config.account_id),
                                           deployment.metadata,
                                           parse_rate(config.principal_rate, "principal rate"),
                                           queue_rate,
                                           MetricsGate(metrics_token, config.auth == "required"),
                                           deployment.rate_buckets)
        if deployment.siblings is not None:
            _serve_siblings(app, deployment.siblings)
        yield


def standard_partitions(config: ServerConfig) -> int:
    """A new standard queue's partitions unless asked: one per worker, so that a send is
    taken where it lands. A cluster's queues spread over its members one per queue, as
    its nodes of one process spread them."""
    return 1 if config.cluster is not None else config.workers


async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: the engine is open and the metadata store answers."""
    deployment = request.app[appkeys.DEPLOYMENT]
    if deployment.broker.broker.closed:
        return web.json_response({"error": {"code": "NotReady", "message": "engine closed"}},
                                 status=503)
    await deployment.metadata.ping()
    if deployment.not_ready is not None and (reason := await deployment.not_ready()):
        return web.json_response({"error": {"code": "NotReady", "message": reason}},
                                 status=503)
    return web.json_response({"status": "ready"})


def _serve_siblings(app: web.Application, siblings: Siblings) -> None:
    """What this worker answers its siblings (server/workers/siblings.py)."""
    usage = app[appkeys.USAGE]
    attempts = app[appkeys.RECEIVE_ATTEMPTS]
    exposition = app[appkeys.EXPOSITION]
    service = app[appkeys.SERVICE]

    async def metrics_text(queue: str, args: Sequence[Any]) -> bytes:
        return await exposition.text()

    async def usage_of(queue: str, args: Sequence[Any]) -> dict[str, Any]:
        return usage.of_account(args[0])

    async def attempt_get(queue: str, args: Sequence[Any]) -> dict[str, Any] | None:
        return attempts.get(queue, args[0])

    async def attempt_put(queue: str, args: Sequence[Any]) -> None:
        attempts.put(queue, args[0], args[1])

    async def sqs_action(queue: str, args: Sequence[Any]) -> dict[str, Any]:
        # Authenticated, authorized and admitted by the worker that took the request.
        action, account, base_url, region, sender, params = args
        ctx = Context(service, account, base_url, region, attempts, sender,
                      siblings=siblings)
        return await ACTIONS[action](ctx, params)

    for op, provider in (("metrics_text", metrics_text), ("usage", usage_of),
                         ("attempt_get", attempt_get), ("attempt_put", attempt_put),
                         ("sqs_action", sqs_action)):
        siblings.provide(op, provider)


async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text, rendered off the event loop (server/metrics.py); with
    workers, every worker's (server/workers/siblings.py)."""
    siblings = request.app[appkeys.DEPLOYMENT].siblings
    if siblings is None:
        body = await request.app[appkeys.EXPOSITION].text()
    else:
        body = merge_metrics(await siblings.gather("metrics_text"))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())
