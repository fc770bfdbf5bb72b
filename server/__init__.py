"""Conveyor's server: the FrontEnd that speaks HTTP, over queues held by a backend.

Rooms, from the socket inwards:

- :mod:`server.web`: the aiohttp application, its middleware, the native REST API;
- :mod:`server.sqs`: the Amazon SQS protocols (JSON 1.0 and query);
- :mod:`server.protection`: authentication, authorization, rate limits, encryption at
  rest, bulkheads and breakers;
- :mod:`server.service`: the queue operations both protocols share; with
  :mod:`server.sealing` (encryption on the message path), :mod:`server.moves` (dead-letter
  redrives), :mod:`server.settings` (the queue attributes the server acts on) and
  :mod:`server.metadata` (which queues exist);
- :mod:`server.backend`: where a queue's messages live, the seam below the service;
  :mod:`server.deployment` picks the backend once, one node or a cluster;
- :mod:`server.cluster`: the cluster's backend, partition calls and etcd stores;
- :mod:`server.cli`, :mod:`server.client`, :mod:`server.config`, :mod:`server.metrics`.
"""
