"""Reaching a secured etcd: TLS with client certificates, and etcd's own users.

Real etcd processes, real `conveyor serve --cluster` and `conveyor keys --cluster`
processes: each connects with the credentials it is given and is refused without them,
with a message rather than a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.harness import cluster
from tests.support.certs import make_pki
from tests.support.etcd import EtcdServer, enable_auth
from tests.support.server import Server, free_port


def _master_key(path: Path) -> Path:
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def _keys(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "keys", *args],
                          capture_output=True, text=True, timeout=60,
                          env=None if env is None else os.environ | env)


def _refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_nodes_and_commands_reach_etcd_over_tls_with_a_client_certificate(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    master = _master_key(tmp_path / "cluster.key")
    options = ("--auth", "required", "--master-key-file", str(master),
               "--min-insync-replicas", "1")
    with cluster(tmp_path, nodes=1, etcd_tls=pki, extra=options) as c:
        assert isinstance(c.etcd, EtcdServer)
        reach = (*c.etcd.client_options(), "--master-key-file", str(master))
        made = _keys("create", *reach, "--principal", "tls")
        assert made.returncode == 0, made.stderr
        key = json.loads(made.stdout)
        # The node started above reached etcd with the certificate; so does the key.
        c.nodes["n0"].sqs(key).create_queue(QueueName="over-tls")

        url = c.etcd.url
        ca = ("--etcd-ca", str(pki.ca))
        where = ("--master-key-file", str(master))
        # No client certificate: etcd ends the handshake.
        _refused(_keys("list", "--cluster", url, *ca, *where), "etcd")
        # The CA not given: etcd's certificate is not trusted.
        _refused(_keys("list", "--cluster", url, "--etcd-cert", str(pki.client_cert),
                       "--etcd-key", str(pki.client_key), *where), "CERTIFICATE_VERIFY")
        # Plain text to the TLS port: no answer.
        _refused(_keys("list", "--cluster", url.replace("etcds://", "etcd://"), *where),
                 "etcd")
        # TLS options with a plain URL are refused, not ignored.
        _refused(_keys("list", "--cluster", url.replace("etcds://", "etcd://"), *ca, *where),
                 "etcds://")
        # A node without the certificate does not start.
        with pytest.raises(RuntimeError, match="etcd"):
            Server(tmp_path / "uncertified", extra=(
                "--cluster", url, *ca, "--node-id", "n1", "--replication-port",
                str(free_port()), *options))


def test_commands_and_nodes_log_in_to_etcd_as_a_user(tmp_path: Path) -> None:
    etcd = EtcdServer(tmp_path / "etcd")
    try:
        password = "correct horse battery staple"
        enable_auth(etcd, "conveyor", password)
        secret = tmp_path / "etcd-password"
        secret.write_text(password + "\n")  # as `echo ... > file` writes it
        secret.chmod(0o600)
        master = _master_key(tmp_path / "cluster.key")
        where = ("--cluster", etcd.url, "--master-key-file", str(master))
        user = ("--etcd-user", "conveyor")

        made = _keys("create", *where, *user, "--etcd-password-file", str(secret))
        assert made.returncode == 0, made.stderr
        listed = _keys("list", *where, *user, env={"CONVEYOR_ETCD_PASSWORD": password})
        assert listed.returncode == 0, listed.stderr
        assert json.loads(made.stdout)["access_key_id"] in listed.stdout

        _refused(_keys("list", *where), "etcd")  # anonymous: etcd refuses
        _refused(_keys("list", *where, *user, env={"CONVEYOR_ETCD_PASSWORD": "wrong"}),
                 "authentication failed")
        _refused(_keys("list", *where, *user, env={"CONVEYOR_ETCD_PASSWORD": ""}),
                 "needs its password")
        secret.chmod(0o640)
        _refused(_keys("list", *where, *user, "--etcd-password-file", str(secret)),
                 "chmod 600")
        secret.chmod(0o600)

        node = Server(tmp_path / "n0", extra=(
            *where, *user, "--etcd-password-file", str(secret), "--node-id", "n0",
            "--replication-port", str(free_port()), "--auth", "required",
            "--min-insync-replicas", "1"))
        try:
            key = json.loads(made.stdout)
            url = node.sqs(key).create_queue(QueueName="as-a-user")["QueueUrl"]
            assert password not in " ".join(node.process.args)  # type: ignore[union-attr]
            # A restarted etcd member has forgotten every auth token: the node logs in
            # again rather than fail every call from then on.
            etcd.restart()
            deadline = time.monotonic() + 20
            while True:
                try:
                    node.sqs(key).send_message(QueueUrl=url, MessageBody="after restart")
                    break
                except Exception:
                    assert time.monotonic() < deadline, node.log.read_text()[-3000:]
                    time.sleep(0.2)
            # How it logged in again varies with which call met the restart first (a call
            # whose token etcd refused, or the watch's reconnection): that it did is what
            # the send above shows.
        finally:
            node.kill()
    finally:
        etcd.stop()
