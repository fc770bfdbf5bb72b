"""Partition calls: engine calls on a queue partition, made by the process that serves it
for one that does not (a cluster node for another, a worker for its siblings).

- :mod:`~server.calls.link`: one connection of calls, and the serving side;
- :mod:`~server.calls.codec`: the values and errors as msgpack.
"""
