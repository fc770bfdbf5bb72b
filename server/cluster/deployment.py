"""A cluster node's deployment: its place in the cluster, queues of replicated partitions,
and queue records and access keys in etcd (see server/deployment.py for the other kind)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from engine import AsyncBroker
from replication.node import ClusterConfig, ClusterNode
from replication.peer import Peers, peer_key
from server.cluster.backend import PartitionedBackend
from server.cluster.calls import PartitionCalls
from server.cluster.etcd_keystore import EtcdKeyStore
from server.cluster.etcd_metadata import EtcdMetadataStore
from server.cluster.health import ReplicationHealth
from server.cluster.view import cluster_view, member_part, merge_members
from server.config import ServerConfig
from server.deployment import (
    Deployment,
    OnSync,
    background,
    engine_guard,
    engine_memory_max,
    metadata_guard,
)
from server.metadata import CachedMetadata
from server.protection import masterkey

_log = logging.getLogger("conveyor.cluster")


@contextlib.asynccontextmanager
async def open_cluster(config: ServerConfig, cluster: ClusterConfig, master: bytes,
                       on_sync: OnSync) -> AsyncIterator[Deployment]:
    async with contextlib.AsyncExitStack() as stack:
        node = ClusterNode(cluster, Peers(cluster.node_id, _peer_key(cluster, master)))
        receipt_key = await node.connect()  # receipts must verify on every node alike
        broker = AsyncBroker(config.data_dir, config.fsync,
                             open_queues_max=config.open_queues_max, on_sync=on_sync,
                             leadership=node, receipt_key=receipt_key,
                             memory_max=engine_memory_max(config))
        stack.push_async_callback(broker.close)
        # Closed before the broker: stepping down closes the queues it leads.
        stack.push_async_callback(node.close)
        prefix = cluster.prefix.encode()
        store = EtcdMetadataStore(node.control.client, prefix)
        stack.push_async_callback(store.close)
        metadata = CachedMetadata(store, metadata_guard())
        # Access keys are kept in etcd, wrapped under the master key every node shares.
        access_keys = (EtcdKeyStore(node.control.client, master, prefix)
                       if config.auth == "required" else None)
        guard = engine_guard()
        calls = PartitionCalls(broker.broker, node, guard)
        stack.push_async_callback(calls.close)
        if access_keys is not None:
            await access_keys.upgrade()  # checks the master key; rewraps old keys once
            background(stack, access_keys.mirror())
        await node.start(broker.broker)
        background(stack, store.watch(metadata.invalidate, metadata.clear))
        alias_key = masterkey.subkey(receipt_key, "node-alias")

        async def describe() -> dict[str, Any]:
            return node.describe()

        deployment = Deployment(broker, metadata, PartitionedBackend(node, calls), guard,
                                access_keys.lookup if access_keys is not None else None,
                                cluster_view(describe, alias_key), (ReplicationHealth(node),))
        if config.worker is not None:
            # A worker of the node's server (server/workers/supervisor.py, "In a
            # cluster"): a member like any other, but it shares with its siblings the
            # server's rate limits, views and FIFO receive attempts.
            from server.workers.deployment import member_siblings, siblings_not_ready
            from server.workers.supervisor import shared_buckets

            siblings = await member_siblings(stack, config.worker)

            async def own_part(queue: str, args: Sequence[Any]) -> dict[str, Any]:
                return member_part(node.describe())

            siblings.provide("describe", own_part)

            async def server_describe() -> dict[str, Any]:
                parts = await siblings.gather("describe")
                return merge_members(node.describe(), parts, siblings.place)

            deployment = dataclasses.replace(
                deployment, rate_buckets=shared_buckets(), siblings=siblings,
                cluster_view=cluster_view(server_describe, alias_key),
                not_ready=functools.partial(siblings_not_ready, siblings.mesh))
        yield deployment


def _peer_key(cluster: ClusterConfig, master: bytes) -> bytes | None:
    """The key this node proves to the others: from --cluster-secret-file, else from the
    master key (never from etcd, whose readers are not all nodes). None: authentication
    off, which only a test asks for."""
    if not cluster.peer_auth:
        _log.warning("peer authentication is OFF: anyone who reaches the replication port "
                     "can replicate into and call on this node")
        return None
    if cluster.peer_secret_file is not None:
        return peer_key(masterkey.load(cluster.peer_secret_file, "cluster secret file"))
    return peer_key(masterkey.subkey(master, "cluster-peers"))
