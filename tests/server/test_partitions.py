"""Queues of several partitions on one node (ConveyorPartitions), seen by clients as one
queue: each partition an engine queue of the server's broker (server/partitioned.py).

One process: with --workers, a send is taken by the partition of the worker that got it,
not in turn (tests/server/test_workers.py)."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from engine import Broker
from engine.receipts import handle_queue_uid
from server.partitioned import group_partition, partition_names
from tests.server.sqs.test_sqs_actions import (
    ACCOUNT,
    arn,
    attrs,
    counts,
    dead_letter_all,
    receive,
    redrive,
)
from tests.support.clients import forged_receipts
from tests.support.server import Server, module_server, restarted_if_dead

PARTITIONS = 3


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with module_server(tmp_path_factory, "partitions", workers=1) as running:
        yield running


@pytest.fixture
def server(shared: Server) -> Server:
    return restarted_if_dead(shared)


def _create(sqs: Any, name: str, partitions: int = PARTITIONS, **attributes: str) -> str:
    url: str = sqs.create_queue(QueueName=name, Attributes={
        "ConveyorPartitions": str(partitions), **attributes})["QueueUrl"]
    return url


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def _uid(message: dict[str, Any]) -> int:
    """The uid of the partition a received message came from (its handle names it)."""
    uid = handle_queue_uid(message["ReceiptHandle"])
    assert uid is not None
    return uid


def _drain(sqs: Any, url: str, expected: int, **kwargs: Any) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(got) < expected and time.monotonic() < deadline:
        got += sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                   **kwargs).get("Messages", [])
    return got


def _delete_all(sqs: Any, url: str, messages: list[dict[str, Any]]) -> None:
    for start in range(0, len(messages), 10):
        reply = sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
            for i, m in enumerate(messages[start:start + 10])])
        assert not reply.get("Failed"), reply


def _receive_groups(sqs: Any, url: str, groups: list[str], total: int
                    ) -> tuple[dict[str, list[int]], dict[str, set[int]]]:
    """Receive and delete bodies "<group>-<n>" until total have come (or 60 s): each
    group's numbers in the order received, and the partitions (uids) it came from."""
    got: dict[str, list[int]] = {g: [] for g in groups}
    uids: dict[str, set[int]] = {g: set() for g in groups}
    deadline = time.monotonic() + 60
    while sum(map(len, got.values())) < total and time.monotonic() < deadline:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=1).get("Messages", [])
        for m in messages:
            group, n = m["Body"].split("-")
            got[group].append(int(n))
            uids[group].add(_uid(m))
        _delete_all(sqs, url, messages)
    return got, uids


def test_a_standard_queue_spreads_sends_over_its_partitions(server: Server) -> None:
    sqs = server.sqs()
    url = _create(sqs, "spread")
    sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": str(i), "MessageBody": f"m{i}"} for i in range(3)])
    for i in range(3 * PARTITIONS):
        sqs.send_message(QueueUrl=url, MessageBody=f"single-{i}")
    got = _drain(sqs, url, 3 + 3 * PARTITIONS, VisibilityTimeout=60)
    assert sorted(m["Body"] for m in got) == sorted(
        [f"m{i}" for i in range(3)] + [f"single-{i}" for i in range(3 * PARTITIONS)])
    # Sends take the partitions in turn: every partition holds some.
    assert len({_uid(m) for m in got}) == PARTITIONS
    _delete_all(sqs, url, got)
    assert counts(sqs, url) == (0, 0, 0)
    # A batch goes whole to one partition.
    sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": str(i), "MessageBody": f"b{i}"} for i in range(10)])
    got = _drain(sqs, url, 10, VisibilityTimeout=60)
    assert len(got) == 10 and len({_uid(m) for m in got}) == 1
    _delete_all(sqs, url, got)


def test_fifo_groups_keep_their_order_each_in_its_partition(server: Server) -> None:
    sqs = server.sqs()
    url = _create(sqs, "groups.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    groups = [f"g{i}" for i in range(8)]
    assert len({group_partition(g, PARTITIONS) for g in groups}) > 1
    for i in range(10):
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": g, "MessageBody": f"{g}-{i}", "MessageGroupId": g} for g in groups])
    got, partition_of = _receive_groups(sqs, url, groups, 80)
    assert got == {g: list(range(10)) for g in groups}
    assert all(len(uids) == 1 for uids in partition_of.values()), partition_of
    # Groups that hash to different partitions were served by different partitions.
    by_hash: dict[int, set[int]] = {}
    for g in groups:
        by_hash.setdefault(group_partition(g, PARTITIONS), set()).update(partition_of[g])
    assert all(len(uids) == 1 for uids in by_hash.values())
    assert len(set().union(*by_hash.values())) == len(by_hash)


def test_receipts_route_to_their_partition_and_forgeries_are_refused(server: Server) -> None:
    sqs = server.sqs()
    url = _create(sqs, "receipts")
    other = sqs.create_queue(QueueName="receipts-other")["QueueUrl"]
    for i in range(2 * PARTITIONS):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    sqs.send_message(QueueUrl=other, MessageBody="elsewhere")
    messages = _drain(sqs, url, 2 * PARTITIONS, VisibilityTimeout=60)
    assert len(messages) == 2 * PARTITIONS
    foreign = sqs.receive_message(QueueUrl=other, WaitTimeSeconds=2)["Messages"][0]
    for bad in forged_receipts(messages[0]["ReceiptHandle"], foreign["ReceiptHandle"]):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=bad)
        assert _code(caught.value) == "ReceiptHandleIsInvalid", bad
    # A visibility change reaches the message's partition: visible again at once.
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=messages[-1]["ReceiptHandle"],
                                  VisibilityTimeout=0)
    again = _drain(sqs, url, 1, VisibilityTimeout=60)
    assert [m["Body"] for m in again] == [messages[-1]["Body"]]
    # Every genuine handle works, in one batch spanning the partitions.
    reply = sqs.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
        for i, m in enumerate(messages[:-1] + again)])
    assert len(reply["Successful"]) == len(messages) and not reply.get("Failed")
    assert counts(sqs, url) == (0, 0, 0)


def _receive_into(server: Server, url: str, got: list[Any]) -> None:
    got.append(server.sqs().receive_message(QueueUrl=url, WaitTimeSeconds=15))


def test_a_long_poll_wakes_for_a_send_to_any_partition(server: Server) -> None:
    sqs = server.sqs()
    url = _create(sqs, "wake")
    for round_ in range(PARTITIONS):  # sends take the partitions in turn
        got: list[Any] = []
        receiver = threading.Thread(target=_receive_into, args=(server, url, got))
        receiver.start()
        time.sleep(1)
        sent = time.monotonic()
        sqs.send_message(QueueUrl=url, MessageBody=f"wake-{round_}")
        receiver.join(20)
        waited = time.monotonic() - sent
        assert got and got[0]["Messages"][0]["Body"] == f"wake-{round_}"
        # Woken by the send, not by a 2 s slice of the wait ending.
        assert waited < 1.5, f"the long poll took {waited:.2f} s to see the message"
        sqs.delete_message(QueueUrl=url, ReceiptHandle=got[0]["Messages"][0]["ReceiptHandle"])


def test_stats_attributes_and_purge_cover_every_partition(server: Server) -> None:
    sqs = server.sqs()
    url = _create(sqs, "stats")
    bodies = {f"s{i}" for i in range(3 * PARTITIONS)}
    for body in sorted(bodies):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    # With a visibility timeout of 0 on every partition, a received message stays
    # visible; one partition left at the default would hide its messages for 30 s.
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "0"})
    seen: set[str] = set()
    for _ in range(50):
        if seen == bodies:
            break
        seen |= {m["Body"] for m in receive(sqs, url, MaxNumberOfMessages=10)}
    assert seen == bodies
    got = attrs(sqs, url)
    assert got["ApproximateNumberOfMessages"] == str(len(bodies))
    assert got["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert got["VisibilityTimeout"] == "0"
    assert got["ConveyorPartitions"] == str(PARTITIONS)
    with urllib.request.urlopen(f"{server.url}/v1/queues/stats") as response:
        document = json.load(response)
    assert document["partitions"] == PARTITIONS
    assert document["stats"]["visible"] == len(bodies), document
    # /metrics shows the queue once, its partitions summed.
    with urllib.request.urlopen(f"{server.url}/metrics") as response:
        text = response.read().decode()
    depth = [line for line in text.splitlines()
             if line.startswith("conveyor_queue_depth{") and "/stats\"" in line]
    assert f'queue="{ACCOUNT}/stats",state="visible"}} {float(len(bodies))}' in "\n".join(
        depth), depth
    assert not [line for line in text.splitlines() if f"{ACCOUNT}-p1/" in line]
    sqs.purge_queue(QueueUrl=url)
    assert counts(sqs, url) == (0, 0, 0)


def test_dead_letters_of_a_partitioned_queue_and_their_redrive(server: Server) -> None:
    sqs = server.sqs()
    dlq = _create(sqs, "parted-dlq")
    url = _create(sqs, "parted-src", RedrivePolicy=redrive("parted-dlq", 1))
    bodies = {f"d{i}" for i in range(2 * PARTITIONS)}
    for body in sorted(bodies):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    dead_letter_all(sqs, url)
    moved = _drain(sqs, dlq, len(bodies), VisibilityTimeout=0,
                   MessageSystemAttributeNames=["DeadLetterQueueSourceArn"])
    assert {m["Body"] for m in moved} == bodies
    # From whichever partition a message left, its source is the queue.
    assert {m["Attributes"]["DeadLetterQueueSourceArn"] for m in moved} == {
        arn("parted-src")}
    assert sqs.list_dead_letter_source_queues(QueueUrl=dlq)["queueUrls"] == [url]
    # A redrive sends each back to the queue it came from.
    sqs.start_message_move_task(SourceArn=arn("parted-dlq"))
    deadline = time.monotonic() + 30
    while counts(sqs, dlq) != (0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    back = _drain(sqs, url, len(bodies), VisibilityTimeout=60)
    assert {m["Body"] for m in back} == bodies
    _delete_all(sqs, url, back)


def test_fifo_dead_letters_keep_each_group_in_one_partition_in_order(server: Server) -> None:
    sqs = server.sqs()
    dlq = _create(sqs, "fdlq.fifo", FifoQueue="true")
    url = _create(sqs, "fsrc.fifo", FifoQueue="true",
                  RedrivePolicy=redrive("fdlq.fifo", 1))
    groups = [f"g{i}" for i in range(6)]
    for i in range(3):
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": g, "MessageBody": f"{g}-{i}", "MessageGroupId": g,
             "MessageDeduplicationId": f"{g}-{i}"} for g in groups])
    dead_letter_all(sqs, url)
    got, uids = _receive_groups(sqs, dlq, groups, 3 * len(groups))
    assert got == {g: [0, 1, 2] for g in groups}
    # Each group went to the dead-letter partition its id hashes to, where a send of that
    # group would go.
    by_hash: dict[int, set[int]] = {}
    for g in groups:
        by_hash.setdefault(group_partition(g, PARTITIONS), set()).update(uids[g])
    assert len(by_hash) > 1 and all(len(u) == 1 for u in by_hash.values()), by_hash
    assert len(set().union(*by_hash.values())) == len(by_hash), by_hash


def test_encrypted_partitions_and_their_dead_letters_open(server: Server) -> None:
    sqs = server.sqs()
    dlq = _create(sqs, "sealed-dlq", SqsManagedSseEnabled="true")
    url = _create(sqs, "sealed", SqsManagedSseEnabled="true",
                  RedrivePolicy=redrive("sealed-dlq", 1))
    bodies = {f"secret-{i}" for i in range(2 * PARTITIONS)}
    for body in sorted(bodies):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    dead_letter_all(sqs, url)
    moved = _drain(sqs, dlq, len(bodies), VisibilityTimeout=0)
    assert {m["Body"] for m in moved} == bodies
    sqs.start_message_move_task(SourceArn=arn("sealed-dlq"))
    back = _drain(sqs, url, len(bodies), VisibilityTimeout=60)
    assert {m["Body"] for m in back} == bodies


def test_partition_count_is_checked_and_fixed_and_delete_takes_all(server: Server) -> None:
    sqs = server.sqs()
    for bad in ("0", "17", "two", "-1", "\u00b2"):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            sqs.create_queue(QueueName="bad-partitions",
                             Attributes={"ConveyorPartitions": bad})
        assert _code(caught.value) == "InvalidAttributeValue", bad
    assert "bad-partitions" not in str(sqs.list_queues())
    url = _create(sqs, "fixed")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"ConveyorPartitions": "2"})
    assert _code(caught.value) == "InvalidAttributeValue"
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        sqs.create_queue(QueueName="fixed", Attributes={"ConveyorPartitions": "2"})
    assert _code(caught.value) == "QueueAlreadyExists"
    for i in range(2 * PARTITIONS):
        sqs.send_message(QueueUrl=url, MessageBody=f"old-{i}")
    sqs.delete_queue(QueueUrl=url)
    # Made again, the queue has none of the old queue's messages in any partition.
    url = _create(sqs, "fixed")
    assert counts(sqs, url) == (0, 0, 0)
    assert not receive(sqs, url, MaxNumberOfMessages=10)


def test_every_partition_survives_kill_and_restart(tmp_path: Path) -> None:
    running = Server(tmp_path / "data", workers=1)
    try:
        sqs = running.sqs()
        url = _create(sqs, "durable")
        fifo = _create(sqs, "durable.fifo", FifoQueue="true",
                       ContentBasedDeduplication="true")
        for i in range(4 * PARTITIONS):
            sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
            sqs.send_message(QueueUrl=fifo, MessageBody=f"f{i}", MessageGroupId=f"g{i % 5}")
        running.stop(signal.SIGKILL)
        running.start()
        sqs = running.sqs()
        got = _drain(sqs, url, 4 * PARTITIONS, VisibilityTimeout=60)
        assert sorted(m["Body"] for m in got) == sorted(f"m{i}" for i in range(4 * PARTITIONS))
        assert len({_uid(m) for m in got}) == PARTITIONS
        got = _drain(sqs, fifo, 4 * PARTITIONS, VisibilityTimeout=60)
        bodies = [int(m["Body"][1:]) for m in got]
        assert sorted(bodies) == list(range(4 * PARTITIONS))
        for group in range(5):  # each group in the order it was sent
            sent = [n for n in bodies if n % 5 == group]
            assert sent == sorted(sent)
    finally:
        running.kill()


def test_a_record_kept_with_one_log_for_several_partitions_is_set_to_one(
        tmp_path: Path) -> None:
    """A release before partitions were kept on one node made one engine queue whatever
    ConveyorPartitions said: such a queue is served whole, and reports 1."""
    data = tmp_path / "data"
    running = Server(data, workers=1)
    try:
        sqs = running.sqs()
        url = _create(sqs, "legacy")
        for i in range(5):
            sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
        running.stop()
        # What the earlier release left: partition 0 only.
        with Broker(str(data)) as broker:
            for name in partition_names(f"{ACCOUNT}/legacy", PARTITIONS)[1:]:
                for message in broker.get_queue(name).receive(10):
                    broker.get_queue(name).delete(message.receipt)
                broker.delete_queue(name)
            p0 = broker.get_queue(f"{ACCOUNT}/legacy")
            before = p0.stats().visible
        running.start()
        sqs = running.sqs()
        assert attrs(sqs, url, "ConveyorPartitions") == {"ConveyorPartitions": "1"}
        got = _drain(sqs, url, before, VisibilityTimeout=60)
        assert len(got) == before and before > 0
        _delete_all(sqs, url, got)
        sqs.send_message(QueueUrl=url, MessageBody="after")
        assert [m["Body"] for m in _drain(sqs, url, 1)] == ["after"]
        assert "its ConveyorPartitions is now 1" in running.log.read_text()
    finally:
        running.kill()
