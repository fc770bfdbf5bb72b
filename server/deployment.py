"""What a server runs on, assembled in one place: the one answer to "one node or a cluster?".

:func:`open_deployment` gives a :class:`Deployment`: this process's engine, the metadata
service, the queue backend and where access keys are found. Everything above it (the queue
service, the FrontEnd) is the same for both:

- one node: queues in the local broker, records in SQLite, access keys in the data
  directory (this module);
- a cluster: queues of partitions replicated over TCP, records and access keys in etcd
  (server/cluster/deployment.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from engine import AsyncBroker
from engine.errors import ConfigError
from server.backend import LocalBackend, QueueBackend
from server.config import (
    BACKEND_CALLS_MAX,
    BREAKER_FAILURES,
    BREAKER_RESET_S,
    METADATA_CALL_S,
    METADATA_CALLS_MAX,
    METADATA_QUEUE_S,
    ServerConfig,
    messages_memory_max,
)
from server.metadata import CachedMetadata, SQLiteMetadataStore
from server.metrics import Source
from server.partitioned import EnginePartitions
from server.protection import keystore
from server.protection.breaker import Bulkhead, CircuitBreaker, Guard
from server.protection.keystore import AccessKey, KeyStore

if TYPE_CHECKING:
    from server.protection._shared_buckets import SharedBuckets
    from server.workers.shared import KeyedFileLocks
    from server.workers.siblings import Siblings

METADATA_FILE = "metadata.sqlite3"

KeyLookup = Callable[[str], Awaitable[AccessKey | None]]
OnSync = Callable[[float], None]


@dataclasses.dataclass(frozen=True)
class Deployment:
    broker: AsyncBroker
    """This process's engine (its queues are what /metrics shows and /readyz checks)."""
    metadata: CachedMetadata
    backend: QueueBackend
    engine_guard: Guard
    """The bulkhead and breaker around this process's engine calls."""
    access_keys: KeyLookup | None
    """Where access keys are found; None while authentication is off."""
    cluster_view: Callable[[str | None], Awaitable[dict[str, Any]]] | None = None
    """This node's view of the cluster (for /v1/cluster): given None, all of it (an
    admin's); given an account, what that account may see (server/cluster/view.py). None
    on a single node."""
    metrics_sources: tuple[Source, ...] = ()
    """What this deployment adds to /metrics (a cluster node: its partitions' health)."""
    queue_locks: KeyedFileLocks | None = None
    """A lock per queue across the server's processes (its workers), held with the
    service's own around a queue's create, change and delete; None: one process."""
    rate_buckets: SharedBuckets | None = None
    """The table the server's processes share their rate limits in; None: one process."""
    siblings: Siblings | None = None
    """The server's other processes (its workers): calls at a queue's home, /metrics and
    /v1/usage gathered from all; None: this process is the server."""
    not_ready: Callable[[], Awaitable[str | None]] | None = None
    """Why this process is not ready for traffic yet, beyond its own engine and metadata
    (a worker: siblings not serving calls yet); None when it is."""


def open_deployment(config: ServerConfig, master: bytes, on_sync: OnSync
                    ) -> contextlib.AbstractAsyncContextManager[Deployment]:
    """The deployment ``config`` describes, open until the context ends.

    master: the master key; on_sync: told the duration of every log fsync.
    """
    if config.cluster is None:
        if config.worker is not None:
            from server.workers.deployment import open_worker

            return open_worker(config, config.worker, master, on_sync)
        return open_single_node(config, master, on_sync)
    # Imported here: a single node never loads the cluster's code and its etcd client.
    from server.cluster.deployment import open_cluster

    return open_cluster(config, config.cluster, master, on_sync)


@contextlib.asynccontextmanager
async def open_single_node(config: ServerConfig, master: bytes, on_sync: OnSync
                           ) -> AsyncIterator[Deployment]:
    async with contextlib.AsyncExitStack() as stack:
        broker = AsyncBroker(config.data_dir, config.fsync,
                             open_queues_max=config.open_queues_max, on_sync=on_sync,
                             memory_max=engine_memory_max(config),
                             partitions=EnginePartitions())
        stack.push_async_callback(broker.close)
        store = SQLiteMetadataStore(os.path.join(config.data_dir, METADATA_FILE))
        stack.push_async_callback(store.close)
        access_keys = KeyStore(os.path.join(config.data_dir, keystore.FILE_NAME), master)
        stack.callback(access_keys.close)
        guard = engine_guard()
        backend = LocalBackend(broker, guard)
        await backend.reconcile(store)
        yield Deployment(broker, CachedMetadata(store, metadata_guard()), backend, guard,
                         access_keys.lookup if config.auth == "required" else None)


def engine_memory_max(config: ServerConfig) -> int | None:
    """The bound on the engine's queued messages that keeps the process within
    config.memory_max (None: none). Raises ConfigError if it leaves them no room."""
    if config.memory_max is None:
        return None
    try:
        return messages_memory_max(config.memory_max, config.memory_max_given)
    except ValueError as exc:
        raise ConfigError("--memory-max", config.memory_max, str(exc)) from None


def engine_guard() -> Guard:
    """The engine's: calls in flight up to the connection limit (long polls hold one each),
    no time limit (a long poll is slow on purpose)."""
    return _guard("engine", BACKEND_CALLS_MAX, 0, None)


def metadata_guard() -> Guard:
    return _guard("metadata", METADATA_CALLS_MAX, METADATA_QUEUE_S, METADATA_CALL_S)


def _guard(name: str, calls: int, queue_s: float, call_s: float | None) -> Guard:
    return Guard(Bulkhead(name, calls, queue_s),
                 CircuitBreaker(name, BREAKER_FAILURES, BREAKER_RESET_S, call_s))


def background(stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` as a task until the stack closes, then cancel it and wait for it."""
    task = asyncio.create_task(work)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)
