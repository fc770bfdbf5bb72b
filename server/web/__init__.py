"""The HTTP front door: app assembly, the request path's outer layers, the native API.

- :mod:`server.web.app`: ``create_app(config)``, routes and resource lifetimes;
- :mod:`server.web.middleware`: request ids, body limits, the one error mapping, audit;
- :mod:`server.web.errors`: the table from every error to its HTTP status and codes;
- :mod:`server.web.native`, :mod:`server.web.openapi`: the native REST API and its schema;
- :mod:`server.web.params`: parameter parsing shared by both protocols;
- :mod:`server.web.appkeys`: the typed keys of application and request state;
- :mod:`server.web.listener`: the listening socket (TLS, connection limit).

Not named ``http``: a folder of that name shadows the standard library's ``http`` for any
script run from the folder above it.
"""
