"""A real etcd process for tests, on free loopback ports, restartable on its data;
optionally over TLS with client certificates required, or with etcd's users on."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from replication.etcd_access import EtcdAccess
from server.cluster.devcluster import etcd_command
from tests.support.certs import Pki
from tests.support.server import free_port

READY_S = 20


class EtcdServer:
    """One etcd member: a cluster of its own unless ``peers`` makes it one of several
    (then nothing is started: EtcdCluster starts them together, since a member of a
    cluster only becomes healthy once a quorum runs)."""

    def __init__(self, root: Path, name: str = "test",
                 peers: tuple[str, int] | None = None, tls: Pki | None = None) -> None:
        """tls: serve clients over TLS with this PKI's server certificate, and require a
        client certificate its CA signed (etcd's --client-cert-auth)."""
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is not installed: run `make test`, which installs "
                               "Debian's etcd-server")
        self.binary = binary
        self.root = root
        self.name = name
        root.mkdir(parents=True, exist_ok=True)
        self.client_port = free_port()
        self.peer_port = peers[1] if peers else free_port()
        self.initial_cluster = peers[0] if peers else None
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.tls = tls
        self.url = f"etcd{'s' if tls else ''}://{self.endpoint}"
        self.log = root / "etcd.log"
        self.process: subprocess.Popen[bytes] | None = None
        if peers is None:
            self.start()

    def start(self) -> None:
        self.launch()
        self.wait_healthy()

    def launch(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                etcd_command(self.binary, self.name, str(self.root / "data"),
                             self.client_port, self.peer_port, self.initial_cluster,
                             "https" if self.tls else "http") + self._tls_flags(),
                stdout=log, stderr=subprocess.STDOUT)

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        return ["--cert-file", str(self.tls.server_cert), "--key-file",
                str(self.tls.server_key), "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth"]

    def client_options(self) -> tuple[str, ...]:
        """The conveyor options that reach this etcd (its URL, and the client
        certificate it requires)."""
        if self.tls is None:
            return ("--cluster", self.url)
        return ("--cluster", self.url, "--etcd-ca", str(self.tls.ca), "--etcd-cert",
                str(self.tls.client_cert), "--etcd-key", str(self.tls.client_key))

    def access(self, user: str | None = None, password: str | None = None) -> EtcdAccess:
        """How a test reaches this etcd in process: its certificates, and the user given."""
        tls = self.tls
        return EtcdAccess.from_url(self.url, ca_file=str(tls.ca) if tls else None,
                                   cert_file=str(tls.client_cert) if tls else None,
                                   key_file=str(tls.client_key) if tls else None,
                                   user=user, password=password)

    def wait_healthy(self) -> None:
        assert self.process is not None
        client = f"{'https' if self.tls else 'http'}://{self.endpoint}"
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(client + "/health", timeout=1,
                                           context=context) as reply:
                if b'"health":"true"' in reply.read():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"etcd not healthy in {READY_S} s: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused member ends too
            self.process.send_signal(sig)
            self.process.wait(20)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EtcdCluster:
    """Several etcd members forming one cluster; ``url`` names them all, in order."""

    def __init__(self, root: Path, members: int = 3) -> None:
        peer_ports = [free_port() for _ in range(members)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{port}" for i, port in enumerate(peer_ports))
        self.members = [EtcdServer(root / f"m{i}", f"m{i}", (initial, port))
                        for i, port in enumerate(peer_ports)]
        try:
            for member in self.members:
                member.launch()
            for member in self.members:
                member.wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.url = "etcd://" + ",".join(m.endpoint for m in self.members)

    def client_options(self) -> tuple[str, ...]:
        return ("--cluster", self.url)

    def stop(self) -> None:
        for member in self.members:
            member.stop()



ROOT_PASSWORD = "root-password-for-tests"


def kv_get(etcd: EtcdServer, key: bytes) -> bytes | None:
    """A key's value, read as a test (before etcd's authentication is on)."""
    return asyncio.run(_kv(etcd, "get", key))


def kv_put(etcd: EtcdServer, key: bytes, value: bytes) -> None:
    """Write a key as anyone who can write etcd could."""
    asyncio.run(_kv(etcd, "put", key, value))


async def _kv(etcd: EtcdServer, method: str, *args: bytes) -> bytes | None:
    client = etcd.access().client(0, 5)
    try:
        found = await getattr(client, method)(*args)
        return found.value if method == "get" and found is not None else None
    finally:
        await client.close()


def enable_auth(etcd: EtcdServer, user: str, password: str,
                prefix: bytes = b"/conveyor/") -> None:
    """Turn etcd's authentication on, as ``etcdctl user add / role grant-permission /
    auth enable`` would (etcdctl is not always installed): a root user, and ``user`` with
    read and write on ``prefix`` only."""
    asyncio.run(_enable_auth(etcd, user, password, prefix))


async def _enable_auth(etcd: EtcdServer, user: str, password: str, prefix: bytes) -> None:
    from aetcd import rpc, utils

    client = etcd.access().client(0, 5)
    await client.connect()
    try:
        auth = rpc.AuthStub(client.channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=ROOT_PASSWORD))
        # etcd enables authentication only once a root role exists and root holds it.
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=password))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="conveyor"))
        await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(
            name="conveyor", perm=rpc.Permission(permType=rpc.Permission.READWRITE,
                                                 key=prefix,
                                                 range_end=utils.prefix_range_end(prefix))))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role="conveyor"))
        await auth.AuthEnable(rpc.AuthEnableRequest())
    finally:
        await client.close()
