"""The application factory: ``create_app(config)`` builds the whole FrontEnd.

Resources (the engine, the metadata store, the queue service) are opened and closed in a
``cleanup_ctx``: aiohttp stops accepting, lets requests in flight finish, and only then
closes them, so a graceful shutdown loses nothing that was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import AsyncBroker
from replication.node import ClusterNode
from server.cluster.calls import PartitionCalls
from server.cluster.etcd_keystore import EtcdKeyStore
from server.cluster.etcd_metadata import EtcdMetadataStore
from server.config import (
    BACKEND_CALLS_MAX,
    BREAKER_FAILURES,
    BREAKER_RESET_S,
    HEADER_BYTES_MAX,
    HEADERS_MAX,
    METADATA_CALL_S,
    METADATA_CALLS_MAX,
    METADATA_QUEUE_S,
    REQUEST_BYTES_MAX,
    ServerConfig,
)
from server.metadata import CachedMetadata, MetadataStore, SQLiteMetadataStore
from server.metrics import Metrics
from server.protection import keystore, masterkey
from server.protection.admission import Admission, protect
from server.protection.auth import Authenticator
from server.protection.breaker import Bulkhead, CircuitBreaker, Guard
from server.protection.keystore import KeyCache, KeyStore
from server.protection.ratelimit import parse_rate
from server.protection.sse import Keyring
from server.protection.usage import Usage
from server.service import QueueService
from server.sqs import handler as sqs
from server.web import appkeys, native, openapi
from server.web.middleware import frontend

METADATA_FILE = "metadata.sqlite3"
KEYRING_FILE = "sse-keys.sqlite3"


def create_app(config: ServerConfig) -> web.Application:
    app = web.Application(
        middlewares=[frontend, protect],
        client_max_size=REQUEST_BYTES_MAX,
        handler_args={"max_line_size": HEADER_BYTES_MAX, "max_field_size": HEADER_BYTES_MAX,
                      "max_headers": HEADERS_MAX},
    )
    app[appkeys.CONFIG] = config
    app[appkeys.METRICS] = Metrics()
    app[appkeys.USAGE] = Usage()
    app[appkeys.RECEIVE_ATTEMPTS] = {}
    app.cleanup_ctx.append(_engine)
    app.router.add_routes(native.routes)
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/openapi.json", openapi_json, name="openapi")
    app.router.add_get("/v1/cluster", cluster_state, name="cluster")
    # The SQS protocols: JSON and query at "/", and the query protocol at a queue's URL.
    app.router.add_post("/", sqs.handle, name="sqs")
    app.router.add_get("/", sqs.handle, name="sqs_get")
    # Account ids are 12 digits, which keeps /v1/... and other paths out of this route.
    app.router.add_post("/{account:[0-9]{12}}/{queue}", sqs.handle, name="sqs_queue")
    return app


async def _engine(app: web.Application) -> AsyncIterator[None]:
    config = app[appkeys.CONFIG]
    os.makedirs(config.data_dir, exist_ok=True)
    master = masterkey.load_or_create(config.master_key_path)
    node: ClusterNode | None = None
    cluster_options: dict[str, Any] = {}
    store: MetadataStore
    if config.cluster is not None:
        node = ClusterNode(config.cluster)
        cluster_options = {"leadership": node, "receipt_key": await node.connect()}
    calls: PartitionCalls | None = None
    broker = AsyncBroker(config.data_dir, config.fsync,
                         open_queues_max=config.open_queues_max,
                         on_sync=app[appkeys.METRICS].fsync.observe, **cluster_options)
    if node is not None:
        store = EtcdMetadataStore(node.control.client, node.config.prefix.encode())
    else:
        store = SQLiteMetadataStore(os.path.join(config.data_dir, METADATA_FILE))
    keyring = Keyring(os.path.join(config.data_dir, KEYRING_FILE), master,
                      rotate_period_s=config.sse_rotation_s)
    # A single node keeps access keys in its data directory; a cluster keeps them in etcd,
    # wrapped under the master key every node shares.
    access_keys = KeyStore(os.path.join(config.data_dir, keystore.FILE_NAME), master)
    cluster_keys = (EtcdKeyStore(node.control.client, master, node.config.prefix.encode())
                    if node is not None and config.auth == "required" else None)
    metadata = CachedMetadata(store, _guard("metadata", METADATA_CALLS_MAX, METADATA_QUEUE_S,
                                            METADATA_CALL_S))
    engine_guard = _guard("engine", BACKEND_CALLS_MAX, 0, None)
    if node is not None:
        # A node proves itself to another with a key derived from the cluster's secret in
        # etcd; with access keys on, from the master key too, so that a reader of etcd
        # cannot make the calls that would skip authentication.
        secret = cluster_options["receipt_key"]
        if config.auth == "required":
            secret += masterkey.subkey(master, "partition-calls")
        calls = PartitionCalls(broker.broker, node, engine_guard, secret)
    service = QueueService(broker, metadata, keyring, engine_guard, cluster=node, calls=calls)
    watch: asyncio.Task[None] | None = None
    key_watch: asyncio.Task[None] | None = None
    key_cache = None
    if config.auth == "required":
        key_cache = KeyCache(cluster_keys.get if cluster_keys else access_keys.lookup)
    authenticator = Authenticator(key_cache, config.account_id)
    try:
        if cluster_keys is not None:
            await cluster_keys.check_master_key()
            key_watch = asyncio.create_task(cluster_keys.mirror())
        if node is not None:
            await node.start(broker.broker)
            assert isinstance(store, EtcdMetadataStore)
            watch = asyncio.create_task(store.watch(metadata.invalidate, metadata.clear))
        await service.start()
        app[appkeys.CLUSTER] = node
        app[appkeys.METRICS].watch(broker.broker)
        app[appkeys.METRICS].registry.register(app[appkeys.USAGE])
        app[appkeys.METRICS].watch_protection((metadata.guard, service.backend),
                                           lambda: service.unopened)
        app[appkeys.BROKER] = broker
        app[appkeys.SERVICE] = service
        app[appkeys.ADMISSION] = Admission(authenticator, metadata,
                                        parse_rate(config.principal_rate, "principal rate"),
                                        parse_rate(config.queue_rate, "queue rate"))
        yield
    finally:
        await service.close()
        for task in (watch, key_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if calls is not None:
            await calls.close()
        if node is not None:
            await node.close()
        await store.close()
        await broker.close()
        keyring.close()
        access_keys.close()


def _guard(name: str, calls: int, queue_s: float, call_s: float | None) -> Guard:
    return Guard(Bulkhead(name, calls, queue_s),
                 CircuitBreaker(name, BREAKER_FAILURES, BREAKER_RESET_S, call_s))


async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: the engine is open and the metadata store answers."""
    service = request.app[appkeys.SERVICE]
    if service.broker.broker.closed:
        return web.json_response({"error": {"code": "NotReady", "message": "engine closed"}},
                                 status=503)
    await service.metadata.ping()
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[appkeys.METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def cluster_state(request: web.Request) -> web.Response:
    """This node's view of the cluster: nodes, and each queue's replicas, ISR and leader."""
    node = request.app[appkeys.CLUSTER]
    if node is None:
        return web.json_response({"error": {"code": "NotClustered",
                                            "message": "this server is a single node"}},
                                 status=404)
    return web.json_response(node.describe())


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())
