"""A cluster node's deployment: its place in the cluster, queues of replicated partitions,
and queue records and access keys in etcd (see server/deployment.py for the other kind)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from engine import AsyncBroker
from replication.node import ClusterConfig, ClusterNode
from server.cluster.backend import PartitionedBackend
from server.cluster.calls import PartitionCalls
from server.cluster.etcd_keystore import EtcdKeyStore
from server.cluster.etcd_metadata import EtcdMetadataStore
from server.cluster.view import cluster_view
from server.config import ServerConfig
from server.deployment import Deployment, OnSync, background, engine_guard, metadata_guard
from server.metadata import CachedMetadata
from server.protection import masterkey


@contextlib.asynccontextmanager
async def open_cluster(config: ServerConfig, cluster: ClusterConfig, master: bytes,
                       on_sync: OnSync) -> AsyncIterator[Deployment]:
    async with contextlib.AsyncExitStack() as stack:
        node = ClusterNode(cluster)
        receipt_key = await node.connect()  # receipts must verify on every node alike
        broker = AsyncBroker(config.data_dir, config.fsync,
                             open_queues_max=config.open_queues_max, on_sync=on_sync,
                             leadership=node, receipt_key=receipt_key)
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
        # A node proves itself to another with a key derived from the cluster's secret in
        # etcd; with access keys on, from the master key too, so that a reader of etcd
        # cannot make the calls that would skip authentication.
        secret = receipt_key
        if config.auth == "required":
            secret += masterkey.subkey(master, "partition-calls")
        calls = PartitionCalls(broker.broker, node, guard, secret)
        stack.push_async_callback(calls.close)
        if access_keys is not None:
            await access_keys.check_master_key()
            background(stack, access_keys.mirror())
        await node.start(broker.broker)
        background(stack, store.watch(metadata.invalidate, metadata.clear))
        yield Deployment(broker, metadata, PartitionedBackend(node, calls), guard,
                         access_keys.get if access_keys is not None else None,
                         cluster_view(node.describe, masterkey.subkey(receipt_key,
                                                                      "node-alias")))
