"""The server's side of a cluster: queues of partitions led on other nodes.

- :mod:`~server.cluster.calls`, :mod:`~server.cluster.codec`: engine calls made at a
  partition's leader, over the inter-node port (the router of
  :mod:`server.partitioned`'s queues of partitions);
- :mod:`~server.cluster.etcd_metadata`, :mod:`~server.cluster.etcd_keystore`: queue
  records and access keys kept in etcd;
- :mod:`~server.cluster.devcluster`: etcd and several nodes on loopback, for development.

Replication itself (logs, leaders, followers, etcd control) is :mod:`replication`.
"""
