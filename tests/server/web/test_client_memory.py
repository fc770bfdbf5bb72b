"""Memory a client could grow, and JSON it could nest, against a real server.

Each case makes what used to grow the server's memory without bound, or answer 500, and
checks that every answer is a 4xx (or the ordinary answer), that the server's anonymous
memory (RssAnon in /proc/PID/status: its heap, not the page cache of its logs) stays
flat, and that the bound holds as documented in docs/API.md. The limits are written here
as numbers, as a client reads them in the documentation.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.support.clients import ACCOUNT, http, metrics, native
from tests.support.server import Server, module_server, restarted_if_dead

MIB = 1024 * 1024
JSON_TYPE = "application/x-amz-json-1.0"
FORM_TYPE = "application/x-www-form-urlencoded"
# The documented limits (docs/API.md).
JSON_DEPTH_MAX = 32
ATTEMPTS_MAX = 10_000
ATTEMPTS_BYTES_MAX = 64 * MIB


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with module_server(tmp_path_factory, "client-memory", fsync="never") as running:
        yield running


@pytest.fixture
def srv(shared: Server) -> Server:
    return restarted_if_dead(shared)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own, for memory measured from a heap no other case grew
    (memory an earlier case freed would be reused, and hide growth)."""
    running = Server(tmp_path / "data", fsync="never")
    try:
        yield running
    finally:
        running.kill()


def anon_mib(server: Server) -> float:
    """The server's anonymous resident memory: what its heap holds."""
    assert server.process is not None
    with open(f"/proc/{server.process.pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/PID/status")


class Connection:
    """One keep-alive connection for many requests: a flood costs the server, not the test."""

    def __init__(self, server: Server) -> None:
        self.conn = HTTPConnection("127.0.0.1", server.port, timeout=60)

    def call(self, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        self.conn.request(method, path, body, headers or {})
        response = self.conn.getresponse()
        return response.status, response.read()

    def sqs(self, action: str, params: dict[str, Any] | bytes) -> tuple[int, bytes]:
        body = params if isinstance(params, bytes) else json.dumps(params).encode()
        return self.call("POST", "/", body, {"Content-Type": JSON_TYPE,
                                             "X-Amz-Target": f"AmazonSQS.{action}"})

    def form(self, fields: dict[str, str]) -> tuple[int, bytes]:
        return self.call("POST", "/", urllib.parse.urlencode(fields).encode(),
                         {"Content-Type": FORM_TYPE})

    def close(self) -> None:
        self.conn.close()


def assert_healthy(server: Server) -> None:
    assert server.process is not None and server.process.poll() is None, "the server died"
    sqs = server.sqs()
    url = sqs.create_queue(QueueName="health")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="still here")
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2)["Messages"]
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


# --- queue names checked before anything is kept under them ------------------------------


def _huge_name(i: int, size: int) -> str:
    return f"{i:04d}" + "n" * (size - 4)  # each one distinct, as an attacker's would be


def _oversized_name_calls(conn: Connection, i: int, size: int) -> list[tuple[str, int]]:
    """Each way a request names a queue, with a made-up name of ``size`` bytes."""
    name = _huge_name(i, size)
    return [
        ("sqs-json CreateQueue", conn.sqs("CreateQueue", {"QueueName": name})[0]),
        ("sqs-query CreateQueue", conn.form({"Action": "CreateQueue", "QueueName": name})[0]),
        ("native create", conn.call("POST", "/v1/queues", json.dumps({"name": name}).encode(),
                                    {"Content-Type": "application/json"})[0]),
        ("sqs-json GetQueueUrl owner", conn.sqs("GetQueueUrl", {
            "QueueName": "q", "QueueOwnerAWSAccountId": name})[0]),
    ]


def test_oversized_queue_names_leave_memory_flat(fresh: Server) -> None:
    srv = fresh
    conn = Connection(srv)
    try:
        for i in range(5):  # warm up: the allocator's first growth is not a leak
            _oversized_name_calls(conn, 10_000 + i, MIB)
        before = anon_mib(srv)
        started = time.monotonic()
        statuses: dict[str, set[int]] = {}
        rounds = 50  # four calls each: 200 names of 1 MiB
        for i in range(rounds):
            for call, status in _oversized_name_calls(conn, i, MIB):
                statuses.setdefault(call, set()).add(status)
        # The native path carries a name too, up to the request line's 16 KiB.
        for i in range(200):
            status, _ = conn.call("GET", f"/v1/queues/{_huge_name(i, 15 * 1024)}")
            statuses.setdefault("native path", set()).add(status)
        elapsed = time.monotonic() - started
        after = anon_mib(srv)
    finally:
        conn.close()
    print(f"200 names of 1 MiB and 200 of 15 KiB in {elapsed:.1f} s: RssAnon "
          f"{before:.1f} -> {after:.1f} MiB")
    assert all(400 <= s < 500 for found in statuses.values() for s in found), statuses
    # Kept under their names, they would hold over 200 MiB.
    assert after - before < 30, f"RssAnon grew {after - before:.1f} MiB"
    usage = native(srv, "GET", "/v1/usage").json()
    assert all(len(q) <= 80 for q in usage["queues"]), [q[:100] for q in usage["queues"]]
    assert max(map(len, http(srv, "GET", "/metrics").body.splitlines())) < 1024
    assert_healthy(srv)


def test_made_up_actions_and_paths_add_no_metrics_labels(srv: Server) -> None:
    conn = Connection(srv)
    try:
        for i in range(100):
            conn.sqs(f"Made{i}Up" + "x" * 8000, {})  # X-Amz-Target, under the 16 KiB header
            conn.form({"Action": f"Made{i}Up" + "y" * 100_000})
            conn.call("GET", f"/no/such/route/{i}/" + "z" * 8000)
            conn.call(f"BREW{i}", "/v1/queues")  # an unknown method on a known path
    finally:
        conn.close()
    labels = {dict(labels)["action"] for name, labels in metrics(srv)
              if name == "conveyor_requests_total"}
    assert "unknown" in labels and "unrouted" in labels, labels
    assert all(len(label) <= 40 for label in labels), sorted(labels, key=len)[-1][:100]
    assert len(http(srv, "GET", "/metrics").body) < 256 * 1024


# --- FIFO receive attempts ----------------------------------------------------------------


def _fifo(srv: Server, name: str) -> str:
    url: str = srv.sqs().create_queue(QueueName=name, Attributes={
        "FifoQueue": "true", "ContentBasedDeduplication": "true"})["QueueUrl"]
    return url


def test_receive_attempts_are_bounded_by_count(srv: Server) -> None:
    sqs = srv.sqs()
    url = _fifo(srv, f"attempts-{uuid.uuid4().hex[:8]}.fifo")
    sqs.send_message(QueueUrl=url, MessageBody="first", MessageGroupId="g")
    first = sqs.receive_message(QueueUrl=url, ReceiveRequestAttemptId="first",
                                VisibilityTimeout=600)["Messages"]
    # Within its window a retry gets the same answer, receipt included.
    again = sqs.receive_message(QueueUrl=url, ReceiveRequestAttemptId="first",
                                VisibilityTimeout=600)["Messages"]
    assert again == first

    # ATTEMPTS_MAX other attempts, each an answer of its own (empty: the group is locked).
    conn = Connection(srv)
    started = time.monotonic()
    try:
        for i in range(ATTEMPTS_MAX):
            status, body = conn.sqs("ReceiveMessage", {
                "QueueUrl": url, "ReceiveRequestAttemptId": f"flood-{i}"})
            assert status == 200, body
    finally:
        conn.close()
    print(f"{ATTEMPTS_MAX} receive attempts in {time.monotonic() - started:.1f} s")

    # The first answer was the oldest, so it went: the retry is a new receive, which finds
    # the message still in flight, as after any lost answer. Nothing is lost.
    retried = sqs.receive_message(QueueUrl=url, ReceiveRequestAttemptId="first",
                                  VisibilityTimeout=600)
    assert "Messages" not in retried, retried
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first[0]["ReceiptHandle"])
    assert "Messages" not in sqs.receive_message(QueueUrl=url)


def test_receive_attempts_are_bounded_by_bytes(fresh: Server) -> None:
    srv = fresh
    sqs = srv.sqs()
    url = _fifo(srv, f"big-{uuid.uuid4().hex[:8]}.fifo")
    answers = 16  # ten messages of 1 MiB each: 160 MiB of answers, over twice the bound
    body = "b" * (MIB - 64)
    # Warm up with one answer of this size first: buffers of that size are the
    # allocator's, not the cache's.
    sqs.send_message(QueueUrl=url, MessageBody=body + "warm", MessageGroupId="warm")
    [warm] = sqs.receive_message(QueueUrl=url, ReceiveRequestAttemptId="warm")["Messages"]
    sqs.delete_message(QueueUrl=url, ReceiptHandle=warm["ReceiptHandle"])
    before = anon_mib(srv)
    half = before
    for n in range(answers):
        for k in range(10):
            sqs.send_message(QueueUrl=url, MessageBody=f"{body}{n:03d}{k}", MessageGroupId="g")
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=600,
                                  ReceiveRequestAttemptId=f"answer-{n}")["Messages"]
        assert len(got) == 10
        # Deleted at once: only the remembered answer still holds the bodies.
        sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])
        if n == answers // 2 - 1:
            half = anon_mib(srv)  # 80 MiB of answers so far: the bound is reached
    after = anon_mib(srv)
    print(f"{answers} answers of 10 MiB: RssAnon {before:.1f} -> {half:.1f} (half) -> "
          f"{after:.1f} MiB")
    # Kept whole, the answers would hold 160 MiB, 80 of it from the second half; bounded,
    # the second half adds only what the allocator keeps of the bodies that passed
    # through (up to about 20 MiB here on a busy machine). Half of 80 tells them apart.
    assert after - half < 40, f"the second half grew {after - half:.1f} MiB"
    assert after - before < ATTEMPTS_BYTES_MAX / MIB + 48, f"grew {after - before:.1f} MiB"

    # The first answer was forgotten to make room: its retry is a new receive.
    sqs.send_message(QueueUrl=url, MessageBody="after", MessageGroupId="g")
    retried = sqs.receive_message(QueueUrl=url, ReceiveRequestAttemptId="answer-0")["Messages"]
    assert [m["Body"] for m in retried] == ["after"]
    # The latest answer is still remembered.
    latest = sqs.receive_message(QueueUrl=url, ReceiveRequestAttemptId=f"answer-{answers - 1}",
                                 MaxNumberOfMessages=10)["Messages"]
    assert latest[0]["Body"].endswith(f"{answers - 1:03d}0")
    assert_healthy(srv)


# --- JSON nested too deeply: 400, never 500, and nothing changes -------------------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


NESTED_ATTRIBUTES = ["Policy", "RedrivePolicy", "RedriveAllowPolicy"]


@pytest.mark.parametrize("depth", [100_000, JSON_DEPTH_MAX + 1])
@pytest.mark.parametrize("attribute", NESTED_ATTRIBUTES)
@pytest.mark.parametrize("protocol", ["sqs-json", "sqs-query", "boto3"])
def test_nested_json_attributes_are_refused(srv: Server, protocol: str, attribute: str,
                                            depth: int) -> None:
    # Wrapped in an object, so that only the nesting is wrong. The deepest is 200 KB, under
    # the 8 KiB Policy limit only when shallow: at 100,000 the Policy is refused by size
    # first, so its nesting is tested at JSON_DEPTH_MAX + 1.
    value = '{"a": ' + _nested(depth) + "}"
    name = f"nested-{uuid.uuid4().hex[:8]}"
    url = srv.sqs().create_queue(QueueName=name)["QueueUrl"]
    conn = Connection(srv)
    try:
        if protocol == "sqs-json":
            for action, params in (("SetQueueAttributes", {"QueueUrl": url}),
                                   ("CreateQueue", {"QueueName": name + "-new"})):
                status, body = conn.sqs(action, {**params, "Attributes": {attribute: value}})
                assert status == 400, body[:300]
                assert json.loads(body)["__type"].endswith("#InvalidAttributeValue"), body[:300]
        elif protocol == "sqs-query":
            for action, params in (("SetQueueAttributes", {"QueueUrl": url}),
                                   ("CreateQueue", {"QueueName": name + "-new"})):
                status, body = conn.form({"Action": action, **params,
                                          "Attribute.1.Name": attribute,
                                          "Attribute.1.Value": value})
                assert status == 400, body[:300]
                assert b"<Code>InvalidAttributeValue</Code>" in body, body[:300]
        else:
            with pytest.raises(ClientError) as refused:
                srv.sqs().set_queue_attributes(QueueUrl=url, Attributes={attribute: value})
            assert refused.value.response["Error"]["Code"] == "InvalidAttributeValue"
    finally:
        conn.close()
    got = srv.sqs().get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attribute not in got
    with pytest.raises(ClientError, match="NonExistentQueue"):
        srv.sqs().get_queue_url(QueueName=name + "-new")


@pytest.mark.parametrize("depth", [100_000, 900, JSON_DEPTH_MAX + 1])
@pytest.mark.parametrize("where", ["sqs-json", "native"])
def test_nested_request_bodies_are_refused(srv: Server, where: str, depth: int) -> None:
    conn = Connection(srv)
    try:
        if where == "sqs-json":
            body = b'{"QueueName": "q", "Attributes": ' + _nested(depth).encode() + b"}"
            status, answer = conn.sqs("CreateQueue", body)
        else:
            body = b'{"name": "q", "attributes": ' + _nested(depth).encode() + b"}"
            status, answer = conn.call("POST", "/v1/queues", body,
                                       {"Content-Type": "application/json"})
    finally:
        conn.close()
    assert status == 400, answer[:300]
    assert f"nested deeper than {JSON_DEPTH_MAX}".encode() in answer, answer[:300]


def test_deeply_nested_form_fields_are_refused(srv: Server) -> None:
    url = srv.sqs().create_queue(QueueName="form-nesting")["QueueUrl"]
    # Batch entries within batch entries: each level was converted by a recursive call.
    key = ".".join(["SendMessageBatchRequestEntry", "1"] * 5000) + ".Id"
    conn = Connection(srv)
    try:
        status, body = conn.form({"Action": "SendMessageBatch", "QueueUrl": url, key: "a"})
    finally:
        conn.close()
    assert status == 400, body[:300]
    assert b"MalformedQueryString" in body, body[:300]
    assert_healthy(srv)


@pytest.mark.parametrize("attribute", ["RedriveAllowPolicy", "KmsMasterKeyId",
                                       "DeduplicationScope", "FifoThroughputLimit"])
def test_attributes_kept_as_given_are_bounded(srv: Server, attribute: str) -> None:
    sqs = srv.sqs()
    url = sqs.create_queue(QueueName=f"kept-{attribute}")["QueueUrl"]
    at_most = 8192
    big = '{"redrivePermission": "allowAll", "x": "' + "p" * at_most + '"}'
    with pytest.raises(ClientError) as refused:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={attribute: big})
    assert refused.value.response["Error"]["Code"] == "InvalidAttributeValue"
    assert f"at most {at_most} bytes" in refused.value.response["Error"]["Message"]
    got = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attribute not in got
    if attribute == "RedriveAllowPolicy":  # under the bound, kept as given
        small = '{"redrivePermission": "allowAll"}'
        sqs.set_queue_attributes(QueueUrl=url, Attributes={attribute: small})
        got = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[attribute])["Attributes"]
        assert got == {attribute: small}


def test_a_refused_name_is_still_counted_for_its_principal(srv: Server) -> None:
    before = native(srv, "GET", "/v1/usage").json()
    conn = Connection(srv)
    try:
        status, _ = conn.sqs("CreateQueue", {"QueueName": "bad name!" * 10})
    finally:
        conn.close()
    assert status == 400
    after = native(srv, "GET", "/v1/usage").json()
    [principal] = after["principals"]
    assert (after["principals"][principal]["requests"]
            > before["principals"][principal]["requests"])
    # No queue label came of the refused name. (Compared with the labels before, not by
    # searching for "bad": other tests' queue names end in random hex, such as e481badc.)
    assert set(after["queues"]) <= set(before["queues"]), after["queues"]
    assert after["account"] == ACCOUNT
