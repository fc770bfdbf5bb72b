"""What only the operator sees, on real server processes: /metrics needs the metrics token
(server/protection/operator.py), and is open only while authentication is off and no token
is configured. (The cluster view's share per account is in tests/cluster/test_cluster_auth.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support.clients import Reply, http, metrics, metrics_token_file, native
from tests.support.server import Server, free_port

TENANT = "111111111111"


def bearer_token(server: Server, key: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "keys", "token", key["access_key_id"],
         "--data-dir", str(server.data_dir)], check=True, capture_output=True, text=True
    ).stdout.strip()


def scrape(server: Server, headers: dict[str, str] | None = None) -> Reply:
    return http(server, "GET", "/metrics", headers=headers)


def signed_scrape(server: Server, key: dict[str, str]) -> Reply:
    request = AWSRequest(method="GET", url=server.url + "/metrics")
    SigV4Auth(Credentials(key["access_key_id"], key["secret_access_key"]), "sqs",
              "us-east-1").add_auth(request)
    return scrape(server, dict(request.headers.items()))


def assert_refused(reply: Reply) -> None:
    assert reply.status == 401, reply
    assert reply.headers["www-authenticate"].startswith("Bearer"), reply.headers
    assert reply.json()["error"]["code"] == "Unauthorized", reply
    assert b"conveyor_" not in reply.body and b"tenant-orders" not in reply.body


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    token_file, token = metrics_token_file(tmp_path / "metrics.token")
    running = Server(tmp_path / "data", extra=("--auth", "required", "--metrics-token-file",
                                               str(token_file)))
    try:
        yield running, token
    finally:
        if running.process is not None and running.process.poll() is None:
            running.kill()


def test_metrics_under_auth_required_needs_the_metrics_token(
        guarded: tuple[Server, str]) -> None:
    server, token = guarded
    tenant_key = server.create_key("tenant", TENANT)
    admin_key = server.create_key("operator")  # the server's own account
    url = server.sqs(tenant_key).create_queue(QueueName="tenant-orders")["QueueUrl"]
    server.sqs(tenant_key).send_message(QueueUrl=url, MessageBody="x")

    assert_refused(scrape(server))
    assert_refused(scrape(server, {"Authorization": "Bearer " + "0" * len(token)}))
    assert_refused(scrape(server, {"Authorization": "Bearer " + token[:-1]}))
    assert_refused(scrape(server, {"Authorization": "Basic " + token}))
    assert_refused(scrape(server, {"Authorization": "Bearer " + token + "\u00e9"}))
    # No access key opens it, a tenant's or an admin's, signed or as a bearer token: the
    # metrics token is the one credential of /metrics.
    assert_refused(signed_scrape(server, tenant_key))
    assert_refused(signed_scrape(server, admin_key))
    assert_refused(scrape(server, {
        "Authorization": f"Bearer {bearer_token(server, tenant_key)}"}))
    assert_refused(scrape(server, {
        "Authorization": f"Bearer {bearer_token(server, admin_key)}"}))

    samples = metrics(server, token)
    assert samples[("conveyor_queue_depth", (("queue", f"{TENANT}/tenant-orders"),
                                             ("state", "visible")))] == 1
    assert samples[("conveyor_usage_principal_requests_total",
                    (("account", TENANT), ("principal", "tenant")))] == 2
    # Refused scrapes are answered and counted; they changed nothing else.
    assert samples[("conveyor_requests_total", (("action", "metrics"), ("protocol", "native"),
                                                ("status", "401")))] == 9
    # The tenant's own usage stays where it always was, for its account only.
    reply = native(server, "GET", "/v1/usage", token=bearer_token(server, tenant_key))
    assert reply.status == 200 and set(reply.json()["queues"]) == {"tenant-orders"}, reply


def test_metrics_under_auth_required_without_a_token_is_refused(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", extra=("--auth", "required"))
    try:
        reply = scrape(server)
        assert_refused(reply)
        assert "--metrics-token-file" in reply.json()["error"]["message"]
        assert_refused(scrape(server, {"Authorization": "Bearer " + "a" * 64}))
        assert http(server, "GET", "/healthz").status == 200  # probes stay open
    finally:
        server.kill()


def test_metrics_under_auth_none_is_open_unless_a_token_is_configured(
        tmp_path: Path) -> None:
    token_file, token = metrics_token_file(tmp_path / "metrics.token")
    open_server = Server(tmp_path / "open")
    guarded = Server(tmp_path / "guarded", extra=("--metrics-token-file", str(token_file)))
    try:
        assert scrape(open_server).status == 200
        assert_refused(scrape(guarded))
        assert ("conveyor_open_queues", ()) in metrics(guarded, token)
    finally:
        open_server.kill()
        guarded.kill()


@pytest.mark.parametrize("content,mode,why", [
    (b"a" * 64 + b"\n", 0o644, "0600 or stricter"),
    (b"short\n", 0o600, "32 to 1024"),
    (b"a" * 31, 0o600, "32 to 1024"),
    (b"a" * 1025, 0o600, "32 to 1024"),
    (b"a" * 40 + b" " + b"a" * 40, 0o600, "visible ASCII"),
    (b"a" * 40 + b"\n" + b"b" * 40 + b"\n", 0o600, "one line"),
    (None, 0o600, "No such file"),
])
def test_a_bad_metrics_token_file_stops_the_server_at_start(
        tmp_path: Path, content: bytes | None, mode: int, why: str) -> None:
    path = tmp_path / "metrics.token"
    if content is not None:
        path.write_bytes(content)
        os.chmod(path, mode)
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path / "data"),
         "--port", str(free_port()), "--auth", "required", "--metrics-token-file", str(path)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert "--metrics-token-file" in done.stderr and why in done.stderr, done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was made
