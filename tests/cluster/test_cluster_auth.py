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
from typing import Any

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



def _call(url: str, token: str | None = None, payload: dict[str, Any] | None = None
          ) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if payload is not None:
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_cluster_view_shows_a_tenant_only_its_own_queues(tmp_path: Path) -> None:
    master = _master_key(tmp_path / "cluster.key")
    alice_account, bob_account = "111111111111", "222222222222"
    with cluster(tmp_path, nodes=2,
                 extra=("--auth", "required", "--master-key-file", str(master))) as c:
        where = ("--cluster", c.etcd.url, "--master-key-file", str(master))
        tokens = {}
        for name, account in (("operator", None), ("alice", alice_account),
                              ("bob", bob_account)):
            made = _keys("create", *where, "--principal", name,
                         *(("--account", account) if account else ()))
            assert made.returncode == 0, made.stderr
            token = _keys("token", json.loads(made.stdout)["access_key_id"], *where)
            assert token.returncode == 0, token.stderr
            tokens[name] = token.stdout.strip()
        n0 = c.nodes["n0"].url
        assert _call(n0 + "/v1/queues", tokens["alice"],
                     {"name": "alice-orders", "partitions": 2})[0] == 201
        assert _call(n0 + "/v1/queues", tokens["bob"], {"name": "bob-payroll"})[0] == 201
        alices = {f"{alice_account}/alice-orders", f"{alice_account}-p1/alice-orders"}
        bobs = {f"{bob_account}/bob-payroll"}

        def view(node: str, who: str) -> tuple[dict[str, Any], bytes]:
            status, body = _call(c.nodes[node].url + "/v1/cluster", tokens[who])
            assert status == 200, body
            return json.loads(body), body

        deadline = time.monotonic() + 30  # until every node knows every leader
        while True:
            whole = {node: view(node, "operator")[0] for node in c.nodes}
            if all(state["queues"].get(q, {}).get("leader") in c.nodes
                   for state in whole.values() for q in alices | bobs):
                break
            assert time.monotonic() < deadline, whole
            time.sleep(0.2)

        seen_leading: set[str] = set()
        for node in c.nodes:
            # The operator (the server's own account) sees everything, addresses too.
            admin = whole[node]
            assert alices | bobs <= set(admin["queues"])
            assert {n: v["http"] for n, v in admin["nodes"].items()} == {
                n: s.url for n, s in c.nodes.items()}
            bob_uid = admin["queues"][f"{bob_account}/bob-payroll"]["uid"]

            alice, raw = view(node, "alice")
            assert set(alice["queues"]) == alices, alice
            assert set(alice["leading"]) <= alices, alice
            seen_leading |= set(alice["leading"])
            for name in alices:
                mine, theirs = alice["queues"][name], admin["queues"][name]
                assert (mine["uid"], mine["epoch"]) == (theirs["uid"], theirs["epoch"])
                assert mine["leader"].startswith("node-") and len(mine["isr"]) == 2
            # Nothing of Bob's, and no node's address or id: nodes go by alias.
            for secret in (b"bob-payroll", bob_account.encode(), str(bob_uid).encode(),
                           b"127.0.0.1", b'"n0"', b'"n1"', b"http"):
                assert secret not in raw, (secret, raw)
            assert alice["node"] in alice["nodes"] and all(
                v == {} for v in alice["nodes"].values())

            bob, raw = view(node, "bob")
            assert set(bob["queues"]) == bobs and set(bob["leading"]) <= bobs, bob
            assert b"alice" not in raw and alice_account.encode() not in raw

            # Every node names a node by the same alias.
            other = next(n for n in c.nodes if n != node)
            assert view(other, "alice")[0]["nodes"].keys() == alice["nodes"].keys()

            status, _ = _call(c.nodes[node].url + "/v1/cluster")
            assert status == 403  # no credentials, no view
        assert seen_leading == alices  # each partition's leader shows it to its owner
