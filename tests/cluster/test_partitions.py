"""Queues of several partitions, each with its own leader, seen by clients as one queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import botocore.exceptions
import pytest

from server.partitioned import group_partition, partition_names
from tests.cluster.harness import ACCOUNT, Cluster
from tests.cluster.workload import IN_DOUBT_PER_FAULT, Workload, create_queue, drain
from tests.support.clients import forged_receipts
from tests.support.consistency import History, check

PARTITIONS = 3


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("partitions"))
    try:
        yield running
    finally:
        running.close()


def _partitioned(c: Cluster, name: str, **attributes: str) -> str:
    return create_queue(c, name, attributes={"ConveyorPartitions": str(PARTITIONS),
                                             **attributes})


def _partition_states(c: Cluster, name: str, led: bool = True
                      ) -> dict[str, dict[str, Any]]:
    """The queue's partitions in a node's view; with led, once each has a leader there
    (a view is up to a reconcile interval old)."""
    deadline = time.monotonic() + 30
    while True:
        queues = c.state()["queues"]
        states = {p: queues[p] for p in partition_names(f"{ACCOUNT}/{name}", PARTITIONS)
                  if p in queues}
        if not led or (len(states) == PARTITIONS and all(s["leader"] for s in states.values())):
            return states
        assert time.monotonic() < deadline, f"partitions of {name} got no leaders: {states}"
        time.sleep(0.1)


def _commit_offsets(c: Cluster, name: str) -> dict[str, int]:
    """Each partition's commit offset, from its leader. A node elected a moment ago
    shows the partition as led once it has opened it: until then it is asked again."""
    offsets: dict[str, int] = {}
    deadline = time.monotonic() + 30
    for partition, state in _partition_states(c, name).items():
        while partition not in (leading := c.state(state["leader"])["leading"]):
            assert time.monotonic() < deadline, f"{state['leader']} leads {partition} " \
                                                f"in etcd, not in its view: {leading}"
            time.sleep(0.1)
        offsets[partition] = leading[partition]["commit_offset"]
    return offsets


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def test_standard_queue_spreads_sends_and_survives_a_partition_leader_kill(
        c: Cluster) -> None:
    url = _partitioned(c, "spread")
    states = _partition_states(c, "spread")
    assert len(states) == PARTITIONS and all(s["leader"] for s in states.values()), states
    before = _commit_offsets(c, "spread")
    history = History()
    with Workload(c, url, history) as load:
        time.sleep(3)
        # One partition's leader dies: sends go on to the others meanwhile.
        victim_partition = partition_names(f"{ACCOUNT}/spread", PARTITIONS)[1]
        victim = states[victim_partition]["leader"]
        c.kill(victim)
        acked_at_kill = load.sent_ok
        time.sleep(4)
        acked_while_down = load.sent_ok - acked_at_kill
        c.restart(victim)
        time.sleep(3)
    drain(c, url, history)
    report = check(history)
    print(f"\n{report}; acknowledged while a partition leader was down: {acked_while_down}")
    assert report.ok, str(report)
    assert report.in_doubt_within(IN_DOUBT_PER_FAULT), str(report)
    assert acked_while_down > 0, "sends stalled while one partition had no leader"
    after = _commit_offsets(c, "spread")
    grew = [p for p in after if after[p] > before.get(p, 0) + 10]
    assert len(grew) == PARTITIONS, f"not every partition took writes: {before} -> {after}"


def test_fifo_groups_map_to_one_partition_and_keep_their_order(c: Cluster) -> None:
    url = _partitioned(c, "groups.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    groups = [f"g{i}" for i in range(8)]
    assert len({group_partition(g, PARTITIONS) for g in groups}) > 1
    for i in range(10):
        client = c.sqs(f"n{i % 3}")
        client.send_message_batch(QueueUrl=url, Entries=[
            {"Id": g, "MessageBody": f"{g}-{i}", "MessageGroupId": g} for g in groups])
    got: dict[str, list[int]] = {g: [] for g in groups}
    deadline = time.monotonic() + 60
    turn = 0
    while sum(map(len, got.values())) < 80 and time.monotonic() < deadline:
        client = c.sqs(f"n{turn % 3}")
        turn += 1
        reply = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=1, AttributeNames=["All"])
        messages = reply.get("Messages", [])
        for m in messages:
            group, n = m["Body"].split("-")
            assert m["Attributes"]["MessageGroupId"] == group
            got[group].append(int(n))
        if messages:
            client.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(messages)])
    assert got == {g: list(range(10)) for g in groups}
    # Each group lives in the one partition its id hashes to.
    offsets = _commit_offsets(c, "groups.fifo")
    used = {partition_names(f"{ACCOUNT}/groups.fifo", PARTITIONS)[group_partition(g, PARTITIONS)]
            for g in groups}
    for partition, offset in offsets.items():
        # A partition no group maps to holds only its CONFIG record.
        assert (offset > 1) == (partition in used), offsets


def test_receipts_route_to_their_partition_and_forgeries_are_refused(c: Cluster) -> None:
    url = _partitioned(c, "receipts")
    other = create_queue(c, "receipts-other")
    client = c.sqs("n0")
    client.send_message_batch(QueueUrl=url, Entries=[
        {"Id": str(i), "MessageBody": f"m{i}"} for i in range(2 * PARTITIONS)])
    client.send_message(QueueUrl=other, MessageBody="elsewhere")
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(messages) < 2 * PARTITIONS and time.monotonic() < deadline:
        messages += client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=1,
                                           VisibilityTimeout=60).get("Messages", [])
    assert len(messages) == 2 * PARTITIONS
    foreign = c.sqs("n1").receive_message(QueueUrl=other, WaitTimeSeconds=2)["Messages"][0]
    for bad in forged_receipts(messages[0]["ReceiptHandle"], foreign["ReceiptHandle"]):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            c.sqs("n2").delete_message(QueueUrl=url, ReceiptHandle=bad)
        assert _code(caught.value) == "ReceiptHandleIsInvalid", bad
    # Every genuine handle works from any node, in one batch spanning the partitions.
    reply = c.sqs("n2").delete_message_batch(QueueUrl=url, Entries=[
        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])
    assert len(reply["Successful"]) == len(messages) and not reply.get("Failed")
    attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "0"
    assert attributes["Attributes"]["ApproximateNumberOfMessagesNotVisible"] == "0"


def _receive_into(c: Cluster, url: str, got: list[Any]) -> None:
    got.append(c.sqs("n0").receive_message(QueueUrl=url, WaitTimeSeconds=15))


def test_a_long_poll_wakes_for_a_send_to_any_partition(c: Cluster) -> None:
    url = _partitioned(c, "wake")
    for round_ in range(PARTITIONS):  # sends take the partitions in turn
        got: list[Any] = []
        receiver = threading.Thread(target=_receive_into, args=(c, url, got))
        started = time.monotonic()
        receiver.start()
        time.sleep(1)
        c.sqs(f"n{round_ % 3}").send_message(QueueUrl=url, MessageBody=f"wake-{round_}")
        receiver.join(20)
        elapsed = time.monotonic() - started
        assert got and got[0]["Messages"][0]["Body"] == f"wake-{round_}"
        assert elapsed < 6, f"the long poll took {elapsed:.1f} s to see the message"
        c.sqs("n0").delete_message(QueueUrl=url,
                                   ReceiptHandle=got[0]["Messages"][0]["ReceiptHandle"])


def test_stats_and_attribute_changes_cover_every_partition(c: Cluster) -> None:
    url = _partitioned(c, "stats")
    client = c.sqs("n1")
    bodies = {f"s{i}" for i in range(3 * PARTITIONS)}
    for body in sorted(bodies):
        client.send_message(QueueUrl=url, MessageBody=body)
    # With a visibility timeout of 0 on every partition, a received message stays
    # visible; one partition left at the default would hide its messages for 30 s.
    client.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "0"})
    seen: set[str] = set()
    for turn in range(50):
        if seen == bodies:
            break
        reply = c.sqs(f"n{turn % 3}").receive_message(QueueUrl=url, MaxNumberOfMessages=10)
        seen |= {m["Body"] for m in reply.get("Messages", [])}
    assert seen == bodies
    attributes = c.sqs("n2").get_queue_attributes(QueueUrl=url,
                                                  AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == str(len(bodies))
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert attributes["VisibilityTimeout"] == "0"
    assert attributes["ConveyorPartitions"] == str(PARTITIONS)
    client.purge_queue(QueueUrl=url)
    attributes = client.get_queue_attributes(QueueUrl=url,
                                             AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"


def test_partition_count_is_checked_and_fixed(c: Cluster) -> None:
    client = c.sqs("n0")
    for bad in ("0", "17", "two", "-1", "\u00b2"):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            client.create_queue(QueueName="bad-partitions",
                                Attributes={"ConveyorPartitions": bad})
        assert _code(caught.value) == "InvalidAttributeValue", bad
    assert "bad-partitions" not in str(client.list_queues())
    url = _partitioned(c, "fixed")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.set_queue_attributes(QueueUrl=url, Attributes={"ConveyorPartitions": "2"})
    assert _code(caught.value) == "InvalidAttributeValue"
    client.set_queue_attributes(QueueUrl=url,
                                Attributes={"ConveyorPartitions": str(PARTITIONS)})
    # Made again with another count, it is another queue's attributes: refused.
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.create_queue(QueueName="fixed", Attributes={"ConveyorPartitions": "2"})
    assert _code(caught.value) == "QueueAlreadyExists"
    assert len(_partition_states(c, "fixed")) == PARTITIONS
    client.delete_queue(QueueUrl=url)
    deadline = time.monotonic() + 10
    while _partition_states(c, "fixed", led=False) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _partition_states(c, "fixed", led=False)
