"""Access keys in a cluster: made once in etcd, honoured and revoked on every node, and
bound to their account and principal, so that a record moved in etcd is refused."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.cluster.etcd_keystore import EtcdKeyStore, master_check
from server.protection import masterkey
from server.protection.keystore import WRAP_LEGACY, new_key
from tests.cluster.harness import cluster
from tests.support.etcd import EtcdServer, kv_get, kv_put
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



# --- a key record is bound to its id, account and principal -----------------------------------

ALICE, BOB = "111111111111", "222222222222"


def test_a_key_record_moved_to_another_account_in_etcd_is_refused(tmp_path: Path) -> None:
    master = _master_key(tmp_path / "cluster.key")
    with cluster(tmp_path, nodes=1, extra=("--auth", "required", "--master-key-file",
                                           str(master), "--min-insync-replicas", "1")) as c:
        assert isinstance(c.etcd, EtcdServer)
        where = ("--cluster", c.etcd.url, "--master-key-file", str(master))
        made = [_keys("create", *where, "--principal", p, "--account", a)
                for p, a in (("alice", ALICE), ("bob", BOB))]
        assert all(m.returncode == 0 for m in made), [m.stderr for m in made]
        alice, bob = (json.loads(m.stdout) for m in made)
        node = c.nodes["n0"]
        url = node.sqs(bob).create_queue(QueueName="bobs-only")["QueueUrl"]

        # Someone who can write etcd gives alice's key to bob's account.
        record = f"/conveyor/access-keys/{alice['access_key_id']}".encode()
        stored = kv_get(c.etcd, record)
        assert stored is not None
        moved = json.loads(stored) | {"account": BOB}
        kv_put(c.etcd, record, json.dumps(moved).encode())

        deadline = time.monotonic() + 15  # the node's copy follows etcd at once; a lookup
        outcome = None                    # made before that is cached for 5 s
        while time.monotonic() < deadline:
            try:
                listed = node.sqs(alice).list_queues().get("QueueUrls", [])
                assert url not in listed, "the moved key acted for bob's account"
                outcome = "served as alice"
            except botocore.exceptions.ClientError as exc:
                status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
                outcome = f"{status} {_code(exc)}"
                if outcome == "403 InvalidClientTokenId":
                    break
            time.sleep(0.2)
        assert outcome == "403 InvalidClientTokenId", outcome
        with pytest.raises(botocore.exceptions.ClientError):
            node.sqs(alice).send_message(QueueUrl=url, MessageBody="as bob")
        assert node.sqs(bob).receive_message(QueueUrl=url).get("Messages") is None
        assert f"access key {alice['access_key_id']} refused" in node.log.read_text()
        # A record that is not one at all is refused the same way, not answered with a 500.
        garbage = {"access_key_id": new_key()[0], "secret_access_key": "x" * 40}
        kv_put(c.etcd, f"/conveyor/access-keys/{garbage['access_key_id']}".encode(),
               b'{"account": 1, "principal": [], "revoked_ms": null}')
        deadline = time.monotonic() + 10
        while f"access key {garbage['access_key_id']} refused" not in node.log.read_text():
            assert time.monotonic() < deadline, node.log.read_text()[-2000:]
            with pytest.raises(botocore.exceptions.ClientError) as caught:
                node.sqs(garbage).list_queues()
            assert _code(caught.value) == "InvalidClientTokenId"
            time.sleep(0.2)
        # The command line says why rather than print a token for the moved key.
        token = _keys("token", alice["access_key_id"], *where)
        assert token.returncode != 0 and "account and principal" in token.stderr
        assert "Traceback" not in token.stderr


def test_format_1_keys_in_etcd_are_rewrapped_once_by_the_first_node(tmp_path: Path) -> None:
    master_path = _master_key(tmp_path / "cluster.key")
    master = master_path.read_bytes()
    etcd = EtcdServer(tmp_path / "etcd")
    try:
        def legacy(principal: str, account: str) -> tuple[str, str]:
            """A key as an older version stored it: bound to its id alone, no version."""
            key_id, secret = new_key()
            nonce = secrets.token_bytes(12)
            wrapped = nonce + AESGCM(masterkey.subkey(master, "access-keys")).encrypt(
                nonce, secret.encode(), key_id.encode())
            kv_put(etcd, f"/conveyor/access-keys/{key_id}".encode(), json.dumps(
                {"principal": principal, "account": account, "created_ms": 1,
                 "revoked_ms": None, "wrapped_secret": base64.b64encode(wrapped).decode()}
            ).encode())
            return key_id, secret

        kv_put(etcd, b"/conveyor/master-key-check",
               master_check(master, WRAP_LEGACY).encode())
        key_id, secret = legacy("alice", ALICE)
        node = Server(tmp_path / "n0", extra=(
            "--cluster", etcd.url, "--node-id", "n0", "--replication-port", str(free_port()),
            "--auth", "required", "--master-key-file", str(master_path),
            "--min-insync-replicas", "1"))
        try:
            key = {"access_key_id": key_id, "secret_access_key": secret}
            node.sqs(key).create_queue(QueueName="kept")  # the old key works on
            stored = kv_get(etcd, f"/conveyor/access-keys/{key_id}".encode())
            assert stored is not None and json.loads(stored)["version"] == 2
            assert kv_get(etcd, b"/conveyor/master-key-check") == master_check(master).encode()
            log = node.log.read_text()
            assert f"access key {key_id} rewrapped from format 1 to 2 as account {ALICE}" in log

            # A format-1 record written now (a replay, or an older `conveyor keys`) is
            # neither served nor rewrapped by a later start.
            late_id, late_secret = legacy("mallory", ALICE)
            late = {"access_key_id": late_id, "secret_access_key": late_secret}
            deadline = time.monotonic() + 10
            while f"access key {late_id} refused" not in node.log.read_text():
                assert time.monotonic() < deadline, node.log.read_text()[-2000:]
                with pytest.raises(botocore.exceptions.ClientError) as caught:
                    node.sqs(late).list_queues()
                assert _code(caught.value) == "InvalidClientTokenId"
                time.sleep(0.2)

            async def start_again() -> None:
                client = etcd.access().client(0, 5)
                try:
                    await EtcdKeyStore(client, master).upgrade()
                finally:
                    await client.close()

            asyncio.run(start_again())
            stored = kv_get(etcd, f"/conveyor/access-keys/{late_id}".encode())
            assert stored is not None and "version" not in json.loads(stored)
        finally:
            node.kill()
    finally:
        etcd.stop()


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
            status, body = _call(c.node(node).url + "/v1/cluster", tokens[who])
            assert status == 200, body
            return json.loads(body), body

        deadline = time.monotonic() + 30  # until every node knows every leader
        while True:
            whole = {node: view(node, "operator")[0] for node in c.nodes}
            if all(state["queues"].get(q, {}).get("leader") in c.members()
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
                m: c.node(m).url for m in c.members()}
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
                           b"127.0.0.1", b'"n0', b'"n1', b"http"):
                assert secret not in raw, (secret, raw)
            assert alice["node"] in alice["nodes"] and all(
                v == {} for v in alice["nodes"].values())

            bob, raw = view(node, "bob")
            assert set(bob["queues"]) == bobs and set(bob["leading"]) <= bobs, bob
            assert b"alice" not in raw and alice_account.encode() not in raw

            # Every node names a node by the same alias.
            other = next(n for n in c.nodes if n != node)
            assert view(other, "alice")[0]["nodes"].keys() == alice["nodes"].keys()

            status, _ = _call(c.node(node).url + "/v1/cluster")
            assert status == 403  # no credentials, no view
        assert seen_leading == alices  # each partition's leader shows it to its owner
