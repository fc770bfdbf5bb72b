"""Every SQS action through an unmodified boto3 client against a real `conveyor serve`.

Each test gets its own server (the `server` fixture). Expected errors follow SQS as the
server's error table states it: boto3 picks the exception class from the JSON shape and
reports the query-protocol code as Error.Code. Every refusal must be a 4xx, never a 5xx.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any
from xml.etree import ElementTree

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

ACCOUNT = "000000000000"
REGION = "us-east-1"
MIB = 1024 * 1024

NON_EXISTENT_QUEUE = "AWS.SimpleQueueService.NonExistentQueue"
TOO_MANY_ENTRIES = "AWS.SimpleQueueService.TooManyEntriesInBatchRequest"
EMPTY_BATCH = "AWS.SimpleQueueService.EmptyBatchRequest"
IDS_NOT_DISTINCT = "AWS.SimpleQueueService.BatchEntryIdsNotDistinct"
INVALID_ENTRY_ID = "AWS.SimpleQueueService.InvalidBatchEntryId"
BATCH_TOO_LONG = "AWS.SimpleQueueService.BatchRequestTooLong"
PURGE_IN_PROGRESS = "AWS.SimpleQueueService.PurgeQueueInProgress"
NOT_INFLIGHT = "AWS.SimpleQueueService.MessageNotInflight"


# --- helpers ----------------------------------------------------------------------------------


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 300 else text[:300] + "..."


def _failure(call: Callable[..., Any], kwargs: Mapping[str, Any]) -> ClientError:
    try:
        result = call(**kwargs)
    except ClientError as exc:
        return exc
    result.pop("ResponseMetadata", None)
    pytest.fail(f"{call.__name__}({short(kwargs)}) succeeded: {short(result)}")


def refused(call: Callable[..., Any], code: str, *, shape: str | None = None,
            status: int = 400, **kwargs: Any) -> dict[str, Any]:
    """Call a boto3 client method that must fail; check the exception class, the query
    code and the HTTP status. Returns the parsed error."""
    client = call.__self__  # type: ignore[attr-defined]
    exc = _failure(call, kwargs)
    response = exc.response
    where = f"{call.__name__}({short(kwargs)})"
    assert (response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]) == (
        code, status), f"{where}: {response['Error']}"
    if shape is not None:
        assert isinstance(exc, getattr(client.exceptions, shape)), f"{where}: {exc!r}"
    return dict(response["Error"])


def refused_4xx(call: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """For refusals whose exact code SQS does not pin down: any client error, never 5xx."""
    exc = _failure(call, kwargs)
    status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
    assert 400 <= status < 500, f"{call.__name__}({short(kwargs)}): {exc.response}"
    return dict(exc.response["Error"])


def sqs_md5_of_attributes(attributes: Mapping[str, Mapping[str, Any]]) -> str:
    """SQS's MD5OfMessageAttributes over boto3-shaped attributes, written from the
    published algorithm rather than taken from the server."""
    digest = hashlib.md5()
    for name in sorted(attributes):
        attribute = attributes[name]
        data_type = attribute["DataType"]
        encoded_name = name.encode("utf-8")
        encoded_type = data_type.encode("utf-8")
        digest.update(struct.pack(">I", len(encoded_name)) + encoded_name)
        digest.update(struct.pack(">I", len(encoded_type)) + encoded_type)
        if "BinaryValue" in attribute:
            value = attribute["BinaryValue"]
            digest.update(b"\x02")
        else:
            value = attribute["StringValue"].encode("utf-8")
            digest.update(b"\x01")
        digest.update(struct.pack(">I", len(value)) + value)
    return digest.hexdigest()


def md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def arn(name: str) -> str:
    return f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"


def create(sqs: Any, name: str, **attributes: str) -> str:
    return str(sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])


def attrs(sqs: Any, url: str, *names: str) -> dict[str, str]:
    response = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(names) or ["All"])
    return dict(response.get("Attributes", {}))


def counts(sqs: Any, url: str) -> tuple[int, int, int]:
    """(visible, in flight, delayed)."""
    got = attrs(sqs, url, "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible", "ApproximateNumberOfMessagesDelayed")
    return (int(got["ApproximateNumberOfMessages"]),
            int(got["ApproximateNumberOfMessagesNotVisible"]),
            int(got["ApproximateNumberOfMessagesDelayed"]))


def receive(sqs: Any, url: str, **kwargs: Any) -> list[dict[str, Any]]:
    kwargs.setdefault("MaxNumberOfMessages", 10)
    return list(sqs.receive_message(QueueUrl=url, **kwargs).get("Messages", []))


def redrive(dead_letter_name: str, max_receive_count: int) -> str:
    return json.dumps({"deadLetterTargetArn": arn(dead_letter_name),
                       "maxReceiveCount": max_receive_count})


def raw_post(url: str, body: bytes, headers: dict[str, str]
             ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url + "/", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def dead_letter_all(sqs: Any, source_url: str) -> None:
    """Drive every message of a maxReceiveCount=1 queue into its dead-letter queue.

    A receive with visibility 0 leaves each message due again at once; the next receive
    finds it at its maxReceiveCount and moves it instead of delivering it.
    """
    for _ in range(30):
        receive(sqs, source_url, VisibilityTimeout=0)
        if counts(sqs, source_url) == (0, 0, 0):
            return
    raise AssertionError("messages did not reach the dead-letter queue")


def wait_for_task(sqs: Any, dead_letter_arn: str, *statuses: str,
                  timeout: float = 10) -> dict[str, Any]:
    """The newest move task of a dead-letter queue, once it has one of these statuses."""
    deadline = time.monotonic() + timeout
    while True:
        results = sqs.list_message_move_tasks(SourceArn=dead_letter_arn)["Results"]
        if results and results[0]["Status"] in statuses:
            return dict(results[0])
        assert time.monotonic() < deadline, results
        time.sleep(0.05)


def in_background(delay: float, call: Callable[..., Any], **kwargs: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        call(**kwargs)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def never_5xx(call: Callable[..., Any], **kwargs: Any) -> None:
    """A request the server may take or refuse, as long as it does not fail itself."""
    try:
        call(**kwargs)
    except ClientError as exc:
        status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
        assert status < 500, f"{call.__name__}({short(kwargs)}): {exc.response['Error']}"


# --- CreateQueue ------------------------------------------------------------------------------


def test_create_queue_attributes_tags_and_fifo(sqs: Any, server: Any) -> None:
    response = sqs.create_queue(
        QueueName="orders",
        Attributes={"VisibilityTimeout": "45", "DelaySeconds": "3",
                    "MaximumMessageSize": "2048", "MessageRetentionPeriod": "3600",
                    "ReceiveMessageWaitTimeSeconds": "2"},
        tags={"team": "billing", "env": "test"})
    url = response["QueueUrl"]
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert url == f"{server.url}/{ACCOUNT}/orders"
    got = attrs(sqs, url)
    assert got["VisibilityTimeout"] == "45"
    assert got["DelaySeconds"] == "3"
    assert got["MaximumMessageSize"] == "2048"
    assert got["MessageRetentionPeriod"] == "3600"
    assert got["ReceiveMessageWaitTimeSeconds"] == "2"
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "billing", "env": "test"}

    url = create(sqs, "plain")
    got = attrs(sqs, url)
    assert got["VisibilityTimeout"] == "30"
    assert got["DelaySeconds"] == "0"
    assert got["MaximumMessageSize"] == str(MIB)
    assert got["MessageRetentionPeriod"] == str(4 * 24 * 3600)
    assert got["ReceiveMessageWaitTimeSeconds"] == "0"
    # A standard queue does not report FIFO-only attributes.
    assert "FifoQueue" not in got
    assert "ContentBasedDeduplication" not in got
    assert "RedrivePolicy" not in got

    url = create(sqs, "jobs.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    assert url.endswith(f"/{ACCOUNT}/jobs.fifo")
    got = attrs(sqs, url)
    assert got["FifoQueue"] == "true"
    assert got["ContentBasedDeduplication"] == "true"
    assert got["QueueArn"] == arn("jobs.fifo")


BAD_ATTRIBUTE_VALUES = [
    ("VisibilityTimeout", "abc"),
    ("VisibilityTimeout", "43201"),
    ("VisibilityTimeout", "-1"),
    ("DelaySeconds", "901"),
    ("MaximumMessageSize", "1023"),
    ("MaximumMessageSize", str(MIB + 1)),
    ("MessageRetentionPeriod", "59"),
    ("MessageRetentionPeriod", str(14 * 24 * 3600 + 1)),
    ("ReceiveMessageWaitTimeSeconds", "21"),
    ("FifoQueue", "maybe"),
    ("RedrivePolicy", "not json"),
    ("Policy", "[1, 2]"),
    ("RedrivePolicy", json.dumps({"deadLetterTargetArn": "arn:aws:sqs:us-east-1:0:x",
                                  "maxReceiveCount": 1})),
]


def test_create_queue_refusals_create_nothing(sqs: Any) -> None:
    # A .fifo name without FifoQueue=true, and FifoQueue=true without the suffix.
    refused(sqs.create_queue, "InvalidParameterValue", QueueName="nofifo.fifo")
    refused(sqs.create_queue, "InvalidParameterValue", QueueName="nofifo.fifo",
            Attributes={"FifoQueue": "false"})
    refused(sqs.create_queue, "InvalidParameterValue", QueueName="nosuffix",
            Attributes={"FifoQueue": "true"})
    # ContentBasedDeduplication is for FIFO queues only.
    refused(sqs.create_queue, "InvalidAttributeValue", shape="InvalidAttributeValue",
            QueueName="std", Attributes={"ContentBasedDeduplication": "true"})
    assert sqs.list_queues().get("QueueUrls", []) == []

    for name in ["has space", "dotted.name", "slash/name", "a/b/c", "a" * 81, "ünicode",
                 "semi;colon", "star*", "tab\tname", "only.fifo"]:
        refused(sqs.create_queue, "InvalidParameterValue", QueueName=name)
    # ".fifo" alone has no name before the suffix.
    refused(sqs.create_queue, "InvalidParameterValue", QueueName=".fifo",
            Attributes={"FifoQueue": "true"})
    refused(sqs.create_queue, "InvalidParameterValue", QueueName="f" * 76 + ".fifo",
            Attributes={"FifoQueue": "true"})
    assert sqs.list_queues().get("QueueUrls", []) == []

    refused(sqs.create_queue, "InvalidAttributeName", shape="InvalidAttributeName",
            QueueName="q", Attributes={"VisibilityTimeout": "5", "Colour": "blue"})
    # Read-only attributes cannot be given either.
    refused(sqs.create_queue, "InvalidAttributeName", shape="InvalidAttributeName",
            QueueName="q", Attributes={"QueueArn": arn("q")})
    assert sqs.list_queues().get("QueueUrls", []) == []

    for name, value in BAD_ATTRIBUTE_VALUES:
        refused(sqs.create_queue, "InvalidAttributeValue", shape="InvalidAttributeValue",
                QueueName="q", Attributes={name: value})
    assert sqs.list_queues().get("QueueUrls", []) == []


def test_create_queue_idempotence_and_name_limits(sqs: Any) -> None:
    first = create(sqs, "same", VisibilityTimeout="7", DelaySeconds="1")
    again = create(sqs, "same", VisibilityTimeout="7", DelaySeconds="1")
    assert again == first
    plain = create(sqs, "plain")
    assert create(sqs, "plain") == plain
    assert len(sqs.list_queues()["QueueUrls"]) == 2

    url = create(sqs, "fixed", VisibilityTimeout="7")
    error = refused(sqs.create_queue, "QueueAlreadyExists", shape="QueueNameExists",
                    QueueName="fixed", Attributes={"VisibilityTimeout": "8"})
    assert error["QueryErrorCode"] == "QueueNameExists"
    # The refusal changed nothing.
    assert attrs(sqs, url, "VisibilityTimeout") == {"VisibilityTimeout": "7"}

    longest = "a" * 80
    assert create(sqs, longest).endswith("/" + longest)
    fifo = "f" * 75 + ".fifo"
    assert create(sqs, fifo, FifoQueue="true").endswith("/" + fifo)
    assert create(sqs, "Mixed_Case-09").endswith("/Mixed_Case-09")


def test_create_queue_tag_limits(sqs: Any) -> None:
    refused(sqs.create_queue, "InvalidParameterValue", QueueName="tags",
            tags={"k" * 129: "v"})
    refused(sqs.create_queue, "InvalidParameterValue", QueueName="tags",
            tags={"k": "v" * 257})
    # A queue holds at most 50 tags, however they arrive.
    refused_4xx(sqs.create_queue, QueueName="tags", tags={f"t{i}": "v" for i in range(51)})
    assert sqs.list_queues().get("QueueUrls", []) == []
    url = sqs.create_queue(QueueName="tags", tags={f"t{i}": "v" for i in range(50)})["QueueUrl"]
    assert len(sqs.list_queue_tags(QueueUrl=url)["Tags"]) == 50


# --- GetQueueUrl, ListQueues ------------------------------------------------------------------


def test_get_queue_url(sqs: Any, server: Any) -> None:
    url = create(sqs, "lookup")
    assert sqs.get_queue_url(QueueName="lookup")["QueueUrl"] == url
    assert sqs.get_queue_url(QueueName="lookup", QueueOwnerAWSAccountId=ACCOUNT)[
        "QueueUrl"] == f"{server.url}/{ACCOUNT}/lookup"
    error = refused(sqs.get_queue_url, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
                    QueueName="absent")
    assert error["QueryErrorCode"] == "QueueDoesNotExist"
    # Names are case-sensitive.
    refused(sqs.get_queue_url, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
            QueueName="LOOKUP")


def test_add_and_remove_permission_write_the_policy(sqs: Any) -> None:
    url = create(sqs, "guarded")
    sqs.add_permission(QueueUrl=url, Label="share", AWSAccountIds=["111122223333"],
                       Actions=["SendMessage", "ReceiveMessage"])
    policy = json.loads(sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["Policy"])["Attributes"]["Policy"])
    [statement] = policy["Statement"]
    assert statement["Sid"] == "share" and statement["Effect"] == "Allow"
    assert statement["Principal"] == {"AWS": "arn:aws:iam::111122223333:root"}
    assert sorted(statement["Action"]) == ["SQS:ReceiveMessage", "SQS:SendMessage"]
    # A label is unique; an unknown action or a bad account id is refused and changes nothing.
    refused(sqs.add_permission, "InvalidParameterValue", QueueUrl=url, Label="share",
            AWSAccountIds=["111122223333"], Actions=["SendMessage"])
    refused(sqs.add_permission, "InvalidParameterValue", QueueUrl=url, Label="other",
            AWSAccountIds=["111122223333"], Actions=["DeleteQueue"])
    refused(sqs.add_permission, "InvalidParameterValue", QueueUrl=url, Label="other",
            AWSAccountIds=["not-an-account"], Actions=["SendMessage"])
    assert len(json.loads(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])[
        "Attributes"]["Policy"])["Statement"]) == 1

    sqs.remove_permission(QueueUrl=url, Label="share")
    assert "Policy" not in sqs.get_queue_attributes(
        QueueUrl=url, AttributeNames=["Policy"]).get("Attributes", {})
    refused(sqs.remove_permission, "InvalidParameterValue", QueueUrl=url, Label="share")


def test_list_queues_prefix_and_pagination(sqs: Any) -> None:
    wanted = {create(sqs, f"page-{i:02d}") for i in range(25)}
    others = {create(sqs, "other-a"), create(sqs, "pag"), create(sqs, "PAGE-upper")}

    everything = sqs.list_queues()
    assert set(everything["QueueUrls"]) == wanted | others
    assert "NextToken" not in everything  # no pagination unless MaxResults asks for it

    by_prefix = sqs.list_queues(QueueNamePrefix="page-")
    assert set(by_prefix["QueueUrls"]) == wanted
    assert "NextToken" not in by_prefix
    assert sqs.list_queues(QueueNamePrefix="nothing-").get("QueueUrls", []) == []
    # Prefixes are literal and case-sensitive.
    assert sqs.list_queues(QueueNamePrefix="pa_").get("QueueUrls", []) == []
    assert sqs.list_queues(QueueNamePrefix="PAGE")["QueueUrls"] == [
        sqs.get_queue_url(QueueName="PAGE-upper")["QueueUrl"]]

    seen: list[str] = []
    pages = []
    token = None
    while True:
        kwargs: dict[str, Any] = {"QueueNamePrefix": "page-", "MaxResults": 10}
        if token:
            kwargs["NextToken"] = token
        page = sqs.list_queues(**kwargs)
        pages.append(len(page["QueueUrls"]))
        seen += page["QueueUrls"]
        token = page.get("NextToken")
        if not token:
            break
        assert len(pages) < 10, "pagination does not end"
    assert pages == [10, 10, 5]
    assert len(seen) == len(set(seen)) == 25
    assert set(seen) == wanted

    # A page that ends exactly at the last queue carries no NextToken.
    exact = sqs.list_queues(QueueNamePrefix="page-", MaxResults=25)
    assert len(exact["QueueUrls"]) == 25
    assert "NextToken" not in exact

    # The paginator (what most boto3 users call) walks the same pages.
    paged = [url for p in sqs.get_paginator("list_queues").paginate(
        QueueNamePrefix="page-", PaginationConfig={"PageSize": 7}) for url in p["QueueUrls"]]
    assert sorted(paged) == sorted(wanted)

    refused(sqs.list_queues, "InvalidParameterValue", MaxResults=0)
    refused(sqs.list_queues, "InvalidParameterValue", MaxResults=1001)


# --- GetQueueAttributes -----------------------------------------------------------------------


def test_get_queue_attributes(sqs: Any, server: Any) -> None:
    before = int(time.time())
    url = create(sqs, "described")
    after = int(time.time())
    everything = attrs(sqs, url)
    expected = {"VisibilityTimeout", "DelaySeconds", "MessageRetentionPeriod",
                "MaximumMessageSize", "ReceiveMessageWaitTimeSeconds",
                "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed", "CreatedTimestamp",
                "LastModifiedTimestamp", "QueueArn"}
    assert expected <= set(everything)
    assert everything["QueueArn"] == "arn:aws:sqs:us-east-1:000000000000:described"
    assert before - 1 <= int(everything["CreatedTimestamp"]) <= after + 1
    assert before - 1 <= int(everything["LastModifiedTimestamp"]) <= after + 1

    some = attrs(sqs, url, "QueueArn", "VisibilityTimeout")
    assert some == {"QueueArn": arn("described"), "VisibilityTimeout": "30"}
    # No AttributeNames at all: no attributes.
    assert sqs.get_queue_attributes(QueueUrl=url).get("Attributes", {}) == {}

    refused(sqs.get_queue_attributes, "InvalidAttributeName", shape="InvalidAttributeName",
            QueueUrl=url, AttributeNames=["VisibilityTimeout", "NoSuchAttribute"])
    refused(sqs.get_queue_attributes, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
            QueueUrl=f"{server.url}/{ACCOUNT}/absent", AttributeNames=["All"])
    refused(sqs.get_queue_attributes, "InvalidAddress", shape="InvalidAddress", status=404,
            QueueUrl=f"{server.url}/just-one-part", AttributeNames=["All"])


def test_approximate_counters_follow_messages(sqs: Any) -> None:
    url = create(sqs, "counted")
    assert counts(sqs, url) == (0, 0, 0)
    sqs.send_message(QueueUrl=url, MessageBody="one")
    sqs.send_message(QueueUrl=url, MessageBody="two")
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=60)
    assert counts(sqs, url) == (2, 0, 1)
    [message] = receive(sqs, url, MaxNumberOfMessages=1)
    assert counts(sqs, url) == (1, 1, 1)
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert counts(sqs, url) == (1, 0, 1)
    [other] = receive(sqs, url)
    assert other["Body"] != message["Body"]
    assert counts(sqs, url) == (0, 1, 1)
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=other["ReceiptHandle"],
                                  VisibilityTimeout=0)
    assert counts(sqs, url) == (1, 0, 1)


# --- SetQueueAttributes -----------------------------------------------------------------------


def test_set_queue_attributes_visibility_takes_effect(sqs: Any) -> None:
    url = create(sqs, "vis")
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "1"})
    assert attrs(sqs, url, "VisibilityTimeout") == {"VisibilityTimeout": "1"}
    sqs.send_message(QueueUrl=url, MessageBody="short")
    sqs.send_message(QueueUrl=url, MessageBody="extended")
    first = {m["Body"]: m for m in receive(sqs, url)}
    assert set(first) == {"short", "extended"}
    # A longer visibility for one message outlives the queue's 1 s.
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=first["extended"]["ReceiptHandle"],
                                  VisibilityTimeout=60)
    assert receive(sqs, url) == []
    time.sleep(1.3)
    again = receive(sqs, url)
    assert [m["Body"] for m in again] == ["short"]
    assert again[0]["MessageId"] == first["short"]["MessageId"]
    assert again[0]["ReceiptHandle"] != first["short"]["ReceiptHandle"]


def test_set_queue_attributes_and_refusals(sqs: Any, server: Any) -> None:
    url = create(sqs, "tuned")
    sqs.set_queue_attributes(QueueUrl=url, Attributes={
        "DelaySeconds": "5", "MaximumMessageSize": "4096", "MessageRetentionPeriod": "120",
        "ReceiveMessageWaitTimeSeconds": "3", "Policy": json.dumps({"Version": "2012-10-17"})})
    got = attrs(sqs, url)
    assert (got["DelaySeconds"], got["MaximumMessageSize"], got["MessageRetentionPeriod"],
            got["ReceiveMessageWaitTimeSeconds"]) == ("5", "4096", "120", "3")
    assert json.loads(got["Policy"]) == {"Version": "2012-10-17"}
    assert int(got["LastModifiedTimestamp"]) >= int(got["CreatedTimestamp"])

    url = create(sqs, "fixed", VisibilityTimeout="9")
    fifo = create(sqs, "fixed.fifo", FifoQueue="true")
    # The queue type is fixed at creation.
    refused(sqs.set_queue_attributes, "InvalidAttributeName", shape="InvalidAttributeName",
            QueueUrl=fifo, Attributes={"FifoQueue": "false"})
    refused(sqs.set_queue_attributes, "InvalidAttributeName", shape="InvalidAttributeName",
            QueueUrl=url, Attributes={"FifoQueue": "true"})
    refused(sqs.set_queue_attributes, "InvalidAttributeName", shape="InvalidAttributeName",
            QueueUrl=url, Attributes={"Bogus": "1"})
    refused(sqs.set_queue_attributes, "InvalidAttributeName", shape="InvalidAttributeName",
            QueueUrl=url, Attributes={"ApproximateNumberOfMessages": "5"})
    refused(sqs.set_queue_attributes, "InvalidAttributeValue", shape="InvalidAttributeValue",
            QueueUrl=url, Attributes={"VisibilityTimeout": "43201"})
    refused(sqs.set_queue_attributes, "InvalidAttributeValue", shape="InvalidAttributeValue",
            QueueUrl=url, Attributes={"ContentBasedDeduplication": "true"})
    # A dead-letter target that does not exist, and one of the other queue type.
    refused(sqs.set_queue_attributes, "InvalidAttributeValue", shape="InvalidAttributeValue",
            QueueUrl=url, Attributes={"RedrivePolicy": redrive("nowhere", 2)})
    refused(sqs.set_queue_attributes, "InvalidAttributeValue", shape="InvalidAttributeValue",
            QueueUrl=url, Attributes={"RedrivePolicy": redrive("fixed.fifo", 2)})
    refused(sqs.set_queue_attributes, "InvalidAttributeValue", shape="InvalidAttributeValue",
            QueueUrl=url, Attributes={"RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": arn("fixed"), "maxReceiveCount": "lots"})})
    refused(sqs.set_queue_attributes, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
            QueueUrl=f"{server.url}/{ACCOUNT}/absent", Attributes={"DelaySeconds": "1"})
    # None of the refusals changed anything.
    got = attrs(sqs, url)
    assert got["VisibilityTimeout"] == "9"
    assert "RedrivePolicy" not in got
    assert attrs(sqs, fifo, "FifoQueue") == {"FifoQueue": "true"}


def test_set_queue_attributes_redrive_policy_set_and_removed(sqs: Any) -> None:
    dlq = create(sqs, "dlq")
    url = create(sqs, "source")
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": redrive("dlq", 2)})
    assert json.loads(attrs(sqs, url, "RedrivePolicy")["RedrivePolicy"]) == {
        "deadLetterTargetArn": arn("dlq"), "maxReceiveCount": 2}
    assert sqs.list_dead_letter_source_queues(QueueUrl=dlq)["queueUrls"] == [url]

    sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": ""})
    assert "RedrivePolicy" not in attrs(sqs, url)
    assert sqs.list_dead_letter_source_queues(QueueUrl=dlq).get("queueUrls", []) == []


# --- SendMessage ------------------------------------------------------------------------------


PUBLISHED_VECTORS: list[tuple[dict[str, dict[str, Any]], str]] = [
    ({"attribName1": {"DataType": "String", "StringValue": "attribValue 1"}},
     "19e27d4e946b072f3f58da80d94fd778"),
    ({"customNumberTypeAttrib": {"DataType": "Number.float",
                                 "StringValue": "4563442423554324324264524243.32543234"}},
     "9fe1b90bbd9965bdf77bac517c7d2495"),
    ({"binaryAttribute": {"DataType": "Binary", "BinaryValue": b"Hello binary world!"}},
     "31a92b15d92f8db860eda32aceb656c3"),
]
ALL_THREE = ({k: v for attributes, _ in PUBLISHED_VECTORS for k, v in attributes.items()},
             "c932db14a896c663f83c260297d594ff")


def test_send_message_digests_and_attributes(sqs: Any) -> None:
    url = create(sqs, "digests")
    for attributes, digest in [*PUBLISHED_VECTORS, ALL_THREE]:
        # The test's own implementation must agree with the published vectors first.
        assert sqs_md5_of_attributes(attributes) == digest
        sent = sqs.send_message(QueueUrl=url, MessageBody="body", MessageAttributes=attributes)
        assert sent["MD5OfMessageAttributes"] == digest, attributes
        [message] = receive(sqs, url, MessageAttributeNames=["All"])
        assert message["MD5OfMessageAttributes"] == digest, attributes
        assert message["MessageAttributes"] == attributes
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    url = create(sqs, "bodies")
    for body in ["hello", "héllo wörld ✓", "emoji 😀 and \U0010fffd", "tab\tnew\nline\rcr",
                 "\ue000 private use", "x" * 10000]:
        sent = sqs.send_message(QueueUrl=url, MessageBody=body)
        assert sent["MD5OfMessageBody"] == md5(body)
        assert "MD5OfMessageAttributes" not in sent
        [message] = receive(sqs, url, MaxNumberOfMessages=1)
        assert message["Body"] == body
        assert message["MD5OfBody"] == md5(body)
        assert message["MessageId"] == sent["MessageId"]
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

    url = create(sqs, "typed")
    attributes = {
        "text": {"DataType": "String", "StringValue": "héllo 😀"},
        "json": {"DataType": "String.json", "StringValue": '{"a": [1, 2]}'},
        "count": {"DataType": "Number", "StringValue": "-1.5e3"},
        "int": {"DataType": "Number.int", "StringValue": "42"},
        "blob": {"DataType": "Binary", "BinaryValue": bytes(range(256))},
        "gif": {"DataType": "Binary.gif", "BinaryValue": b"GIF89a\x00\x01"},
    }
    sent = sqs.send_message(QueueUrl=url, MessageBody="typed", MessageAttributes=attributes)
    assert sent["MD5OfMessageAttributes"] == sqs_md5_of_attributes(attributes)
    [message] = receive(sqs, url, MessageAttributeNames=["All"])
    assert message["MessageAttributes"] == attributes
    assert message["MD5OfMessageAttributes"] == sqs_md5_of_attributes(attributes)

    url = create(sqs, "traced")
    trace = {"AWSTraceHeader": {
        "DataType": "String", "StringValue": "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"}}
    sent = sqs.send_message(QueueUrl=url, MessageBody="t", MessageSystemAttributes=trace)
    assert sent["MD5OfMessageSystemAttributes"] == sqs_md5_of_attributes(trace)
    assert "MD5OfMessageAttributes" not in sent
    [message] = receive(sqs, url, MessageSystemAttributeNames=["AWSTraceHeader"])
    assert message["Attributes"] == {"AWSTraceHeader": trace["AWSTraceHeader"]["StringValue"]}
    # AWSTraceHeader is the only system attribute a sender may set.
    refused(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="t",
            MessageSystemAttributes={"SenderId": {"DataType": "String", "StringValue": "x"}})
    assert counts(sqs, url) == (0, 1, 0)


def test_send_message_delays(sqs: Any) -> None:
    url = create(sqs, "delayed")
    sqs.send_message(QueueUrl=url, MessageBody="soon", DelaySeconds=1)
    assert receive(sqs, url) == []
    assert counts(sqs, url) == (0, 0, 1)
    started = time.monotonic()
    got = receive(sqs, url, WaitTimeSeconds=5)
    assert [m["Body"] for m in got] == ["soon"]
    assert 0.5 <= time.monotonic() - started < 4

    url = create(sqs, "slow", DelaySeconds="60")
    sqs.send_message(QueueUrl=url, MessageBody="queue-delay")
    sqs.send_message(QueueUrl=url, MessageBody="no-delay", DelaySeconds=0)
    assert [m["Body"] for m in receive(sqs, url)] == ["no-delay"]
    assert counts(sqs, url) == (0, 1, 1)


INVALID_MESSAGE_ATTRIBUTES: list[dict[str, Any]] = [
    {"n": {"DataType": "Number", "StringValue": "twelve"}},
    {"n": {"DataType": "Number", "StringValue": "1" * 39}},
    {"AWS.reserved": {"DataType": "String", "StringValue": "x"}},
    {"Amazon.reserved": {"DataType": "String", "StringValue": "x"}},
    {".leading": {"DataType": "String", "StringValue": "x"}},
    {"double..dot": {"DataType": "String", "StringValue": "x"}},
    {"n": {"DataType": "Text", "StringValue": "x"}},
    {"n": {"DataType": "String", "StringValue": ""}},
    {"n": {"DataType": "String"}},
    {"n": {"DataType": "Binary", "BinaryValue": b""}},
    {f"a{i}": {"DataType": "String", "StringValue": "x"} for i in range(11)},
]


def test_send_message_refusals(sqs: Any, server: Any) -> None:
    url = create(sqs, "strict")
    for body in ["\x00", "bad \x08 char", "\x1f", "\x7f ok but \x0b not", "\uffff", "\ufffe",
                 "lone \ud800", "lone \udfff"]:
        refused(sqs.send_message, "InvalidMessageContents", shape="InvalidMessageContents",
                QueueUrl=url, MessageBody=body)
    refused(sqs.send_message, "MissingParameter", QueueUrl=url, MessageBody="")
    assert counts(sqs, url) == (0, 0, 0)

    url = create(sqs, "attrs")
    for attributes in INVALID_MESSAGE_ATTRIBUTES:
        refused(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="b",
                MessageAttributes=attributes)
    # Ten attributes are allowed.
    ten = {f"a{i}": {"DataType": "String", "StringValue": "x"} for i in range(10)}
    sqs.send_message(QueueUrl=url, MessageBody="ten", MessageAttributes=ten)
    assert counts(sqs, url) == (1, 0, 0)

    url = create(sqs, "params")
    refused(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="b",
            DelaySeconds=901)
    refused(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="b",
            DelaySeconds=-1)
    refused(sqs.send_message, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
            QueueUrl=f"{server.url}/{ACCOUNT}/absent", MessageBody="b")
    refused(sqs.send_message, "InvalidAddress", shape="InvalidAddress", status=404,
            QueueUrl=f"{server.url}/{ACCOUNT}/absent/extra", MessageBody="b")
    assert counts(sqs, url) == (0, 0, 0)


def test_send_message_size_limits(sqs: Any) -> None:
    url = create(sqs, "big")
    sent = sqs.send_message(QueueUrl=url, MessageBody="a" * MIB)
    assert sent["MD5OfMessageBody"] == md5("a" * MIB)
    refused(sqs.send_message, "InvalidParameterValue", QueueUrl=url,
            MessageBody="a" * (MIB + 1))
    # Attribute names, types and values count towards the size.
    refused(sqs.send_message, "InvalidParameterValue", QueueUrl=url,
            MessageBody="a" * (MIB - 10),
            MessageAttributes={"name": {"DataType": "String", "StringValue": "x" * 20}})
    # Multi-byte characters count as their UTF-8 bytes.
    refused(sqs.send_message, "InvalidParameterValue", QueueUrl=url,
            MessageBody="é" * (MIB // 2 + 1))

    small = create(sqs, "small", MaximumMessageSize="1024")
    sqs.send_message(QueueUrl=small, MessageBody="b" * 1024)
    refused(sqs.send_message, "InvalidParameterValue", QueueUrl=small,
            MessageBody="b" * 1025)
    assert counts(sqs, url) == (1, 0, 0)
    assert counts(sqs, small) == (1, 0, 0)


def test_send_message_fifo(sqs: Any) -> None:
    url = create(sqs, "ordered.fifo", FifoQueue="true")
    refused(sqs.send_message, "MissingParameter", QueueUrl=url, MessageBody="b",
            MessageDeduplicationId="d0")
    # Without content-based deduplication every message needs a deduplication id.
    error = refused_4xx(sqs.send_message, QueueUrl=url, MessageBody="b", MessageGroupId="g")
    assert error["Code"] in ("MissingParameter", "InvalidParameterValue")
    # FIFO queues take no per-message delay.
    refused(sqs.send_message, "InvalidParameterValue", QueueUrl=url, MessageBody="b",
            MessageGroupId="g", MessageDeduplicationId="d0", DelaySeconds=5)
    assert counts(sqs, url) == (0, 0, 0)

    first = sqs.send_message(QueueUrl=url, MessageBody="one", MessageGroupId="g",
                             MessageDeduplicationId="d1")
    duplicate = sqs.send_message(QueueUrl=url, MessageBody="one again", MessageGroupId="g",
                                 MessageDeduplicationId="d1")
    second = sqs.send_message(QueueUrl=url, MessageBody="two", MessageGroupId="g",
                              MessageDeduplicationId="d2")
    assert duplicate["MessageId"] == first["MessageId"]
    assert second["MessageId"] != first["MessageId"]
    assert first["SequenceNumber"].isdigit() and second["SequenceNumber"].isdigit()
    assert int(second["SequenceNumber"]) > int(first["SequenceNumber"])
    got = receive(sqs, url)
    assert [m["Body"] for m in got] == ["one", "two"]
    assert counts(sqs, url) == (0, 2, 0)

    url = create(sqs, "content.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    first = sqs.send_message(QueueUrl=url, MessageBody="same", MessageGroupId="g")
    again = sqs.send_message(QueueUrl=url, MessageBody="same", MessageGroupId="g")
    other = sqs.send_message(QueueUrl=url, MessageBody="different", MessageGroupId="g")
    assert again["MessageId"] == first["MessageId"]
    assert other["MessageId"] != first["MessageId"]
    assert counts(sqs, url) == (2, 0, 0)


# --- SendMessageBatch -------------------------------------------------------------------------


def test_send_message_batch(sqs: Any) -> None:
    url = create(sqs, "batch")
    attributes = {"k": {"DataType": "String", "StringValue": "v"}}
    response = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": "ok-1", "MessageBody": "first", "MessageAttributes": attributes},
        {"Id": "bad_chars", "MessageBody": "nul \x00"},
        {"Id": "delayed", "MessageBody": "later", "DelaySeconds": 60},
        {"Id": "bad_delay", "MessageBody": "x", "DelaySeconds": 901},
        {"Id": "ok-2", "MessageBody": "second"},
        {"Id": "bad_attribute", "MessageBody": "x",
         "MessageAttributes": {"AWS.reserved": {"DataType": "String", "StringValue": "v"}}},
    ])
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    successful = {e["Id"]: e for e in response["Successful"]}
    failed = {e["Id"]: e for e in response["Failed"]}
    assert set(successful) == {"ok-1", "delayed", "ok-2"}
    assert set(failed) == {"bad_chars", "bad_delay", "bad_attribute"}
    assert failed["bad_chars"]["Code"] == "InvalidMessageContents"
    assert failed["bad_delay"]["Code"] == "InvalidParameterValue"
    assert failed["bad_attribute"]["Code"] == "InvalidParameterValue"
    assert all(e["SenderFault"] is True for e in failed.values())
    assert successful["ok-1"]["MD5OfMessageBody"] == md5("first")
    assert successful["ok-1"]["MD5OfMessageAttributes"] == sqs_md5_of_attributes(attributes)
    assert successful["ok-2"]["MD5OfMessageBody"] == md5("second")
    assert "MD5OfMessageAttributes" not in successful["ok-2"]
    assert len({e["MessageId"] for e in successful.values()}) == 3
    assert counts(sqs, url) == (2, 0, 1)
    got = {m["MessageId"]: m["Body"] for m in receive(sqs, url)}
    assert got == {successful["ok-1"]["MessageId"]: "first",
                   successful["ok-2"]["MessageId"]: "second"}

    url = create(sqs, "batch.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    response = sqs.send_message_batch(QueueUrl=url, Entries=[
        *({"Id": f"m{i}", "MessageBody": f"body {i}", "MessageGroupId": "g"} for i in range(5)),
        {"Id": "no_group", "MessageBody": "lost"}])
    [no_group] = response["Failed"]
    assert (no_group["Id"], no_group["Code"]) == ("no_group", "MissingParameter")
    numbers = [int(e["SequenceNumber"]) for e in response["Successful"]]
    assert numbers == sorted(numbers) and len(set(numbers)) == 5
    assert [m["Body"] for m in receive(sqs, url)] == [f"body {i}" for i in range(5)]


def test_send_message_batch_request_errors(sqs: Any) -> None:
    url = create(sqs, "batch")
    entry = {"MessageBody": "b"}
    refused(sqs.send_message_batch, TOO_MANY_ENTRIES, shape="TooManyEntriesInBatchRequest",
            QueueUrl=url, Entries=[{"Id": f"e{i}", **entry} for i in range(11)])
    refused(sqs.send_message_batch, IDS_NOT_DISTINCT, shape="BatchEntryIdsNotDistinct",
            QueueUrl=url, Entries=[{"Id": "same", **entry}, {"Id": "same", **entry}])
    refused(sqs.send_message_batch, EMPTY_BATCH, shape="EmptyBatchRequest",
            QueueUrl=url, Entries=[])
    for bad in ["has space", "dot.ted", "x" * 81, "ünï"]:
        refused(sqs.send_message_batch, INVALID_ENTRY_ID, shape="InvalidBatchEntryId",
                QueueUrl=url, Entries=[{"Id": "fine", **entry}, {"Id": bad, **entry}])
    refused(sqs.send_message_batch, BATCH_TOO_LONG, shape="BatchRequestTooLong",
            QueueUrl=url, Entries=[{"Id": "a", "MessageBody": "a" * (600 * 1024)},
                                   {"Id": "b", "MessageBody": "b" * (600 * 1024)}])
    # Ten entries at the limit together are fine.
    ten = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": f"e{i}", "MessageBody": "c" * (MIB // 10)} for i in range(10)])
    assert len(ten["Successful"]) == 10
    # Only the ten good ones got in; every refused batch sent nothing.
    assert counts(sqs, url) == (10, 0, 0)


def test_send_message_batch_total_counts_attributes(sqs: Any) -> None:
    # SQS's batch limit is the sum of the messages' sizes, attributes included.
    url = create(sqs, "batch")
    attributes = {"pad": {"DataType": "String", "StringValue": "p" * 1000}}
    refused(sqs.send_message_batch, BATCH_TOO_LONG, shape="BatchRequestTooLong",
            QueueUrl=url, Entries=[
                {"Id": "a", "MessageBody": "a" * (MIB // 2), "MessageAttributes": attributes},
                {"Id": "b", "MessageBody": "b" * (MIB // 2), "MessageAttributes": attributes},
            ])
    assert counts(sqs, url) == (0, 0, 0)


# --- ReceiveMessage ---------------------------------------------------------------------------


def test_receive_max_number_of_messages_and_refusals(sqs: Any, server: Any) -> None:
    url = create(sqs, "many")
    for start in (0, 10):
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": f"m{i}", "MessageBody": f"m{i}"} for i in range(start, start + 6)])
    assert len(receive(sqs, url, MaxNumberOfMessages=1)) == 1
    assert len(sqs.receive_message(QueueUrl=url).get("Messages", [])) == 1  # default 1
    assert len(receive(sqs, url, MaxNumberOfMessages=10)) == 10
    assert receive(sqs, url, MaxNumberOfMessages=10) == []
    for bad in (0, 11, -1):
        refused(sqs.receive_message, "InvalidParameterValue", QueueUrl=url,
                MaxNumberOfMessages=bad)
    refused(sqs.receive_message, "InvalidParameterValue", QueueUrl=url, WaitTimeSeconds=21)
    refused(sqs.receive_message, "InvalidParameterValue", QueueUrl=url,
            VisibilityTimeout=43201)

    refused(sqs.receive_message, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
            QueueUrl=f"{server.url}/{ACCOUNT}/absent")
    url = create(sqs, "errs")
    refused_4xx(sqs.receive_message, QueueUrl=url, MessageSystemAttributeNames=["Bogus"])


def test_receive_long_poll(sqs: Any, server: Any) -> None:
    url = create(sqs, "polled")
    sender = server.sqs()

    def send_later() -> None:
        time.sleep(0.5)
        sender.send_message(QueueUrl=url, MessageBody="arrived")

    thread = threading.Thread(target=send_later)
    started = time.monotonic()
    thread.start()
    try:
        got = receive(sqs, url, WaitTimeSeconds=10)
    finally:
        thread.join()
    elapsed = time.monotonic() - started
    assert [m["Body"] for m in got] == ["arrived"]
    assert 0.4 <= elapsed < 5

    url = create(sqs, "quiet")
    started = time.monotonic()
    assert receive(sqs, url, WaitTimeSeconds=1) == []
    assert 0.9 <= time.monotonic() - started < 4
    # The queue's ReceiveMessageWaitTimeSeconds is the default wait.
    waiting = create(sqs, "waiting", ReceiveMessageWaitTimeSeconds="1")
    started = time.monotonic()
    assert receive(sqs, waiting) == []
    assert 0.9 <= time.monotonic() - started < 4
    # WaitTimeSeconds=0 overrides it: a short poll (on a queue whose default wait would
    # show plainly, however slow the machine).
    patient = create(sqs, "patient", ReceiveMessageWaitTimeSeconds="20")
    started = time.monotonic()
    assert receive(sqs, patient, WaitTimeSeconds=0) == []
    assert time.monotonic() - started < 10


def test_long_poll_woken_by_released_messages(sqs: Any, server: Any) -> None:
    other = server.sqs()
    url = create(sqs, "woken")
    sqs.send_message(QueueUrl=url, MessageBody="held")
    [held] = receive(sqs, url)
    thread = in_background(0.4, other.change_message_visibility, QueueUrl=url,
                           ReceiptHandle=held["ReceiptHandle"], VisibilityTimeout=0)
    started = time.monotonic()
    got = receive(sqs, url, WaitTimeSeconds=20)
    thread.join()
    assert [m["Body"] for m in got] == ["held"]
    assert time.monotonic() - started < 10  # woken, not run out

    # Deleting the message in flight frees its FIFO group for a waiting receive.
    fifo = create(sqs, "woken.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    for body in ("a1", "a2"):
        sqs.send_message(QueueUrl=fifo, MessageBody=body, MessageGroupId="a")
    [first] = receive(sqs, fifo, MaxNumberOfMessages=1)
    thread = in_background(0.4, other.delete_message, QueueUrl=fifo,
                           ReceiptHandle=first["ReceiptHandle"])
    started = time.monotonic()
    got = receive(sqs, fifo, WaitTimeSeconds=20)
    thread.join()
    assert [m["Body"] for m in got] == ["a2"]
    assert time.monotonic() - started < 10


def test_receive_visibility_timeout_override(sqs: Any) -> None:
    url = create(sqs, "override")  # the queue's own visibility is 30 s
    sent = sqs.send_message(QueueUrl=url, MessageBody="again")
    [first] = receive(sqs, url, VisibilityTimeout=1)
    assert receive(sqs, url) == []
    time.sleep(1.2)
    [second] = receive(sqs, url, AttributeNames=["ApproximateReceiveCount"])
    assert first["MessageId"] == second["MessageId"] == sent["MessageId"]
    assert second["Attributes"] == {"ApproximateReceiveCount": "2"}
    # Visibility 0 leaves the message receivable at once.
    sqs.delete_message(QueueUrl=url, ReceiptHandle=second["ReceiptHandle"])
    sqs.send_message(QueueUrl=url, MessageBody="zero")
    [a] = receive(sqs, url, VisibilityTimeout=0)
    [b] = receive(sqs, url, VisibilityTimeout=0)
    assert a["MessageId"] == b["MessageId"]
    assert a["Body"] == "zero"


def test_receive_system_attributes(sqs: Any) -> None:
    url = create(sqs, "system")
    before = time.time_ns() // 1_000_000
    sqs.send_message(QueueUrl=url, MessageBody="meta")
    after = time.time_ns() // 1_000_000
    [first] = receive(sqs, url, AttributeNames=["All"], VisibilityTimeout=0)
    received_by = time.time_ns() // 1_000_000
    attributes = first["Attributes"]
    assert {"SentTimestamp", "ApproximateReceiveCount", "ApproximateFirstReceiveTimestamp",
            "SenderId"} <= set(attributes)
    # FIFO-only attributes are absent on a standard queue.
    assert not {"MessageGroupId", "SequenceNumber", "MessageDeduplicationId"} & set(attributes)
    sent_at = int(attributes["SentTimestamp"])
    assert before - 5 <= sent_at <= after + 5
    first_received = int(attributes["ApproximateFirstReceiveTimestamp"])
    assert sent_at <= first_received <= received_by + 5
    assert attributes["ApproximateReceiveCount"] == "1"
    assert attributes["SenderId"] == ACCOUNT

    [second] = receive(sqs, url, MessageSystemAttributeNames=[
        "ApproximateReceiveCount", "ApproximateFirstReceiveTimestamp"], VisibilityTimeout=0)
    assert second["Attributes"] == {
        "ApproximateReceiveCount": "2",
        "ApproximateFirstReceiveTimestamp": str(first_received)}
    [third] = receive(sqs, url, AttributeNames=["SentTimestamp"])
    assert third["Attributes"] == {"SentTimestamp": str(sent_at)}
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=third["ReceiptHandle"],
                                  VisibilityTimeout=0)
    [bare] = receive(sqs, url)
    assert "Attributes" not in bare

    url = create(sqs, "attrs.fifo", FifoQueue="true")
    sent = sqs.send_message(QueueUrl=url, MessageBody="f", MessageGroupId="group-1",
                            MessageDeduplicationId="dedup-1")
    [message] = receive(sqs, url, MessageSystemAttributeNames=["All"])
    attributes = message["Attributes"]
    assert attributes["MessageGroupId"] == "group-1"
    assert attributes["MessageDeduplicationId"] == "dedup-1"
    assert attributes["SequenceNumber"] == sent["SequenceNumber"]
    assert attributes["ApproximateReceiveCount"] == "1"
    assert {"SentTimestamp", "ApproximateFirstReceiveTimestamp", "SenderId"} <= set(attributes)


def test_receive_message_attribute_name_filters(sqs: Any) -> None:
    url = create(sqs, "filtered", VisibilityTimeout="0")
    attributes = {
        "color": {"DataType": "String", "StringValue": "red"},
        "colour": {"DataType": "String", "StringValue": "rouge"},
        "size": {"DataType": "Number", "StringValue": "10"},
        "shape.x": {"DataType": "Number", "StringValue": "1"},
        "shape.y": {"DataType": "Binary", "BinaryValue": b"\x00\xff"},
    }
    sqs.send_message(QueueUrl=url, MessageBody="filter me", MessageAttributes=attributes)

    def returned(names: list[str] | None) -> dict[str, Any]:
        kwargs = {} if names is None else {"MessageAttributeNames": names}
        [message] = receive(sqs, url, **kwargs)
        got = message.get("MessageAttributes", {})
        if got:
            # The digest covers exactly the attributes returned.
            assert message["MD5OfMessageAttributes"] == sqs_md5_of_attributes(got)
        else:
            assert "MD5OfMessageAttributes" not in message
        return dict(got)

    assert returned(None) == {}
    assert returned(["All"]) == attributes
    assert returned([".*"]) == attributes
    assert returned(["shape.*"]) == {k: attributes[k] for k in ("shape.x", "shape.y")}
    assert returned(["color"]) == {"color": attributes["color"]}
    assert returned(["color", "size"]) == {k: attributes[k] for k in ("color", "size")}
    assert returned(["nope", "size"]) == {"size": attributes["size"]}
    assert returned(["nope"]) == {}
    assert returned(["shape.*", "colour"]) == {
        k: attributes[k] for k in ("shape.x", "shape.y", "colour")}


def test_receive_fifo(sqs: Any) -> None:
    url = create(sqs, "retry.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}", MessageGroupId="g")
    attempted = receive(sqs, url, ReceiveRequestAttemptId="attempt-1")
    assert [m["Body"] for m in attempted] == ["m0", "m1", "m2"]
    retried = receive(sqs, url, ReceiveRequestAttemptId="attempt-1")
    assert [(m["MessageId"], m["ReceiptHandle"]) for m in retried] == [
        (m["MessageId"], m["ReceiptHandle"]) for m in attempted]
    # A new attempt finds the group in flight.
    assert receive(sqs, url, ReceiveRequestAttemptId="attempt-2") == []
    # The retried receive's handles are the live ones.
    for message in retried:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert counts(sqs, url) == (0, 0, 0)

    url = create(sqs, "groups.fifo", FifoQueue="true", ContentBasedDeduplication="true")
    for group, body in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2")]:
        sqs.send_message(QueueUrl=url, MessageBody=body, MessageGroupId=group)
    [first] = receive(sqs, url, MaxNumberOfMessages=1)
    assert first["Body"] == "a1"
    # Group a is locked while a1 is in flight; b still flows.
    rest = receive(sqs, url)
    assert [m["Body"] for m in rest] == ["b1", "b2"]
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
    assert [m["Body"] for m in receive(sqs, url)] == ["a2"]


# --- DeleteMessage, DeleteMessageBatch --------------------------------------------------------


def test_delete_message(sqs: Any, server: Any) -> None:
    url = create(sqs, "deletes")
    other = create(sqs, "elsewhere")
    sqs.send_message(QueueUrl=url, MessageBody="target")
    sqs.send_message(QueueUrl=other, MessageBody="other")
    [stale] = receive(sqs, url, VisibilityTimeout=0)
    [current] = receive(sqs, url)
    assert stale["MessageId"] == current["MessageId"]
    assert stale["ReceiptHandle"] != current["ReceiptHandle"]
    [foreign] = receive(sqs, other)

    handle = current["ReceiptHandle"]
    middle = len(handle) // 2
    tampered = handle[:middle] + ("A" if handle[middle] != "A" else "B") + handle[middle + 1:]
    for bad in ["forged", "x" * len(handle), tampered, stale["ReceiptHandle"],
                foreign["ReceiptHandle"]]:
        refused(sqs.delete_message, "ReceiptHandleIsInvalid", shape="ReceiptHandleIsInvalid",
                QueueUrl=url, ReceiptHandle=bad)
    # The refusals left the message in flight.
    assert counts(sqs, url) == (0, 1, 0)

    sqs.delete_message(QueueUrl=url, ReceiptHandle=handle)
    # Deleting again with the same handle succeeds: deletes are idempotent.
    again = sqs.delete_message(QueueUrl=url, ReceiptHandle=handle)
    assert again["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert counts(sqs, url) == (0, 0, 0)
    assert counts(sqs, other) == (0, 1, 0)

    refused(sqs.delete_message, "MissingParameter", QueueUrl=url, ReceiptHandle="")
    refused(sqs.delete_message, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
            QueueUrl=f"{server.url}/{ACCOUNT}/absent", ReceiptHandle="whatever")


def test_delete_message_batch(sqs: Any) -> None:
    url = create(sqs, "batch-delete")
    sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": f"m{i}", "MessageBody": f"m{i}"} for i in range(3)])
    [stale] = receive(sqs, url, MaxNumberOfMessages=1, VisibilityTimeout=0)
    messages = receive(sqs, url)
    assert len(messages) == 3
    response = sqs.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": "good-0", "ReceiptHandle": messages[0]["ReceiptHandle"]},
        {"Id": "forged", "ReceiptHandle": "not-a-receipt-handle"},
        {"Id": "good-1", "ReceiptHandle": messages[1]["ReceiptHandle"]},
        {"Id": "stale", "ReceiptHandle": stale["ReceiptHandle"]},
    ])
    assert sorted(e["Id"] for e in response["Successful"]) == ["good-0", "good-1"]
    failed = {e["Id"]: e for e in response["Failed"]}
    assert set(failed) == {"forged", "stale"}
    for entry in failed.values():
        assert entry["Code"] == "ReceiptHandleIsInvalid"
        assert entry["SenderFault"] is True
    assert counts(sqs, url) == (0, 1, 0)

    refused(sqs.delete_message_batch, TOO_MANY_ENTRIES, shape="TooManyEntriesInBatchRequest",
            QueueUrl=url, Entries=[{"Id": f"e{i}", "ReceiptHandle": "h"} for i in range(11)])
    refused(sqs.delete_message_batch, IDS_NOT_DISTINCT, shape="BatchEntryIdsNotDistinct",
            QueueUrl=url, Entries=[{"Id": "d", "ReceiptHandle": "h"},
                                   {"Id": "d", "ReceiptHandle": "h"}])
    refused(sqs.delete_message_batch, EMPTY_BATCH, shape="EmptyBatchRequest",
            QueueUrl=url, Entries=[])
    refused(sqs.delete_message_batch, INVALID_ENTRY_ID, shape="InvalidBatchEntryId",
            QueueUrl=url, Entries=[{"Id": "bad id", "ReceiptHandle": "h"}])


# --- ChangeMessageVisibility(Batch) -----------------------------------------------------------


def test_change_message_visibility(sqs: Any) -> None:
    url = create(sqs, "visibility")
    sqs.send_message(QueueUrl=url, MessageBody="v")
    [message] = receive(sqs, url)
    handle = message["ReceiptHandle"]
    refused(sqs.change_message_visibility, "InvalidParameterValue", QueueUrl=url,
            ReceiptHandle=handle, VisibilityTimeout=43201)
    refused(sqs.change_message_visibility, "InvalidParameterValue", QueueUrl=url,
            ReceiptHandle=handle, VisibilityTimeout=-1)
    refused(sqs.change_message_visibility, "ReceiptHandleIsInvalid",
            shape="ReceiptHandleIsInvalid", QueueUrl=url, ReceiptHandle="forged",
            VisibilityTimeout=5)
    assert counts(sqs, url) == (0, 1, 0)
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=3600)
    assert receive(sqs, url) == []
    # 0 releases the message at once.
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=0)
    assert counts(sqs, url) == (1, 0, 0)
    # Now the message is not in flight: its (still current) handle cannot change it.
    refused(sqs.change_message_visibility, NOT_INFLIGHT, shape="MessageNotInflight",
            QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=10)
    [again] = receive(sqs, url, AttributeNames=["ApproximateReceiveCount"])
    assert again["MessageId"] == message["MessageId"]
    assert again["Attributes"]["ApproximateReceiveCount"] == "2"
    # The first lease's handle is stale now.
    refused(sqs.change_message_visibility, "ReceiptHandleIsInvalid",
            shape="ReceiptHandleIsInvalid", QueueUrl=url, ReceiptHandle=handle,
            VisibilityTimeout=10)


def test_change_message_visibility_batch(sqs: Any) -> None:
    url = create(sqs, "visibility-batch")
    sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": f"m{i}", "MessageBody": f"m{i}"} for i in range(3)])
    messages = {m["Body"]: m for m in receive(sqs, url)}
    assert set(messages) == {"m0", "m1", "m2"}
    response = sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
        {"Id": "release", "ReceiptHandle": messages["m0"]["ReceiptHandle"],
         "VisibilityTimeout": 0},
        {"Id": "forged", "ReceiptHandle": "forged-handle", "VisibilityTimeout": 0},
        {"Id": "too_long", "ReceiptHandle": messages["m1"]["ReceiptHandle"],
         "VisibilityTimeout": 43201},
        {"Id": "extend", "ReceiptHandle": messages["m2"]["ReceiptHandle"],
         "VisibilityTimeout": 600},
    ])
    assert sorted(e["Id"] for e in response["Successful"]) == ["extend", "release"]
    failed = {e["Id"]: e for e in response["Failed"]}
    assert failed["forged"]["Code"] == "ReceiptHandleIsInvalid"
    assert failed["too_long"]["Code"] == "InvalidParameterValue"
    assert all(e["SenderFault"] is True for e in failed.values())
    assert [m["Body"] for m in receive(sqs, url)] == ["m0"]

    refused(sqs.change_message_visibility_batch, TOO_MANY_ENTRIES,
            shape="TooManyEntriesInBatchRequest", QueueUrl=url, Entries=[
                {"Id": f"e{i}", "ReceiptHandle": "h", "VisibilityTimeout": 0}
                for i in range(11)])
    refused(sqs.change_message_visibility_batch, IDS_NOT_DISTINCT,
            shape="BatchEntryIdsNotDistinct", QueueUrl=url, Entries=[
                {"Id": "d", "ReceiptHandle": "h", "VisibilityTimeout": 0},
                {"Id": "d", "ReceiptHandle": "h", "VisibilityTimeout": 0}])
    refused(sqs.change_message_visibility_batch, EMPTY_BATCH, shape="EmptyBatchRequest",
            QueueUrl=url, Entries=[])
    refused(sqs.change_message_visibility_batch, INVALID_ENTRY_ID,
            shape="InvalidBatchEntryId", QueueUrl=url,
            Entries=[{"Id": "no/slash", "ReceiptHandle": "h", "VisibilityTimeout": 0}])


# --- PurgeQueue -------------------------------------------------------------------------------


def test_purge_queue(sqs: Any, server: Any) -> None:
    url = create(sqs, "purged")
    untouched = create(sqs, "untouched")
    sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": f"m{i}", "MessageBody": f"m{i}"} for i in range(3)])
    sqs.send_message(QueueUrl=url, MessageBody="delayed", DelaySeconds=30)
    sqs.send_message(QueueUrl=untouched, MessageBody="kept")
    receive(sqs, url, MaxNumberOfMessages=1)
    assert counts(sqs, url) == (2, 1, 1)
    sqs.purge_queue(QueueUrl=url)
    assert counts(sqs, url) == (0, 0, 0)
    assert receive(sqs, url) == []
    refused(sqs.purge_queue, PURGE_IN_PROGRESS, shape="PurgeQueueInProgress", status=403,
            QueueUrl=url)
    # Another queue has its own purge interval, and messages sent after a purge stay.
    sqs.purge_queue(QueueUrl=untouched)
    assert counts(sqs, untouched) == (0, 0, 0)
    sqs.send_message(QueueUrl=url, MessageBody="after")
    assert [m["Body"] for m in receive(sqs, url)] == ["after"]
    refused(sqs.purge_queue, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
            QueueUrl=f"{server.url}/{ACCOUNT}/absent")


# --- tags -------------------------------------------------------------------------------------


def test_tag_untag_list_queue_tags(sqs: Any, server: Any) -> None:
    url = create(sqs, "tagged")
    assert sqs.list_queue_tags(QueueUrl=url).get("Tags", {}) == {}
    sqs.tag_queue(QueueUrl=url, Tags={"a": "1", "b": "2"})
    sqs.tag_queue(QueueUrl=url, Tags={"b": "two", "c": ""})
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"a": "1", "b": "two", "c": ""}
    sqs.untag_queue(QueueUrl=url, TagKeys=["a", "not-there"])
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"b": "two", "c": ""}
    sqs.untag_queue(QueueUrl=url, TagKeys=["b", "c"])
    assert sqs.list_queue_tags(QueueUrl=url).get("Tags", {}) == {}

    refused(sqs.tag_queue, "InvalidParameterValue", QueueUrl=url, Tags={"k" * 129: "v"})
    refused(sqs.tag_queue, "InvalidParameterValue", QueueUrl=url, Tags={"k": "v" * 257})
    refused(sqs.tag_queue, "InvalidParameterValue", QueueUrl=url,
            Tags={f"t{i}": "v" for i in range(51)})
    assert sqs.list_queue_tags(QueueUrl=url).get("Tags", {}) == {}
    absent = f"{server.url}/{ACCOUNT}/absent"
    refused(sqs.tag_queue, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist", QueueUrl=absent,
            Tags={"a": "1"})
    refused(sqs.untag_queue, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist", QueueUrl=absent,
            TagKeys=["a"])
    refused(sqs.list_queue_tags, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
            QueueUrl=absent)


# --- dead-letter queues -----------------------------------------------------------------------


def test_list_dead_letter_source_queues_and_redrive_policy(sqs: Any, server: Any) -> None:
    dlq = create(sqs, "dlq")
    sources = sorted(create(sqs, f"src-{c}", RedrivePolicy=redrive("dlq", 5)) for c in "abc")
    create(sqs, "unrelated")
    assert sorted(sqs.list_dead_letter_source_queues(QueueUrl=dlq)["queueUrls"]) == sources
    first = sqs.list_dead_letter_source_queues(QueueUrl=dlq, MaxResults=2)
    assert len(first["queueUrls"]) == 2
    assert first["NextToken"]
    second = sqs.list_dead_letter_source_queues(QueueUrl=dlq, MaxResults=2,
                                                NextToken=first["NextToken"])
    assert len(second["queueUrls"]) == 1
    assert "NextToken" not in second
    assert sorted(first["queueUrls"] + second["queueUrls"]) == sources
    # A queue nobody dead-letters into has no sources.
    assert sqs.list_dead_letter_source_queues(QueueUrl=sources[0]).get("queueUrls", []) == []
    refused(sqs.list_dead_letter_source_queues, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist",
            QueueUrl=f"{server.url}/{ACCOUNT}/absent")

    url = create(sqs, "source", RedrivePolicy=redrive("dlq", 3))
    policy = json.loads(attrs(sqs, url, "RedrivePolicy")["RedrivePolicy"])
    assert policy == {"deadLetterTargetArn": arn("dlq"), "maxReceiveCount": 3}
    assert json.loads(attrs(sqs, url)["RedrivePolicy"]) == policy


def test_dead_letter_after_max_receive_count(sqs: Any) -> None:
    dlq = create(sqs, "dlq")
    source = create(sqs, "source", VisibilityTimeout="1", RedrivePolicy=redrive("dlq", 1))
    attributes = {"origin": {"DataType": "String", "StringValue": "source"}}
    sent = sqs.send_message(QueueUrl=source, MessageBody="poison",
                            MessageAttributes=attributes)
    [first] = receive(sqs, source)
    assert first["MessageId"] == sent["MessageId"]
    time.sleep(1.2)
    # The second attempt finds the message at its maxReceiveCount: it moves, unseen.
    assert receive(sqs, source) == []
    assert counts(sqs, source) == (0, 0, 0)
    [dead] = receive(sqs, dlq, MessageAttributeNames=["All"], AttributeNames=["All"])
    assert dead["MessageId"] == sent["MessageId"]
    assert dead["Body"] == "poison"
    assert dead["MD5OfBody"] == md5("poison")
    assert dead["MessageAttributes"] == attributes
    assert dead["Attributes"].get("DeadLetterQueueSourceArn") == arn("source")


def test_message_move_tasks(sqs: Any) -> None:
    dlq = create(sqs, "dlq")
    source = create(sqs, "source", RedrivePolicy=redrive("dlq", 1))
    bodies = {f"moved-{i}" for i in range(3)}
    for body in bodies:
        sqs.send_message(QueueUrl=source, MessageBody=body)
    dead_letter_all(sqs, source)
    assert counts(sqs, dlq) == (3, 0, 0)

    handle = sqs.start_message_move_task(SourceArn=arn("dlq"))["TaskHandle"]
    assert handle
    task = wait_for_task(sqs, arn("dlq"), "COMPLETED")
    assert task["ApproximateNumberOfMessagesMoved"] == 3
    assert task["ApproximateNumberOfMessagesToMove"] == 3
    assert task["SourceArn"] == arn("dlq")
    assert "TaskHandle" not in task  # only running tasks have one
    assert counts(sqs, dlq) == (0, 0, 0)
    assert {m["Body"] for m in receive(sqs, source)} == bodies

    # A finished task cannot be cancelled; an unknown one does not exist.
    refused_4xx(sqs.cancel_message_move_task, TaskHandle=handle)
    refused(sqs.cancel_message_move_task, "ResourceNotFoundException",
            shape="ResourceNotFoundException", status=404, TaskHandle="no-such-task")

    # To a DestinationArn instead of the original queue.
    create(sqs, "dlq2")
    source = create(sqs, "source2", RedrivePolicy=redrive("dlq2", 1))
    elsewhere = create(sqs, "elsewhere")
    sqs.send_message(QueueUrl=source, MessageBody="redirected")
    dead_letter_all(sqs, source)
    sqs.start_message_move_task(SourceArn=arn("dlq2"), DestinationArn=arn("elsewhere"),
                                MaxNumberOfMessagesPerSecond=100)
    task = wait_for_task(sqs, arn("dlq2"), "COMPLETED")
    assert task["DestinationArn"] == arn("elsewhere")
    assert task["MaxNumberOfMessagesPerSecond"] == 100
    assert task["ApproximateNumberOfMessagesMoved"] == 1
    assert [m["Body"] for m in receive(sqs, elsewhere)] == ["redirected"]
    assert counts(sqs, source) == (0, 0, 0)

    create(sqs, "dlq3")
    create(sqs, "source3", RedrivePolicy=redrive("dlq3", 3))
    # Not a dead-letter queue of any queue.
    refused(sqs.start_message_move_task, "InvalidParameterValue", SourceArn=arn("source3"))
    refused(sqs.start_message_move_task, "InvalidParameterValue", SourceArn="not-an-arn")
    refused(sqs.start_message_move_task, "InvalidParameterValue", SourceArn=arn("dlq3"),
            MaxNumberOfMessagesPerSecond=501)
    error = refused_4xx(sqs.start_message_move_task, SourceArn=arn("absent"))
    assert error["Code"] in (NON_EXISTENT_QUEUE, "ResourceNotFoundException")
    refused(sqs.cancel_message_move_task, "ResourceNotFoundException",
            shape="ResourceNotFoundException", status=404, TaskHandle="bm8tc3VjaC10YXNr")
    assert sqs.list_message_move_tasks(SourceArn=arn("dlq3"))["Results"] == []
    refused(sqs.list_message_move_tasks, "InvalidParameterValue", SourceArn=arn("dlq3"),
            MaxResults=11)


def test_message_move_task_cancel_while_running(sqs: Any) -> None:
    dlq = create(sqs, "dlq")
    source = create(sqs, "source", RedrivePolicy=redrive("dlq", 1))
    sqs.send_message_batch(QueueUrl=source, Entries=[
        {"Id": f"m{i}", "MessageBody": f"m{i}"} for i in range(10)])
    sqs.send_message_batch(QueueUrl=source, Entries=[
        {"Id": f"m{i}", "MessageBody": f"m{i}"} for i in range(10, 12)])
    dead_letter_all(sqs, source)
    assert counts(sqs, dlq) == (12, 0, 0)
    # One message a second: the first batch of ten moves, then the task waits.
    handle = sqs.start_message_move_task(SourceArn=arn("dlq"),
                                         MaxNumberOfMessagesPerSecond=1)["TaskHandle"]
    deadline = time.monotonic() + 10
    while True:
        [task] = sqs.list_message_move_tasks(SourceArn=arn("dlq"))["Results"]
        if task["ApproximateNumberOfMessagesMoved"] >= 10:
            break
        assert time.monotonic() < deadline, task
        time.sleep(0.05)
    assert task["Status"] == "RUNNING"
    assert task["TaskHandle"] == handle
    # One task at a time per dead-letter queue.
    refused(sqs.start_message_move_task, "InvalidParameterValue", SourceArn=arn("dlq"))
    cancelled = sqs.cancel_message_move_task(TaskHandle=handle)
    assert cancelled["ApproximateNumberOfMessagesMoved"] == 10
    [task] = sqs.list_message_move_tasks(SourceArn=arn("dlq"), MaxResults=10)["Results"]
    assert task["Status"] == "CANCELLED"
    assert counts(sqs, dlq) == (2, 0, 0)
    assert counts(sqs, source) == (10, 0, 0)


def test_receive_after_the_dead_letter_queue_is_deleted(sqs: Any, server: Any) -> None:
    dlq = create(sqs, "dlq")
    source = create(sqs, "source", RedrivePolicy=redrive("dlq", 1))
    sqs.send_message(QueueUrl=source, MessageBody="stranded")
    assert len(receive(sqs, source, VisibilityTimeout=0)) == 1
    sqs.delete_queue(QueueUrl=dlq)
    # One attempt only: a retry after the timeout would hide a request that never ends.
    impatient = boto3.client(
        "sqs", endpoint_url=server.url, region_name=REGION, aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        config=Config(retries={"total_max_attempts": 1}, read_timeout=3))
    try:
        receive(impatient, source, VisibilityTimeout=0)
    except ReadTimeoutError:
        pytest.fail("ReceiveMessage did not answer within 3 s once the queue's dead-letter "
                    "queue was deleted")
    # The message has nowhere to go, so it stays in its queue.
    visible, in_flight, _ = counts(sqs, source)
    assert visible + in_flight == 1


def test_message_move_task_from_a_fifo_dead_letter_queue(sqs: Any) -> None:
    dlq = create(sqs, "dlq.fifo", FifoQueue="true")
    source = create(sqs, "source.fifo", FifoQueue="true", ContentBasedDeduplication="true",
                    RedrivePolicy=redrive("dlq.fifo", 1))
    sqs.send_message(QueueUrl=source, MessageBody="fifo poison", MessageGroupId="g")
    dead_letter_all(sqs, source)
    assert counts(sqs, dlq) == (1, 0, 0)
    sqs.start_message_move_task(SourceArn=arn("dlq.fifo"))
    task = wait_for_task(sqs, arn("dlq.fifo"), "COMPLETED", "FAILED")
    assert counts(sqs, dlq) == (0, 0, 0)
    assert task["ApproximateNumberOfMessagesMoved"] == 1
    # Counted as moved, so it must be in the source queue again, not dropped as a
    # duplicate of its own first send.
    assert [m["Body"] for m in receive(sqs, source)] == ["fifo poison"]


def test_message_move_task_keeps_what_the_destination_refuses(sqs: Any) -> None:
    dlq = create(sqs, "dlq")
    source = create(sqs, "source", RedrivePolicy=redrive("dlq", 1))
    small = create(sqs, "small", MaximumMessageSize="1024")
    sqs.send_message(QueueUrl=source, MessageBody="x" * 2000)
    dead_letter_all(sqs, source)
    sqs.start_message_move_task(SourceArn=arn("dlq"), DestinationArn=arn("small"))
    task = wait_for_task(sqs, arn("dlq"), "COMPLETED", "FAILED")
    assert counts(sqs, small) == (0, 0, 0)
    # The destination refused the message: it must not be counted as moved, nor lost.
    assert task["ApproximateNumberOfMessagesMoved"] == 0, task
    visible, in_flight, _ = counts(sqs, dlq)
    assert visible + in_flight == 1


# --- DeleteQueue, unencodable names -----------------------------------------------------------


def test_delete_queue(sqs: Any) -> None:
    url = create(sqs, "doomed")
    kept = create(sqs, "kept")
    sqs.send_message(QueueUrl=url, MessageBody="lost")
    [old] = receive(sqs, url)
    sqs.delete_queue(QueueUrl=url)
    assert sqs.list_queues()["QueueUrls"] == [kept]
    absent: list[tuple[Callable[..., Any], dict[str, Any]]] = [
        (sqs.get_queue_url, {"QueueName": "doomed"}),
        (sqs.get_queue_attributes, {"QueueUrl": url, "AttributeNames": ["All"]}),
        (sqs.set_queue_attributes, {"QueueUrl": url, "Attributes": {"DelaySeconds": "1"}}),
        (sqs.send_message, {"QueueUrl": url, "MessageBody": "b"}),
        (sqs.send_message_batch, {"QueueUrl": url,
                                  "Entries": [{"Id": "a", "MessageBody": "b"}]}),
        (sqs.receive_message, {"QueueUrl": url}),
        (sqs.purge_queue, {"QueueUrl": url}),
        (sqs.list_queue_tags, {"QueueUrl": url}),
        (sqs.delete_queue, {"QueueUrl": url}),
    ]
    for call, kwargs in absent:
        refused(call, NON_EXISTENT_QUEUE, shape="QueueDoesNotExist", **kwargs)
    # The name is free again, for an empty queue.
    assert create(sqs, "doomed") == url
    assert counts(sqs, url) == (0, 0, 0)
    # A receipt from the deleted queue names nothing in the new one.
    sqs.send_message(QueueUrl=url, MessageBody="new")
    receive(sqs, url)
    refused(sqs.delete_message, "ReceiptHandleIsInvalid", shape="ReceiptHandleIsInvalid",
            QueueUrl=url, ReceiptHandle=old["ReceiptHandle"])
    assert counts(sqs, url) == (0, 1, 0)


def test_names_that_cannot_be_encoded_are_client_errors(sqs: Any, server: Any) -> None:
    # A lone surrogate arrives as a JSON escape; it can name no queue, so every such
    # request is the client's fault, never an internal error.
    create(sqs, "real")
    bad_url = f"{server.url}/{ACCOUNT}/bad\ud800"
    refused_4xx(sqs.create_queue, QueueName="bad\ud800")
    refused_4xx(sqs.get_queue_url, QueueName="bad\ud800")
    refused_4xx(sqs.get_queue_attributes, QueueUrl=bad_url, AttributeNames=["All"])
    refused_4xx(sqs.send_message, QueueUrl=bad_url, MessageBody="b")
    refused_4xx(sqs.delete_queue, QueueUrl=bad_url)
    refused_4xx(sqs.start_message_move_task, SourceArn=arn("bad\ud800"))
    never_5xx(sqs.list_queues, QueueNamePrefix="\ud800")
    assert len(sqs.list_queues()["QueueUrls"]) == 1


# --- the wire protocol ------------------------------------------------------------------------


JSON_HEADERS = {"Content-Type": "application/x-amz-json-1.0"}


def test_json_protocol_refusals(server: Any) -> None:
    status, headers, body = raw_post(server.url, b"{}",
                                     {**JSON_HEADERS, "X-Amz-Target": "AmazonSQS.Nope"})
    assert status == 400
    error = json.loads(body)
    assert error["__type"].endswith("#InvalidAction")
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered["x-amzn-query-error"].startswith("InvalidAction;")
    # A target outside the SQS prefix, and none at all.
    status, _, body = raw_post(server.url, b"{}",
                               {**JSON_HEADERS, "X-Amz-Target": "DynamoDB.ListTables"})
    assert status == 400 and json.loads(body)["__type"].endswith("#InvalidAction")
    status, _, body = raw_post(server.url, b"{}", JSON_HEADERS)
    assert status == 400 and json.loads(body)["__type"].endswith("#InvalidAction")

    for payload in [b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"', b"{}}", b"null"]:
        status, headers, body = raw_post(
            server.url, payload, {**JSON_HEADERS, "X-Amz-Target": "AmazonSQS.ListQueues"})
        assert status == 400, payload
        assert json.loads(body)["__type"].endswith("#MalformedQueryString"), (payload, body)
        assert "x-amzn-query-error" in {k.lower() for k in headers}, payload

    def call(action: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, _, body = raw_post(server.url, json.dumps(params).encode(),
                                   {**JSON_HEADERS, "X-Amz-Target": f"AmazonSQS.{action}"})
        return status, json.loads(body)

    status, created = call("CreateQueue", {"QueueName": "raw"})
    assert status == 200
    url = created["QueueUrl"]
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("CreateQueue", {}, "MissingParameter"),
        ("SendMessage", {"MessageBody": "b"}, "MissingParameter"),
        ("SendMessage", {"QueueUrl": url}, "MissingParameter"),
        ("SendMessage", {"QueueUrl": url, "MessageBody": 5}, "MissingParameter"),
        ("ReceiveMessage", {"QueueUrl": url, "MaxNumberOfMessages": "ten"},
         "InvalidParameterValue"),
        ("ReceiveMessage", {"QueueUrl": url, "MaxNumberOfMessages": True},
         "InvalidParameterValue"),
        ("SendMessageBatch", {"QueueUrl": url}, "MissingParameter"),
        ("SendMessageBatch", {"QueueUrl": url, "Entries": {"a": 1}}, "InvalidParameterValue"),
        ("SendMessageBatch", {"QueueUrl": url, "Entries": ["x"]}, "InvalidParameterValue"),
        ("SetQueueAttributes", {"QueueUrl": url}, "MissingParameter"),
        ("SetQueueAttributes", {"QueueUrl": url, "Attributes": ["x"]},
         "InvalidParameterValue"),
        ("TagQueue", {"QueueUrl": url}, "MissingParameter"),
        ("UntagQueue", {"QueueUrl": url}, "MissingParameter"),
        ("ChangeMessageVisibility", {"QueueUrl": url, "ReceiptHandle": "h"},
         "MissingParameter"),
        ("ListQueues", {"QueueNamePrefix": 5}, "InvalidParameterValue"),
        ("SendMessage", {"QueueUrl": url, "MessageBody": "b",
                         "MessageAttributes": {"a": {"DataType": "Binary",
                                                     "BinaryValue": "***"}}},
         "InvalidParameterValue"),
    ]
    for action, params, shape in cases:
        status, error = call(action, params)
        assert status == 400, (action, params, error)
        assert error["__type"].endswith("#" + shape), (action, params, error)


# --- persistence ------------------------------------------------------------------------------


def test_messages_and_receipts_survive_a_restart(server: Any, sqs: Any) -> None:
    url = create(sqs, "durable", VisibilityTimeout="120")
    fifo = create(sqs, "durable.fifo", FifoQueue="true")
    sqs.tag_queue(QueueUrl=url, Tags={"keep": "me"})
    attributes = {"n": {"DataType": "Number", "StringValue": "7"}}
    sent = [sqs.send_message(QueueUrl=url, MessageBody=f"m{i}", MessageAttributes=attributes)
            for i in range(3)]
    sqs.send_message(QueueUrl=url, MessageBody="delayed", DelaySeconds=600)
    first_fifo = sqs.send_message(QueueUrl=fifo, MessageBody="f", MessageGroupId="g",
                                  MessageDeduplicationId="once")
    [in_flight] = receive(sqs, url, MaxNumberOfMessages=1)
    assert counts(sqs, url) == (2, 1, 1)

    server.restart()
    client = server.sqs()

    assert sorted(client.list_queues()["QueueUrls"]) == sorted([url, fifo])
    assert counts(client, url) == (2, 1, 1)
    assert attrs(client, url, "VisibilityTimeout") == {"VisibilityTimeout": "120"}
    assert client.list_queue_tags(QueueUrl=url)["Tags"] == {"keep": "me"}
    rest = receive(client, url, MessageAttributeNames=["All"])
    assert {m["MessageId"] for m in rest} == (
        {s["MessageId"] for s in sent} - {in_flight["MessageId"]})
    assert all(m["MessageAttributes"] == attributes for m in rest)
    # The receipt handed out before the restart still names the live lease.
    client.change_message_visibility(QueueUrl=url, ReceiptHandle=in_flight["ReceiptHandle"],
                                     VisibilityTimeout=60)
    client.delete_message(QueueUrl=url, ReceiptHandle=in_flight["ReceiptHandle"])
    assert counts(client, url) == (0, 2, 1)
    # FIFO deduplication remembers sends from before the restart.
    again = client.send_message(QueueUrl=fifo, MessageBody="f", MessageGroupId="g",
                                MessageDeduplicationId="once")
    assert again["MessageId"] == first_fifo["MessageId"]
    assert counts(client, fifo) == (1, 0, 0)
    # Sequence numbers and message ids carry on from where they were.
    later = client.send_message(QueueUrl=fifo, MessageBody="g", MessageGroupId="g",
                                MessageDeduplicationId="twice")
    assert int(later["SequenceNumber"]) > int(first_fifo["SequenceNumber"])
    fresh = client.send_message(QueueUrl=url, MessageBody="fresh")["MessageId"]
    assert fresh not in {s["MessageId"] for s in sent}


def test_messages_and_receipts_survive_sigkill(server: Any, sqs: Any) -> None:
    url = create(sqs, "crashed")
    sent = [sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")["MessageId"] for i in range(5)]
    [in_flight] = receive(sqs, url, MaxNumberOfMessages=1, VisibilityTimeout=600)
    [deleted] = receive(sqs, url, MaxNumberOfMessages=1)
    sqs.delete_message(QueueUrl=url, ReceiptHandle=deleted["ReceiptHandle"])
    # fsync=always: everything acknowledged is on disk before the answer.
    server.kill()
    server.restart()
    client = server.sqs()
    assert counts(client, url)[:2] == (3, 1)
    rest = receive(client, url, VisibilityTimeout=0)
    assert {m["MessageId"] for m in rest} == (
        set(sent) - {in_flight["MessageId"], deleted["MessageId"]})
    client.delete_message(QueueUrl=url, ReceiptHandle=in_flight["ReceiptHandle"])
    assert counts(client, url) == (3, 0, 0)


def test_query_protocol(server: Any, sqs: Any) -> None:
    namespace = "{http://queue.amazonaws.com/doc/2012-11-05/}"

    def form(fields: dict[str, str]) -> tuple[int, ElementTree.Element]:
        status, _, body = raw_post(server.url, urllib.parse.urlencode(fields).encode(),
                                   {"Content-Type": "application/x-www-form-urlencoded"})
        return status, ElementTree.fromstring(body)

    def text(root: ElementTree.Element, path: str) -> str:
        found = root.find("/".join(namespace + part for part in path.split("/")))
        assert found is not None, (path, ElementTree.tostring(root))
        return found.text or ""

    url = create(sqs, "legacy")
    body = 'line\r\nbreak <&> "quoted"'
    attributes = {"k": {"DataType": "String", "StringValue": "v"}}
    status, sent = form({
        "Action": "SendMessage", "QueueUrl": url, "MessageBody": body,
        "MessageAttribute.1.Name": "k", "MessageAttribute.1.Value.DataType": "String",
        "MessageAttribute.1.Value.StringValue": "v"})
    assert status == 200
    assert text(sent, "SendMessageResult/MD5OfMessageBody") == md5(body)
    assert text(sent, "SendMessageResult/MD5OfMessageAttributes") == (
        sqs_md5_of_attributes(attributes))
    # The JSON protocol sees what the query protocol sent.
    [message] = receive(sqs, url, MessageAttributeNames=["All"], VisibilityTimeout=0)
    assert message["Body"] == body
    assert message["MessageAttributes"] == attributes
    status, received = form({"Action": "ReceiveMessage", "QueueUrl": url,
                             "MessageAttributeName.1": "All", "AttributeName.1": "All"})
    assert status == 200
    assert text(received, "ReceiveMessageResult/Message/Body") == body
    assert text(received, "ReceiveMessageResult/Message/MessageId") == message["MessageId"]

    status, error = form({"Action": "GetQueueUrl", "QueueName": "absent"})
    assert status == 400
    assert text(error, "Error/Code") == NON_EXISTENT_QUEUE
    assert text(error, "Error/Type") == "Sender"
    status, error = form({"Action": "Nope"})
    assert status == 400
    assert text(error, "Error/Code") == "InvalidAction"
