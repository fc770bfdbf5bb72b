"""How a node or a command reaches etcd: which members, over TLS or not, and as whom.

Everything that opens an etcd client (a cluster node, ``conveyor keys --cluster``) takes
one :class:`EtcdAccess` and asks it for clients, so that a cluster secured one way is
reached that way by every part of Conveyor.

- ``etcds://HOST:PORT[,...]`` is TLS; ``etcd://`` is plain TCP. The scheme alone decides,
  so the URL in a log line says whether the traffic was encrypted, and a TLS option given
  with ``etcd://`` is refused rather than ignored (a typo must not fall back to plain
  text). The server's certificate is checked against ``ca_file`` (else the system's
  roots) and the host name or IP address in the URL.
- ``cert_file``/``key_file``: a client certificate, for an etcd started with
  ``--client-cert-auth``. With etcd's authentication on, its common name is the etcd user.
- ``user``/``password``: etcd's own authentication (``etcdctl auth enable``). The
  password reaches this object from a file or the environment, never from the command
  line (server/cli.py says why).

The files are read at each connection, not once, so a renewed certificate is taken up
by the next connection (a failover, or the next command) without a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import aetcd  # type: ignore[import-untyped]
import grpc  # type: ignore[import-untyped]
from aetcd import rpc
from aetcd import watcher as aetcd_watcher

PLAIN_SCHEME = "etcd://"
TLS_SCHEME = "etcds://"
# gRPC waits longer and longer between tries to reconnect to a member that went away (up
# to two minutes by default); a node's watch and lease must be back within a second of it.
RECONNECT_BACKOFF_MAX_MS = 1000
_CHANNEL_OPTIONS = {"grpc.max_reconnect_backoff_ms": RECONNECT_BACKOFF_MAX_MS}


def parse_url(url: str) -> tuple[bool, tuple[tuple[str, int], ...]]:
    """``etcd[s]://HOST:PORT[,HOST:PORT...]`` -> (TLS or not, ((host, port), ...))."""
    tls = url.startswith(TLS_SCHEME)
    if not tls and not url.startswith(PLAIN_SCHEME):
        raise ValueError(f"expected etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS), "
                         f"got {url!r}")
    rest = url[len(TLS_SCHEME if tls else PLAIN_SCHEME):]
    endpoints = []
    for part in rest.split(","):
        host, sep, port = part.strip().rpartition(":")
        # isascii first: "²".isdigit() is true, and int("²") raises.
        if not sep or not host or not port.isascii() or not port.isdigit():
            raise ValueError(f"bad etcd endpoint {part!r} in {url!r}")
        endpoints.append((host, int(port)))
    return tls, tuple(endpoints)


@dataclasses.dataclass(frozen=True)
class EtcdAccess:
    endpoints: tuple[tuple[str, int], ...]
    tls: bool = False
    ca_file: str | None = None
    """PEM CA bundle etcd's server certificate must chain to (None: the system's roots)."""
    cert_file: str | None = None
    """PEM client certificate (chain), for etcd's --client-cert-auth."""
    key_file: str | None = None
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    """Kept out of repr: a config printed in a log line or a traceback must not show it."""

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("no etcd endpoints")
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError("--etcd-ca, --etcd-cert and --etcd-key are TLS options: "
                             "name the cluster etcds://HOST:PORT")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("--etcd-cert and --etcd-key go together")
        if (self.user is None) != (self.password is None):
            raise ValueError("an etcd user needs its password (--etcd-password-file or "
                             "CONVEYOR_ETCD_PASSWORD), and a password its --etcd-user")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdAccess:
        tls, endpoints = parse_url(url)
        return cls(endpoints, tls, **options)

    @property
    def url(self) -> str:
        """The URL, for log lines: no credentials in it."""
        scheme = TLS_SCHEME if self.tls else PLAIN_SCHEME
        return scheme + ",".join(f"{host}:{port}" for host, port in self.endpoints)

    def client(self, index: int, timeout_s: float) -> Any:
        """An unconnected client of endpoint ``index``."""
        host, port = self.endpoints[index]
        if not self.tls:
            return aetcd.Client(host=host, port=port, username=self.user,
                                password=self.password, timeout=timeout_s,
                                options=dict(_CHANNEL_OPTIONS))
        return TlsClient(self._credentials(), host=host, port=port, username=self.user,
                         password=self.password, timeout=timeout_s,
                         options=dict(_CHANNEL_OPTIONS))

    def _credentials(self) -> Any:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file),
                                            private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))


class TlsClient(aetcd.Client):  # type: ignore[misc]  # aetcd is untyped
    """aetcd's client over a TLS channel.

    aetcd 1.0 takes a user and password but no TLS settings: it only ever opens a plain
    channel. So ``connect`` is its own with grpc's secure channel in place of the
    insecure one: the same stubs, the same authentication, the same watcher. Every call
    of the client goes through ``connect`` first, as in aetcd. It reaches into aetcd's
    private attributes; the TLS tests (tests/cluster/test_etcd_security.py) fail if a
    new aetcd moves them.
    """

    _is_connecting: bool  # aetcd's, declared for the type checker

    def __init__(self, credentials: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it, as aetcd does
            async with asyncio.timeout(self._connect_wait_timeout):
                await self._connected.wait()
            return
        try:
            self._is_connecting = True
            self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                              options=self._options.items())
            if self._username is not None and self._password is not None:
                # Sent only over this channel: the password never travels in clear.
                self.auth_stub = rpc.AuthStub(self.channel)
                reply = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout)
                self.metadata = (("token", reply.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd_watcher.Watcher(rpc.WatchStub(self.channel),
                                                  timeout=self._timeout,
                                                  metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False
