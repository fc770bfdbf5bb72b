"""``conveyor dev-cluster``: etcd and N nodes on loopback ports, for trying a cluster.

Node i serves HTTP on BASE_PORT + i and replicates on BASE_PORT + 100 + i; etcd listens
on BASE_PORT + 200 (clients) and BASE_PORT + 201 (peers). Everything lives under one
directory, so a second run picks up where the first stopped. Ctrl-C (or SIGTERM) stops
the nodes gracefully, then etcd.

It takes none of the --etcd-* options (TLS, client certificates, etcd users): the etcd it
reaches is the one it starts, on loopback, for trying a cluster on one machine, where
they would protect nothing. A secured etcd is run by its operator; see
docs/OPERATIONS.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import BinaryIO

from server.config import MEMORY_MAX_DEFAULT
from server.protection import masterkey

READY_TIMEOUT_S = 30.0


def etcd_command(binary: str, name: str, data_dir: str, client_port: int,
                 peer_port: int, initial_cluster: str | None = None,
                 client_scheme: str = "http") -> list[str]:
    """An etcd member on loopback ports (the dev cluster's, the tests', the bench's): a
    cluster of its own, or one of initial_cluster ("name=http://host:peer_port,...").
    client_scheme "https" serves clients over TLS (the caller adds the certificate flags)."""
    client = f"{client_scheme}://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    return [binary, "--name", name, "--data-dir", data_dir, "--listen-client-urls", client,
            "--advertise-client-urls", client, "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial_cluster or f"{name}={peer}"]


def run(nodes: int, base_port: int, data_dir: str, fsync: str,
        echo: Callable[[str], None]) -> int:
    etcd_binary = shutil.which("etcd")
    if etcd_binary is None:
        echo("etcd is not installed: apt-get install etcd-server (make test does this)")
        return 1
    os.makedirs(data_dir, exist_ok=True)
    # One cluster secret for every node, made on the first run: the nodes prove it to
    # each other on the replication port.
    secret = os.path.join(data_dir, "cluster.secret")
    masterkey.load_or_create(secret)
    client_port, peer_port = base_port + 200, base_port + 201
    etcd_url = f"http://127.0.0.1:{client_port}"
    children: list[subprocess.Popen[bytes]] = []
    logs: list[BinaryIO] = []  # each child writes its own copy; closed here at the end
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        etcd_log = open(os.path.join(data_dir, "etcd.log"), "ab")  # noqa: SIM115
        logs.append(etcd_log)
        children.append(subprocess.Popen(
            etcd_command(etcd_binary, "dev", os.path.join(data_dir, "etcd"), client_port,
                         peer_port), stdout=etcd_log, stderr=subprocess.STDOUT))
        if not _wait(etcd_url + "/health", children[0]):
            echo(f"etcd did not start; see {etcd_log.name}")
            return 1
        urls = []
        for i in range(nodes):
            node_dir = os.path.join(data_dir, f"node{i}")
            os.makedirs(node_dir, exist_ok=True)
            log = open(os.path.join(data_dir, f"node{i}.log"), "ab")  # noqa: SIM115
            logs.append(log)
            port = base_port + i
            children.append(subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--data-dir", node_dir,
                 "--port", str(port), "--fsync", fsync, "--no-access-log",
                 "--cluster", f"etcd://127.0.0.1:{client_port}", "--node-id", f"node{i}",
                 "--replication-port", str(base_port + 100 + i),
                 "--cluster-secret-file", secret,
                 # The nodes share one host: its default share of memory, split.
                 "--memory-max", f"{float(MEMORY_MAX_DEFAULT.rstrip('%')) / nodes:g}%"],
                stdout=log, stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
        for url, child in zip(urls, children[1:], strict=True):
            if not _wait(url + "/readyz", child):
                echo(f"a node at {url} did not start; see the node logs in {data_dir}")
                return 1
        echo(f"etcd: {etcd_url} (data and logs: {os.path.abspath(data_dir)})")
        for i, url in enumerate(urls):
            echo(f"node{i}: {url}")
        echo("Ctrl-C stops them all.")
        while not stopping:
            for i, child in enumerate(children):
                if child.poll() is not None:
                    what = "etcd" if i == 0 else f"node{i - 1}"
                    echo(f"{what} exited ({child.returncode}); stopping the rest")
                    stopping = True
            time.sleep(0.2)
        return 0
    finally:
        for child in reversed(children[1:]):  # nodes first: they revoke their leases
            if child.poll() is None:
                child.terminate()
        for child in children[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(30)
            if child.poll() is None:
                child.kill()
        if children:
            children[0].terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                children[0].wait(10)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for handle in logs:
            handle.close()
        echo("stopped")


def _wait(url: str, child: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.poll() is not None:
            return False
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as reply:
            if reply.status == 200:
                return True
        time.sleep(0.1)
    return False
