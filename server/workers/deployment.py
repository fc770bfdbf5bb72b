"""What a worker runs on: the shared data directory's engine, opened for the partitions
this worker owns, and the same metadata and access keys as its siblings (SQLite in WAL
mode: every worker reads them, and writes go to one database file). A worker of a
cluster node is a cluster member instead (server/cluster/deployment.py), which shares
with its siblings only what siblings do for one another (``member_siblings``)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from engine import AsyncBroker
from server.config import ServerConfig
from server.deployment import (
    METADATA_FILE,
    Deployment,
    OnSync,
    engine_guard,
    engine_memory_max,
    metadata_guard,
)
from server.errors import DependencyUnavailableError
from server.metadata import CachedMetadata, SQLiteMetadataStore
from server.protection import keystore
from server.protection.keystore import KeyStore
from server.workers.backend import WorkerBackend, WorkerPartitions
from server.workers.mesh import Mesh
from server.workers.ownership import Ownership, WorkerPlace
from server.workers.shared import Generation, KeyedFileLocks
from server.workers.siblings import SIBLING_OPS, Siblings
from server.workers.supervisor import shared_buckets


@contextlib.asynccontextmanager
async def open_worker(config: ServerConfig, place: WorkerPlace, master: bytes,
                      on_sync: OnSync) -> AsyncIterator[Deployment]:
    async with contextlib.AsyncExitStack() as stack:
        guard = engine_guard()
        partitions = WorkerPartitions(place, guard)
        stack.callback(partitions.close)
        broker = AsyncBroker(config.data_dir, config.fsync,
                             open_queues_max=config.open_queues_max, on_sync=on_sync,
                             memory_max=engine_memory_max(config), partitions=partitions,
                             leadership=Ownership(place), shared=True)
        stack.push_async_callback(broker.close)
        mesh = Mesh(place, partitions.local)
        siblings = Siblings(place, mesh)
        partitions.attach(broker.broker, mesh, siblings)
        await mesh.start()
        # Closed before the engine (the stack unwinds in reverse): no sibling's call
        # reaches a closed broker through it.
        stack.push_async_callback(mesh.close)
        store = SQLiteMetadataStore(os.path.join(config.data_dir, METADATA_FILE))
        stack.push_async_callback(store.close)
        access_keys = KeyStore(os.path.join(config.data_dir, keystore.FILE_NAME), master)
        stack.callback(access_keys.close)
        generation = Generation(place.run_dir)
        stack.callback(generation.close)

        yield Deployment(broker, CachedMetadata(store, metadata_guard(), generation),
                         WorkerBackend(partitions, guard), guard,
                         access_keys.lookup if config.auth == "required" else None,
                         queue_locks=KeyedFileLocks(place.run_dir),
                         rate_buckets=shared_buckets(), siblings=siblings,
                         not_ready=functools.partial(siblings_not_ready, mesh))


async def siblings_not_ready(mesh: Mesh) -> str | None:
    """Why a worker is not ready: siblings not serving calls yet. The server is ready
    once every worker is (a load balancer, or the supervisor's caller, sees one port)."""
    place = mesh.place
    up = await mesh.reachable()
    missing = sorted(set(range(place.count)) - set(up) - {place.index})
    return f"workers {missing} are not serving calls yet" if missing else None


async def member_siblings(stack: contextlib.AsyncExitStack, place: WorkerPlace) -> Siblings:
    """The siblings of a worker that is a cluster member. Its call socket serves them
    what siblings do for one another (server/workers/siblings.py: its part of the
    server's views; FIFO receive attempts of the queues whose home it is, so that an
    SDK's retry on another connection is answered as the first try), and nothing else:
    its queues are the cluster's, reached by the cluster's partition calls."""

    async def sibling_ops(queue: str, op: str, args: Sequence[Any]) -> Any:
        if op not in SIBLING_OPS:
            raise DependencyUnavailableError(f"worker {place.index}",
                                             f"a cluster member serves no {op!r} here")
        return await siblings.local(op, queue, args)

    mesh = Mesh(place, sibling_ops)
    siblings = Siblings(place, mesh)
    await mesh.start()
    stack.push_async_callback(mesh.close)
    return siblings
