"""Leader/follower log shipping over TCP, and cluster control on etcd.

- :mod:`replication.frames`: the binary frames of the replication protocol;
- :mod:`replication.history`: a log's epoch history, and where two logs diverge;
- :mod:`replication.control`: etcd keys, leases and transactions;
- :mod:`replication.leader`: a leading queue ships its log and tracks the commit offset;
- :mod:`replication.follower`: the follower side of replication, where replicas append;
- :mod:`replication.listener`: the inter-node port, routing each connection by its magic;
- :mod:`replication.node`: one node of the cluster, tying the parts together.
"""
