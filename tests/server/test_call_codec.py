"""Partition calls: the codec carries engine values and errors whole. The calls
themselves run in tests/cluster/test_partitions.py."""

from __future__ import annotations

from typing import Any

import pytest

from engine import Message, QueueAttributes, QueueStats
from engine.errors import ReceiptInvalidError
from engine.records import MessageAttribute
from engine.results import SendEntry, SendResult
from replication.errors import NotLeaderError, ReplicationUnavailableError
from server.calls.codec import ARGUMENTS, RESULTS, pack, result_value, unpack

ATTRIBUTES = {"a": MessageAttribute("String", "text"),
              "b": MessageAttribute("Binary.custom", b"\x00\xff")}


def _round_trip(op: str, result: object) -> object:
    return RESULTS[op](unpack(pack(result_value(op, result))))


def test_send_entries_arrive_as_they_left() -> None:
    entries = [SendEntry(b"\x00body", 3, ATTRIBUTES, "g", "d", "sender",
                         {"AWSTraceHeader": MessageAttribute("String", "t")}, b"x" * 16, 9,
                         b"m" * 16),
               SendEntry(b"plain")]
    [arrived] = ARGUMENTS["send_batch"](unpack(pack([entries])))
    assert arrived == entries


def test_results_and_per_entry_errors_arrive_as_they_left() -> None:
    refusal = ReceiptInvalidError("forged")
    results = [SendResult("id-1", "17", False), refusal]
    back = _round_trip("send_batch", results)
    assert isinstance(back, list) and back[0] == results[0]
    assert type(back[1]) is ReceiptInvalidError and str(back[1]) == str(refusal)
    assert vars(back[1]) == vars(refusal)
    message = Message("id", b"\x01\x02", "receipt", 2, 1.5, 2.5, ATTRIBUTES, "g", "5", "d",
                      "sender", {"AWSTraceHeader": MessageAttribute("String", "t")}, None,
                      b"m" * 16)
    assert _round_trip("receive", [message]) == [message]
    stats = QueueStats(1, 2, 3, 4.5, 6, 7, 8, 9, 10, 11)
    assert _round_trip("stats", stats) == stats
    attributes = QueueAttributes(visibility_timeout=7)
    assert _round_trip("attributes", attributes) == attributes


def test_raised_errors_keep_their_class_and_attributes() -> None:
    for error in (NotLeaderError("0/q", "http://127.0.0.1:1"),
                  ReplicationUnavailableError("0/q", "too few in-sync replicas")):
        failed, back = unpack(pack([1, error]))
        assert failed == 1 and type(back) is type(error)
        assert str(back) == str(error) and vars(back) == vars(error)


def test_a_single_node_keeps_the_partition_count_it_is_given(sqs: object) -> None:
    """One log whatever the count, so that one CreateQueue works on both kinds of server;
    the count is checked all the same."""
    import botocore.exceptions

    client: Any = sqs
    url = client.create_queue(QueueName="counted",
                              Attributes={"ConveyorPartitions": "4"})["QueueUrl"]
    attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
    assert attributes["Attributes"]["ConveyorPartitions"] == "4"
    for name, bad in (("ConveyorPartitions", "0"), ("ConveyorPartitions", "\u00b2"),
                      ("ConveyorReplicationFactor", "\u00b2")):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            client.create_queue(QueueName="miscounted", Attributes={name: bad})
        assert caught.value.response["Error"]["Code"] == "InvalidAttributeValue", (name, bad)
