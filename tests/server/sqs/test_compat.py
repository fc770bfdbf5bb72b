"""Unmodified SQS clients against a real server: the AWS CLI, and a pre-JSON boto3.

The AWS CLI speaks SQS's JSON 1.0 protocol. boto3 1.28.0 with botocore 1.31.0 is the last
release pair that speaks the form/XML query protocol to SQS; many deployed SDKs still do,
so it runs here in a virtual environment of its own, built once under the git-ignored
.venv and reused by later runs.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import Server

REPO = Path(__file__).resolve().parents[3]
QUERY_VENV = REPO / ".venv" / "query-protocol-boto3"
# botocore 1.31.0 is pinned on its own: later 1.31.x releases already send JSON to SQS.
QUERY_PINS = ("boto3==1.28.0", "botocore==1.31.0")
AWS = Path(sys.executable).parent / "aws"


# --- the AWS CLI (JSON 1.0) ----------------------------------------------------------------


def aws_env(tmp_path: Path) -> dict[str, str]:
    # Nothing of the user's AWS setup (profiles, regions, real keys) may reach the CLI.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "dummy-secret",
        "AWS_CONFIG_FILE": str(tmp_path / "absent-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "absent-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    return env


def test_aws_cli_smoke(server: Server, tmp_path: Path) -> None:
    env = aws_env(tmp_path)

    def aws(*args: str) -> Any:
        done = subprocess.run(
            [str(AWS), "sqs", *args, "--endpoint-url", server.url, "--region", "us-east-1",
             "--output", "json"],
            capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, f"aws sqs {args[0]} failed: {done.stderr}"
        return json.loads(done.stdout) if done.stdout.strip() else None

    url = aws("create-queue", "--queue-name", "cli-q",
              "--attributes", "VisibilityTimeout=45")["QueueUrl"]
    assert url.endswith("/cli-q")
    body = "from the CLI: <&> é ☃"
    sent = aws("send-message", "--queue-url", url, "--message-body", body)
    assert sent["MessageId"]
    got = aws("receive-message", "--queue-url", url, "--wait-time-seconds", "1")
    [message] = got["Messages"]
    assert message["Body"] == body
    assert message["MessageId"] == sent["MessageId"]
    assert aws("delete-message", "--queue-url", url,
               "--receipt-handle", message["ReceiptHandle"]) is None
    attributes = aws("get-queue-attributes", "--queue-url", url,
                     "--attribute-names", "All")["Attributes"]
    assert attributes["VisibilityTimeout"] == "45"
    assert attributes["ApproximateNumberOfMessages"] == "0"
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert attributes["QueueArn"] == "arn:aws:sqs:us-east-1:000000000000:cli-q"
    assert url in aws("list-queues")["QueueUrls"]
    aws("delete-queue", "--queue-url", url)
    listed = aws("list-queues")
    assert url not in ((listed or {}).get("QueueUrls") or [])


# --- boto3 1.28 (query protocol) ------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once must not build it twice
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def query_python() -> Path | str:
    """The interpreter of the boto3 1.28 environment, built on first use; or why it
    could not be built, for the test to fail with (a missing client is no reason to skip).

    Module scope sets this up before the per-test fixture that clears proxy variables
    from the environment, so pip still reaches the index the way the machine is set up to.
    """
    python = QUERY_VENV / "bin" / "python"
    ready = QUERY_VENV / "ready"
    with _locked(QUERY_VENV.with_name(QUERY_VENV.name + ".lock")):
        if ready.exists() and ready.read_text() == "\n".join(QUERY_PINS):
            return python
        shutil.rmtree(QUERY_VENV, ignore_errors=True)  # a half-built one from a failed run
        made = subprocess.run([sys.executable, "-m", "venv", str(QUERY_VENV)],
                              capture_output=True, text=True, timeout=120)
        if made.returncode != 0:
            return f"python -m venv {QUERY_VENV} failed:\n{made.stderr[-3000:]}"
        try:
            done = subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--retries", "1", "--timeout", "30", *QUERY_PINS],
                capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return f"pip install {' '.join(QUERY_PINS)} timed out: is the index reachable?"
        if done.returncode != 0:
            return (f"pip install {' '.join(QUERY_PINS)} failed (is the index reachable?):\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        ready.write_text("\n".join(QUERY_PINS))
    return python


QUERY_CLIENT = textwrap.dedent('''
    import base64, json, sys, time
    import boto3, botocore
    from botocore.config import Config

    endpoint = sys.argv[1]
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                       config=Config(retries={"max_attempts": 1}))
    out = {"boto3": boto3.__version__, "botocore": botocore.__version__,
           "request_content_types": set(), "response_content_types": set()}

    def seen_request(request, **kwargs):
        content_type = request.headers.get("Content-Type", "")
        if isinstance(content_type, bytes):
            content_type = content_type.decode()
        out["request_content_types"].add(content_type)
    sqs.meta.events.register("before-send.sqs", seen_request)

    def call(name, **params):
        r = getattr(sqs, name)(**params)
        out["response_content_types"].add(r["ResponseMetadata"]["HTTPHeaders"]["content-type"])
        return r

    def error_of(name, **params):
        try:
            call(name, **params)
        except sqs.exceptions.QueueDoesNotExist as e:
            return {"class": "QueueDoesNotExist", "code": e.response["Error"]["Code"],
                    "status": e.response["ResponseMetadata"]["HTTPStatusCode"]}
        except botocore.exceptions.ClientError as e:
            return {"class": type(e).__name__, "code": e.response["Error"]["Code"],
                    "status": e.response["ResponseMetadata"]["HTTPStatusCode"]}
        return None

    url = call("create_queue", QueueName="compat-q",
               Attributes={"VisibilityTimeout": "20", "MaximumMessageSize": "262144"},
               tags={"team": "core", "env": "test"})["QueueUrl"]
    out["url"] = url
    other = call("create_queue", QueueName="unrelated-q")["QueueUrl"]
    out["created_attributes"] = call("get_queue_attributes", QueueUrl=url,
                                     AttributeNames=["All"])["Attributes"]
    out["created_tags"] = call("list_queue_tags", QueueUrl=url).get("Tags")

    body = sys.argv[2]
    binary = bytes(range(256))
    sent = call("send_message", QueueUrl=url, MessageBody=body, MessageAttributes={
        "text": {"DataType": "String", "StringValue": "a<b>&c\\r\\nd é"},
        "count": {"DataType": "Number", "StringValue": "-12.5e3"},
        "blob": {"DataType": "Binary", "BinaryValue": binary},
    })
    out["sent"] = {k: sent.get(k) for k in
                   ("MessageId", "MD5OfMessageBody", "MD5OfMessageAttributes")}
    got = call("receive_message", QueueUrl=url, AttributeNames=["All"],
               MessageAttributeNames=["All"], WaitTimeSeconds=2).get("Messages", [])
    out["received"] = [{
        "MessageId": m["MessageId"], "Body": m["Body"], "MD5OfBody": m["MD5OfBody"],
        "Attributes": m.get("Attributes", {}),
        "MD5OfMessageAttributes": m.get("MD5OfMessageAttributes"),
        "MessageAttributes": {
            k: ({"DataType": v["DataType"],
                 "BinaryValue": base64.b64encode(v["BinaryValue"]).decode()}
                if "BinaryValue" in v else v)
            for k, v in m.get("MessageAttributes", {}).items()},
    } for m in got]
    out["binary_b64"] = base64.b64encode(binary).decode()

    # ChangeMessageVisibility to 0 makes the message receivable again at once.
    if got:
        call("change_message_visibility", QueueUrl=url, ReceiptHandle=got[0]["ReceiptHandle"],
             VisibilityTimeout=0)
        again = call("receive_message", QueueUrl=url, AttributeNames=["All"],
                     WaitTimeSeconds=2).get("Messages", [])
        out["after_visibility_change"] = [
            {"MessageId": m["MessageId"], "Body": m["Body"],
             "ApproximateReceiveCount": m["Attributes"]["ApproximateReceiveCount"]}
            for m in again]
        for m in again:
            call("delete_message", QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])

    batch = call("send_message_batch", QueueUrl=url, Entries=[
        {"Id": "ok1", "MessageBody": "batch one"},
        {"Id": "bad", "MessageBody": "not allowed: \\u0000"},
        {"Id": "ok2", "MessageBody": "batch two", "DelaySeconds": 0},
    ])
    out["batch_successful"] = sorted(e["Id"] for e in batch.get("Successful", []))
    out["batch_failed"] = [{k: e.get(k) for k in ("Id", "Code", "SenderFault")}
                           for e in batch.get("Failed", [])]
    handles, bodies = [], []
    deadline = time.monotonic() + 10
    while len(handles) < 2 and time.monotonic() < deadline:
        for m in call("receive_message", QueueUrl=url, MaxNumberOfMessages=10,
                      WaitTimeSeconds=1).get("Messages", []):
            handles.append(m["ReceiptHandle"])
            bodies.append(m["Body"])
    out["batch_bodies"] = sorted(bodies)
    deleted = call("delete_message_batch", QueueUrl=url, Entries=[
        *({"Id": f"d{i}", "ReceiptHandle": h} for i, h in enumerate(handles)),
        {"Id": "garbage", "ReceiptHandle": "not-a-receipt-handle"},
    ])
    out["delete_successful"] = sorted(e["Id"] for e in deleted.get("Successful", []))
    out["delete_failed"] = [{k: e.get(k) for k in ("Id", "Code")}
                            for e in deleted.get("Failed", [])]

    call("set_queue_attributes", QueueUrl=url,
         Attributes={"VisibilityTimeout": "7", "DelaySeconds": "1"})
    out["set_attributes"] = call("get_queue_attributes", QueueUrl=url,
                                 AttributeNames=["VisibilityTimeout", "DelaySeconds"]
                                 )["Attributes"]
    out["listed_prefix"] = call("list_queues", QueueNamePrefix="compat-").get("QueueUrls", [])
    out["listed_all"] = call("list_queues").get("QueueUrls", [])
    out["other_url"] = other

    call("tag_queue", QueueUrl=url, Tags={"added": "yes", "team": "platform"})
    call("untag_queue", QueueUrl=url, TagKeys=["env"])
    out["tags_after"] = call("list_queue_tags", QueueUrl=url).get("Tags")

    for i in range(3):
        call("send_message", QueueUrl=url, MessageBody=f"to purge {i}", DelaySeconds=0)
    out["before_purge"] = call("get_queue_attributes", QueueUrl=url,
                               AttributeNames=["ApproximateNumberOfMessages"]
                               )["Attributes"]["ApproximateNumberOfMessages"]
    call("purge_queue", QueueUrl=url)
    out["after_purge"] = call("get_queue_attributes", QueueUrl=url,
                              AttributeNames=["ApproximateNumberOfMessages",
                                              "ApproximateNumberOfMessagesDelayed"]
                              )["Attributes"]
    out["after_purge_receive"] = len(call("receive_message", QueueUrl=url,
                                          WaitTimeSeconds=2).get("Messages", []))

    out["missing"] = error_of("get_queue_url", QueueName="no-such-queue")
    out["found_url"] = call("get_queue_url", QueueName="compat-q")["QueueUrl"]
    call("delete_queue", QueueUrl=url)
    out["after_delete"] = error_of("get_queue_url", QueueName="compat-q")
    out["listed_after_delete"] = call("list_queues").get("QueueUrls", [])

    out["request_content_types"] = sorted(out["request_content_types"])
    out["response_content_types"] = sorted(out["response_content_types"])
    print(json.dumps(out))
''')

# Carriage returns, XML metacharacters and non-ASCII text (BMP and astral) in one body:
# each is mangled by some naive form or XML handling.
HOSTILE_BODY = ("line one\r\nline two\rthree\n <&> <tag attr=\"x\">&amp; &lt;</tag>"
                " é ü 中文 ☃ 😀 \t end")


def test_query_protocol_with_boto3_1_28(query_python: Path | str, server: Server,
                                        tmp_path: Path) -> None:
    assert isinstance(query_python, Path), query_python
    python = query_python
    script = tmp_path / "query_client.py"
    script.write_text(QUERY_CLIENT)
    done = subprocess.run([str(python), str(script), server.url, HOSTILE_BODY],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout)

    # The point of the test: this client really speaks the query protocol.
    assert (out["boto3"], out["botocore"]) == ("1.28.0", "1.31.0")
    assert out["request_content_types"] == ["application/x-www-form-urlencoded; charset=utf-8"]
    assert all(ct.startswith("text/xml") for ct in out["response_content_types"]), out
    print("query protocol response content types:", out["response_content_types"])

    url = out["url"]
    assert url.endswith("/000000000000/compat-q")
    assert out["created_attributes"]["VisibilityTimeout"] == "20"
    assert out["created_attributes"]["MaximumMessageSize"] == "262144"
    assert out["created_tags"] == {"team": "core", "env": "test"}

    [received] = out["received"]
    assert received["Body"] == HOSTILE_BODY
    assert received["MessageId"] == out["sent"]["MessageId"]
    assert received["MD5OfBody"] == out["sent"]["MD5OfMessageBody"]
    assert received["MD5OfMessageAttributes"] == out["sent"]["MD5OfMessageAttributes"]
    assert received["MessageAttributes"] == {
        "text": {"DataType": "String", "StringValue": "a<b>&c\r\nd é"},
        "count": {"DataType": "Number", "StringValue": "-12.5e3"},
        "blob": {"DataType": "Binary", "BinaryValue": out["binary_b64"]},
    }
    assert base64.b64decode(out["binary_b64"]) == bytes(range(256))
    system = received["Attributes"]
    assert system["ApproximateReceiveCount"] == "1"
    assert {"SentTimestamp", "ApproximateFirstReceiveTimestamp", "SenderId"} <= set(system)

    assert out["after_visibility_change"] == [{
        "MessageId": received["MessageId"], "Body": HOSTILE_BODY,
        "ApproximateReceiveCount": "2"}]

    assert out["batch_successful"] == ["ok1", "ok2"]
    assert out["batch_failed"] == [
        {"Id": "bad", "Code": "InvalidMessageContents", "SenderFault": True}]
    assert out["batch_bodies"] == ["batch one", "batch two"]
    assert out["delete_successful"] == ["d0", "d1"]
    assert out["delete_failed"] == [{"Id": "garbage", "Code": "ReceiptHandleIsInvalid"}]

    assert out["set_attributes"] == {"VisibilityTimeout": "7", "DelaySeconds": "1"}
    assert out["listed_prefix"] == [url]
    assert set(out["listed_all"]) == {url, out["other_url"]}
    assert out["tags_after"] == {"team": "platform", "added": "yes"}

    assert out["before_purge"] == "3"  # sent with DelaySeconds 0 over the queue's 1
    assert out["after_purge"] == {"ApproximateNumberOfMessages": "0",
                                  "ApproximateNumberOfMessagesDelayed": "0"}
    assert out["after_purge_receive"] == 0

    assert out["missing"] == {"class": "QueueDoesNotExist",
                              "code": "AWS.SimpleQueueService.NonExistentQueue",
                              "status": 400}
    assert out["found_url"] == url
    assert out["after_delete"]["class"] == "QueueDoesNotExist"
    assert out["listed_after_delete"] == [out["other_url"]]
