"""Server-side encryption end to end: real server processes and the real boto3 client.

A queue is encrypted by the SQS attributes SqsManagedSseEnabled or KmsMasterKeyId, or by
the native API's ``encrypted``. What is checked here is what a user of the feature relies
on: no byte of a body sent to such a queue is ever on disk in the clear, through a SIGKILL
and a restart; consumers still get exactly what was sent, with the right MD5s; a stored
ciphertext that was altered is never delivered, and damage on disk never becomes a wrong
body or an internal error; and the SQS features built on bodies (dead-letter queues and
their redrive, content-based deduplication, the size limit) work as on a plain queue.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from botocore.exceptions import ClientError

from engine import format as fmt
from server.protection.sse import ENVELOPE_OVERHEAD, MAGIC
from tests.server.sqs.test_sqs_actions import md5, sqs_md5_of_attributes
from tests.support.clients import ACCOUNT, drain, files_holding, native
from tests.support.server import Server, module_server

MIB = 1024 * 1024
# Message attributes are metadata, kept as sent (SQS encrypts bodies only): none of their
# values is a secret the searches below look for.
ATTRIBUTES: dict[str, dict[str, Any]] = {
    "trace": {"DataType": "String", "StringValue": "attribute-value-☃"},
    "count": {"DataType": "Number", "StringValue": "42"},
    "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01\xfe\xff"},
}


def create(sqs: Any, name: str, **attributes: str) -> str:
    return str(sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])


def arn(name: str) -> str:
    return f"arn:aws:sqs:us-east-1:{ACCOUNT}:{name}"


def check_message(message: dict[str, Any], body: str, attributes: dict[str, Any] | None
                  ) -> None:
    """A received message carries the plaintext and MD5s computed over the plaintext."""
    assert message["Body"] == body
    assert message["MD5OfBody"] == md5(body)
    if attributes:
        assert message["MessageAttributes"] == attributes
        assert message["MD5OfMessageAttributes"] == sqs_md5_of_attributes(attributes)
    else:
        assert "MessageAttributes" not in message


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # fsync=always: what a request was acknowledged for is in the files when it returns.
    with module_server(tmp_path_factory, "encryption") as running:
        yield running


@pytest.fixture
def sqs(shared: Server) -> Any:
    return shared.sqs()


# --- nothing in the clear on disk ---------------------------------------------------------


class Sender:
    """Sends distinctive bodies through every path a body can take into a queue, and
    remembers what each queue must give back."""

    def __init__(self, server: Server, secret: str, control: str) -> None:
        self.server = server
        self.sqs = server.sqs()
        self.secret = secret
        self.control = control
        self.expected: dict[str, dict[str, dict[str, Any] | None]] = {}

    def sqs_sends(self, name: str, round_: str) -> None:
        url = f"{self.server.url}/{ACCOUNT}/{name}"
        bodies = self.expected.setdefault(name, {})
        body = f"{self.secret}/{name}/{round_}/single/é☃"
        sent = self.sqs.send_message(QueueUrl=url, MessageBody=body,
                                     MessageAttributes=ATTRIBUTES)
        assert sent["MD5OfMessageBody"] == md5(body)
        assert sent["MD5OfMessageAttributes"] == sqs_md5_of_attributes(ATTRIBUTES)
        bodies[body] = ATTRIBUTES
        entries: list[dict[str, Any]] = [
            {"Id": f"e{i}", "MessageBody": f"{self.secret}/{name}/{round_}/batch/{i}",
             **({"MessageAttributes": ATTRIBUTES} if i % 2 else {})} for i in range(10)]
        result = self.sqs.send_message_batch(QueueUrl=url, Entries=entries)
        assert not result.get("Failed"), result["Failed"]
        by_id = {e["Id"]: e for e in result["Successful"]}
        for entry in entries:
            assert by_id[entry["Id"]]["MD5OfMessageBody"] == md5(entry["MessageBody"])
            bodies[entry["MessageBody"]] = entry.get("MessageAttributes")

    def native_sends(self, name: str, round_: str) -> None:
        bodies = self.expected.setdefault(name, {})
        raw = f"{self.secret}/{name}/{round_}/raw/".encode() + b"x" * 200_000
        reply = native(self.server, "POST", f"/v1/queues/{name}/messages", raw=raw)
        assert reply.status == 201, reply
        bodies[raw.decode()] = None
        batch = [f"{self.secret}/{name}/{round_}/native-batch/{i}" for i in range(3)]
        reply = native(self.server, "POST", f"/v1/queues/{name}/messages/batch", {"messages": [
            {"body": batch[0]},
            {"body_base64": base64.b64encode(batch[1].encode()).decode()},
            {"body": batch[2], "attributes": {"trace": {"type": "String",
                                                        "value": "attribute-value-☃"}}},
        ]})
        assert reply.status == 200, reply
        assert all("error" not in r for r in reply.json()["results"]), reply
        bodies[batch[0]] = bodies[batch[1]] = None
        bodies[batch[2]] = {"trace": ATTRIBUTES["trace"]}

    def control_sends(self, round_: str) -> None:
        url = f"{self.server.url}/{ACCOUNT}/control"
        for i in range(3):
            body = f"{self.control}/{round_}/{i}"
            self.sqs.send_message(QueueUrl=url, MessageBody=body)
            self.expected.setdefault("control", {})[body] = None

    def send_all(self, round_: str) -> None:
        for name in ("managed", "kms"):
            self.sqs_sends(name, round_)
        self.native_sends("native", round_)
        self.sqs_sends("native", round_)
        self.control_sends(round_)

    def peek_all(self) -> None:
        """Receive and check everything, then make it visible again."""
        for name, bodies in self.expected.items():
            url = f"{self.server.url}/{ACCOUNT}/{name}"
            messages = drain(self.sqs, url)
            assert sorted(m["Body"] for m in messages) == sorted(bodies), name
            for message in messages:
                check_message(message, message["Body"], bodies[message["Body"]])
            for start in range(0, len(messages), 10):
                result = self.sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                    for i, m in enumerate(messages[start:start + 10])])
                assert not result.get("Failed"), result["Failed"]

    def drain_all(self) -> None:
        for name, bodies in self.expected.items():
            messages = drain(self.sqs, f"{self.server.url}/{ACCOUNT}/{name}")
            assert sorted(m["Body"] for m in messages) == sorted(bodies), name
            for message in messages:
                check_message(message, message["Body"], bodies[message["Body"]])


def assert_sealed_on_disk(server: Server, secret: str, control: str, when: str) -> None:
    found = files_holding(server.data_dir, [secret.encode(), control.encode()])
    assert found[secret.encode()] == [], f"plaintext of an encrypted queue on disk {when}"
    # The control queue is not encrypted: its bodies are in its log, so the search works.
    assert any(path.startswith("queues/") for path in found[control.encode()]), (
        f"the plaintext of the unencrypted control queue was not found {when}: {found}")


def test_no_plaintext_on_disk_through_a_sigkill_and_a_restart(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")
    try:
        token = uuid.uuid4().hex
        secret, control = f"SEALED-{token}", f"CLEAR-{token}"
        sender = Sender(server, secret, control)
        create(sender.sqs, "managed", SqsManagedSseEnabled="true")
        create(sender.sqs, "kms", KmsMasterKeyId="alias/aws/sqs")
        reply = native(server, "POST", "/v1/queues", {"name": "native", "encrypted": True})
        assert reply.status == 201 and reply.json()["encrypted"] is True, reply
        create(sender.sqs, "control")
        for name, attribute in (("managed", "SqsManagedSseEnabled"),
                                ("kms", "KmsMasterKeyId"), ("native", "SqsManagedSseEnabled")):
            got = sender.sqs.get_queue_attributes(
                QueueUrl=f"{server.url}/{ACCOUNT}/{name}", AttributeNames=["All"])["Attributes"]
            assert got.get(attribute) in ("true", "alias/aws/sqs"), got

        sender.send_all("before-kill")
        sender.peek_all()
        server.kill()
        assert_sealed_on_disk(server, secret, control, "after SIGKILL")

        server.start()
        sender.peek_all()  # what was acknowledged before the kill opens after it
        sender.send_all("after-restart")
        sender.drain_all()
        assert server.stop() == 0
        # A graceful stop writes snapshots, which must not hold plaintext either.
        assert any(p.name == "snapshot" for p in server.data_dir.rglob("snapshot"))
        assert_sealed_on_disk(server, secret, control, "after a graceful stop")
        assert secret not in server.log.read_text(errors="replace")
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


# --- tampering ----------------------------------------------------------------------------


def envelopes(segment: bytes) -> list[int]:
    """Byte positions of every stored envelope in a segment."""
    found, at = [], segment.find(MAGIC)
    while at >= 0:
        found.append(at)
        at = segment.find(MAGIC, at + 1)
    return found


def rewrite_checksum(segment: bytearray, position: int) -> None:
    """Recompute the checksum of the batch holding ``position``, as docs/FORMAT.md gives
    it (xxh3-64 over everything after the checksum field), so the engine takes the batch
    as intact and only the envelope can notice the change."""
    at = 0
    while at < len(segment):
        assert segment[at:at + 4] == fmt.BATCH_MAGIC, f"no batch at {at}"
        (payload,) = struct.unpack_from("<I", segment, at + fmt.BATCH_PAYLOAD_BYTES_AT)
        end = at + fmt.BATCH_HEADER_BYTES + payload
        if at <= position < end:
            digest = xxhash.xxh3_64_intdigest(bytes(segment[at + fmt.BATCH_CHECKSUMMED_FROM:end]))
            struct.pack_into("<Q", segment, at + fmt.BATCH_CHECKSUM_AT, digest)
            return
        at = end
    raise AssertionError(f"no batch holds byte {position}")


def only_segment(server: Server) -> Path:
    [segment] = server.data_dir.glob("queues/*/log/*.log")
    return segment


def test_a_tampered_ciphertext_is_skipped_and_logged_never_delivered(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")
    try:
        sqs = server.sqs()
        url = create(sqs, "sealed", SqsManagedSseEnabled="true")
        bodies = [f"message {i} of six" for i in range(6)]
        ids = [sqs.send_message(QueueUrl=url, MessageBody=b)["MessageId"] for b in bodies]
        assert server.stop() == 0

        segment_path = only_segment(server)
        segment = bytearray(segment_path.read_bytes())
        found = envelopes(bytes(segment))
        assert len(found) == len(bodies), found
        victim = 3
        # A ciphertext byte: past magic, version, key id and nonce.
        position = found[victim] + ENVELOPE_OVERHEAD - 16 + 2
        segment[position] ^= 0x20
        rewrite_checksum(segment, position)
        segment_path.write_bytes(bytes(segment))

        server.start()
        received: dict[str, str] = {}
        deadline = time.monotonic() + 20
        while len(received) < len(bodies) - 1:
            assert time.monotonic() < deadline, received
            try:
                got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                          VisibilityTimeout=600, WaitTimeSeconds=1)
            except ClientError as exc:
                pytest.fail(f"receive failed: {exc.response}")
            for message in got.get("Messages", []):
                assert message["MD5OfBody"] == md5(message["Body"])
                received[message["MessageId"]] = message["Body"]
        assert ids[victim] not in received
        assert sorted(received.values()) == sorted(b for i, b in enumerate(bodies)
                                                   if i != victim)
        assert received == {ids[i]: bodies[i] for i in range(len(bodies)) if i != victim}
        # Nothing more comes: the tampered message stays in flight, never delivered.
        again = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        assert again.get("Messages", []) == []
        log = server.log.read_text()
        assert "does not open" in log and ids[victim] in log, log[-2000:]
        assert "Traceback" not in log, log[-3000:]
        # The server is healthy, and the queue takes and gives new messages.
        sqs.send_message(QueueUrl=url, MessageBody="after the damage")
        [fresh] = drain(sqs, url)
        assert fresh["Body"] == "after the damage"
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


def test_a_damaged_batch_the_checksum_catches_never_yields_a_wrong_body(
        tmp_path: Path) -> None:
    """A flipped byte the batch checksum does catch: opening the log cuts the damaged
    batch and all after it, records that the queue's snapshot still counts on. What was
    there must not be read in their place: the queue refuses (503) and says why, and the
    rest of the server is unaffected."""
    server = Server(tmp_path / "data")
    try:
        sqs = server.sqs()
        url = create(sqs, "sealed", SqsManagedSseEnabled="true")
        other = create(sqs, "other")
        for i in range(6):
            sqs.send_message(QueueUrl=url, MessageBody=f"message {i}")
        sqs.send_message(QueueUrl=other, MessageBody="unaffected")
        assert server.stop() == 0

        segment_path = next(p for p in server.data_dir.glob("queues/*/log/*.log")
                            if MAGIC in p.read_bytes())
        segment = bytearray(segment_path.read_bytes())
        segment[envelopes(bytes(segment))[3] + 30] ^= 0x20  # checksum left as it was
        segment_path.write_bytes(bytes(segment))

        server.start()
        for _ in range(3):
            try:
                got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                          VisibilityTimeout=600)
            except ClientError as exc:
                error = exc.response
                # The damaged queue stays closed, with its own code (docs/API.md).
                assert (error["ResponseMetadata"]["HTTPStatusCode"],
                        error["Error"]["Code"]) == (503, "QueueDamaged"), error
            else:
                # Whatever is delivered is a message that was sent, with its own body.
                for message in got.get("Messages", []):
                    assert message["Body"] in {f"message {i}" for i in range(6)}, message
                    assert message["MD5OfBody"] == md5(message["Body"])
        [message] = drain(sqs, other)
        assert message["Body"] == "unaffected"
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


# --- what is built on bodies ----------------------------------------------------------------


def test_dead_letter_queue_of_an_encrypted_queue_reads_and_redrives(shared: Server,
                                                                     sqs: Any) -> None:
    dead = create(sqs, "sealed-dead")  # not encrypted itself: moved bodies stay sealed
    source = create(sqs, "sealed-source", SqsManagedSseEnabled="true",
                    RedrivePolicy=json.dumps({"deadLetterTargetArn": arn("sealed-dead"),
                                              "maxReceiveCount": 1}))
    bodies = {f"poison {i}": ATTRIBUTES if i % 2 else None for i in range(4)}
    for body, attributes in bodies.items():
        sqs.send_message(QueueUrl=source, MessageBody=body,
                         **({"MessageAttributes": attributes} if attributes else {}))
    deadline = time.monotonic() + 20
    while int(sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=[
            "ApproximateNumberOfMessages"])["Attributes"]["ApproximateNumberOfMessages"]) < 4:
        assert time.monotonic() < deadline, "messages did not reach the dead-letter queue"
        sqs.receive_message(QueueUrl=source, MaxNumberOfMessages=10, VisibilityTimeout=0)
    moved = drain(sqs, dead)
    assert sorted(m["Body"] for m in moved) == sorted(bodies)
    for message in moved:
        check_message(message, message["Body"], bodies[message["Body"]])
    # Make them visible again, then redrive them to the source: resealed there, readable.
    for message in moved:
        sqs.change_message_visibility(QueueUrl=dead, ReceiptHandle=message["ReceiptHandle"],
                                      VisibilityTimeout=0)
    sqs.start_message_move_task(SourceArn=arn("sealed-dead"))
    deadline = time.monotonic() + 20
    while sqs.list_message_move_tasks(SourceArn=arn("sealed-dead"))["Results"][0][
            "Status"] != "COMPLETED":
        assert time.monotonic() < deadline, "the redrive did not complete"
        time.sleep(0.05)
    back = drain(sqs, source)
    assert sorted(m["Body"] for m in back) == sorted(bodies)
    for message in back:
        check_message(message, message["Body"], bodies[message["Body"]])


def test_content_based_deduplication_on_an_encrypted_fifo_queue(shared: Server,
                                                                 sqs: Any) -> None:
    url = create(sqs, "sealed.fifo", FifoQueue="true", ContentBasedDeduplication="true",
                 KmsMasterKeyId="alias/aws/sqs")
    first = sqs.send_message(QueueUrl=url, MessageBody="same body", MessageGroupId="g")
    again = sqs.send_message(QueueUrl=url, MessageBody="same body", MessageGroupId="g")
    other_group = sqs.send_message(QueueUrl=url, MessageBody="same body", MessageGroupId="h")
    different = sqs.send_message(QueueUrl=url, MessageBody="another body", MessageGroupId="g")
    assert again["MessageId"] == first["MessageId"]
    assert again["SequenceNumber"] == first["SequenceNumber"]
    assert other_group["MessageId"] == first["MessageId"]  # the body alone decides
    assert different["MessageId"] != first["MessageId"]
    # An explicit deduplication id overrides the content.
    explicit = sqs.send_message(QueueUrl=url, MessageBody="same body", MessageGroupId="g",
                                MessageDeduplicationId="explicit")
    assert explicit["MessageId"] != first["MessageId"]
    batch = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": "a", "MessageBody": "another body", "MessageGroupId": "g"},
        {"Id": "b", "MessageBody": "third body", "MessageGroupId": "g"},
        {"Id": "c", "MessageBody": "third body", "MessageGroupId": "g"},
    ])
    ids = {e["Id"]: e["MessageId"] for e in batch["Successful"]}
    assert ids["a"] == different["MessageId"] and ids["b"] == ids["c"]
    messages = drain(sqs, url)
    assert [m["Body"] for m in messages if m["Attributes"]["MessageGroupId"] == "g"] == [
        "same body", "another body", "same body", "third body"]
    assert len(messages) == 4
    for message in messages:
        assert message["MD5OfBody"] == md5(message["Body"])


def test_content_based_deduplication_keeps_no_digest_of_the_plaintext(shared: Server,
                                                                      sqs: Any) -> None:
    """The deduplication key of a content-deduplicated message is stored with it. A plain
    SHA-256 of the body there would let anyone with the files confirm a guessed body
    (a short or predictable one, say), which is what encryption at rest must prevent."""
    sealed = create(sqs, "digest.fifo", FifoQueue="true", ContentBasedDeduplication="true",
                    SqsManagedSseEnabled="true")
    plain = create(sqs, "digest-plain.fifo", FifoQueue="true",
                   ContentBasedDeduplication="true")
    body, control = (f"approved {uuid.uuid4().hex}" for _ in range(2))
    for url, text in ((sealed, body), (plain, control)):
        first = sqs.send_message(QueueUrl=url, MessageBody=text, MessageGroupId="g")
        duplicate = sqs.send_message(QueueUrl=url, MessageBody=text, MessageGroupId="g")
        assert duplicate["MessageId"] == first["MessageId"]
    needles = [text.encode() for text in (body, control)]
    needles += [hashlib.sha256(text.encode()).hexdigest().encode() for text in (body, control)]
    needles += [hashlib.sha256(text.encode()).digest() for text in (body, control)]
    found = files_holding(shared.data_dir, needles)
    # The unencrypted queue keeps the body and its SHA-256: the search finds them.
    assert found[needles[1]] and found[needles[3]], found
    assert (found[needles[0]], found[needles[2]], found[needles[4]]) == ([], [], []), found
    [message] = drain(sqs, sealed)
    assert message["Body"] == body


def test_no_md5_of_the_plaintext_is_stored(shared: Server, sqs: Any) -> None:
    """An SQS send stores the body's MD5 with the message, so that a receive need not hash
    the body again; for the same reason as above, an encrypted queue must not."""
    sealed = create(sqs, "md5-sealed", SqsManagedSseEnabled="true")
    plain = create(sqs, "md5-plain")
    body, control = (f"approved {uuid.uuid4().hex}" for _ in range(2))
    for url, text in ((sealed, body), (plain, control)):
        sqs.send_message(QueueUrl=url, MessageBody=text)
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "1", "MessageBody": text}])
    needles = [hashlib.md5(text.encode()).digest() for text in (body, control)]
    found = files_holding(shared.data_dir, needles)
    # The unencrypted queue keeps its bodies' digest: the search finds it.
    assert found[needles[1]], found
    assert found[needles[0]] == [], found
    for url, text in ((sealed, body), (plain, control)):
        messages = drain(sqs, url)  # boto3 checks each MD5OfBody against the body
        assert [m["Body"] for m in messages] == [text, text]
        assert {m["MD5OfBody"] for m in messages} == {md5(text)}


def test_a_body_beginning_with_the_envelope_magic_is_refused(shared: Server,
                                                             sqs: Any) -> None:
    create(sqs, "magic-sealed", SqsManagedSseEnabled="true")
    create(sqs, "magic-plain")
    forged = MAGIC + bytes([1]) + b"\x00\x00\x00\x01" + b"n" * 12 + b"c" * 40
    for name in ("magic-sealed", "magic-plain"):
        reply = native(shared, "POST", f"/v1/queues/{name}/messages", raw=forged)
        assert reply.status == 400, reply
        assert reply.json()["error"]["code"] == "InvalidMessageContents", reply
        reply = native(shared, "POST", f"/v1/queues/{name}/messages/batch", {"messages": [
            {"body": "fine"}, {"body_base64": base64.b64encode(forged).decode()},
            {"body": "\u0000CVE as text"}]})
        assert reply.status == 200, reply
        results = reply.json()["results"]
        assert "message_id" in results[0], results
        assert results[1]["error"]["code"] == "InvalidMessageContents", results
        assert results[2]["error"]["code"] == "InvalidMessageContents", results
        # Through SQS: NUL is no SQS character, and the magic is refused on its own.
        with pytest.raises(ClientError) as refused:
            sqs.send_message(QueueUrl=f"{shared.url}/{ACCOUNT}/{name}",
                             MessageBody="\u0000CVE\u0001rest")
        status = refused.value.response["ResponseMetadata"]["HTTPStatusCode"]
        assert 400 <= status < 500, refused.value.response
        [message] = drain(sqs, f"{shared.url}/{ACCOUNT}/{name}")
        assert message["Body"] == "fine"


def test_the_size_limit_counts_the_plaintext_not_the_envelope(shared: Server,
                                                              sqs: Any) -> None:
    url = create(sqs, "sealed-large", SqsManagedSseEnabled="true",
                 MaximumMessageSize=str(64 * 1024))
    largest = "L" * (64 * 1024)
    sent = sqs.send_message(QueueUrl=url, MessageBody=largest)
    assert sent["MD5OfMessageBody"] == md5(largest)
    with pytest.raises(ClientError) as refused:
        sqs.send_message(QueueUrl=url, MessageBody=largest + "L")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    one_mib = create(sqs, "sealed-mib", KmsMasterKeyId="alias/aws/sqs")
    sqs.send_message(QueueUrl=one_mib, MessageBody="M" * MIB)
    [message] = drain(sqs, url)
    assert message["Body"] == largest
    [message] = drain(sqs, one_mib)
    assert message["MD5OfBody"] == md5("M" * MIB) and len(message["Body"]) == MIB


def test_native_binary_bodies_round_trip_on_an_encrypted_queue(shared: Server) -> None:
    reply = native(shared, "POST", "/v1/queues", {"name": "sealed-binary", "encrypted": True})
    assert reply.status == 201, reply
    assert native(shared, "GET", "/v1/queues/sealed-binary").json()["encrypted"] is True
    bodies = [bytes(range(256)) * 4, b"\xff\xfe not utf-8"]
    for body in bodies:
        assert native(shared, "POST", "/v1/queues/sealed-binary/messages",
                      raw=body).status == 201
    got = native(shared, "POST", "/v1/queues/sealed-binary/messages/receive",
                 {"max_messages": 10, "wait_seconds": 1})
    assert got.status == 200, got
    received = sorted(base64.b64decode(m["body_base64"]) for m in got.json()["messages"])
    assert received == sorted(bodies)
    # Encryption can be turned off again; what was sealed still opens.
    assert native(shared, "POST", "/v1/queues/sealed-binary/messages",
                  raw=b"sealed then").status == 201
    reply = native(shared, "PATCH", "/v1/queues/sealed-binary", {"encrypted": False})
    assert reply.status == 200 and reply.json()["encrypted"] is False, reply
    assert native(shared, "POST", "/v1/queues/sealed-binary/messages",
                  raw=b"plain now").status == 201
    got = native(shared, "POST", "/v1/queues/sealed-binary/messages/receive",
                 {"max_messages": 10, "wait_seconds": 1})
    assert sorted(base64.b64decode(m["body_base64"]) for m in got.json()["messages"]) == [
        b"plain now", b"sealed then"]
