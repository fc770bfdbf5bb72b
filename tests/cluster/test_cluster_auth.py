"""Access keys in a cluster: made once in etcd, honoured and revoked on every node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import botocore.exceptions
import pytest

from tests.cluster.harness import cluster
from tests.support.server import Server, free_port


def _master_key(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, os.urandom(32))
    finally:
        os.close(fd)
    return path


def _keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "keys", *args],
                          capture_output=True, text=True, timeout=60)


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def test_keys_made_in_etcd_work_on_every_node_and_revoke_everywhere(tmp_path: Path) -> None:
    master = _master_key(tmp_path / "cluster.key")
    with cluster(tmp_path, extra=("--auth", "required", "--master-key-file", str(master))) as c:
        where = ("--cluster", c.etcd.url, "--master-key-file", str(master))
        made = _keys("create", *where, "--principal", "alice")
        assert made.returncode == 0, made.stderr
        key = json.loads(made.stdout)

        url = c.nodes["n0"].sqs(key).create_queue(QueueName="guarded")["QueueUrl"]
        c.nodes["n1"].sqs(key).send_message(QueueUrl=url, MessageBody="signed")
        got = c.nodes["n2"].sqs(key).receive_message(QueueUrl=url, WaitTimeSeconds=5)
        assert got["Messages"][0]["Body"] == "signed"

        for node in c.nodes.values():  # dummy credentials: refused, and nothing changes
            with pytest.raises(botocore.exceptions.ClientError) as caught:
                node.sqs().send_message(QueueUrl=url, MessageBody="unsigned")
            assert _code(caught.value) == "InvalidClientTokenId"

        listed = _keys("list", *where, "--json")
        assert listed.returncode == 0, listed.stderr
        assert [k["access_key_id"] for k in json.loads(listed.stdout)] == \
            [key["access_key_id"]]
        token = _keys("token", key["access_key_id"], *where)
        assert token.returncode == 0, token.stderr
        request = urllib.request.Request(c.nodes["n2"].url + "/v1/queues", headers={
            "Authorization": f"Bearer {token.stdout.strip()}"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert [q["name"] for q in json.loads(reply.read())["queues"]] == ["guarded"]

        # A master key that is not the cluster's opens nothing: the command says so.
        stranger = _master_key(tmp_path / "other.key")
        wrong = _keys("create", "--cluster", c.etcd.url, "--master-key-file", str(stranger))
        assert wrong.returncode != 0 and "master key" in wrong.stderr

        revoked = _keys("revoke", key["access_key_id"], *where)
        assert revoked.returncode == 0, revoked.stderr
        deadline = time.monotonic() + 15  # the key cache lives 5 s on each node
        refused: set[str] = set()
        while refused != set(c.nodes) and time.monotonic() < deadline:
            for name, node in c.nodes.items():
                try:
                    node.sqs(key).get_queue_url(QueueName="guarded")
                except botocore.exceptions.ClientError as exc:
                    assert _code(exc) == "InvalidClientTokenId"
                    refused.add(name)
            time.sleep(0.5)
        assert refused == set(c.nodes)


def test_a_node_with_another_master_key_refuses_to_start(tmp_path: Path) -> None:
    master = _master_key(tmp_path / "cluster.key")
    with cluster(tmp_path, nodes=1,
                 extra=("--auth", "required", "--master-key-file", str(master))) as c:
        stranger = _master_key(tmp_path / "other.key")
        with pytest.raises(RuntimeError, match="master key"):
            Server(tmp_path / "stranger", extra=(
                "--cluster", c.etcd.url, "--node-id", "stranger", "--replication-port",
                str(free_port()), "--auth", "required", "--master-key-file", str(stranger)))
        # The cluster serves on, untouched by the attempt.
        with urllib.request.urlopen(c.nodes["n0"].url + "/readyz", timeout=5) as reply:
            assert reply.status == 200

