"""What stands between a request and a queue, and what keeps the server up under load.

- who the caller is: :mod:`~server.protection.auth`, :mod:`~server.protection.sigv4`, with
  keys from :mod:`~server.protection.keystore` under :mod:`~server.protection.masterkey`;
- what the caller may do: :mod:`~server.protection.authz` (accounts and queue policies);
- how much: :mod:`~server.protection.ratelimit`, and :mod:`~server.protection.usage`;
- :mod:`~server.protection.admission`: the request-path checks that apply all of the above;
- :mod:`~server.protection.sse`: encryption of message bodies at rest;
- :mod:`~server.protection.breaker`: bulkheads and circuit breakers around dependencies.
"""
