"""A SigV4 signature binds what a request does, against a real `conveyor serve --auth required`.

A signature covers only the headers its SignedHeaders names. The server reads an SQS JSON
request's action from X-Amz-Target and its protocol from Content-Type, and every
signature's time from X-Amz-Date (or Date), so a signature that leaves any of these out is
refused, 403 IncompleteSignature, before anything happens: a SendMessage signed over
``host`` alone cannot be resent as a DeleteQueue. The query protocol's Action is in the
query string or the form body, both signed; the body only because UNSIGNED-PAYLOAD is
refused. And the query string is percent-decoded once: ``MessageBody=%2541`` is ``%41``.

Each refusal has its control: the signatures are genuine (botocore's own signer, told to
sign fewer headers: tests/support/signing.py), and where the rule under test is the only
one they break, sigv4's cryptographic check alone accepts the tampered request, so it is
that rule, and nothing else, that refuses it.
"""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.credentials import Credentials

from server.protection import sigv4
from tests.support.clients import Reply
from tests.support.server import Server, module_server, restarted_if_dead
from tests.support.signing import SelectiveSigV4Auth, SelectiveSigV4QueryAuth

ACCOUNT = "222222222222"
JSON_TYPE = "application/x-amz-json-1.0"
FORM_TYPE = "application/x-www-form-urlencoded; charset=utf-8"
QUERY_NS = "{http://queue.amazonaws.com/doc/2012-11-05/}"
# What botocore signs on a JSON request: every header but user-agent and the like.
ALL_JSON = ("content-type", "host", "x-amz-date", "x-amz-target")
AWS = Path(sys.executable).parent / "aws"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with module_server(tmp_path_factory, "binding", fsync="never",
                       extra=("--auth", "required")) as running:
        yield running


@pytest.fixture
def srv(shared: Server) -> Server:
    return restarted_if_dead(shared)


@pytest.fixture(scope="module")
def key(shared: Server) -> dict[str, str]:
    return shared.create_key("binder", ACCOUNT)


# --- signing and sending ------------------------------------------------------------------


def sign(server: Server, key: dict[str, str], *, signed: Collection[str] | None = None,
         method: str = "POST", path: str = "/", body: bytes | dict[str, str] = b"",
         headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
         expires: int | None = None) -> AWSPreparedRequest:
    """Signed by botocore; ``signed`` names the only headers to sign (None: all, as
    botocore does); ``expires``: a presigned URL."""
    request = AWSRequest(method=method, url=server.url + path, data=body,
                         headers=headers or {}, params=params or {})
    credentials = Credentials(key["access_key_id"], key["secret_access_key"])
    signer: SigV4Auth
    if expires is None:
        signer = (SigV4Auth(credentials, "sqs", "us-east-1") if signed is None
                  else SelectiveSigV4Auth(credentials, "sqs", "us-east-1", signed))
    else:
        signer = (SigV4QueryAuth(credentials, "sqs", "us-east-1", expires=expires)
                  if signed is None else
                  SelectiveSigV4QueryAuth(credentials, "sqs", "us-east-1", expires, signed))
    signer.add_auth(request)
    return request.prepare()


def json_request(server: Server, key: dict[str, str], action: str, params: dict[str, Any],
                 signed: Collection[str] | None = None) -> AWSPreparedRequest:
    return sign(server, key, signed=signed, body=json.dumps(params).encode(),
                headers={"Content-Type": JSON_TYPE, "X-Amz-Target": f"AmazonSQS.{action}"})


def form_request(server: Server, key: dict[str, str], fields: dict[str, str],
                 signed: Collection[str] | None = None,
                 headers: dict[str, str] | None = None) -> AWSPreparedRequest:
    body = urllib.parse.urlencode({"Version": "2012-11-05", **fields}).encode()
    return sign(server, key, signed=signed, body=body,
                headers={"Content-Type": FORM_TYPE, **(headers or {})})


def send(prepared: AWSPreparedRequest, *, body: bytes | None = None,
         replace: dict[str, str] | None = None) -> Reply:
    """The prepared request on the wire as it is, or with its body or headers replaced."""
    # urllib sets Content-Length for the body it sends, which may not be the signed one's.
    headers = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}
    headers.update(replace or {})
    data = prepared.body if body is None else body
    if isinstance(data, str):
        data = data.encode()
    request = urllib.request.Request(prepared.url, data=data or None, method=prepared.method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status,
                         {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def refusal(reply: Reply) -> tuple[int, str]:
    """(status, SQS error code) of a refusal, in either protocol's framing; no code when
    the request was served."""
    if reply.status < 400:
        return reply.status, ""
    if reply.headers.get("content-type", "").startswith(JSON_TYPE):
        return reply.status, reply.headers["x-amzn-query-error"].partition(";")[0]
    code = ElementTree.fromstring(reply.body).find(f"{QUERY_NS}Error/{QUERY_NS}Code")
    assert code is not None, reply
    return reply.status, str(code.text)


def genuine(prepared: AWSPreparedRequest, key: dict[str, str], *, body: bytes | None = None,
            replace: dict[str, str] | None = None,
            verifier: sigv4.Verifier | None = None) -> None:
    """The control: sigv4's parse and cryptographic check, without the binding rule that
    server/protection/auth.py adds, accept the request as it would be sent."""
    parts = urllib.parse.urlsplit(prepared.url)
    headers = {**dict(prepared.headers.items()), "Host": parts.netloc, **(replace or {})}
    signed = sigv4.parse(headers, parts.query)
    assert signed is not None
    data = prepared.body if body is None else body
    (verifier or sigv4.Verifier()).verify(
        signed, key["secret_access_key"], method=prepared.method, raw_path=parts.path,
        query_string=parts.query, headers=headers,
        body=data.encode() if isinstance(data, str) else data or b"")


def queue(server: Server, key: dict[str, str], prefix: str) -> str:
    url: str = server.sqs(key).create_queue(QueueName=f"{prefix}-{uuid.uuid4().hex[:8]}")[
        "QueueUrl"]
    return url


def queue_names(server: Server, key: dict[str, str]) -> set[str]:
    urls = server.sqs(key).list_queues(MaxResults=1000).get("QueueUrls", [])
    return {url.rpartition("/")[2] for url in urls}


def bodies(server: Server, key: dict[str, str], url: str) -> list[str]:
    """The bodies of the messages in the queue, which are deleted."""
    sqs = server.sqs(key)
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                              WaitTimeSeconds=1).get("Messages", [])
    for message in got:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return sorted(m["Body"] for m in got)


# --- the JSON protocol: X-Amz-Target and Content-Type ---------------------------------------


@pytest.mark.parametrize("signed", [("host",), ("host", "x-amz-date"),
                                    ("content-type", "host", "x-amz-date")],
                         ids=";".join)
def test_an_action_swapped_under_a_signature_without_the_target_is_refused(
        srv: Server, key: dict[str, str], signed: tuple[str, ...]) -> None:
    url = queue(srv, key, "swap")
    prepared = json_request(srv, key, "SendMessage", {"QueueUrl": url, "MessageBody": "hi"},
                            signed=signed)
    swapped = {"X-Amz-Target": "AmazonSQS.DeleteQueue"}
    if "x-amz-date" in signed:
        # The control: the signature is good for the swapped request, as far as it goes.
        genuine(prepared, key, replace=swapped)
    assert refusal(send(prepared, replace=swapped)) == (403, "IncompleteSignature")
    # Nothing changed: the queue is there, and the unswapped request is refused as well.
    assert url.rpartition("/")[2] in queue_names(srv, key)
    assert refusal(send(prepared)) == (403, "IncompleteSignature")
    assert bodies(srv, key, url) == []
    # The same request as botocore signs it works, and its target is bound.
    whole = json_request(srv, key, "SendMessage", {"QueueUrl": url, "MessageBody": "hi"})
    assert refusal(send(whole, replace=swapped)) == (403, "SignatureDoesNotMatch")
    assert send(whole).status == 200
    assert bodies(srv, key, url) == ["hi"]


def test_an_unsigned_content_type_on_a_json_request_is_refused(srv: Server,
                                                               key: dict[str, str]) -> None:
    name = f"untyped-{uuid.uuid4().hex[:8]}"
    prepared = json_request(srv, key, "CreateQueue", {"QueueName": name},
                            signed=("host", "x-amz-date", "x-amz-target"))
    genuine(prepared, key)
    reply = send(prepared)
    assert refusal(reply) == (403, "IncompleteSignature"), reply
    assert b"content-type" in reply.body
    assert name not in queue_names(srv, key)
    # A request made JSON by its target alone must sign its Content-Type all the same.
    assert refusal(send(prepared, replace={"Content-Type": FORM_TYPE})) == (
        403, "IncompleteSignature")
    assert name not in queue_names(srv, key)


def test_a_presigned_json_request_must_sign_the_target(srv: Server,
                                                       key: dict[str, str]) -> None:
    headers = {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.ListQueues"}
    host_only = sign(srv, key, signed=("host",), headers=headers, expires=60)
    assert "X-Amz-SignedHeaders=host&" in host_only.url
    genuine(host_only, key)
    assert refusal(send(host_only)) == (403, "IncompleteSignature")
    # The URL boto3 presigns signs both, and serves.
    url = srv.sqs(key).generate_presigned_url("list_queues", Params={}, ExpiresIn=60)
    assert "content-type%3Bhost%3Bx-amz-target" in url
    # botocore also signs the X-Amzn-Query-Mode header it adds: the caller sends it too.
    reply = send(AWSPreparedRequest("POST", url, {**headers, "X-Amzn-Query-Mode": "true"},
                                    b"", False))
    assert reply.status == 200, reply


# --- the signing time -------------------------------------------------------------------------


def test_an_unsigned_x_amz_date_is_refused(srv: Server, key: dict[str, str]) -> None:
    name = f"undated-{uuid.uuid4().hex[:8]}"
    prepared = json_request(srv, key, "CreateQueue", {"QueueName": name},
                            signed=("content-type", "host", "x-amz-target"))
    assert "X-Amz-Date" in prepared.headers
    reply = send(prepared)
    assert refusal(reply) == (403, "IncompleteSignature"), reply
    assert b"x-amz-date" in reply.body
    form = form_request(srv, key, {"Action": "CreateQueue", "QueueName": name},
                        signed=("content-type", "host"))
    assert refusal(send(form)) == (403, "IncompleteSignature")
    assert name not in queue_names(srv, key)


def test_an_unsigned_date_header_is_refused(srv: Server, key: dict[str, str]) -> None:
    # botocore signs with the Date header, and no X-Amz-Date, when the request has one.
    name = f"dated-{uuid.uuid4().hex[:8]}"
    date = {"Date": email.utils.formatdate(usegmt=True)}
    unsigned = form_request(srv, key, {"Action": "CreateQueue", "QueueName": name},
                            signed=("content-type", "host"), headers=date)
    assert "X-Amz-Date" not in unsigned.headers and "Date" in unsigned.headers
    assert refusal(send(unsigned)) == (403, "IncompleteSignature")
    assert name not in queue_names(srv, key)
    # The control: signed as botocore signs it, with the Date header, it is served.
    whole = form_request(srv, key, {"Action": "CreateQueue", "QueueName": name}, headers=date)
    assert "SignedHeaders=content-type;date;host," in whole.headers["Authorization"]
    reply = send(whole)
    assert reply.status == 200, reply
    assert name in queue_names(srv, key)


# --- the query protocol: the Action in a signed query string or body ----------------------


def test_a_form_action_cannot_be_swapped_without_the_payload_hash(srv: Server,
                                                                 key: dict[str, str]) -> None:
    url = queue(srv, key, "form")
    delete = urllib.parse.urlencode({"Action": "DeleteQueue", "QueueUrl": url,
                                     "Version": "2012-11-05"}).encode()
    # botocore sends no X-Amz-Content-SHA256 to SQS: the server hashes the body itself.
    listing = form_request(srv, key, {"Action": "ListQueues"})
    assert "X-Amz-Content-SHA256" not in listing.headers
    assert refusal(send(listing, body=delete)) == (403, "SignatureDoesNotMatch")
    # Signed over UNSIGNED-PAYLOAD, the body is bound by nothing: refused outright.
    unbound = form_request(srv, key, {"Action": "ListQueues"},
                           headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    assert "x-amz-content-sha256" in unbound.headers["Authorization"]
    # The control: a verifier that took UNSIGNED-PAYLOAD would run the DeleteQueue.
    genuine(unbound, key, body=delete, verifier=sigv4.Verifier(allow_unsigned_payload=True))
    assert refusal(send(unbound, body=delete)) == (403, "SignatureDoesNotMatch")
    assert refusal(send(unbound)) == (403, "SignatureDoesNotMatch")
    assert url.rpartition("/")[2] in queue_names(srv, key)
    assert send(listing).status == 200


# --- the query string is decoded once -------------------------------------------------------


@pytest.mark.parametrize("way", ["signed query", "presigned url", "form body", "json body"])
def test_a_percent_escape_is_decoded_once(srv: Server, key: dict[str, str], way: str) -> None:
    url = queue(srv, key, "escape")
    fields = {"Action": "SendMessage", "Version": "2012-11-05", "QueueUrl": url}
    for text in ("%41", "%2541", "100%", "a+b %20"):
        if way == "signed query":
            prepared = sign(srv, key, method="GET", params={**fields, "MessageBody": text})
        elif way == "presigned url":
            # botocore moves a presigned form into the query string.
            prepared = sign(srv, key, body={**fields, "MessageBody": text},
                            headers={"Content-Type": FORM_TYPE}, expires=60)
        elif way == "form body":
            prepared = form_request(srv, key, {**fields, "MessageBody": text})
        else:
            prepared = json_request(srv, key, "SendMessage",
                                    {"QueueUrl": url, "MessageBody": text})
        if text == "%41" and way != "json body":
            wire = prepared.url if "query" in way or "url" in way else prepared.body
            assert "MessageBody=%2541" in str(wire), wire
        reply = send(prepared)
        assert reply.status == 200, (way, text, reply)
        assert bodies(srv, key, url) == [text], (way, text)


# --- what AWS's own clients send keeps working ------------------------------------------------


def test_boto3_and_the_aws_cli_keep_working(srv: Server, key: dict[str, str],
                                            tmp_path: Path) -> None:
    sqs = srv.sqs(key)
    url = sqs.create_queue(QueueName=f"clients-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="from boto3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": key["access_key_id"],
                "AWS_SECRET_ACCESS_KEY": key["secret_access_key"],
                "AWS_CONFIG_FILE": str(tmp_path / "absent-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "absent-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true"})
    done = subprocess.run(
        [str(AWS), "sqs", "send-message", "--queue-url", url, "--message-body", "from the cli",
         "--endpoint-url", srv.url, "--region", "us-east-1", "--output", "json"],
        capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert bodies(srv, key, url) == ["from boto3", "from the cli"]
    sqs.delete_queue(QueueUrl=url)
    # botocore's signer as it is, for both protocols.
    assert send(json_request(srv, key, "ListQueues", {})).status == 200
    assert send(form_request(srv, key, {"Action": "ListQueues"})).status == 200

