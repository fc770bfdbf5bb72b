"""Authentication against real `conveyor serve` processes, and the key store beneath it.

A server started with ``--auth required`` must serve exactly the requests that prove an
access key made by ``conveyor keys create``: signed with SigV4 (boto3, botocore's signer
for the query protocol and for presigned URLs) or, on the native API only, carrying a
bearer token from ``conveyor keys token``. Everything else is refused with the status and
code of the error table (docs/API.md), and a revoked key stops working within the key
cache's lifetime. Startup refuses ``--auth none`` off loopback unless ``--insecure``. TLS
is served at 1.2 and above only. Hostile Authorization headers get a 4xx, never a 5xx, and
the server keeps serving. The last part tests server/protection/keystore.py and
server/protection/masterkey.py directly: secrets are wrapped, never on disk in the
clear, and open only under their master key.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from http.client import HTTPException
from pathlib import Path
from typing import Any
from unittest import mock
from xml.etree import ElementTree

import boto3
import botocore.auth
import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, SSLError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.errors import ConfigError, InvalidParameterError
from server.protection import keystore, masterkey
from server.protection.auth import TOKEN_TTL_S_MAX, bearer_token
from server.protection.keystore import KeyCache, KeyStore
from server.web import listener
from tests.server.web.test_hostile_input import exchange
from tests.support.clients import Reply, http, native, wait_for
from tests.support.databases import forge_checks
from tests.support.server import Server, free_port, module_server, restarted_if_dead

ALICE = "111111111111"
JSON_TYPE = "application/x-amz-json-1.0"
FORM_TYPE = "application/x-www-form-urlencoded; charset=utf-8"
QUERY_NS = "{http://queue.amazonaws.com/doc/2012-11-05/}"
SKEW_S = 5 * 60
# The key cache's lifetime is 5 s: a revoked key must be refused well within this.
REVOKED_WITHIN_S = keystore.KEY_CACHE_TTL_S + 5


def conveyor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


# --- signing requests by hand, with botocore's signer ----------------------------------------


def utcnow() -> datetime.datetime:
    # botocore's clock (botocore.auth.get_current_datetime) is naive UTC.
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def sign(server: Server, key: dict[str, str], method: str, path: str, *, body: bytes = b"",
         headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
         at: datetime.datetime | None = None, secret: str | None = None,
         expires: int | None = None, service: str = "sqs") -> AWSPreparedRequest:
    """A request signed by botocore's SigV4 signer, at ``at`` (default: now); ``expires``:
    a presigned URL (SigV4QueryAuth) instead of an Authorization header."""
    request = AWSRequest(method=method, url=server.url + path, data=body,
                         headers=headers or {}, params=params or {})
    credentials = Credentials(key["access_key_id"], secret or key["secret_access_key"])
    signer = (SigV4Auth(credentials, service, "us-east-1") if expires is None
              else SigV4QueryAuth(credentials, service, "us-east-1", expires=expires))
    if at is None:
        signer.add_auth(request)
    else:
        with mock.patch.object(botocore.auth, "get_current_datetime", return_value=at):
            signer.add_auth(request)
    return request.prepare()


def send(prepared: AWSPreparedRequest, *, body: bytes | None = None,
         replace: dict[str, str] | None = None) -> Reply:
    """Send a prepared request as it is, or with its body or some headers replaced."""
    headers = {k: v for k, v in prepared.headers.items()}
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


def json_call(server: Server, key: dict[str, str], action: str, params: dict[str, Any],
              **options: Any) -> Reply:
    """A signed SQS JSON-protocol request."""
    return send(sign(server, key, "POST", "/", body=json.dumps(params).encode(),
                     headers={"Content-Type": JSON_TYPE,
                              "X-Amz-Target": f"AmazonSQS.{action}"}, **options))


def form_call(server: Server, key: dict[str, str], fields: dict[str, str],
              path: str = "/", **options: Any) -> Reply:
    """A signed SQS query-protocol (form) request."""
    body = urllib.parse.urlencode({"Version": "2012-11-05", **fields}).encode()
    return send(sign(server, key, "POST", path, body=body,
                     headers={"Content-Type": FORM_TYPE}, **options))


def json_error(reply: Reply) -> tuple[int, str, str]:
    """(status, error shape, query code) of a JSON-protocol refusal."""
    document = reply.json()
    return (reply.status, document["__type"].rpartition("#")[2],
            reply.headers.get("x-amzn-query-error", "").partition(";")[0])


def xml_code(reply: Reply) -> tuple[int, str]:
    root = ElementTree.fromstring(reply.body)
    code = root.find(f"{QUERY_NS}Error/{QUERY_NS}Code")
    assert code is not None, reply
    return reply.status, str(code.text)


def native_error(reply: Reply) -> tuple[int, str]:
    return reply.status, reply.json()["error"]["code"]


def boto_refusal(call: Any, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(ClientError) as caught:
        call(**kwargs)
    response = caught.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


def token_of(server: Server, key: dict[str, str], *options: str) -> str:
    """A bearer token made by the real CLI, as an operator would."""
    done = conveyor("keys", "token", key["access_key_id"], "--data-dir", str(server.data_dir),
                    *options)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def assert_serving(server: Server, key: dict[str, str]) -> None:
    """The process is alive and a signed send, receive and delete still work."""
    assert server.process is not None and server.process.poll() is None, (
        f"the server exited: {server.log.read_text()[-2000:]}")
    sqs = server.sqs(key)
    url = sqs.create_queue(QueueName="health")["QueueUrl"]
    body = f"still serving {uuid.uuid4()}"
    sqs.send_message(QueueUrl=url, MessageBody=body)
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2)["Messages"]
    assert message["Body"] == body
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


# --- the shared server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with module_server(tmp_path_factory, "auth", fsync="never",
                       extra=("--auth", "required")) as running:
        yield running


@pytest.fixture
def srv(shared: Server) -> Server:
    return restarted_if_dead(shared)


@pytest.fixture(scope="module")
def alice(shared: Server) -> dict[str, str]:
    return shared.create_key("alice", ALICE)


# --- SigV4 -------------------------------------------------------------------------------------


def test_a_signed_boto3_client_does_everything(srv: Server, alice: dict[str, str]) -> None:
    sqs = srv.sqs(alice)
    url = sqs.create_queue(QueueName="signed")["QueueUrl"]
    assert url == f"{srv.url}/{ALICE}/signed"
    assert url in sqs.list_queues()["QueueUrls"]
    sent = sqs.send_message(QueueUrl=url, MessageBody="héllo ✓ +/=&")
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2,
                                    AttributeNames=["SenderId"])["Messages"]
    assert (message["MessageId"], message["Body"]) == (sent["MessageId"], "héllo ✓ +/=&")
    # The sender is the key's principal.
    assert message["Attributes"]["SenderId"] == "alice"
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert "Messages" not in sqs.receive_message(QueueUrl=url)
    sqs.delete_queue(QueueUrl=url)


def test_an_unknown_access_key_is_an_invalid_client_token(srv: Server,
                                                          alice: dict[str, str]) -> None:
    unknown = {"access_key_id": "CVY" + "A" * 17, "secret_access_key": "x" * 40}
    assert boto_refusal(srv.sqs(unknown).list_queues) == (403, "InvalidClientTokenId")
    # An id that cannot even be one of this server's keys, as AWS's look.
    aws_like = {"access_key_id": "AKIAIOSFODNN7EXAMPLE",
                "secret_access_key": alice["secret_access_key"]}
    assert boto_refusal(srv.sqs(aws_like).list_queues) == (403, "InvalidClientTokenId")


def test_a_wrong_secret_does_not_match(srv: Server, alice: dict[str, str]) -> None:
    wrong = dict(alice, secret_access_key=alice["secret_access_key"][::-1])
    assert boto_refusal(srv.sqs(wrong).list_queues) == (403, "SignatureDoesNotMatch")
    # The query protocol is refused the same way, in XML.
    reply = form_call(srv, wrong, {"Action": "ListQueues"})
    assert xml_code(reply) == (403, "SignatureDoesNotMatch")


@pytest.mark.parametrize("path", ["/", f"/{ALICE}/signed", "/v1/queues", "/v1/queues/x",
                                  "/v1/usage", "/v1/no/such/route"])
def test_no_signature_is_a_missing_authentication_token(srv: Server, path: str) -> None:
    for method, body, headers in (
            ("POST", b"Action=ListQueues", {"Content-Type": FORM_TYPE}),
            ("POST", b"{}", {"Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.ListQueues"}),
            ("GET", None, {})):
        reply = http(srv, method, path, body, headers)
        assert reply.status == 403, (method, path, reply)
        assert b"MissingAuthenticationToken" in reply.body, (method, path, reply)


def test_the_open_paths_need_no_signature(srv: Server) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert http(srv, "GET", path).status == 200, path


@pytest.mark.parametrize("skew_s", [-SKEW_S - 60, SKEW_S + 60, -3600 * 24, 3600 * 24 * 365])
def test_a_clock_skew_over_five_minutes_is_request_expired(srv: Server, alice: dict[str, str],
                                                           skew_s: int) -> None:
    at = utcnow() + datetime.timedelta(seconds=skew_s)
    reply = json_call(srv, alice, "ListQueues", {}, at=at)
    assert json_error(reply) == (400, "RequestExpired", "RequestExpired"), reply
    reply = form_call(srv, alice, {"Action": "ListQueues"}, at=at)
    assert xml_code(reply) == (400, "RequestExpired")


@pytest.mark.parametrize("skew_s", [-SKEW_S + 60, SKEW_S - 60])
def test_a_clock_skew_within_five_minutes_is_accepted(srv: Server, alice: dict[str, str],
                                                      skew_s: int) -> None:
    at = utcnow() + datetime.timedelta(seconds=skew_s)
    reply = json_call(srv, alice, "ListQueues", {}, at=at)
    assert reply.status == 200, reply


def test_the_query_protocol_signed_with_botocore(srv: Server, alice: dict[str, str]) -> None:
    reply = form_call(srv, alice, {"Action": "CreateQueue", "QueueName": "by-form"})
    assert reply.status == 200, reply
    url = ElementTree.fromstring(reply.body).findtext(f".//{QUERY_NS}QueueUrl")
    assert url == f"{srv.url}/{ALICE}/by-form"
    body = "form body with spaces, + and & and é"
    reply = form_call(srv, alice, {"Action": "SendMessage", "QueueUrl": url,
                                   "MessageBody": body})
    assert reply.status == 200, reply
    # The query protocol may also address the queue by posting to its URL.
    reply = form_call(srv, alice, {"Action": "ReceiveMessage", "WaitTimeSeconds": "2"},
                      path=f"/{ALICE}/by-form")
    assert reply.status == 200, reply
    assert ElementTree.fromstring(reply.body).findtext(f".//{QUERY_NS}Body") == body
    # The body is signed: the same signature over another body does not match.
    prepared = sign(srv, alice, "POST", "/", headers={"Content-Type": FORM_TYPE},
                    body=b"Action=ListQueues&Version=2012-11-05")
    assert send(prepared).status == 200
    tampered = send(prepared, body=b"Action=ListQueues&Version=2012-11-06")
    assert xml_code(tampered) == (403, "SignatureDoesNotMatch")


def test_a_hash_in_the_target_is_refused(srv: Server, alice: dict[str, str]) -> None:
    # aiohttp reads what follows '#' as a fragment and the handlers never see it, while the
    # signature's canonical query decodes '%23' and a literal '#' alike and sorts the
    # parameters: sent with a literal '#', a signed query would be read cut short where it
    # was signed whole (here the prefix "a#b" read as "a"). Refused before the signature.
    signed = sign(srv, alice, "GET", "/", params={"Action": "ListQueues",
                                                  "QueueNamePrefix": "a#b",
                                                  "Version": "2012-11-05"})
    query = urllib.parse.urlsplit(signed.url).query
    assert "a%23b" in query
    pairs = sorted(query.split("&"), key=lambda pair: not pair.startswith("Version="))
    cut = "/?" + "&".join(pairs).replace("a%23b", "a#b")
    headers = [f"{k}: {v}".encode() for k, v in signed.headers.items() if k.lower() != "host"]
    assert raw_request(srv, "GET", "/?" + query, headers).status == 200  # as signed
    reply = raw_request(srv, "GET", cut, headers)
    assert xml_code(reply) == (400, "MalformedQueryString"), reply


def test_a_presigned_query_string(srv: Server, alice: dict[str, str]) -> None:
    params = {"Action": "ListQueues", "Version": "2012-11-05"}
    good = send(sign(srv, alice, "GET", "/", params=params, expires=60))
    assert good.status == 200, good
    assert b"ListQueuesResult" in good.body
    # Past its expiry, even though the signing time is within the clock skew.
    old = utcnow() - datetime.timedelta(seconds=120)
    expired = send(sign(srv, alice, "GET", "/", params=params, expires=60, at=old))
    assert xml_code(expired) == (400, "RequestExpired")
    # The parameters are signed.
    prepared = sign(srv, alice, "GET", "/", params=params, expires=60)
    prepared.url = prepared.url.replace("Action=ListQueues", "Action=CreateQueue")
    assert xml_code(send(prepared)) == (403, "SignatureDoesNotMatch")
    # A presigned URL of an unknown key.
    unknown = dict(alice, access_key_id="CVY" + "B" * 17)
    assert xml_code(send(sign(srv, unknown, "GET", "/", params=params, expires=60))) == (
        403, "InvalidClientTokenId")


def test_boto3_presigned_url(srv: Server, alice: dict[str, str]) -> None:
    url = srv.sqs(alice).generate_presigned_url("list_queues", Params={}, ExpiresIn=60)
    # botocore signs the JSON protocol's headers into the URL: the caller sends them too.
    reply = send(AWSPreparedRequest("POST", url, {
        "Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.ListQueues",
        "X-Amzn-Query-Mode": "true"}, b"", False))
    assert reply.status == 200, reply
    assert isinstance(reply.json()["QueueUrls"], list)


def test_a_signature_over_another_body_does_not_match(srv: Server,
                                                      alice: dict[str, str]) -> None:
    url = srv.sqs(alice).create_queue(QueueName="tamper")["QueueUrl"]
    prepared = sign(srv, alice, "POST", "/", headers={
        "Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.SendMessage"},
        body=json.dumps({"QueueUrl": url, "MessageBody": "signed"}).encode())
    other = json.dumps({"QueueUrl": url, "MessageBody": "forged"}).encode()
    assert json_error(send(prepared, body=other)) == (
        403, "SignatureDoesNotMatch", "SignatureDoesNotMatch")
    # A declared payload hash that is not the body's is no way around it.
    lying = send(prepared, body=other,
                 replace={"X-Amz-Content-SHA256": hashlib.sha256(prepared.body).hexdigest()})
    assert json_error(lying)[0] == 403
    assert "Messages" not in srv.sqs(alice).receive_message(QueueUrl=url)
    assert send(prepared).status == 200  # the untouched request is good


def test_the_signed_headers_are_signed(srv: Server, alice: dict[str, str]) -> None:
    prepared = sign(srv, alice, "POST", "/", headers={
        "Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.ListQueues"}, body=b"{}")
    other_target = send(prepared, replace={"X-Amz-Target": "AmazonSQS.CreateQueue"})
    assert json_error(other_target)[:2] == (403, "SignatureDoesNotMatch")
    signed_at = datetime.datetime.strptime(prepared.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    later = (signed_at + datetime.timedelta(seconds=1)).strftime("%Y%m%dT%H%M%SZ")
    other_date = send(prepared, replace={"X-Amz-Date": later})
    assert json_error(other_date)[:2] == (403, "SignatureDoesNotMatch")


def test_a_revoked_key_is_refused_within_the_cache_lifetime(srv: Server) -> None:
    key = srv.create_key("short-lived", ALICE)
    sqs = srv.sqs(key)
    sqs.list_queues()  # the server now holds the key in its cache
    token = token_of(srv, key)
    assert native(srv, "GET", "/v1/queues", token=token).status == 200
    done = conveyor("keys", "revoke", key["access_key_id"], "--data-dir", str(srv.data_dir))
    assert (done.returncode, done.stdout.strip()) == (0, f"revoked {key['access_key_id']}")
    revoked_at = time.monotonic()

    def refused() -> bool:
        try:
            sqs.list_queues()
        except ClientError as exc:
            assert exc.response["Error"]["Code"] == "InvalidClientTokenId", exc.response
            return True
        return False

    wait_for(refused, REVOKED_WITHIN_S, "the revoked key to be refused", interval=0.2)
    assert time.monotonic() - revoked_at < REVOKED_WITHIN_S
    # Its tokens die with it, and it stays refused.
    assert native_error(native(srv, "GET", "/v1/queues", token=token)) == (
        403, "InvalidClientTokenId")
    assert boto_refusal(sqs.list_queues) == (403, "InvalidClientTokenId")
    # The CLI knows it is revoked: listed as such, and neither revoked again nor tokenized.
    listed = conveyor("keys", "list", "--json", "--data-dir", str(srv.data_dir))
    [entry] = [k for k in json.loads(listed.stdout)
               if k["access_key_id"] == key["access_key_id"]]
    assert entry["revoked_ms"] is not None and "secret_access_key" not in entry
    again = conveyor("keys", "revoke", key["access_key_id"], "--data-dir", str(srv.data_dir))
    assert again.returncode == 1 and "no active key" in again.stderr
    no_token = conveyor("keys", "token", key["access_key_id"], "--data-dir", str(srv.data_dir))
    assert no_token.returncode == 1 and "no active key" in no_token.stderr


def test_keys_are_listed_without_secrets(srv: Server, alice: dict[str, str]) -> None:
    done = conveyor("keys", "list", "--data-dir", str(srv.data_dir))
    assert done.returncode == 0, done.stderr
    assert f"{alice['access_key_id']}  {ALICE}  alice" in done.stdout
    assert alice["secret_access_key"] not in done.stdout


@pytest.mark.parametrize("args", [("--principal", "has space"), ("--account", "12345"),
                                  ("--account", "1111111111111")])
def test_keys_create_refuses_bad_principals_and_accounts(tmp_path: Path,
                                                         args: tuple[str, str]) -> None:
    done = conveyor("keys", "create", "--data-dir", str(tmp_path), *args)
    assert done.returncode == 1, done
    assert "Error:" in done.stderr and "Traceback" not in done.stderr


# --- bearer tokens on the native API ---------------------------------------------------------


def test_a_cli_token_works_on_the_native_api(srv: Server, alice: dict[str, str]) -> None:
    token = token_of(srv, alice, "--ttl", "600")
    prefix, key_id, expiry, _ = token.split(".")
    assert (prefix, key_id) == ("cvt1", alice["access_key_id"])
    assert 540 <= int(expiry) - time.time() <= 601
    reply = native(srv, "POST", "/v1/queues", {"name": "by-token"}, token=token)
    assert reply.status == 201, reply
    reply = native(srv, "POST", "/v1/queues/by-token/messages", raw=b"\x00binary\xff",
                   token=token)
    assert reply.status == 201, reply
    reply = native(srv, "POST", "/v1/queues/by-token/messages/receive", {"wait_seconds": 2},
                   token=token)
    [message] = reply.json()["messages"]
    assert message["body_base64"] == "AGJpbmFyef8="
    # It acts as the key's account: boto3 with the key sees the same queue.
    assert f"{srv.url}/{ALICE}/by-token" in srv.sqs(alice).list_queues()["QueueUrls"]
    # The CLI's client verbs take it from CONVEYOR_TOKEN.
    env = dict(os.environ, CONVEYOR_TOKEN=token)
    done = conveyor("send", "by-token", "from the cli", "--endpoint", srv.url, env=env)
    assert done.returncode == 0, done.stderr
    without = dict(env)
    del without["CONVEYOR_TOKEN"]
    refused = conveyor("send", "by-token", "anonymous", "--endpoint", srv.url, env=without)
    assert refused.returncode == 1 and "MissingAuthenticationToken" in refused.stderr


def test_a_signed_request_works_on_the_native_api(srv: Server, alice: dict[str, str]) -> None:
    for service in ("sqs", "conveyor"):
        reply = send(sign(srv, alice, "GET", "/v1/queues", service=service))
        assert reply.status == 200, reply
    reply = send(sign(srv, alice, "GET", "/v1/queues", service="s3"))
    assert native_error(reply) == (403, "SignatureDoesNotMatch")


@pytest.mark.parametrize("ttl", ["0", str(TOKEN_TTL_S_MAX + 1), "-5", "soon"])
def test_keys_token_refuses_a_ttl_out_of_range(srv: Server, alice: dict[str, str],
                                               ttl: str) -> None:
    done = conveyor("keys", "token", alice["access_key_id"], "--data-dir", str(srv.data_dir),
                    "--ttl", ttl)
    assert done.returncode == 2, done
    assert "--ttl" in done.stderr


def test_expired_and_tampered_tokens_are_refused(srv: Server, alice: dict[str, str]) -> None:
    key_id, secret = alice["access_key_id"], alice["secret_access_key"]
    now = int(time.time())
    good = bearer_token(key_id, secret, now + 600)
    assert native(srv, "GET", "/v1/queues", token=good).status == 200
    other = srv.create_key("other", ALICE)
    _, _, expiry, mac = good.split(".")
    flipped = mac[:5] + ("A" if mac[5] != "A" else "B") + mac[6:]
    cases = {
        "expired": (bearer_token(key_id, secret, now - 5), 400, "RequestExpired"),
        "mac flipped": (f"cvt1.{key_id}.{expiry}.{flipped}", 403, "SignatureDoesNotMatch"),
        "mac cut short": (f"cvt1.{key_id}.{expiry}.{mac[:-1]}", 403, "SignatureDoesNotMatch"),
        "expiry extended": (f"cvt1.{key_id}.{int(expiry) + 3600}.{mac}", 403,
                            "SignatureDoesNotMatch"),
        "another key's id": (f"cvt1.{other['access_key_id']}.{expiry}.{mac}", 403,
                             "SignatureDoesNotMatch"),
        "made with the wrong secret": (bearer_token(key_id, "x" * 40, now + 600), 403,
                                       "SignatureDoesNotMatch"),
        "unknown key": (bearer_token("CVY" + "C" * 17, secret, now + 600), 403,
                        "InvalidClientTokenId"),
        "no such prefix": ("cvt2" + good[4:], 400, "IncompleteSignature"),
        "three parts": (f"cvt1.{key_id}.{expiry}", 400, "IncompleteSignature"),
        "five parts": (good + ".x", 400, "IncompleteSignature"),
        "expiry not a number": (f"cvt1.{key_id}.soon.{mac}", 400, "IncompleteSignature"),
        # "Bearer" alone (the header's trailing space is not kept): no token at all.
        "empty": ("", 403, "MissingAuthenticationToken"),
    }
    for case, (token, status, code) in cases.items():
        reply = http(srv, "GET", "/v1/queues", headers={"Authorization": f"Bearer {token}"})
        assert native_error(reply) == (status, code), (case, reply)


def test_a_token_living_longer_than_the_maximum_is_refused(srv: Server,
                                                           alice: dict[str, str]) -> None:
    # Made with the key's own secret, so its mac is right: only its lifetime is wrong.
    # docs/FORMAT.md: a token is accepted "for at most 7 days".
    now = int(time.time())
    longest = bearer_token(alice["access_key_id"], alice["secret_access_key"],
                           now + TOKEN_TTL_S_MAX)
    assert native(srv, "GET", "/v1/queues", token=longest).status == 200
    for lifetime in (TOKEN_TTL_S_MAX + 3600, 10 * 365 * 24 * 3600, 10**11):
        token = bearer_token(alice["access_key_id"], alice["secret_access_key"],
                             now + lifetime)
        reply = native(srv, "GET", "/v1/queues", token=token)
        assert native_error(reply) == (400, "IncompleteSignature"), (lifetime, reply)


@pytest.mark.parametrize("path", ["/", f"/{ALICE}/signed"])
def test_a_bearer_token_is_refused_on_the_sqs_paths(srv: Server, alice: dict[str, str],
                                                    path: str) -> None:
    authorization = {"Authorization": f"Bearer {token_of_cached(srv, alice)}"}
    reply = http(srv, "POST", path, b"{}", {"Content-Type": JSON_TYPE,
                                            "X-Amz-Target": "AmazonSQS.ListQueues",
                                            **authorization})
    assert json_error(reply) == (400, "IncompleteSignature", "IncompleteSignature"), reply
    reply = http(srv, "POST", path, b"Action=ListQueues",
                 {"Content-Type": FORM_TYPE, **authorization})
    assert xml_code(reply) == (400, "IncompleteSignature"), reply
    reply = http(srv, "GET", "/?Action=ListQueues", headers=authorization)
    assert xml_code(reply) == (400, "IncompleteSignature"), reply


# --- hostile authentication input --------------------------------------------------------------


def raw_request(server: Server, method: str, path: str, headers: list[bytes],
                body: bytes = b"") -> Reply:
    lines = [f"{method} {path} HTTP/1.1".encode(), f"Host: 127.0.0.1:{server.port}".encode(),
             b"Connection: close", b"Content-Length: %d" % len(body), *headers]
    return exchange(server, b"\r\n".join(lines) + b"\r\n\r\n" + body)


def hostile_authorizations(key_id: str, token: str) -> dict[str, bytes]:
    scope = f"{key_id}/20260101/us-east-1/sqs/aws4_request"
    signature = "0" * 64
    _, _, expiry, mac = token.split(".")
    return {
        "random bytes": os.urandom(64).replace(b"\r", b"").replace(b"\n", b""),
        "latin-1 bytes": bytes(range(0x80, 0x100)),
        "truncated": b"AWS4-HMAC-SHA256 Credential=",
        "algorithm alone": b"AWS4-HMAC-SHA256",
        "other aws4 algorithm": b"AWS4-ECDSA-P256-SHA256 Credential=x",
        "sigv2": b"AWS AKIDEXAMPLE:c2lnbmF0dXJl",
        "components repeated": (f"AWS4-HMAC-SHA256 Credential={scope}, Credential={scope}, "
                                f"SignedHeaders=host, Signature={signature}").encode(),
        "huge credential scope": (f"AWS4-HMAC-SHA256 Credential={key_id}/20260101/"
                                  f"{'r' * 12_000}/sqs/aws4_request, SignedHeaders=host;"
                                  f"x-amz-date, Signature={signature}").encode(),
        "huge key id": (f"AWS4-HMAC-SHA256 Credential={'K' * 12_000}/20260101/us-east-1/sqs/"
                        f"aws4_request, SignedHeaders=host;x-amz-date, "
                        f"Signature={signature}").encode(),
        "non-ascii key id": (f"AWS4-HMAC-SHA256 Credential=CVYÉ✓/20260101/us-east-1/sqs/"
                             f"aws4_request, SignedHeaders=host;x-amz-date, "
                             f"Signature={signature}").encode(),
        "non-ascii signature": (f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders=host;"
                                f"x-amz-date, Signature={'é' * 64}").encode(),
        "signed headers without host": (f"AWS4-HMAC-SHA256 Credential={scope}, "
                                        f"SignedHeaders=x-amz-date, "
                                        f"Signature={signature}").encode(),
        "signed header absent": (f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders=host;"
                                 f"x-amz-date;x-nothing, Signature={signature}").encode(),
        "bearer, mac not ascii": f"Bearer cvt1.{key_id}.{expiry}.é{mac[1:]}".encode(),
        "bearer, superscript expiry": f"Bearer cvt1.{key_id}.².{mac}".encode(),
        "bearer, expiry of 5000 digits": f"Bearer cvt1.{key_id}.{'9' * 5000}.{mac}".encode(),
        "bearer, arabic-indic expiry": f"Bearer cvt1.{key_id}.١٢٣٤٥.{mac}".encode(),
        "bearer, huge mac": f"Bearer cvt1.{key_id}.{expiry}.{'m' * 12_000}".encode(),
        "bearer, nul bytes": f"Bearer cvt1.{key_id}\x00.{expiry}.{mac}".encode(),
    }


HOSTILE_CASES = sorted(hostile_authorizations("CVY" + "A" * 17, "cvt1.k.1.m"))


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_hostile_authorization_headers_are_client_errors(srv: Server, alice: dict[str, str],
                                                         case: str) -> None:
    # A real key id and token, so that each case reaches as far into the checks as it can.
    value = hostile_authorizations(alice["access_key_id"], token_of_cached(srv, alice))[case]
    for path, headers, body in (
            ("/", [b"Content-Type: " + JSON_TYPE.encode(),
                   b"X-Amz-Target: AmazonSQS.ListQueues"], b"{}"),
            ("/", [b"Content-Type: " + FORM_TYPE.encode()], b"Action=ListQueues"),
            ("/v1/queues", [], b"")):
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()).encode()
        reply = raw_request(srv, "POST" if body else "GET", path,
                            [b"Authorization: " + value, b"X-Amz-Date: " + date, *headers],
                            body)
        assert 400 <= reply.status < 500, (case, path, reply)
    assert_serving(srv, alice)


_tokens: dict[str, str] = {}


def token_of_cached(server: Server, key: dict[str, str]) -> str:
    """One CLI-made token per key for the whole module: the CLI takes a while to start."""
    if key["access_key_id"] not in _tokens:
        _tokens[key["access_key_id"]] = token_of(server, key)
    return _tokens[key["access_key_id"]]


@pytest.mark.parametrize("amz_date", ["garbage", "20261399T999999Z", "2026-01-01T00:00:00Z",
                                      "", "99999999T999999Z", "20260101T000000",
                                      "\uff12\uff10\uff12\uff16\uff10\uff11\uff10\uff11T000000Z"])
def test_a_garbage_x_amz_date_is_an_incomplete_signature(srv: Server, alice: dict[str, str],
                                                         amz_date: str) -> None:
    prepared = sign(srv, alice, "POST", "/", headers={
        "Content-Type": JSON_TYPE, "X-Amz-Target": "AmazonSQS.ListQueues"}, body=b"{}")
    headers = [f"{k}: {v}".encode() for k, v in prepared.headers.items()
               if k.lower() not in ("x-amz-date", "content-length")]
    reply = raw_request(srv, "POST", "/", [*headers, b"X-Amz-Date: " + amz_date.encode()],
                        b"{}")
    assert reply.status == 400, (amz_date, reply)
    assert json.loads(reply.body)["__type"].endswith("#IncompleteSignature"), reply
    assert_serving(srv, alice)


def test_hostile_presigned_query_strings(srv: Server, alice: dict[str, str]) -> None:
    good = sign(srv, alice, "GET", "/", params={"Action": "ListQueues"}, expires=60)
    query = urllib.parse.urlsplit(good.url).query
    cases = [
        query.replace("X-Amz-Expires=60", "X-Amz-Expires=99999999999999999999"),
        query.replace("X-Amz-Expires=60", "X-Amz-Expires=%C2%B2"),
        query.replace("X-Amz-Expires=60", "X-Amz-Expires=0"),
        query + "&X-Amz-Signature=" + "0" * 64,
        query.replace("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Algorithm=%FF%FE"),
        query.replace("X-Amz-Credential=", "X-Amz-Credential=%00"),
        "X-Amz-Signature=" + "a" * 64,
        "X-Amz-Credential=" + "%E2%9C%93" * 2000,
        query.replace("X-Amz-Date=", "X-Amz-Date=x"),
    ]
    for case in cases:
        reply = http(srv, "GET", "/?" + case)
        assert 400 <= reply.status < 500, (case[:200], reply)
    assert send(good).status == 200
    assert_serving(srv, alice)


# --- startup: --auth none off loopback ---------------------------------------------------------


def test_auth_none_off_loopback_needs_insecure(tmp_path: Path) -> None:
    # --auth none is the default: saying it or not changes nothing.
    for host, auth in (("0.0.0.0", ()), ("::", ("--auth", "none")),
                       ("localhost.example.com", ())):
        done = conveyor("serve", "--data-dir", str(tmp_path / "data"), "--host", host,
                        "--port", str(free_port()), *auth)
        assert done.returncode == 2, (host, done)
        assert "--auth none" in done.stderr and "--insecure" in done.stderr, done.stderr
        assert "Conveyor serving" not in done.stderr


def test_auth_none_off_loopback_starts_with_insecure(tmp_path: Path) -> None:
    server = Server(tmp_path / "data", fsync="never", extra=("--host", "0.0.0.0", "--insecure"))
    try:
        sqs = server.sqs()  # dummy credentials: nothing is checked
        url = sqs.create_queue(QueueName="open")["QueueUrl"]
        assert url == f"{server.url}/000000000000/open"
        sqs.send_message(QueueUrl=url, MessageBody="anyone")
        assert http(server, "GET", "/v1/queues").status == 200
    finally:
        server.kill()
    assert "auth=none" in server.log.read_text()


def test_tls_options_go_together(tmp_path: Path, tls: TLSFiles) -> None:
    done = conveyor("serve", "--data-dir", str(tmp_path), "--port", str(free_port()),
                    "--tls-cert", str(tls.cert))
    assert done.returncode == 2 and "--tls-cert and --tls-key go together" in done.stderr


# --- TLS ---------------------------------------------------------------------------------------


class TLSFiles:
    def __init__(self, directory: Path) -> None:
        self.ca = directory / "ca.pem"
        self.cert = directory / "server.pem"
        self.key = directory / "server.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 (an IP SAN) signed by it."""
    files = TLSFiles(tmp_path_factory.mktemp("tls"))
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Conveyor test CA"))
          .issuer_name(_name("Conveyor test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, tls: TLSFiles) -> Iterator[Server]:
    with module_server(tmp_path_factory, "tls", fsync="never", cafile=tls.ca,
                       extra=("--auth", "required", "--tls-cert", str(tls.cert),
                              "--tls-key", str(tls.key))) as running:
        yield running


def handshake(server: Server, context: ssl.SSLContext) -> str:
    """The TLS version negotiated with the server, after one HTTPS request over it."""
    with (socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
          context.wrap_socket(raw, server_hostname="127.0.0.1") as sock):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        return str(sock.version())


def client_context(tls: TLSFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.ca))


def test_boto3_over_https(tls_server: Server) -> None:
    assert tls_server.url.startswith("https://")
    key = tls_server.create_key("secure", ALICE)
    sqs = tls_server.sqs(key)
    url = sqs.create_queue(QueueName="over-tls")["QueueUrl"]
    assert url == f"{tls_server.url}/{ALICE}/over-tls"
    sqs.send_message(QueueUrl=url, MessageBody="encrypted in transit")
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2)["Messages"]
    assert message["Body"] == "encrypted in transit"
    # Authentication is still required over TLS.
    with pytest.raises(ClientError) as caught:
        tls_server.sqs({"access_key_id": key["access_key_id"],
                        "secret_access_key": "wrong" * 8}).list_queues()
    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: Server) -> None:
    untrusting = boto3.client("sqs", endpoint_url=tls_server.url, region_name="us-east-1",
                              aws_access_key_id="CVY" + "A" * 17, aws_secret_access_key="x",
                              config=Config(retries={"total_max_attempts": 1}))
    with pytest.raises(SSLError):
        untrusting.list_queues()


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_tls_1_2_and_1_3_are_served(tls_server: Server, tls: TLSFiles, version: str) -> None:
    context = client_context(tls)
    context.minimum_version = context.maximum_version = ssl.TLSVersion[version]
    assert handshake(tls_server, context) == version.replace("_", ".")


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_below_1_2_is_refused(tls_server: Server, tls: TLSFiles, version: str) -> None:
    context = client_context(tls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # what this test is about
        old = ssl.TLSVersion[version]
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = old
    # OpenSSL 3's default security level refuses TLS < 1.2 in the client as well; level 0
    # lets this client offer it, so that the refusal is the server's.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    # Refused either way: by the server (it closes the connection on the ClientHello), or,
    # with an OpenSSL that cannot offer TLS < 1.2 at all, by the client itself.
    with pytest.raises(ssl.SSLError):
        handshake(tls_server, context)
    # The same client settings, allowed TLS 1.2, do connect: the client was able.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    assert handshake(tls_server, context) == "TLSv1.2"


def test_the_servers_tls_context_starts_at_1_2(tls: TLSFiles) -> None:
    context = listener.tls_context(str(tls.cert), str(tls.key))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    assert not context.check_hostname and context.verify_mode == ssl.CERT_NONE


def test_plain_http_to_the_tls_port_gets_no_http_response(tls_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                received += chunk
    assert not received.startswith(b"HTTP/"), received[:200]
    with pytest.raises((OSError, HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.port}/healthz", timeout=10)
    # And the server still serves TLS clients afterwards.
    assert tls_server.process is not None and tls_server.process.poll() is None


# --- server/protection/keystore.py and masterkey.py, in process -------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    opened = KeyStore.open(str(tmp_path))
    try:
        yield opened
    finally:
        opened.close()


def test_create_get_list_revoke(store: KeyStore) -> None:
    created = store.create("billing-worker", ALICE)
    assert keystore.is_key_id(created.access_key_id)
    assert len(created.secret) == 40
    assert created.secret not in repr(created)
    got = store.get(created.access_key_id)
    assert got is not None
    assert (got.principal, got.account, got.secret, got.revoked_ms) == (
        "billing-worker", ALICE, created.secret, None)
    second = store.create("other", "222222222222")
    assert second.access_key_id != created.access_key_id
    assert second.secret != created.secret
    listed = store.list()
    # In creation order, to the millisecond; keys made within one are ordered by id.
    assert sorted(k.access_key_id for k in listed) == sorted(
        [created.access_key_id, second.access_key_id])
    assert [k.created_ms for k in listed] == sorted(k.created_ms for k in listed)
    assert all(k.secret == "" for k in listed)
    assert store.revoke(created.access_key_id) is True
    assert store.revoke(created.access_key_id) is False
    assert store.revoke("CVY" + "Z" * 17) is False
    assert store.get(created.access_key_id) is None
    assert store.get(second.access_key_id) is not None
    revoked = {k.access_key_id: k.revoked_ms for k in store.list()}
    assert revoked[created.access_key_id] is not None and revoked[second.access_key_id] is None


@pytest.mark.parametrize("key_id", ["", "CVY", "cvy" + "a" * 17, "CVY" + "A" * 18,
                                    "CVY" + "1" * 17, "CVY" + "A" * 16 + "\n", "' OR 1=1 --"])
def test_get_of_something_not_a_key_id_is_none(store: KeyStore, key_id: str) -> None:
    store.create("p", ALICE)
    assert store.get(key_id) is None


@pytest.mark.parametrize(("principal", "account"), [
    ("", ALICE), ("a" * 65, ALICE), ("white space", ALICE), ("é", ALICE), (None, ALICE),
    ("ok", "11111111111"), ("ok", "1111111111111"), ("ok", "11111111111a"), ("ok", 111111111111),
    ("ok", "\u0661" * 12),
])
def test_create_refuses_bad_principals_and_accounts(store: KeyStore, principal: Any,
                                                    account: Any) -> None:
    with pytest.raises(InvalidParameterError):
        store.create(principal, account)
    assert store.list() == []


def test_secrets_are_not_stored_in_the_clear(tmp_path: Path) -> None:
    opened = KeyStore.open(str(tmp_path))
    secrets = [opened.create(f"p{i}", ALICE) for i in range(20)]
    files = sorted(p for p in tmp_path.iterdir() if p.name.startswith(keystore.FILE_NAME))
    data = b"".join(p.read_bytes() for p in files)  # the database, and its WAL while open
    opened.close()
    data += (tmp_path / keystore.FILE_NAME).read_bytes()
    for key in secrets:
        assert key.access_key_id.encode() in data  # the search does find what is there
        for form in (key.secret.encode(), key.secret.encode("utf-16-le"),
                     key.secret[:16].encode()):
            assert form not in data, key.access_key_id
    assert (tmp_path / keystore.FILE_NAME).stat().st_mode & 0o077 == 0
    master = (tmp_path / masterkey.FILE_NAME).read_bytes()
    assert master not in data


def test_secrets_open_only_under_their_master_key(tmp_path: Path) -> None:
    opened = KeyStore.open(str(tmp_path))
    key = opened.create("p", ALICE)
    opened.close()
    other_master = tmp_path / "other.key"
    with KeyStoreClosing(KeyStore.open(str(tmp_path), str(other_master))) as wrong:
        assert [k.access_key_id for k in wrong.list()] == [key.access_key_id]
        with pytest.raises(ConfigError, match="does not open under this master key"):
            wrong.get(key.access_key_id)
    # The right key still opens it.
    with KeyStoreClosing(KeyStore.open(str(tmp_path))) as right:
        got = right.get(key.access_key_id)
        assert got is not None and got.secret == key.secret


def test_a_wrapped_secret_moved_to_another_key_id_does_not_open(tmp_path: Path) -> None:
    opened = KeyStore.open(str(tmp_path))
    first, second = opened.create("a", ALICE), opened.create("b", ALICE)
    opened.close()
    db = sqlite3.connect(tmp_path / keystore.FILE_NAME, isolation_level=None)
    try:
        [(wrapped,)] = db.execute("SELECT wrapped_secret FROM access_keys WHERE "
                                  "access_key_id = ?", (first.access_key_id,)).fetchall()
        db.execute("UPDATE access_keys SET wrapped_secret = ? WHERE access_key_id = ?",
                   (wrapped, second.access_key_id))
    finally:
        db.close()
    forge_checks(str(tmp_path / keystore.FILE_NAME), keystore.TABLE)  # as an attacker would
    with KeyStoreClosing(KeyStore.open(str(tmp_path))) as reopened:
        assert reopened.get(first.access_key_id) is not None
        with pytest.raises(ConfigError):
            reopened.get(second.access_key_id)


def test_the_cli_refuses_a_wrong_master_key(tmp_path: Path) -> None:
    created = conveyor("keys", "create", "--data-dir", str(tmp_path), "--principal", "p")
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["access_key_id"]
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(os.urandom(32))
    wrong.chmod(0o600)
    done = conveyor("keys", "token", key_id, "--data-dir", str(tmp_path), "--master-key-file",
                    str(wrong))
    assert done.returncode == 1 and "does not open under this master key" in done.stderr
    assert "Traceback" not in done.stderr
    exposed = tmp_path / "exposed.key"
    exposed.write_bytes(os.urandom(32))
    exposed.chmod(0o644)
    done = conveyor("keys", "list", "--data-dir", str(tmp_path), "--master-key-file",
                    str(exposed))
    assert done.returncode == 1 and "0600" in done.stderr


class KeyStoreClosing(contextlib.AbstractContextManager[KeyStore]):
    def __init__(self, opened: KeyStore) -> None:
        self.opened = opened

    def __enter__(self) -> KeyStore:
        return self.opened

    def __exit__(self, *exc: object) -> None:
        self.opened.close()


def test_master_key_is_created_once_0600_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    key = masterkey.load_or_create(str(path))
    assert len(key) == masterkey.KEY_BYTES
    assert path.stat().st_mode & 0o777 == 0o600
    assert masterkey.load_or_create(str(path)) == key
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="0600"):
        masterkey.load_or_create(str(path))
    path.chmod(0o600)
    for content in (b"", b"x" * 31, b"x" * 33):
        path.write_bytes(content)
        with pytest.raises(ConfigError, match="exactly 32 bytes"):
            masterkey.load_or_create(str(path))


def test_master_key_created_concurrently_is_one_key(tmp_path: Path) -> None:
    # Processes starting at once (a server and `conveyor keys create`) must agree on the
    # key, and none may read the file before its 32 bytes are there.
    for round_ in range(30):
        path = tmp_path / f"master-{round_}.key"
        barrier = threading.Barrier(6)
        results: list[bytes | BaseException] = []

        def load(path: Path = path, barrier: threading.Barrier = barrier,
                 results: list[bytes | BaseException] = results) -> None:
            barrier.wait()
            try:
                results.append(masterkey.load_or_create(str(path)))
            except BaseException as exc:
                results.append(exc)  # reported below

        threads = [threading.Thread(target=load) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(set(map(repr, results))) == 1 and isinstance(results[0], bytes), (
            round_, results)


def test_subkeys_differ_by_purpose_and_master() -> None:
    master = os.urandom(32)
    keys = {masterkey.subkey(master, p) for p in ("access-keys", "sse-kek", "other")}
    assert len(keys) == 3 and all(len(k) == 32 for k in keys)
    assert masterkey.subkey(master, "access-keys") == masterkey.subkey(master, "access-keys")
    assert masterkey.subkey(os.urandom(32), "access-keys") not in keys


async def test_key_cache_remembers_for_its_ttl_then_sees_a_revocation(store: KeyStore) -> None:
    key = store.create("p", ALICE)
    cache = KeyCache(store.lookup, ttl_s=0.2)
    first = await cache.lookup(key.access_key_id)
    assert first is not None and first.secret == key.secret
    store.revoke(key.access_key_id)
    assert await cache.lookup(key.access_key_id) is not None  # still cached
    deadline = time.monotonic() + 5
    while await cache.lookup(key.access_key_id) is not None:
        assert time.monotonic() < deadline, "the revocation was never seen"
        await asyncio.sleep(0.05)
    assert await cache.lookup("CVY" + "Q" * 17) is None  # well formed, but no such key


class CountingStore(KeyStore):
    """A real key store that counts the reads that reach it."""

    reads = 0

    def get(self, access_key_id: str) -> keystore.AccessKey | None:
        self.reads += 1
        return super().get(access_key_id)


def key_id(n: int) -> str:
    """A well-formed key id (not necessarily of an existing key)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return "CVY" + "".join(alphabet[(n >> (5 * i)) & 31] for i in range(17))


async def test_key_cache_is_bounded_and_evicts_the_oldest(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path / keystore.FILE_NAME),
                          masterkey.load_or_create(str(tmp_path / masterkey.FILE_NAME)))
    try:
        cache = KeyCache(store.lookup, max_entries=50)
        real = store.create("p", ALICE)
        got = await cache.lookup(real.access_key_id)
        assert got is not None and got.secret == real.secret
        assert await cache.lookup(real.access_key_id) == got
        assert store.reads == 1  # the second lookup was the cache's
        for n in range(49):
            assert await cache.lookup(key_id(n)) is None
        assert await cache.lookup(real.access_key_id) == got
        assert store.reads == 50  # 50 entries: the real key is still there
        for n in range(49, 99):
            assert await cache.lookup(key_id(n)) is None
        assert await cache.lookup(key_id(98)) is None
        assert store.reads == 100  # absences are remembered too
        assert await cache.lookup(real.access_key_id) == got
        assert store.reads == 101  # evicted, read again
        # Strings that cannot be key ids never reach the store.
        for made_up in ("", "AKIAIOSFODNN7EXAMPLE", "CVY" + "a" * 17, "K" * 16_000):
            assert await cache.lookup(made_up) is None
        assert store.reads == 101
    finally:
        store.close()


async def test_key_cache_memory_stays_small_under_made_up_key_ids(store: KeyStore) -> None:
    # Anyone can send an Authorization header naming a 16 KB "key id"; remembering each
    # one would let KEY_CACHE_MAX of them hold 160 MB.
    cache = KeyCache(store.lookup)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(2000):
            assert await cache.lookup(f"{i:06d}" + "K" * 16_000) is None
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown < 4 * 1024 * 1024, f"{grown} bytes held for 2000 made-up key ids"
