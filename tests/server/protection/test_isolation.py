"""Dispatch isolation, the connection limit and hostile input, against real servers.

A metadata store that stops answering (here: another process holding an exclusive lock on
its SQLite file) must cost only the requests that need it, which fail fast with 503, while
messages keep flowing through queues the server already knows; when the store answers
again, so does the server. Connections over --connections-max are closed at once and the
server keeps serving the ones it has. Malformed requests that test_hostile_input.py does
not send (header limits at their edge, bodies cut short or longer than declared, bad UTF-8
in fields other than the message body) get a 4xx, never a 5xx, and enqueue nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from server.config import HEADER_BYTES_MAX, HEADERS_MAX
from server.deployment import METADATA_FILE
from tests.server.web.test_hostile_input import (
    FORM_TYPE,
    JSON_TYPE,
    Reply,
    _read_reply,
    assert_client_error,
    assert_healthy,
    request,
    sqs_form,
    sqs_json,
    with_queues,
)
from tests.support.clients import ACCOUNT, native, wait_for
from tests.support.server import Server, module_server, restarted_if_dead

# No call may take longer than this, whatever a dependency does: a hang fails the test.
HANG_S = 10


def timed(call: Callable[..., Any], **kwargs: Any) -> tuple[str, Any]:
    """("ok", result) or (error code, status) of a boto3 call, checked not to hang."""
    started = time.monotonic()
    try:
        result: tuple[str, Any] = ("ok", call(**kwargs))
    except ClientError as exc:
        result = (exc.response["Error"]["Code"],
                  exc.response["ResponseMetadata"]["HTTPStatusCode"])
    elapsed = time.monotonic() - started
    assert elapsed < HANG_S, f"{call.__name__} took {elapsed:.1f} s"
    return result


# --- the metadata store stops answering -----------------------------------------------------


def test_a_locked_metadata_store_fails_fast_and_cached_queues_keep_working(
        tmp_path: Path) -> None:
    server = Server(tmp_path / "data", fsync="never")
    try:
        sqs = server.sqs(read_timeout=HANG_S * 3, connect_timeout=5)
        warm = sqs.create_queue(QueueName="warm")["QueueUrl"]
        sqs.send_message(QueueUrl=warm, MessageBody="before the lock")
        [message] = sqs.receive_message(QueueUrl=warm, WaitTimeSeconds=1)["Messages"]
        sqs.delete_message(QueueUrl=warm, ReceiptHandle=message["ReceiptHandle"])
        reply = native(server, "POST", "/v1/queues", {"name": "warm-native"})
        assert reply.status == 201, reply
        assert native(server, "POST", "/v1/queues/warm-native/messages", raw=b"n").status == 201

        holder = sqlite3.connect(server.data_dir / METADATA_FILE, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        refused_creates = []
        try:
            # Several refused writes in a row, each followed by reads: a write that
            # waits for the lock must not hold up the reads behind it (WAL lets them in).
            until = time.monotonic() + 6
            i = 0
            while time.monotonic() < until:
                created = timed(sqs.create_queue, QueueName=f"during-{i}")
                assert created == ("ServiceUnavailable", 503), created
                refused_creates.append(f"during-{i}")
                listed = timed(sqs.list_queues)
                assert listed[0] == "ok", listed
                assert len(listed[1]["QueueUrls"]) == 2
                unknown = timed(sqs.get_queue_url, QueueName=f"never-made-{i}")
                assert unknown == ("AWS.SimpleQueueService.NonExistentQueue", 400), unknown
                body = f"during the lock {i}"
                sent = timed(sqs.send_message, QueueUrl=warm, MessageBody=body)
                assert sent[0] == "ok", sent
                got = timed(sqs.receive_message, QueueUrl=warm, WaitTimeSeconds=1)
                assert got[0] == "ok", got
                [message] = got[1]["Messages"]
                assert message["Body"] == body
                assert timed(sqs.delete_message, QueueUrl=warm,
                             ReceiptHandle=message["ReceiptHandle"])[0] == "ok"
                reply = native(server, "POST", "/v1/queues/warm-native/messages",
                               raw=b"native")
                assert reply.status == 201, reply
                assert native(server, "GET", "/healthz").status == 200
                assert native(server, "GET", "/readyz").status == 200
                i += 1
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert refused_creates

        # The store answers again: within the breaker's reset time, so do creates.
        wait_for(lambda: timed(sqs.create_queue, QueueName="after")[0] == "ok", 30,
                 "CreateQueue to work again", interval=0.5)
        # A create refused during the outage can be made now, with any attributes.
        retried = timed(sqs.create_queue, QueueName=refused_creates[0],
                        Attributes={"VisibilityTimeout": "45"})
        assert retried[0] == "ok", retried
        got = sqs.get_queue_attributes(QueueUrl=retried[1]["QueueUrl"],
                                       AttributeNames=["VisibilityTimeout"])
        assert got["Attributes"]["VisibilityTimeout"] == "45"
        reply = native(server, "GET", "/v1/queues/warm-native")
        assert reply.json()["stats"]["visible"] == 1 + len(refused_creates), reply
        urls = sqs.list_queues()["QueueUrls"]
        names = {url.rsplit("/", 1)[1] for url in urls}
        # A 503 leaves the outcome open, as it does on SQS: a create the caller gave up on
        # may still land. Whatever is listed must then work.
        assert {"warm", "warm-native", "after", refused_creates[0]} <= names
        assert names <= {"warm", "warm-native", "after", *refused_creates}
        for url in urls:
            sqs.send_message(QueueUrl=url, MessageBody="listed, so usable")
        assert native(server, "GET", "/readyz").status == 200

        # A refused delete loses nothing, and a queue deleted for good comes back empty
        # when its name is used again, even if its delete was refused first.
        doomed = sqs.create_queue(QueueName="doomed")["QueueUrl"]
        for body in ("old 1", "old 2"):
            sqs.send_message(QueueUrl=doomed, MessageBody=body)
        holder = sqlite3.connect(server.data_dir / METADATA_FILE, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            deleted = timed(sqs.delete_queue, QueueUrl=doomed)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert deleted == ("ServiceUnavailable", 503), deleted
        time.sleep(0.5)  # a write the caller gave up on, if still under way, lands now
        if timed(sqs.get_queue_url, QueueName="doomed")[0] == "ok":
            messages = sqs.receive_message(QueueUrl=doomed, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=1)["Messages"]
            assert sorted(m["Body"] for m in messages) == ["old 1", "old 2"]
            sqs.delete_queue(QueueUrl=doomed)
        recreated = sqs.create_queue(QueueName="doomed")["QueueUrl"]
        got = sqs.receive_message(QueueUrl=recreated, MaxNumberOfMessages=10,
                                  WaitTimeSeconds=1).get("Messages", [])
        assert [m["Body"] for m in got] == []
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


# --- the connection limit ------------------------------------------------------------------


def served(connection: http.client.HTTPConnection) -> bool:
    """Whether a request on the connection gets an answer (it is kept alive after)."""
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
    except (ConnectionError, http.client.HTTPException, OSError):
        connection.close()
        return False
    return response.status == 200


def new_connection(server: Server) -> http.client.HTTPConnection | None:
    """A new keep-alive connection that has been served once, or None."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    return connection if served(connection) else None


def refused_at_once(server: Server) -> bool:
    """Whether a new connection is closed without an answer to its request."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
    return answer == b""


def test_connections_over_the_limit_are_closed_and_the_rest_are_served(tmp_path: Path) -> None:
    limit = 4
    server = Server(tmp_path / "data", fsync="never", extra=("--connections-max", str(limit)))
    held: list[http.client.HTTPConnection] = []
    try:
        for _ in range(limit):
            # The readiness probe's connection may not be gone yet: retry until served.
            held.append(wait_for(lambda: new_connection(server), 10,
                                 "a connection under the limit"))
        for _ in range(3):
            assert refused_at_once(server), "a connection over the limit was served"
        assert all(served(c) for c in held), "a held connection stopped being served"

        held.pop(0).close()

        held.append(wait_for(lambda: new_connection(server), 10,
                             "a connection once one was closed"))
        assert refused_at_once(server)
        assert all(served(c) for c in held)

        for connection in held:
            connection.close()
        held.clear()
        sqs = wait_for(lambda: _working_client(server), 10, "the server to serve boto3")
        url = sqs.create_queue(QueueName="after-the-flood")["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="still healthy")
        [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1)["Messages"]
        assert message["Body"] == "still healthy"
        assert server.process is not None and server.process.poll() is None
    finally:
        for connection in held:
            connection.close()
        if server.process is not None and server.process.poll() is None:
            server.kill()


def _working_client(server: Server) -> Any:
    sqs = server.sqs()
    try:
        sqs.list_queues()
    except Exception:  # a connection the server has not let go of yet
        sqs.close()
        return None
    return sqs


# --- hostile input beyond test_hostile_input.py ---------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with module_server(tmp_path_factory, "isolation", fsync="never") as running:
        yield running


@pytest.fixture
def srv(shared: Server) -> Server:
    restarted_if_dead(shared)
    # A fresh, empty queue q for each case: what a case enqueued is then its own doing.
    reply = sqs_json(shared, "DeleteQueue", {"QueueUrl": f"/{ACCOUNT}/q"})
    assert reply.status in (200, 400), reply
    return with_queues(shared)


def queue_depth(server: Server) -> int:
    reply = sqs_json(server, "GetQueueAttributes", {
        "QueueUrl": f"/{ACCOUNT}/q", "AttributeNames": ["ApproximateNumberOfMessages",
                                                        "ApproximateNumberOfMessagesNotVisible"]})
    assert reply.status == 200, reply
    attributes = json.loads(reply.body)["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"])


def assert_nothing_enqueued(server: Server) -> None:
    # A request the server was still reading when the client left may take a moment to
    # be dropped; whatever it does, it must not enqueue anything.
    time.sleep(0.3)
    assert queue_depth(server) == 0


def raw_exchange(server: Server, head: bytes, body: bytes, close: str) -> Reply | None:
    """Send a head and (part of) a body, then "both": close at once; "write": half-close
    and read the answer; "none": read the answer. None if no answer came."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(head + body)
        if close == "both":
            return None
        if close == "write":
            sock.shutdown(socket.SHUT_WR)
        try:
            return _read_reply(sock, time.monotonic() + 10)
        except ConnectionError:
            return None


SEND_JSON = (b'{"QueueUrl": "/' + ACCOUNT.encode() + b'/q", "MessageBody": "'
             + b"p" * 400 + b'"}')
SEND_FORM = f"Action=SendMessage&QueueUrl=/{ACCOUNT}/q&MessageBody=".encode() + b"p" * 400
TRUNCATED = {
    "sqs-json": ("/", {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.SendMessage"},
                 SEND_JSON),
    "sqs-query": ("/", {"Content-Type": FORM_TYPE}, SEND_FORM),
    "native": ("/v1/queues/q/messages", {"Content-Type": "application/octet-stream"},
               b"p" * 400),
}


@pytest.mark.parametrize("close", ["both", "write"])
@pytest.mark.parametrize("protocol", list(TRUNCATED))
def test_a_body_cut_short_enqueues_nothing(srv: Server, protocol: str, close: str) -> None:
    path, headers, body = TRUNCATED[protocol]
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body) + 600}",
            *(f"{k}: {v}" for k, v in headers.items())]
    reply = raw_exchange(srv, ("\r\n".join(head) + "\r\n\r\n").encode(), body, close)
    if reply is not None:
        assert_client_error(reply, srv)
    assert_nothing_enqueued(srv)
    assert_healthy(srv)


def test_bytes_beyond_the_declared_length_are_not_the_body(srv: Server) -> None:
    # The first five bytes are the body; the rest reaches the parser as the next request.
    head = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + JSON_TYPE.encode()
            + b"\r\nX-Amz-Target: AmazonSQS.SendMessage\r\nContent-Length: 5\r\n\r\n")
    reply = raw_exchange(srv, head, SEND_JSON, "none")
    assert reply is not None
    assert_client_error(reply, srv)
    assert_nothing_enqueued(srv)


@pytest.mark.parametrize("headers", [
    {"Content-Length": "10", "Transfer-Encoding": "chunked"},
    {"Content-Length": "abc"},
    {"Content-Length": "-1"},
    {"Content-Length": "10, 20"},
    {"Transfer-Encoding": "gzip, chunked, identity"},
], ids=["length-and-chunked", "length-not-a-number", "length-negative", "length-list",
        "unknown-coding"])
def test_conflicting_or_invalid_framing_is_refused(srv: Server, headers: dict[str, str]) -> None:
    smuggled = b"0\r\n\r\n" + SEND_JSON
    lines = [b"POST / HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: " + JSON_TYPE.encode(),
             b"X-Amz-Target: AmazonSQS.SendMessage"]
    lines += [f"{k}: {v}".encode() for k, v in headers.items()]
    reply = raw_exchange(srv, b"\r\n".join(lines) + b"\r\n\r\n", smuggled, "none")
    assert reply is not None
    assert_client_error(reply, srv)
    assert_nothing_enqueued(srv)


def test_header_count_at_and_over_the_limit(srv: Server) -> None:
    # request() sends Host, Connection and Content-Length itself.
    at_limit = request(srv, "GET", "/healthz",
                       headers={f"X-H{i}": "v" for i in range(HEADERS_MAX - 3)})
    assert at_limit.status == 200, at_limit
    over = request(srv, "GET", "/healthz",
                   headers={f"X-H{i}": "v" for i in range(HEADERS_MAX - 2)})
    assert_client_error(over, srv)


def test_huge_signature_headers_on_each_protocol(srv: Server) -> None:
    big = "A" * (HEADER_BYTES_MAX + 1)
    for reply in (
        request(srv, "POST", "/", SEND_JSON, {"Content-Type": JSON_TYPE, "Authorization": big,
                                              "X-Amz-Target": "AmazonSQS.SendMessage"}),
        request(srv, "POST", "/", SEND_FORM, {"Content-Type": FORM_TYPE,
                                              "X-Amz-Security-Token": big}),
        request(srv, "POST", "/v1/queues/q/messages", b"p", {"Authorization": big}),
    ):
        assert_client_error(reply, srv)
    assert_nothing_enqueued(srv)


def test_headers_each_under_the_limit_but_large_in_sum(srv: Server) -> None:
    headers = {f"X-H{i}": "v" * (HEADER_BYTES_MAX - 100) for i in range(HEADERS_MAX - 3)}
    reply = request(srv, "GET", "/healthz", headers=headers)
    assert reply.status < 500, reply
    assert_healthy(srv)


URL = f"/{ACCOUNT}/q"
BAD_UTF8: dict[str, Callable[[Server], Reply]] = {
    "json-queue-name": lambda s: sqs_json(s, "CreateQueue", b'{"QueueName": "q\xff"}'),
    "json-key": lambda s: sqs_json(s, "CreateQueue", b'{"QueueName": "x", "\xc3\x28": 1}'),
    "json-attribute-value": lambda s: sqs_json(
        s, "SendMessage", b'{"QueueUrl": "' + URL.encode() + b'", "MessageBody": "x", '
        b'"MessageAttributes": {"a": {"DataType": "String", "StringValue": "\xed\xa0\x80"}}}'),
    "json-tag-value": lambda s: sqs_json(
        s, "TagQueue", b'{"QueueUrl": "' + URL.encode() + b'", "Tags": {"k": "\xf8\x88"}}'),
    "json-overlong-slash": lambda s: sqs_json(
        s, "GetQueueUrl", b'{"QueueName": "\xc0\xafetc"}'),
    "json-lone-surrogate-body": lambda s: sqs_json(
        s, "SendMessage", b'{"QueueUrl": "' + URL.encode() + b'", "MessageBody": "\\ud800"}'),
    "form-queue-name": lambda s: sqs_form(s, b"Action=CreateQueue&QueueName=q%FF"),
    "form-field-name": lambda s: sqs_form(s, b"Action=CreateQueue&QueueName=x&%FF%FE=1"),
    "form-attribute-value": lambda s: sqs_form(
        s, b"Action=SetQueueAttributes&QueueUrl=" + URL.encode()
        + b"&Attribute.1.Name=Policy&Attribute.1.Value=%C0%AF"),
    "form-message-attribute": lambda s: sqs_form(
        s, b"Action=SendMessage&QueueUrl=" + URL.encode() + b"&MessageBody=x"
        b"&MessageAttribute.1.Name=a&MessageAttribute.1.Value.DataType=String"
        b"&MessageAttribute.1.Value.StringValue=%ED%A0%80"),
    "form-tag": lambda s: sqs_form(
        s, b"Action=TagQueue&QueueUrl=" + URL.encode() + b"&Tag.1.Key=k&Tag.1.Value=%FF"),
    "form-group-id": lambda s: sqs_form(
        s, b"Action=SendMessage&QueueUrl=" + URL.encode() + b"&MessageBody=x"
        b"&MessageDeduplicationId=%FF%FE"),
    "native-query-prefix": lambda s: request(s, "GET", "/v1/queues?prefix=%FF%FE"),
    "native-idempotency-key": lambda s: request(
        s, "POST", "/v1/queues/q/messages", b"x", {"Idempotency-Key": "\xff\xfe"}),
}


@pytest.mark.parametrize("case", list(BAD_UTF8))
def test_invalid_utf8_in_fields_is_refused(srv: Server, case: str) -> None:
    reply = BAD_UTF8[case](srv)
    assert_client_error(reply, srv)
    assert_nothing_enqueued(srv)


def test_lone_surrogates_in_batches_fail_their_entries_only(srv: Server) -> None:
    reply = sqs_json(srv, "SendMessageBatch", b'{"QueueUrl": "' + URL.encode()
                     + b'", "Entries": [{"Id": "a", "MessageBody": "\\udfff"}, '
                     b'{"Id": "b", "MessageBody": "fine"}]}')
    assert reply.status == 200, reply
    result = json.loads(reply.body)
    assert [e["Id"] for e in result["Successful"]] == ["b"], result
    assert [(e["Id"], e["Code"], e["SenderFault"]) for e in result["Failed"]] == [
        ("a", "InvalidMessageContents", True)], result
    reply = request(srv, "POST", "/v1/queues/q/messages/batch",
                    b'{"messages": [{"body": "\\ud800"}, {"body": "fine"}]}',
                    {"Content-Type": "application/json"})
    assert reply.status == 200, reply
    results = json.loads(reply.body)["results"]
    assert results[0]["error"]["code"] == "InvalidMessageContents", results
    assert "message_id" in results[1], results
    got = sqs_json(srv, "ReceiveMessage", {"QueueUrl": URL, "MaxNumberOfMessages": 10,
                                           "WaitTimeSeconds": 1, "VisibilityTimeout": 0})
    assert sorted(m["Body"] for m in json.loads(got.body)["Messages"]) == ["fine", "fine"]


def test_messages_over_the_size_limit_through_the_query_and_native_batch_paths(
        srv: Server) -> None:
    mib = 1024 * 1024
    reply = sqs_form(srv, f"Action=SendMessage&QueueUrl={URL}&MessageBody=".encode()
                     + b"o" * (mib + 1))
    assert_client_error(reply, srv)
    assert b"<Code>InvalidParameterValue</Code>" in reply.body, reply
    reply = request(srv, "POST", "/v1/queues/q/messages/batch", json.dumps({"messages": [
        {"body": "o" * (mib + 1)}, {"body": "small"}]}).encode(),
        {"Content-Type": "application/json"})
    assert reply.status == 200, reply
    results = json.loads(reply.body)["results"]
    assert results[0]["error"]["code"] == "MessageTooLarge", results
    assert "message_id" in results[1], results
    assert queue_depth(srv) == 1
