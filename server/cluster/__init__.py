"""The server's side of a cluster: queues of partitions led on other nodes.

- :mod:`~server.cluster.partitions`: a queue of one or more partitions, seen as one queue;
- :mod:`~server.cluster.calls`, :mod:`~server.cluster.codec`: engine calls made at a
  partition's leader, over the inter-node port;
- :mod:`~server.cluster.etcd_metadata`, :mod:`~server.cluster.etcd_keystore`: queue
  records and access keys kept in etcd;
- :mod:`~server.cluster.devcluster`: etcd and several nodes on loopback, for development.

Replication itself (logs, leaders, followers, etcd control) is :mod:`replication`.
"""
