"""Rate limits and usage data end to end: real server processes, real clients.

The rate limit is checked the way a client sees it: ten times the allowed rate, from
several threads and through every protocol, admits no more than the token bucket allows
over the time the requests took, and not much less either; everything refused is a 429
with a Retry-After and the error code each protocol's clients parse. Usage counters,
/metrics and the audit log are checked against exact counts of what the test sent.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.support.clients import (
    ACCOUNT,
    http,
    metrics,
    metrics_token_file,
    native,
    sqs_query,
)
from tests.support.server import Server

RATE, BURST = 20, 20
DRIVE_S = 10.0
THREAD_RATE = 50.0  # four threads: 200 requests a second, ten times the limit
JSON_TYPE = "application/x-amz-json-1.0"


class Outcome(NamedTuple):
    protocol: str
    started: float
    ended: float
    status: int
    code: str | None
    retry_after: str | None


# --- one request, through each protocol -------------------------------------------------


def via_boto3(client: Any, url: str) -> Callable[[], tuple[int, str | None, str | None]]:
    def send() -> tuple[int, str | None, str | None]:
        try:
            client.send_message(QueueUrl=url, MessageBody="load")
        except ClientError as exc:
            meta = exc.response["ResponseMetadata"]
            return (meta["HTTPStatusCode"], exc.response["Error"]["Code"],
                    meta["HTTPHeaders"].get("retry-after"))
        return 200, None, None
    return send


def via_raw_json(server: Server, url: str) -> Callable[[], tuple[int, str | None, str | None]]:
    body = json.dumps({"QueueUrl": url, "MessageBody": "load"}).encode()

    def send() -> tuple[int, str | None, str | None]:
        reply = http(server, "POST", "/", body, {"Content-Type": JSON_TYPE,
                                                 "X-Amz-Target": "AmazonSQS.SendMessage"})
        if reply.status == 200:
            return 200, None, None
        # The JSON protocol's error shape, and the query code SQS sends alongside it.
        code = f"{reply.json()['__type']}|{reply.headers.get('x-amzn-query-error')}"
        return reply.status, code, reply.headers.get("retry-after")
    return send


def via_query(server: Server, url: str) -> Callable[[], tuple[int, str | None, str | None]]:
    fields = urllib.parse.urlencode({"Action": "SendMessage", "QueueUrl": url,
                                     "MessageBody": "load"})

    def send() -> tuple[int, str | None, str | None]:
        reply = sqs_query(server, fields)
        if reply.status == 200:
            return 200, None, None
        match = re.search(rb"<Code>([^<]*)</Code>", reply.body)
        return (reply.status, match[1].decode() if match else repr(reply.body),
                reply.headers.get("retry-after"))
    return send


def via_native(server: Server, name: str) -> Callable[[], tuple[int, str | None, str | None]]:
    def send() -> tuple[int, str | None, str | None]:
        reply = native(server, "POST", f"/v1/queues/{name}/messages", raw=b"load")
        if reply.status == 201:
            return 200, None, None
        return reply.status, reply.json()["error"]["code"], reply.headers.get("retry-after")
    return send


def drive(senders: dict[str, Callable[[], tuple[int, str | None, str | None]]],
          seconds: float, per_thread_rate: float) -> list[Outcome]:
    """Each sender on a thread of its own, paced at ``per_thread_rate``, for ``seconds``."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.05
    failures: list[BaseException] = []

    def run(protocol: str, send: Callable[[], tuple[int, str | None, str | None]]) -> None:
        try:
            k = 0
            while True:
                due = start + k / per_thread_rate
                if due >= start + seconds:
                    return
                time.sleep(max(0.0, due - time.monotonic()))
                began = time.monotonic()
                status, code, retry_after = send()
                outcome = Outcome(protocol, began, time.monotonic(), status, code, retry_after)
                with lock:
                    outcomes.append(outcome)
                k += 1
        except BaseException as exc:  # reported by the test, not lost in a thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in senders.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    return outcomes


# --- the per-queue limit ------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("throttling") / "data", fsync="never",
                     extra=("--rate-limit-queue", f"{RATE}/s:{BURST}"))
    try:
        yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            running.kill()


def patiently(call: Callable[..., Any], **kwargs: Any) -> Any:
    """A call on a rate-limited queue, retried after each 429 as its Retry-After says."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return call(**kwargs)
        except ClientError as exc:
            meta = exc.response["ResponseMetadata"]
            if meta["HTTPStatusCode"] != 429 or time.monotonic() > deadline:
                raise
            time.sleep(int(meta["HTTPHeaders"]["retry-after"]))


def test_ten_times_the_rate_is_admitted_at_the_rate(limited: Server) -> None:
    sqs = limited.sqs()
    url = sqs.create_queue(QueueName="hot")["QueueUrl"]
    outcomes = drive({
        "sqs-json": via_boto3(limited.sqs(), url),
        "sqs-json-raw": via_raw_json(limited, url),
        "sqs-query": via_query(limited, url),
        "native": via_native(limited, "hot"),
    }, DRIVE_S, THREAD_RATE)

    elapsed = max(o.ended for o in outcomes) - min(o.started for o in outcomes)
    accepted = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status != 200]
    allowed = RATE * elapsed + BURST
    print(f"{len(outcomes)} requests in {elapsed:.2f} s: {len(accepted)} accepted "
          f"(bound {allowed:.1f}), {len(refused)} refused")
    assert len(outcomes) > 5 * RATE * elapsed, "the load was not ten times the rate"
    assert len(accepted) <= allowed
    assert len(accepted) >= 0.5 * RATE * elapsed, "far fewer admitted than the rate allows"
    expected_codes = {
        "sqs-json": "RequestThrottled",  # boto3 reports the query code SQS sends along
        "sqs-json-raw": "com.amazonaws.sqs#ThrottlingException|RequestThrottled;Sender",
        "sqs-query": "RequestThrottled",
        "native": "Throttled",
    }
    for outcome in refused:
        assert outcome.status == 429, outcome
        assert outcome.code == expected_codes[outcome.protocol], outcome
        assert outcome.retry_after is not None and outcome.retry_after.isdigit(), outcome
        assert int(outcome.retry_after) >= 1, outcome
    assert {o.protocol for o in refused} == set(expected_codes)

    # Only what was admitted was sent; the usage data counts every request and refusal.
    time.sleep(1.1)  # a token for the next request
    depth = patiently(sqs.get_queue_attributes, QueueUrl=url,
                      AttributeNames=["ApproximateNumberOfMessages"])
    assert int(depth["Attributes"]["ApproximateNumberOfMessages"]) == len(accepted)
    samples = metrics(limited)
    labels = (("account", ACCOUNT), ("queue", "hot"))
    assert samples[("conveyor_usage_queue_throttled_total", labels)] == len(refused)
    assert samples[("conveyor_usage_queue_messages_total", labels)] == len(accepted)


def burst(client: Any, url: str, count: int) -> tuple[int, float]:
    """Send ``count`` messages back to back: how many were admitted, and the seconds."""
    admitted = 0
    started = time.monotonic()
    for _ in range(count):
        try:
            client.send_message(QueueUrl=url, MessageBody="burst")
        except ClientError as exc:
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 429, exc.response
        else:
            admitted += 1
    return admitted, time.monotonic() - started


def test_a_queue_attribute_tightens_the_limit_for_that_queue_only(limited: Server) -> None:
    sqs = limited.sqs()
    slow = sqs.create_queue(QueueName="slow", Attributes={"ConveyorRateLimit": "2/s:3"}
                            )["QueueUrl"]
    default = sqs.create_queue(QueueName="default")["QueueUrl"]

    admitted, seconds = burst(sqs, slow, 30)
    assert 3 <= admitted <= 3 + 2 * seconds, (admitted, seconds)
    admitted, seconds = burst(sqs, default, 60)
    assert BURST <= admitted <= BURST + RATE * seconds, (admitted, seconds)

    # A change applies at once, and to that queue alone: up to the server's own limit.
    time.sleep(1.1)
    got = patiently(sqs.get_queue_attributes, QueueUrl=slow, AttributeNames=["All"])
    assert got["Attributes"]["ConveyorRateLimit"] == "2/s:3"
    patiently(sqs.set_queue_attributes, QueueUrl=slow,
              Attributes={"ConveyorRateLimit": f"{RATE}/s:{BURST}"})
    admitted, seconds = burst(sqs, slow, 60)
    # A change hands out no fresh burst: the bucket keeps the tokens it had (none, or
    # nearly), then fills at the new rate.
    assert 2 * seconds < admitted <= BURST + RATE * seconds, (admitted, seconds)
    time.sleep(1.1)
    reply = native(limited, "GET", "/v1/queues/slow")
    assert reply.status == 200 and reply.json()["rate_limit"] == f"{RATE}/s:{BURST}", reply
    admitted, seconds = burst(sqs, default, 60)  # still the server's limit
    assert BURST <= admitted <= BURST + RATE * seconds, (admitted, seconds)

    time.sleep(1.1)
    for bad in ("fast", "-1/s", "0/s", "10/s:0", "1e3/s"):
        with pytest.raises(ClientError) as refused:
            sqs.set_queue_attributes(QueueUrl=default, Attributes={"ConveyorRateLimit": bad})
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400, bad


# What an owner might write to lift the server's limit of RATE/s:BURST for its queue: no
# limit, a higher rate, a larger burst, or both.
LIFTS = ["off", "0", "", f"{RATE * 50}/s", f"{RATE}/s:{BURST * 50}", f"{RATE * 50}/s:{BURST}"]


@pytest.mark.parametrize("lift", [v for v in LIFTS if v != ""])
def test_an_owner_cannot_lift_the_servers_queue_limit(limited: Server, lift: str) -> None:
    sqs = limited.sqs()
    name = f"capped-{LIFTS.index(lift)}"
    with pytest.raises(ClientError) as refused:  # at creation: no queue is made
        sqs.create_queue(QueueName=name, Attributes={"ConveyorRateLimit": lift})
    error = refused.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400, error
    assert error["Error"]["Code"] == "InvalidAttributeValue", error
    assert f"limits each queue to {RATE}/s:{BURST}" in error["Error"]["Message"], error
    with pytest.raises(ClientError, match="NonExistentQueue"):
        sqs.get_queue_url(QueueName=name)

    url = patiently(sqs.create_queue, QueueName=name)["QueueUrl"]
    with pytest.raises(ClientError) as refused:  # and later: nothing changes
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"ConveyorRateLimit": lift})
    assert refused.value.response["Error"]["Code"] == "InvalidAttributeValue"
    reply = native(limited, "PATCH", f"/v1/queues/{name}", {"rate_limit": lift})
    assert reply.status == 400 and reply.json()["error"]["code"] == "InvalidAttribute", reply
    got = patiently(sqs.get_queue_attributes, QueueUrl=url, AttributeNames=["All"])
    assert "ConveyorRateLimit" not in got["Attributes"]

    time.sleep(BURST / RATE)  # a full bucket
    admitted, seconds = burst(sqs, url, 3 * BURST)
    assert admitted <= BURST + RATE * seconds, (admitted, seconds)


def test_a_kept_limit_above_a_lowered_server_limit_is_held_under_it(tmp_path: Path) -> None:
    # Kept while the server allowed them: "off" (no server limit then) and 10/s:10.
    server = Server(tmp_path / "data", fsync="never")
    try:
        sqs = server.sqs()
        free = sqs.create_queue(QueueName="free", Attributes={"ConveyorRateLimit": "off"}
                                )["QueueUrl"]
        ten = sqs.create_queue(QueueName="ten", Attributes={"ConveyorRateLimit": "10/s:10"}
                               )["QueueUrl"]
        admitted, _ = burst(sqs, free, 40)
        assert admitted == 40
        # The operator lowers the limit: a value kept cannot be refused now, so it is held
        # under the new limit, which no owner can then lift.
        server.extra = ("--rate-limit-queue", "2/s:2")
        server.restart()
        for url in (free, ten):
            time.sleep(1.0)  # a full bucket
            admitted, seconds = burst(sqs, url, 20)
            assert 2 <= admitted <= 2 + 2 * seconds, (url, admitted, seconds)
        got = patiently(sqs.get_queue_attributes, QueueUrl=ten, AttributeNames=["All"])
        assert got["Attributes"]["ConveyorRateLimit"] == "10/s:10"  # kept, as written
    finally:
        server.kill()


# --- usage by principal and queue, with authentication --------------------------------------

ALICE_ACCOUNT, BOB_ACCOUNT, DAVE_ACCOUNT = "111111111111", "222222222222", "333333333333"
# /metrics needs it under --auth required (server/protection/operator.py).
METRICS_TOKEN = secrets.token_hex(32)


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The audit log is on: conftest turns it off, and the later flag wins.
    root = tmp_path_factory.mktemp("usage")
    token_file, _ = metrics_token_file(root / "metrics.token", METRICS_TOKEN)
    running = Server(root / "data", fsync="never",
                     extra=("--auth", "required", "--rate-limit-principal", "5/s:40",
                            "--access-log", "--metrics-token-file", str(token_file)))
    try:
        yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            running.kill()


def bearer_token(server: Server, key: dict[str, str]) -> str:
    """A token made by the real CLI, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "keys", "token", key["access_key_id"],
         "--data-dir", str(server.data_dir)], check=True, capture_output=True, text=True
    ).stdout.strip()


def signed_get(server: Server, path: str, key: dict[str, str]) -> Any:
    request = AWSRequest(method="GET", url=server.url + path)
    SigV4Auth(Credentials(key["access_key_id"], key["secret_access_key"]), "sqs",
              "us-east-1").add_auth(request)
    return http(server, "GET", path, headers=dict(request.headers.items()))


def audit_lines(server: Server, until: Callable[[list[dict[str, Any]]], bool],
                timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The server's audit lines, once ``until`` holds of them: a request's line is written
    at the end of the event loop's turn that answered it, so its client can see the answer
    first (server/web/audit.py)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(line) for line in server.log.read_text().splitlines()
                 if line.startswith('{"ts":')]
        if until(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def usage_of(samples: dict[Any, float], scope: str, account: str, key: str
             ) -> dict[str, float]:
    return {field: samples.get((f"conveyor_usage_{scope}_{field}_total",
                                (("account", account), (scope, key))), 0.0)
            for field in ("requests", "messages", "bytes_in", "bytes_out", "throttled")}


def test_usage_by_principal_and_queue(authed: Server) -> None:
    alice_key = authed.create_key("alice", ALICE_ACCOUNT)
    carol_key = authed.create_key("carol", ALICE_ACCOUNT)
    bob_key = authed.create_key("bob", BOB_ACCOUNT)
    alice, carol, bob = (authed.sqs(k) for k in (alice_key, carol_key, bob_key))

    url = alice.create_queue(QueueName="orders")["QueueUrl"]
    alice_requests, alice_messages = 1, 0
    for i in range(3):
        alice.send_message(QueueUrl=url, MessageBody=f"single {i}")
    alice.send_message_batch(QueueUrl=url, Entries=[
        {"Id": str(i), "MessageBody": f"batched {i}"} for i in range(4)])
    alice_requests, alice_messages = alice_requests + 4, alice_messages + 7
    carol.send_message(QueueUrl=url, MessageBody="from carol")
    received: list[dict[str, Any]] = []
    while len(received) < 8:
        received += alice.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                          WaitTimeSeconds=1).get("Messages", [])
        alice_requests += 1
    alice.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(received[:5])])
    alice_requests += 1
    alice_messages += len(received) + 5

    bob_url = bob.create_queue(QueueName="orders")["QueueUrl"]
    assert bob_url != url
    for _ in range(2):
        bob.send_message(QueueUrl=bob_url, MessageBody="bob's")

    samples = metrics(authed, METRICS_TOKEN)
    assert usage_of(samples, "principal", ALICE_ACCOUNT, "alice")["requests"] == alice_requests
    assert usage_of(samples, "principal", ALICE_ACCOUNT, "alice")["messages"] == alice_messages
    assert usage_of(samples, "principal", ALICE_ACCOUNT, "carol")["requests"] == 1
    assert usage_of(samples, "principal", ALICE_ACCOUNT, "carol")["messages"] == 1
    orders = usage_of(samples, "queue", ALICE_ACCOUNT, "orders")
    assert orders["requests"] == alice_requests + 1
    assert orders["messages"] == alice_messages + 1
    assert orders["bytes_in"] > 0 and orders["bytes_out"] > 0
    assert orders["throttled"] == 0
    bobs = usage_of(samples, "principal", BOB_ACCOUNT, "bob")
    assert (bobs["requests"], bobs["messages"]) == (3, 2)
    assert usage_of(samples, "queue", BOB_ACCOUNT, "orders")["requests"] == 3

    # GET /v1/usage: the caller's account only, by bearer token or signed request.
    reply = native(authed, "GET", "/v1/usage", token=bearer_token(authed, alice_key))
    assert reply.status == 200, reply
    document = reply.json()
    assert document["account"] == ALICE_ACCOUNT
    assert set(document["principals"]) == {"alice", "carol"}
    assert set(document["queues"]) == {"orders"}
    assert document["principals"]["alice"]["requests"] == alice_requests
    assert document["principals"]["alice"]["messages"] == alice_messages
    assert document["queues"]["orders"]["requests"] == alice_requests + 1
    reply = signed_get(authed, "/v1/usage", bob_key)
    assert reply.status == 200, reply
    document = reply.json()
    assert document["account"] == BOB_ACCOUNT
    assert set(document["principals"]) == {"bob"} and set(document["queues"]) == {"orders"}
    assert document["queues"]["orders"]["messages"] == 2
    assert native(authed, "GET", "/v1/usage").status == 403
    assert native(authed, "GET", "/v1/usage", token="cvt1.CVYNOSUCHKEY.1.x").status == 403

    # Each request's audit line names its principal.
    lines = audit_lines(authed, lambda lines: sum(
        line["action"] == "usage" and line["status"] == 403 for line in lines) >= 2)
    sends = [line for line in lines if line["action"] == "SendMessage"
             and line["queue"] == f"{ALICE_ACCOUNT}/orders"]
    assert sorted(line["principal"] for line in sends) == ["alice"] * 3 + ["carol"]
    assert all(line["status"] == 200 for line in sends)
    usage_lines = [line for line in lines if line["action"] == "usage"
                   and line["principal"] in ("alice", "bob", None)]
    assert [line["principal"] for line in usage_lines] == ["alice", "bob", None, None]
    assert [line["status"] for line in usage_lines] == [200, 200, 403, 403]


def test_throttled_requests_are_counted_for_their_principal(authed: Server) -> None:
    dave_key = authed.create_key("dave", DAVE_ACCOUNT)
    dave = authed.sqs(dave_key)
    statuses = []
    started = time.monotonic()
    for _ in range(80):
        try:
            dave.list_queues()
        except ClientError as exc:
            meta = exc.response["ResponseMetadata"]
            assert (meta["HTTPStatusCode"], exc.response["Error"]["Code"]) == (
                429, "RequestThrottled"), exc.response
            assert int(meta["HTTPHeaders"]["retry-after"]) >= 1
            statuses.append(429)
        else:
            statuses.append(200)
    elapsed = time.monotonic() - started
    throttled = statuses.count(429)
    assert 40 <= statuses.count(200) <= 40 + 5 * elapsed, (statuses, elapsed)
    time.sleep(1)  # tokens for the next requests, at 5 a second
    reply = native(authed, "GET", "/v1/usage", token=bearer_token(authed, dave_key))
    assert reply.status == 200, reply
    dave_usage = reply.json()["principals"]["dave"]
    # Every request before this one, admitted or refused, is counted.
    assert dave_usage["requests"] == len(statuses)
    assert dave_usage["throttled"] == throttled, (dave_usage, statuses)
    assert dave_usage["messages"] == 0
    samples = metrics(authed, METRICS_TOKEN)
    assert usage_of(samples, "principal", DAVE_ACCOUNT, "dave")["throttled"] == throttled
    refused = [line for line in audit_lines(authed, lambda lines: sum(
        line["principal"] == "dave" and line["status"] == 429 for line in lines) >= throttled)
               if line["principal"] == "dave" and line["status"] == 429]
    assert len(refused) >= throttled


def test_usage_of_an_unauthenticated_server_is_the_anonymous_principal(
        limited: Server) -> None:
    sqs = limited.sqs()
    url = sqs.create_queue(QueueName="anonymous-usage")["QueueUrl"]
    patiently(sqs.send_message, QueueUrl=url, MessageBody="x")
    reply = native(limited, "GET", "/v1/usage")
    assert reply.status == 200, reply
    document = reply.json()
    assert document["account"] == ACCOUNT
    assert document["queues"]["anonymous-usage"]["messages"] == 1
    assert document["principals"]["anonymous"]["requests"] >= 2
