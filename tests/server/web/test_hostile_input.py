"""Hostile and malformed requests against a real server.

Every one must be refused with a 4xx (the client's fault, never a 5xx), and the server
must stay healthy: after each case /healthz answers and an ordinary send and receive
still work. Requests go over raw sockets where a well-behaved HTTP client would refuse to
send them.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import json
import os
import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from server.config import HEADER_BYTES_MAX, REQUEST_BYTES_MAX
from tests.support.clients import Reply
from tests.support.server import Server, module_server, restarted_if_dead

ACCOUNT = "000000000000"
QUEUE = "q"
QUEUE_PATH = f"/{ACCOUNT}/{QUEUE}"
HEALTH_QUEUE = "health-check"
JSON_TYPE = "application/x-amz-json-1.0"
FORM_TYPE = "application/x-www-form-urlencoded"
MIB = 1024 * 1024


# --- raw HTTP ---------------------------------------------------------------------------


def _read_reply(sock: socket.socket, deadline: float) -> Reply:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = _recv(sock, deadline)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = _recv(sock, deadline)
            if not chunk:
                break
            body += chunk
        body = body[:length]
    else:
        while chunk := _recv(sock, deadline):
            body += chunk
    return Reply(status, headers, body)


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def exchange(server: Server, raw: bytes, timeout: float = 30) -> Reply:
    """Send raw bytes as one request on a fresh connection and read the response."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)  # the server may answer and close before taking all of it
        return _read_reply(sock, deadline)


def request(server: Server, method: str, target: str | bytes, body: bytes = b"",
            headers: dict[str, str] | None = None) -> Reply:
    target_bytes = target if isinstance(target, bytes) else target.encode()
    lines = [b"%s %s HTTP/1.1" % (method.encode(), target_bytes), b"Host: 127.0.0.1",
             b"Connection: close", b"Content-Length: %d" % len(body)]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
    return exchange(server, b"\r\n".join(lines) + b"\r\n\r\n" + body)


def sqs_json(server: Server, action: str, params: Any) -> Reply:
    body = params if isinstance(params, bytes) else json.dumps(params).encode()
    return request(server, "POST", "/", body,
                   {"Content-Type": JSON_TYPE, "X-Amz-Target": f"AmazonSQS.{action}"})


def sqs_form(server: Server, body: bytes, path: str = "/") -> Reply:
    return request(server, "POST", path, body, {"Content-Type": FORM_TYPE})


# --- the server, and its health ------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with module_server(tmp_path_factory, "hostile", fsync="never") as running:
        yield running


@pytest.fixture
def srv(shared: Server) -> Server:
    return with_queues(restarted_if_dead(shared))


def with_queues(server: Server) -> Server:
    for name in (QUEUE, HEALTH_QUEUE):
        reply = sqs_json(server, "CreateQueue", {"QueueName": name})
        assert reply.status == 200, reply
    return server


def assert_healthy(server: Server) -> None:
    assert server.process is not None and server.process.poll() is None, (
        f"the server exited with {server.process and server.process.returncode}")
    reply = request(server, "GET", "/healthz")
    assert reply.status == 200, f"/healthz after the case: {reply}"
    url = f"{server.url}/{ACCOUNT}/{HEALTH_QUEUE}"
    body = f"still healthy {uuid.uuid4()}"
    sent = sqs_json(server, "SendMessage", {"QueueUrl": url, "MessageBody": body})
    assert sent.status == 200, f"SendMessage after the case: {sent}"
    got = sqs_json(server, "ReceiveMessage", {"QueueUrl": url, "WaitTimeSeconds": 2})
    assert got.status == 200, f"ReceiveMessage after the case: {got}"
    [message] = json.loads(got.body)["Messages"]
    assert message["Body"] == body
    done = sqs_json(server, "DeleteMessage",
                    {"QueueUrl": url, "ReceiptHandle": message["ReceiptHandle"]})
    assert done.status == 200, f"DeleteMessage after the case: {done}"


def assert_client_error(reply: Reply, server: Server) -> None:
    assert_healthy(server)
    assert 400 <= reply.status < 500, f"expected a 4xx, got {reply}"


def a_receipt(server: Server) -> str:
    """A genuine receipt handle of a message of QUEUE, left in flight."""
    url = f"{server.url}{QUEUE_PATH}"
    assert sqs_json(server, "SendMessage", {"QueueUrl": url, "MessageBody": "victim"}
                    ).status == 200
    reply = sqs_json(server, "ReceiveMessage", {"QueueUrl": url, "WaitTimeSeconds": 2,
                                                "VisibilityTimeout": 600})
    handle: str = json.loads(reply.body)["Messages"][0]["ReceiptHandle"]
    return handle


def _flip(handle: str, at: int) -> str:
    replacement = "A" if handle[at] != "A" else "B"
    return handle[:at] + replacement + handle[at + 1:]


# --- declared and streamed bodies over the limit ----------------------------------------


@pytest.mark.parametrize(("path", "headers"), [
    ("/", {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.SendMessage"}),
    ("/", {"Content-Type": FORM_TYPE}),
    (f"/v1/queues/{QUEUE}/messages", {"Content-Type": "application/octet-stream"}),
], ids=["json", "form", "native"])
def test_declared_length_over_limit_is_refused_before_the_body(
        srv: Server, path: str, headers: dict[str, str]) -> None:
    # Only the head is sent: an answer can only come if the body is never waited for.
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1",
            f"Content-Length: {REQUEST_BYTES_MAX + 1}",
            *(f"{k}: {v}" for k, v in headers.items())]
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        reply = _read_reply(sock, time.monotonic() + 10)
    assert reply.status == 413, reply
    assert time.monotonic() - started < 5
    assert_healthy(srv)


def memory_mib(pid: int) -> dict[str, float]:
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(value.split()[0]) / 1024
    return values


def stream_chunked(server: Server, path: str, headers: dict[str, str], total: int
                   ) -> tuple[Reply, int]:
    """POST up to ``total`` bytes with chunked encoding (no Content-Length), stopping early
    when the server answers; the answer and the bytes sent."""
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Transfer-Encoding: chunked",
            *(f"{k}: {v}" for k, v in headers.items())]
    chunk = b"%x\r\n%s\r\n" % (MIB, b"a" * MIB)
    sent = 0
    deadline = time.monotonic() + 120
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sock.setblocking(False)
        pending = memoryview(chunk)
        chunks_left = total // MIB
        while chunks_left and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1)
            if readable:
                break  # the server answered without taking the whole body
            if not writable:
                continue
            try:
                pending = pending[sock.send(pending):]
            except (BrokenPipeError, ConnectionResetError):
                break
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    continue
                raise
            if not pending:
                sent += MIB
                chunks_left -= 1
                pending = memoryview(chunk)
        else:
            with contextlib.suppress(OSError):
                sock.setblocking(True)
                sock.sendall(b"0\r\n\r\n")
        sock.setblocking(True)
        return _read_reply(sock, deadline), sent


@pytest.mark.parametrize(("path", "headers"), [
    ("/", {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.SendMessage"}),
    ("/", {"Content-Type": FORM_TYPE}),
    (f"/v1/queues/{QUEUE}/messages", {"Content-Type": "application/octet-stream"}),
], ids=["sqs-json", "sqs-form", "native"])
def test_streamed_100_mib_body_is_refused_with_flat_memory(
        server: Server, path: str, headers: dict[str, str]) -> None:
    with_queues(server)
    assert server.process is not None
    pid = server.process.pid
    before = memory_mib(pid)
    reply, sent = stream_chunked(server, path, headers, 100 * MIB)
    time.sleep(0.3)
    after = memory_mib(pid)
    rss_growth = after["VmRSS"] - before["VmRSS"]
    peak_growth = after["VmHWM"] - before["VmRSS"]
    print(f"{path}: {sent / MIB:.0f} MiB sent before the answer; RSS {before['VmRSS']:.1f}"
          f" -> {after['VmRSS']:.1f} MiB, peak (VmHWM) {before['VmHWM']:.1f} -> "
          f"{after['VmHWM']:.1f} MiB")
    assert reply.status == 413, reply
    # Holding the body would cost 100 MiB; buffering up to the 8 MiB limit is expected.
    assert rss_growth < 40, f"RSS grew {rss_growth:.1f} MiB"
    assert peak_growth < 40, f"peak RSS rose {peak_growth:.1f} MiB above the start"
    assert_healthy(server)


# --- malformed requests ---------------------------------------------------------------------

URL = f"http://127.0.0.1{QUEUE_PATH}"


def _many_fields(count: int) -> bytes:
    return ("Action=ListQueues&" + "&".join(f"F{i}=x" for i in range(count))).encode()


def _many_attributes(count: int) -> bytes:
    fields = [f"Action=SendMessage&QueueUrl={QUEUE_PATH}&MessageBody=x"]
    fields += [f"MessageAttribute.{i}.Name=a{i}&MessageAttribute.{i}.Value.DataType=String"
               f"&MessageAttribute.{i}.Value.StringValue=v" for i in range(1, count + 1)]
    return "&".join(fields).encode()


def _deep_json(depth: int) -> bytes:
    # Well under the size limit, but deeper than a recursive parser's stack.
    return b'{"QueueName": ' + b"[" * depth + b"]" * depth + b"}"


CASES: dict[str, Callable[[Server], Reply]] = {
    # Bodies that are not what their content type says.
    "json-truncated": lambda s: sqs_json(s, "SendMessage",
                                         b'{"QueueUrl": "' + URL.encode() + b'", "Mess'),
    "json-array": lambda s: sqs_json(s, "SendMessage", [{"QueueUrl": URL}]),
    "json-scalar": lambda s: sqs_json(s, "ListQueues", b"42"),
    "json-invalid-utf8": lambda s: sqs_json(
        s, "SendMessage", b'{"QueueUrl": "' + URL.encode() + b'", "MessageBody": "\xff\xfe"}'),
    "json-deeply-nested": lambda s: sqs_json(s, "GetQueueUrl", _deep_json(100_000)),
    "json-huge-integer": lambda s: sqs_json(
        s, "ReceiveMessage", b'{"QueueUrl": "' + URL.encode() + b'", "MaxNumberOfMessages": '
        + b"9" * 5000 + b"}"),
    "form-invalid-utf8-escaped": lambda s: sqs_form(
        s, f"Action=SendMessage&QueueUrl={QUEUE_PATH}&MessageBody=%FF%FE".encode()),
    "form-invalid-utf8-raw": lambda s: sqs_form(
        s, f"Action=SendMessage&QueueUrl={QUEUE_PATH}&MessageBody=".encode() + b"\xff\xfe"),
    "form-thousands-of-fields": lambda s: sqs_form(s, _many_fields(5000)),
    "form-hundreds-of-attributes": lambda s: sqs_form(s, _many_attributes(600)),
    "form-conflicting-fields": lambda s: sqs_form(
        s, b"Action=CreateQueue&QueueName=x&Attribute.1=a&Attribute.1.Name=b"),
    "form-index-zero": lambda s: sqs_form(
        s, b"Action=CreateQueue&QueueName=x&Attribute.0.Name=VisibilityTimeout"),
    "form-empty-key-parts": lambda s: sqs_form(
        s, f"Action=SendMessage&QueueUrl={QUEUE_PATH}&MessageBody=x&....=1".encode()),
    "query-string-invalid-utf8-escaped": lambda s: request(
        s, "GET", "/?Action=GetQueueUrl&QueueName=%FF%FE"),
    "query-string-invalid-utf8-raw": lambda s: request(
        s, "GET", b"/?Action=GetQueueUrl&QueueName=\xff\xfe"),
    # Actions.
    "unknown-target": lambda s: sqs_json(s, "DropAllTables", {}),
    "foreign-target-prefix": lambda s: request(
        s, "POST", "/", b"{}", {"Content-Type": JSON_TYPE,
                                "X-Amz-Target": "DynamoDB_20120810.ListTables"}),
    "json-without-target": lambda s: request(s, "POST", "/", b'{"QueueName": "q"}',
                                             {"Content-Type": JSON_TYPE}),
    "form-without-action": lambda s: sqs_form(s, b"QueueName=q"),
    "get-garbage-query": lambda s: request(s, "GET", "/?%%%&&==&;;[[]]"),
    "get-garbage-escapes": lambda s: request(s, "GET", "/?a=%zz&&&=&Action"),
    "get-control-characters": lambda s: request(s, "GET", b"/?Action=\x01\x02\x7f"),
    "get-unknown-action": lambda s: request(s, "GET", "/?Action=" + "A" * 5000),
    # Headers.
    "huge-header": lambda s: request(s, "GET", "/healthz",
                                     headers={"X-Big": "a" * (HEADER_BYTES_MAX + 1024)}),
    "huge-request-line": lambda s: request(s, "GET", "/?" + "a" * (HEADER_BYTES_MAX + 1024)),
    "many-headers": lambda s: request(s, "GET", "/healthz",
                                      headers={f"X-H{i}": "v" for i in range(500)}),
    "header-control-character": lambda s: request(
        s, "POST", "/", b'{"QueueName": "q"}',
        {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.GetQueueUrl",
         "Authorization": "AWS4-HMAC-SHA256 \x7f\x01"}),
    # Queue URLs.
    "queue-url-too-many-segments": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": "http://x/a/b/c", "MessageBody": "x"}),
    "queue-url-dot-dot": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": "http://x/../../etc/passwd", "MessageBody": "x"}),
    "queue-url-bad-ipv6-host": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": "http://[::1/000000000000/q", "MessageBody": "x"}),
    "queue-url-bad-ipv6-host-query": lambda s: sqs_form(
        s, b"Action=SendMessage&MessageBody=x&QueueUrl=http://[::1/000000000000/q"),
    "queue-url-not-a-string": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": {"path": QUEUE_PATH}, "MessageBody": "x"}),
    "queue-url-nul": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": f"/{ACCOUNT}/q\x00", "MessageBody": "x"}),
    "queue-url-very-long": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": f"/{ACCOUNT}/" + "q" * 100_000, "MessageBody": "x"}),
    "query-path-bad-account": lambda s: sqs_form(s, b"Action=SendMessage&MessageBody=x",
                                                 path="/bad%20acct!/q"),
    "query-path-dot-dot": lambda s: sqs_form(s, b"Action=SendMessage&MessageBody=x",
                                             path="/%2e%2e/%2e%2e"),
    # Receipt handles.
    "receipt-garbage": lambda s: sqs_json(
        s, "DeleteMessage", {"QueueUrl": URL, "ReceiptHandle": "garbage!*&^%$#@"}),
    "receipt-random-bytes": lambda s: sqs_json(
        s, "DeleteMessage", {"QueueUrl": URL,
                             "ReceiptHandle": base64.urlsafe_b64encode(os.urandom(42)).decode()}),
    "receipt-too-short": lambda s: sqs_json(
        s, "DeleteMessage", {"QueueUrl": URL, "ReceiptHandle": a_receipt(s)[:-4]}),
    "receipt-too-long": lambda s: sqs_json(
        s, "DeleteMessage", {"QueueUrl": URL, "ReceiptHandle": a_receipt(s) + "AAAA"}),
    "receipt-huge": lambda s: sqs_json(
        s, "DeleteMessage", {"QueueUrl": URL, "ReceiptHandle": "A" * 1_000_000}),
    "receipt-tampered": lambda s: sqs_json(
        s, "DeleteMessage", {"QueueUrl": URL, "ReceiptHandle": _flip(a_receipt(s), 20)}),
    "receipt-non-ascii": lambda s: sqs_json(
        s, "DeleteMessage", {"QueueUrl": URL, "ReceiptHandle": "ñö☃😀" * 14}),
    "receipt-lone-surrogate": lambda s: sqs_json(
        s, "ChangeMessageVisibility", b'{"QueueUrl": "' + URL.encode()
        + b'", "ReceiptHandle": "\\ud800\\udfff\\ud800", "VisibilityTimeout": 1}'),
    "receipt-non-ascii-query": lambda s: sqs_form(
        s, f"Action=ChangeMessageVisibility&QueueUrl={QUEUE_PATH}&VisibilityTimeout=1"
           f"&ReceiptHandle=%C3%B1%E2%98%83".encode()),
    "receipt-not-a-string": lambda s: sqs_json(
        s, "DeleteMessage", {"QueueUrl": URL, "ReceiptHandle": ["x"]}),
    "receipt-native-garbage": lambda s: request(
        s, "DELETE", f"/v1/queues/{QUEUE}/messages/%FF%FE%00garbage"),
    # Numbers that are not numbers.
    "max-messages-abc": lambda s: sqs_json(
        s, "ReceiveMessage", {"QueueUrl": URL, "MaxNumberOfMessages": "abc"}),
    "max-messages-abc-query": lambda s: sqs_form(
        s, f"Action=ReceiveMessage&QueueUrl={QUEUE_PATH}&MaxNumberOfMessages=abc".encode()),
    "max-messages-nan": lambda s: sqs_json(
        s, "ReceiveMessage", b'{"QueueUrl": "' + URL.encode() + b'", "MaxNumberOfMessages": NaN}'),
    "max-messages-list": lambda s: sqs_json(
        s, "ReceiveMessage", {"QueueUrl": URL, "MaxNumberOfMessages": [5]}),
    "wait-time-float": lambda s: sqs_json(
        s, "ReceiveMessage", {"QueueUrl": URL, "WaitTimeSeconds": 1e300}),
    # Maps and lists holding values of the wrong type.
    "queue-attributes-list-value": lambda s: sqs_json(
        s, "CreateQueue", {"QueueName": "typed", "Attributes": {"VisibilityTimeout": [30]}}),
    "queue-attributes-object-value": lambda s: sqs_json(
        s, "CreateQueue", {"QueueName": "typed", "Attributes": {"DelaySeconds": {"a": 1}}}),
    "queue-attributes-null-value": lambda s: sqs_json(
        s, "CreateQueue", {"QueueName": "typed", "Attributes": {"VisibilityTimeout": None}}),
    "queue-attributes-number-policy": lambda s: sqs_json(
        s, "CreateQueue", {"QueueName": "typed", "Attributes": {"Policy": 5}}),
    "queue-attributes-not-a-map": lambda s: sqs_json(
        s, "CreateQueue", {"QueueName": "typed", "Attributes": ["VisibilityTimeout", 5]}),
    "set-attributes-redrive-object": lambda s: sqs_json(
        s, "SetQueueAttributes", {"QueueUrl": URL, "Attributes": {"RedrivePolicy": {"a": 1}}}),
    "set-attributes-redrive-array": lambda s: sqs_json(
        s, "SetQueueAttributes", {"QueueUrl": URL, "Attributes": {"RedrivePolicy": "[1]"}}),
    "message-attribute-number-value": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": URL, "MessageBody": "x", "MessageAttributes": {
            "a": {"DataType": "String", "StringValue": 5}}}),
    "message-attribute-scalar": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": URL, "MessageBody": "x", "MessageAttributes": {"a": 5}}),
    "message-attribute-type-not-string": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": URL, "MessageBody": "x", "MessageAttributes": {
            "a": {"DataType": ["String"], "StringValue": "v"}}}),
    "message-attribute-binary-not-base64": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": URL, "MessageBody": "x", "MessageAttributes": {
            "a": {"DataType": "Binary", "BinaryValue": 12345}}}),
    "message-body-object": lambda s: sqs_json(
        s, "SendMessage", {"QueueUrl": URL, "MessageBody": {"nested": True}}),
    "batch-entry-id-number": lambda s: sqs_json(
        s, "SendMessageBatch", {"QueueUrl": URL, "Entries": [{"Id": 1, "MessageBody": "x"}]}),
    "batch-entries-object": lambda s: sqs_json(
        s, "SendMessageBatch", {"QueueUrl": URL, "Entries": {"Id": "a", "MessageBody": "x"}}),
    "tags-number-value": lambda s: sqs_json(
        s, "TagQueue", {"QueueUrl": URL, "Tags": {"team": 5}}),
    "untag-keys-string": lambda s: sqs_json(
        s, "UntagQueue", {"QueueUrl": URL, "TagKeys": "team"}),
    "attribute-names-nested-list": lambda s: sqs_json(
        s, "GetQueueAttributes", {"QueueUrl": URL, "AttributeNames": [["All"]]}),
    "attribute-names-object": lambda s: sqs_json(
        s, "GetQueueAttributes", {"QueueUrl": URL, "AttributeNames": [{"All": 1}]}),
    "receive-attribute-names-nested": lambda s: sqs_json(
        s, "ReceiveMessage", {"QueueUrl": URL, "MessageAttributeNames": [["All"]]}),
    "queue-owner-list": lambda s: sqs_json(
        s, "GetQueueUrl", {"QueueName": QUEUE, "QueueOwnerAWSAccountId": [ACCOUNT]}),
    "queue-name-object": lambda s: sqs_json(s, "CreateQueue", {"QueueName": {"a": "b"}}),
    # The native API.
    "native-truncated-json": lambda s: request(
        s, "POST", f"/v1/queues/{QUEUE}/messages/receive", b'{"max_messages": ',
        {"Content-Type": "application/json"}),
    "native-json-array": lambda s: request(
        s, "POST", f"/v1/queues/{QUEUE}/messages/receive", b"[]",
        {"Content-Type": "application/json"}),
    "native-deeply-nested": lambda s: request(
        s, "POST", "/v1/queues", b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        {"Content-Type": "application/json"}),
    "native-invalid-utf8": lambda s: request(
        s, "POST", "/v1/queues", b'{"name": "\xff"}', {"Content-Type": "application/json"}),
    "native-attributes-wrong-types": lambda s: request(
        s, "POST", "/v1/queues", json.dumps(
            {"name": "typed", "attributes": {"visibility_timeout": [1], "fifo": "yes"}}
        ).encode(), {"Content-Type": "application/json"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_a_client_error(srv: Server, case: str) -> None:
    reply = CASES[case](srv)
    assert_client_error(reply, srv)


def test_tampered_receipt_deletes_nothing(srv: Server) -> None:
    handle = a_receipt(srv)
    for at in (8, 20, len(handle) - 6):
        reply = sqs_json(srv, "DeleteMessage",
                         {"QueueUrl": URL, "ReceiptHandle": _flip(handle, at)})
        assert reply.status == 400, reply
        assert json.loads(reply.body)["__type"].endswith("#ReceiptHandleIsInvalid")
    assert sqs_json(srv, "ChangeMessageVisibility", {
        "QueueUrl": URL, "ReceiptHandle": handle, "VisibilityTimeout": 0}).status == 200
    got = sqs_json(srv, "ReceiveMessage", {"QueueUrl": URL, "MaxNumberOfMessages": 10,
                                           "WaitTimeSeconds": 1})
    assert "victim" in [m["Body"] for m in json.loads(got.body)["Messages"]]
    assert_healthy(srv)


def test_raw_utf8_in_a_form_is_not_reinterpreted(srv: Server) -> None:
    # Clients that do not percent-encode send UTF-8 as is; storing those bytes decoded
    # as Latin-1 would silently corrupt the message. Refusing it would be fine too.
    body = "café ☃"
    assert sqs_json(srv, "CreateQueue", {"QueueName": "raw-utf8"}).status == 200
    path = f"/{ACCOUNT}/raw-utf8"
    reply = sqs_form(srv, f"Action=SendMessage&QueueUrl={path}&MessageBody=".encode()
                     + body.encode())
    assert reply.status < 500, reply
    if reply.status == 200:
        got = sqs_json(srv, "ReceiveMessage", {"QueueUrl": path, "MaxNumberOfMessages": 10,
                                               "WaitTimeSeconds": 1})
        bodies = [m["Body"] for m in json.loads(got.body).get("Messages", [])]
        assert body in bodies, f"sent {body!r} as raw UTF-8, received {bodies!r}"
    assert_healthy(srv)


GARBAGE_AUTH: list[dict[str, str]] = [
    {"Authorization": "AWS4-HMAC-SHA256 Credential=/////, SignedHeaders=;;;, Signature=zz",
     "X-Amz-Date": "not-a-date", "X-Amz-Content-Sha256": "definitely not a hash"},
    {"Authorization": "AWS4-HMAC-SHA256", "X-Amz-Security-Token": "%" * 2000},
    {"Authorization": "Bearer " + "x" * 4000},
    {"Authorization": "garbage", "X-Amz-Date": "20991399T999999Z"},
    {"Authorization": "AWS AKIDEXAMPLE:c2lnbmF0dXJl"},
    {"Authorization": "AWS4-HMAC-SHA256 Credential=AKID/20200101/us-east-1/sqs/aws4_request,"
                      " SignedHeaders=host;x-amz-date, Signature=" + "0" * 64},
]


@pytest.mark.parametrize("auth", range(len(GARBAGE_AUTH)))
def test_garbage_signatures_are_accepted_when_auth_is_off(srv: Server, auth: int) -> None:
    headers = GARBAGE_AUTH[auth]
    json_reply = request(srv, "POST", "/", json.dumps({"QueueName": QUEUE}).encode(),
                         {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.GetQueueUrl",
                          **headers})
    assert json_reply.status == 200, json_reply
    form_reply = request(srv, "POST", "/", b"Action=GetQueueUrl&QueueName=" + QUEUE.encode(),
                         {"Content-Type": FORM_TYPE, **headers})
    assert form_reply.status == 200, form_reply
    native_reply = request(srv, "GET", f"/v1/queues/{QUEUE}", headers=headers)
    assert native_reply.status == 200, native_reply
    assert_healthy(srv)


def test_garbage_presigned_query_parameters_are_accepted(srv: Server) -> None:
    reply = request(srv, "GET", "/?Action=GetQueueUrl&QueueName=q&X-Amz-Algorithm=ROT13"
                                "&X-Amz-Credential=%2F%2F%2F&X-Amz-Date=yesterday"
                                "&X-Amz-Expires=-5&X-Amz-SignedHeaders=&X-Amz-Signature=zz")
    assert reply.status == 200, reply
    assert_healthy(srv)


def test_keep_alive_connection_survives_refusals(srv: Server) -> None:
    # A refused request must not leave the connection's parser out of step with the
    # next request on it.
    connection = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    refused = [
        ("/", b'{"QueueUrl": "' + URL.encode() + b'", "MaxNumberOfMessages": "abc"}',
         {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.ReceiveMessage"}),
        ("/", b'{"QueueUrl": ', {"Content-Type": JSON_TYPE,
                                 "X-Amz-Target": "AmazonSQS.ReceiveMessage"}),
        ("/", b"[]", {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.Nope"}),
        ("/", b"Action=Nope&%FF=1", {"Content-Type": FORM_TYPE}),
        ("/v1/queues/q/messages/receive", b"{", {"Content-Type": "application/json"}),
    ]
    statuses = []
    try:
        for _ in range(10):
            for path, body, headers in refused:
                connection.request("POST", path, body, headers)
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
        connection.request("POST", "/", json.dumps({"QueueName": QUEUE}).encode(),
                           {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.GetQueueUrl"})
        final = connection.getresponse()
        final_body = final.read()
    finally:
        connection.close()
    assert statuses == [400] * 50
    assert final.status == 200, final_body
    assert json.loads(final_body)["QueueUrl"].endswith(QUEUE_PATH)
    assert_healthy(srv)


def test_path_like_queue_names_are_refused(srv: Server) -> None:
    # Queue names must never become paths: nothing may appear beside or in the data
    # directory's top level.
    before = (sorted(os.listdir(srv.data_dir.parent)), sorted(os.listdir(srv.data_dir)))
    for name in ("..", "../escape", "a/../../b", "%2e%2e", "/abs", ".", "a\\b", "q\x00"):
        for reply in (sqs_json(srv, "CreateQueue", {"QueueName": name}),
                      request(srv, "POST", "/v1/queues", json.dumps({"name": name}).encode(),
                              {"Content-Type": "application/json"})):
            assert 400 <= reply.status < 500, (name, reply)
    after = (sorted(os.listdir(srv.data_dir.parent)), sorted(os.listdir(srv.data_dir)))
    assert after == before
    assert_healthy(srv)
