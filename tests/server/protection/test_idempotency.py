"""Request deduplication on standard queues, end to end and across a SIGKILL.

A send that carries a deduplication id (SQS MessageDeduplicationId, the native API's
Idempotency-Key header or dedup_id) is a retry if another send with that id reached the
queue in the last five minutes: it returns the first send's message id and enqueues
nothing. The window is kept in the queue's log and snapshot, so a restart, even after a
SIGKILL, forgets none of it.
"""

from __future__ import annotations

from typing import Any

from tests.support.clients import drain, native
from tests.support.server import Server


def native_send(server: Server, name: str, body: bytes, key: str | None = None,
                **params: str) -> tuple[int, dict[str, Any]]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    reply = native(server, "POST", f"/v1/queues/{name}/messages" + (f"?{query}" if query else ""),
                   raw=body, headers={"Idempotency-Key": key} if key is not None else None)
    assert reply.status in (200, 201), reply
    return reply.status, reply.json()


def test_retried_sends_are_deduplicated_across_a_sigkill(server: Server) -> None:
    sqs = server.sqs()
    plain = sqs.create_queue(QueueName="orders")["QueueUrl"]
    sealed = sqs.create_queue(QueueName="sealed", Attributes={"SqsManagedSseEnabled": "true"}
                              )["QueueUrl"]

    first = {url: sqs.send_message(QueueUrl=url, MessageBody="charge card 42",
                                   MessageDeduplicationId="order-42")["MessageId"]
             for url in (plain, sealed)}
    for url in (plain, sealed):
        retry = sqs.send_message(QueueUrl=url, MessageBody="charge card 42",
                                 MessageDeduplicationId="order-42")
        assert retry["MessageId"] == first[url]
        # The id decides, not the body: a retry is the same request, whatever it carries.
        changed = sqs.send_message(QueueUrl=url, MessageBody="charge card 43",
                                   MessageDeduplicationId="order-42")
        assert changed["MessageId"] == first[url]
        batch = sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": "retry", "MessageBody": "charge card 42", "MessageDeduplicationId": "order-42"},
            {"Id": "new", "MessageBody": "charge card 44", "MessageDeduplicationId": "order-44"},
            {"Id": "again", "MessageBody": "charge card 44",
             "MessageDeduplicationId": "order-44"},
            {"Id": "plain", "MessageBody": "no id, never deduplicated"},
            {"Id": "plain2", "MessageBody": "no id, never deduplicated"},
        ])
        ids = {e["Id"]: e["MessageId"] for e in batch["Successful"]}
        assert ids["retry"] == first[url]
        assert ids["new"] == ids["again"] != first[url]
        assert ids["plain"] != ids["plain2"]
        # Standard queues report no sequence numbers, duplicates included.
        assert "SequenceNumber" not in retry and "SequenceNumber" not in changed

    status, created = native_send(server, "orders", b"ship parcel 7", key="parcel-7")
    assert status == 201 and created["duplicate"] is False
    status, retried = native_send(server, "orders", b"ship parcel 7", key="parcel-7")
    assert (status, retried["message_id"], retried["duplicate"]) == (
        200, created["message_id"], True)
    status, by_param = native_send(server, "orders", b"ship parcel 7", dedup_id="parcel-7")
    assert (status, by_param["message_id"]) == (200, created["message_id"])
    status, sealed_created = native_send(server, "sealed", b"ship parcel 8", key="parcel-8")
    assert status == 201
    status, sealed_retried = native_send(server, "sealed", b"ship parcel 8", key="parcel-8")
    assert (status, sealed_retried["message_id"]) == (200, sealed_created["message_id"])
    conflict = native(server, "POST", "/v1/queues/orders/messages?dedup_id=other", raw=b"x",
                      headers={"Idempotency-Key": "parcel-7"})
    assert conflict.status == 400, conflict

    server.kill()
    server.start()
    sqs = server.sqs()
    for url in (plain, sealed):
        after = sqs.send_message(QueueUrl=url, MessageBody="charge card 42",
                                 MessageDeduplicationId="order-42")
        assert after["MessageId"] == first[url]
    status, retried = native_send(server, "orders", b"ship parcel 7", key="parcel-7")
    assert (status, retried["message_id"]) == (200, created["message_id"])
    status, sealed_retried = native_send(server, "sealed", b"ship parcel 8", key="parcel-8")
    assert (status, sealed_retried["message_id"]) == (200, sealed_created["message_id"])

    # A graceful restart keeps the window in the snapshot rather than replaying the log.
    assert server.stop() == 0
    server.start()
    sqs = server.sqs()
    status, retried = native_send(server, "orders", b"ship parcel 7", key="parcel-7")
    assert (status, retried["message_id"]) == (200, created["message_id"])

    for url, extra in ((plain, "ship parcel 7"), (sealed, "ship parcel 8")):
        messages = drain(sqs, url)
        assert sorted(m["Body"] for m in messages) == sorted([
            "charge card 42", "charge card 44", "no id, never deduplicated",
            "no id, never deduplicated", extra]), url
        by_body = {m["Body"]: m["MessageId"] for m in messages}
        assert by_body["charge card 42"] == first[url]
