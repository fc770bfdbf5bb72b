"""A real etcd process for tests, on free loopback ports, restartable on its data."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from server.cluster.devcluster import etcd_command
from tests.support.server import free_port

READY_S = 20


class EtcdServer:
    """One etcd member: a cluster of its own unless ``peers`` makes it one of several
    (then nothing is started: EtcdCluster starts them together, since a member of a
    cluster only becomes healthy once a quorum runs)."""

    def __init__(self, root: Path, name: str = "test",
                 peers: tuple[str, int] | None = None) -> None:
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
        self.url = f"etcd://{self.endpoint}"
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
                             self.client_port, self.peer_port, self.initial_cluster),
                stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self) -> None:
        assert self.process is not None
        client = f"http://{self.endpoint}"
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(client + "/health", timeout=1) as reply:
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

    def stop(self) -> None:
        for member in self.members:
            member.stop()

