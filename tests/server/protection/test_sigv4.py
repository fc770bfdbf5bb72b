"""server/protection/sigv4.py against botocore's own signer.

No signature here is made by hand: botocore's SigV4Auth and SigV4QueryAuth sign every
request, and only the clock they read is fixed (botocore.auth.get_current_datetime), so
that skew and expiry can be tested to the second. Unit tests feed the pieces of the
prepared request to parse/verify; the wire tests send signed requests through botocore's
own HTTP session (urllib3), and boto3 itself, to a small aiohttp app, because what urllib3
does to a URL on the way out, and what aiohttp hands the server, are part of the contract.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import datetime
import hashlib
import json
import os
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import boto3
import botocore.auth
import hypothesis
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.httpsession import URLLib3Session
from hypothesis import strategies as st
from multidict import CIMultiDict

from server.errors import (
    AuthenticationError,
    IncompleteSignatureError,
    InvalidClientTokenIdError,
    RequestExpiredError,
    SignatureDoesNotMatchError,
    UnsignedHeaderError,
)
from server.protection import sigv4
from server.web.errors import spec_for
from tests.support.signing import SelectiveSigV4Auth, SelectiveSigV4QueryAuth

AKID = "AKIDCONVEYOREXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
T0 = datetime.datetime(2026, 11, 28, 4, 30, 0)
T0_S = calendar.timegm(T0.timetuple())
URL = "http://sqs.us-east-1.localhost:9324/"
QUEUE_URL = "http://sqs.us-east-1.localhost:9324/123456789012/orders"
JSON_HEADERS = {"Content-Type": "application/x-amz-json-1.0",
                "X-Amz-Target": "AmazonSQS.SendMessage"}
JSON_BODY = json.dumps({"QueueUrl": QUEUE_URL, "MessageBody": "héllo ✓ +/=&"}).encode()


@dataclasses.dataclass
class Wire:
    """A request as the server would see it: what aiohttp gives for each piece."""

    method: str
    raw_path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes


def wire(prepared: AWSPreparedRequest) -> Wire:
    parts = urlsplit(prepared.url)
    headers: CIMultiDict[str] = CIMultiDict(prepared.headers.items())
    if "Host" not in headers:
        # The Host header urllib3 adds: the port only when it is not the scheme's default.
        default = {"http": 80, "https": 443}[parts.scheme]
        port = f":{parts.port}" if parts.port not in (None, default) else ""
        headers["Host"] = f"{parts.hostname}{port}"
    body = prepared.body or b""
    return Wire(prepared.method, parts.path or "/", parts.query, headers,
                body.encode() if isinstance(body, str) else body)


def sign(method: str = "POST", url: str = URL, *, data: Any = b"",
         headers: dict[str, str] | None = None, params: Any = None, secret: str = SECRET,
         token: str | None = None, at: datetime.datetime = T0, service: str = "sqs",
         region: str = "us-east-1", expires: int | None = None,
         context: dict[str, Any] | None = None, only: tuple[str, ...] | None = None) -> Wire:
    """Sign with botocore at the time ``at``; ``expires`` set: a presigned URL; ``only``:
    sign those headers alone (botocore signs all)."""
    request = AWSRequest(method=method, url=url, data=data, headers=headers or {},
                         params=params or {})
    request.context.update(context or {})
    credentials = Credentials(AKID, secret, token)
    signer: SigV4Auth
    if only is not None:
        signer = (SelectiveSigV4Auth(credentials, service, region, only) if expires is None
                  else SelectiveSigV4QueryAuth(credentials, service, region, expires, only))
    else:
        signer = (SigV4Auth(credentials, service, region) if expires is None
                  else SigV4QueryAuth(credentials, service, region, expires=expires))
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=at):
        signer.add_auth(request)
    return wire(request.prepare())


def verify(w: Wire, *, secret: str = SECRET, now: float = T0_S,
           verifier: sigv4.Verifier | None = None) -> sigv4.SignedRequest:
    signed = sigv4.parse(w.headers, w.query_string)
    assert signed is not None
    (verifier or sigv4.Verifier()).verify(
        signed, secret, method=w.method, raw_path=w.raw_path, query_string=w.query_string,
        headers=w.headers, body=w.body, now=now)
    return signed


def with_authorization(w: Wire, old: str, new: str) -> Wire:
    headers = w.headers.copy()
    assert old in headers["Authorization"]
    headers["Authorization"] = headers["Authorization"].replace(old, new)
    return dataclasses.replace(w, headers=headers)


def with_query(w: Wire, old: str, new: str) -> Wire:
    assert old in w.query_string
    return dataclasses.replace(w, query_string=w.query_string.replace(old, new))


# --- requests botocore signs that must verify -----------------------------------------------


def test_json_protocol_post() -> None:
    w = sign(data=JSON_BODY, headers=JSON_HEADERS)
    signed = verify(w)
    assert signed == sigv4.SignedRequest(
        access_key_id=AKID, date="20261128", region="us-east-1", service="sqs",
        amz_date="20261128T043000Z", timestamp=T0_S,
        signed_headers=("content-type", "host", "x-amz-date", "x-amz-target"),
        signature=signed.signature, presigned=False, expires_s=None)
    assert signed.scope == "20261128/us-east-1/sqs/aws4_request"


def test_query_protocol_form_post() -> None:
    # botocore's query serializer hands the parameters over as a dict: a form body.
    form = {"Action": "SendMessage", "Version": "2012-11-05", "QueueUrl": QUEUE_URL,
            "MessageBody": "héllo wörld +/=&?%20~*"}
    w = sign(data=form,
             headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    assert b"MessageBody=h%C3%A9llo+w%C3%B6rld" in w.body
    verify(w)


def test_get_with_query_parameters_needing_encoding() -> None:
    params = [("QueueNamePrefix", "a b/c+d=e&f"), ("unicode", "é✓"), ("Action", "ListQueues"),
              ("tilde~key", "x~y*z!'()"), ("empty", ""), ("dup", "2"), ("dup", "1")]
    w = sign("GET", URL, params=params)
    # urllib's urlencode makes spaces '+' on the wire, where the signed form has %20.
    assert "QueueNamePrefix=a+b%2Fc%2Bd%3De%26f" in w.query_string
    verify(w)


def test_service_conveyor_and_any_region() -> None:
    signed = verify(sign(data=b'{"x":1}', service="conveyor", region="eu-west-3"))
    assert (signed.service, signed.region) == ("conveyor", "eu-west-3")


def test_date_header_instead_of_x_amz_date() -> None:
    # botocore keeps to a Date header when the request already has one.
    w = sign(data=b"{}", headers={"Date": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert "X-Amz-Date" not in w.headers
    assert w.headers["Date"].startswith("Sat, 28 Nov 2026 04:30:00")
    signed = verify(w)
    assert signed.amz_date == "20261128T043000Z" and "date" in signed.signed_headers


def test_whitespace_in_signed_header_values() -> None:
    w = sign(data=b"{}", headers={"X-Conveyor-Note": "  a   lot\tof   space  "})
    verify(w)
    # aiohttp strips the ends of a value; the canonical form does not care.
    w.headers["X-Conveyor-Note"] = "a lot\tof   space"
    verify(w)


def test_plain_mapping_headers_are_looked_up_case_insensitively() -> None:
    w = sign(data=JSON_BODY, headers=JSON_HEADERS)
    lowered = {k.lower(): v for k, v in w.headers.items()}
    signed = sigv4.parse(lowered, w.query_string)
    assert signed is not None
    sigv4.Verifier().verify(signed, SECRET, method="post", raw_path=w.raw_path,
                            query_string=w.query_string, headers=lowered, body=w.body,
                            now=T0_S)


def test_declared_content_sha256() -> None:
    declared = hashlib.sha256(JSON_BODY).hexdigest()
    w = sign(data=JSON_BODY, headers={**JSON_HEADERS, "X-Amz-Content-SHA256": declared})
    assert "x-amz-content-sha256" in verify(w).signed_headers
    with pytest.raises(SignatureDoesNotMatchError, match="SHA-256 of the body"):
        verify(dataclasses.replace(w, body=JSON_BODY + b" "))


def test_declared_content_sha256_that_lies_is_refused() -> None:
    # botocore signs the declared value, not the body: the signature itself is good.
    lie = hashlib.sha256(b"something else").hexdigest()
    w = sign(data=JSON_BODY, headers={**JSON_HEADERS, "X-Amz-Content-SHA256": lie})
    with pytest.raises(SignatureDoesNotMatchError, match="SHA-256 of the body"):
        verify(w)
    verify(dataclasses.replace(w, body=b"something else"))


def test_unsigned_payload() -> None:
    # What botocore sends over HTTPS when payload signing is off for an operation.
    w = sign(url="https://sqs.us-east-1.localhost/", data=JSON_BODY, headers=JSON_HEADERS,
             context={"payload_signing_enabled": False})
    assert w.headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    with pytest.raises(SignatureDoesNotMatchError, match="unsigned payloads"):
        verify(w)
    lenient = sigv4.Verifier(allow_unsigned_payload=True)
    verify(w, verifier=lenient)
    verify(dataclasses.replace(w, body=b"anything"), verifier=lenient)


# --- presigned URLs ---------------------------------------------------------------------------


def test_presigned_get() -> None:
    w = sign("GET", URL, params={"Action": "ListQueues", "QueueNamePrefix": "a b/é+"},
             expires=900)
    assert "X-Amz-Signature=" in w.query_string and "Authorization" not in w.headers
    signed = verify(w)
    assert signed.presigned and signed.expires_s == 900
    assert signed.signed_headers == ("host",)


def test_presigned_post_moves_the_form_into_the_query() -> None:
    w = sign(data={"Action": "SendMessage", "QueueUrl": QUEUE_URL, "MessageBody": "hé llo"},
             headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
             expires=60)
    assert w.body == b"" and "MessageBody=h%C3%A9%20llo" in w.query_string
    verify(w)
    # The hash of the empty body is signed: a body added afterwards is refused.
    with pytest.raises(SignatureDoesNotMatchError):
        verify(dataclasses.replace(w, body=b"Action=DeleteQueue"))


def test_presigned_expiry() -> None:
    w = sign("GET", URL, params={"Action": "ListQueues"}, expires=60)
    verify(w, now=T0_S + 60)
    with pytest.raises(RequestExpiredError, match="expired after 60 s"):
        verify(w, now=T0_S + 61)
    verify(w, now=T0_S - 299)
    with pytest.raises(RequestExpiredError, match="ahead"):
        verify(w, now=T0_S - 301)


def test_presigned_query_tampering() -> None:
    w = sign("GET", URL, params={"Action": "ListQueues", "QueueNamePrefix": "a"}, expires=60)
    with pytest.raises(SignatureDoesNotMatchError):
        verify(with_query(w, "QueueNamePrefix=a", "QueueNamePrefix=b"))
    with pytest.raises(SignatureDoesNotMatchError):
        verify(dataclasses.replace(w, query_string=w.query_string + "&Extra=1"))
    with pytest.raises(SignatureDoesNotMatchError):
        verify(with_query(w, "X-Amz-Expires=60", "X-Amz-Expires=600"), now=T0_S + 100)


@pytest.mark.parametrize(("old", "new"), [
    ("X-Amz-Expires=60", "X-Amz-Expires=0"),
    ("X-Amz-Expires=60", "X-Amz-Expires=604801"),
    ("X-Amz-Expires=60", "X-Amz-Expires=6O"),
    ("X-Amz-Expires=60", "X-Amz-Expires=%EF%BC%96"),  # a fullwidth digit
    ("X-Amz-Expires=60&", ""),
    ("X-Amz-Date=20261128T043000Z&", ""),
    ("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Algorithm=AWS4-HMAC-SHA512"),
    ("X-Amz-Credential=", "X-Amz-Credential=x&X-Amz-Credential="),
    ("X-Amz-SignedHeaders=host", "X-Amz-SignedHeaders=x-amz-date"),
    ("X-Amz-Date=20261128T043000Z", "X-Amz-Date=2026-11-28T04:30:00Z"),
])
def test_malformed_presigned_query(old: str, new: str) -> None:
    w = with_query(sign("GET", URL, params={"Action": "ListQueues"}, expires=60), old, new)
    with pytest.raises(IncompleteSignatureError):
        verify(w)


def test_presigned_without_signature_is_incomplete() -> None:
    w = sign("GET", URL, params={"Action": "ListQueues"}, expires=60)
    query = w.query_string.partition("&X-Amz-Signature=")[0]
    with pytest.raises(IncompleteSignatureError, match="X-Amz-Signature"):
        sigv4.parse(w.headers, query)


# --- refusals -----------------------------------------------------------------------------------


def test_wrong_secret() -> None:
    with pytest.raises(SignatureDoesNotMatchError):
        verify(sign(data=JSON_BODY, headers=JSON_HEADERS), secret=SECRET + "x")
    with pytest.raises(SignatureDoesNotMatchError):
        verify(sign("GET", URL, params={"A": "1"}, expires=60), secret="other")


def test_body_altered_after_signing() -> None:
    w = sign(data=JSON_BODY, headers=JSON_HEADERS)
    with pytest.raises(SignatureDoesNotMatchError):
        verify(dataclasses.replace(w, body=JSON_BODY.replace(b"/orders", b"/others")))


def test_signed_header_altered_but_not_unsigned_one() -> None:
    w = sign(data=JSON_BODY, headers={**JSON_HEADERS, "User-Agent": "botocore"})
    assert "user-agent" not in verify(w).signed_headers
    w.headers["User-Agent"] = "something else"
    verify(w)
    w.headers["X-Amz-Target"] = "AmazonSQS.DeleteQueue"
    with pytest.raises(SignatureDoesNotMatchError):
        verify(w)


def test_signed_header_repeated_on_the_wire() -> None:
    w = sign(data=JSON_BODY, headers=JSON_HEADERS)
    w.headers.add("X-Amz-Target", "AmazonSQS.DeleteQueue")
    with pytest.raises(SignatureDoesNotMatchError):
        verify(w)


def test_method_and_path_are_signed() -> None:
    w = sign(data=JSON_BODY, headers=JSON_HEADERS)
    with pytest.raises(SignatureDoesNotMatchError):
        verify(dataclasses.replace(w, method="PUT"))
    with pytest.raises(SignatureDoesNotMatchError):
        verify(dataclasses.replace(w, raw_path="/123456789012/orders"))


@pytest.mark.parametrize("delta", [-299, -300, 299, 300])
def test_clock_skew_within_bounds(delta: int) -> None:
    verify(sign(data=b"{}"), now=T0_S + delta)


@pytest.mark.parametrize("delta", [-301, 301, 86400])
def test_clock_skew_beyond_bounds(delta: int) -> None:
    with pytest.raises(RequestExpiredError):
        verify(sign(data=b"{}"), now=T0_S + delta)


def test_narrower_skew() -> None:
    with pytest.raises(RequestExpiredError, match="at most 5 s"):
        verify(sign(data=b"{}"), now=T0_S + 6, verifier=sigv4.Verifier(skew_s=5))


def test_scope_date_differs_from_signing_date() -> None:
    w = sign(data=b"{}")
    with pytest.raises(SignatureDoesNotMatchError, match="scope's date"):
        sigv4.parse(with_authorization(w, "/20261128/", "/20261127/").headers, "")
    # Signed a second before midnight, claiming the next second: another day.
    w = sign(data=b"{}", at=datetime.datetime(2026, 11, 27, 23, 59, 59))
    w.headers["X-Amz-Date"] = "20261128T000000Z"
    with pytest.raises(SignatureDoesNotMatchError, match="scope's date"):
        sigv4.parse(w.headers, "")
    w = sign("GET", URL, params={"A": "1"}, expires=60)
    with pytest.raises(SignatureDoesNotMatchError, match="scope's date"):
        sigv4.parse(w.headers, w.query_string.replace("%2F20261128%2F", "%2F20261129%2F"))


def test_signing_time_is_signed() -> None:
    w = sign(data=b"{}")
    w.headers["X-Amz-Date"] = "20261128T043001Z"
    with pytest.raises(SignatureDoesNotMatchError):
        verify(w)


def test_service_other_than_sqs_or_conveyor() -> None:
    with pytest.raises(SignatureDoesNotMatchError, match="service 's3'"):
        verify(sign(data=b"{}", service="s3"))


@pytest.mark.parametrize(("old", "new"), [
    (", Signature=", ", Nothing="),
    ("AWS4-HMAC-SHA256 ", "AWS4-HMAC-SHA512 "),
    ("AWS4-HMAC-SHA256 ", "AWS4-ECDSA-P256-SHA256 "),
    ("AWS4-HMAC-SHA256 ", "aws4-hmac-sha256 "),
    ("SignedHeaders=content-type;host;", "SignedHeaders=content-type;"),
    ("SignedHeaders=content-type;", "SignedHeaders=Content-Type;"),
    ("SignedHeaders=content-type;", "SignedHeaders=content-type;content-type;"),
    ("/us-east-1/sqs/aws4_request", "/us-east-1/aws4_request"),
    ("/us-east-1/sqs/aws4_request", "/us-east-1/sqs/aws5_request"),
    ("/20261128/", "/2026112/"),
    (f"Credential={AKID}/", "Credential=/"),
    ("Signature=", "Signature=ABCDEF"),
    ("Signature=", "Signature=zz"),
    (", Signature=", ", Signature=0, Signature="),
])
def test_malformed_authorization(old: str, new: str) -> None:
    w = with_authorization(sign(data=b"{}", headers=JSON_HEADERS), old, new)
    with pytest.raises(IncompleteSignatureError):
        verify(w)


def test_a_header_laid_out_otherwise_than_botocore_means_the_same() -> None:
    # botocore's layout is parsed by one match; any other takes the general parser, and
    # both must make the same claims of the same components.
    w = sign(data=JSON_BODY, headers=JSON_HEADERS)
    original = verify(w)
    components = w.headers["Authorization"].split(" ", 1)[1].split(", ")
    for layout in (" AWS4-HMAC-SHA256  " + " ,  ".join(reversed(components)) + " ",
                   "AWS4-HMAC-SHA256 " + ",".join(components)):
        relaid = dataclasses.replace(w, headers=w.headers.copy())
        relaid.headers["Authorization"] = layout
        assert verify(relaid) == original


# Values as botocore writes them (printable ASCII but ',' and space), and values with
# the characters where the two parsers could part: spaces, commas, Unicode spaces.
_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","),
            min_size=1, max_size=12),
    st.text(st.sampled_from("aZ09/;=-_,. \t\u00a0\u2003é"), max_size=12))


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(st.lists(_VALUES, min_size=3, max_size=3),
                  st.sampled_from([", ", ", ", ",", " , "]))
def test_the_botocore_layout_parses_as_the_general_parser_does(
        values: list[str], separator: str) -> None:
    header = "AWS4-HMAC-SHA256 " + separator.join(
        f"{name}={value}" for name, value in zip(
            ("Credential", "SignedHeaders", "Signature"), values, strict=True))
    fast = sigv4._BOTOCORE_HEADER_RE.match(header)
    hypothesis.event("botocore layout" if fast else "general parser only")
    if fast is None:
        return  # the general parser alone decides
    assert fast.groups() == sigv4._header_components(header)


def test_the_claims_cache_keeps_only_short_accepted_pairs() -> None:
    # Anyone can send an Authorization header, so the cache is bounded by count and by
    # the size of what it keeps, and a refused pair is not kept at all.
    assert sigv4._cached_claims.cache_info().maxsize == sigv4.CLAIMS_CACHE_MAX
    sigv4._cached_claims.cache_clear()
    w = sign(data=b"{}", headers=JSON_HEADERS)
    assert verify(w) == verify(w)
    info = sigv4._cached_claims.cache_info()
    assert (info.currsize, info.hits) == (1, 1)
    refused = with_authorization(w, "SignedHeaders=content-type;",
                                 "SignedHeaders=Content-Type;")
    for _ in range(2):
        with pytest.raises(IncompleteSignatureError):
            sigv4.parse(refused.headers, "")
    long = with_authorization(w, "/us-east-1/", "/" + "r" * 600 + "/")
    claims = sigv4.parse(long.headers, "")
    assert claims is not None and claims.region == "r" * 600
    assert sigv4._cached_claims.cache_info().currsize == 1


@pytest.mark.parametrize("value", ["AWS4-HMAC-SHA256", "AWS4-HMAC-SHA256 garbage",
                                   "AWS4-HMAC-SHA256 Credential=a, SignedHeaders=host",
                                   "AWS4garbage", "AWS4-HMAC-SHA256\tCredential=x"])
def test_garbage_authorization(value: str) -> None:
    with pytest.raises(IncompleteSignatureError):
        sigv4.parse(CIMultiDict({"Authorization": value, "X-Amz-Date": "20261128T043000Z"}),
                    "")


def test_missing_or_malformed_date() -> None:
    w = sign(data=b"{}")
    del w.headers["X-Amz-Date"]
    with pytest.raises(IncompleteSignatureError, match="X-Amz-Date or a Date"):
        sigv4.parse(w.headers, "")
    for bad in ("2026-11-28T04:30:00Z", "20261328T043000Z", "20261128T043000", "x" * 100):
        w.headers["X-Amz-Date"] = bad
        with pytest.raises(IncompleteSignatureError):
            sigv4.parse(w.headers, "")
    del w.headers["X-Amz-Date"]
    w.headers["Date"] = "yesterday"
    with pytest.raises(IncompleteSignatureError, match="not an HTTP date"):
        sigv4.parse(w.headers, "")


def test_signed_header_missing_from_request() -> None:
    w = sign(data=b"{}", headers=JSON_HEADERS)
    del w.headers["X-Amz-Target"]
    signed = sigv4.parse(w.headers, "")
    assert signed is not None
    with pytest.raises(IncompleteSignatureError, match="'x-amz-target'"):
        verify(w)


# --- what a signature must cover -------------------------------------------------------------


def test_host_must_be_signed() -> None:
    w = sign(data=b"{}", only=("x-amz-date",))
    with pytest.raises(UnsignedHeaderError, match="host") as caught:
        sigv4.parse(w.headers, "")
    assert caught.value.header == "host"


def test_x_amz_date_must_be_signed() -> None:
    w = sign(data=JSON_BODY, headers=JSON_HEADERS,
             only=("content-type", "host", "x-amz-target"))
    assert "X-Amz-Date" in w.headers
    with pytest.raises(UnsignedHeaderError, match="x-amz-date") as caught:
        sigv4.parse(w.headers, "")
    assert caught.value.header == "x-amz-date"


def test_the_date_header_must_be_signed_when_it_gives_the_time() -> None:
    w = sign(data=b"{}", headers={"Date": "Thu, 01 Jan 1970 00:00:00 GMT"}, only=("host",))
    with pytest.raises(UnsignedHeaderError, match="the date header") as caught:
        sigv4.parse(w.headers, "")
    assert caught.value.header == "date"
    # With an X-Amz-Date as well, that one gives the time, and it is the one to sign.
    w.headers["X-Amz-Date"] = "20261128T043000Z"
    with pytest.raises(UnsignedHeaderError) as caught:
        sigv4.parse(w.headers, "")
    assert caught.value.header == "x-amz-date"


def test_a_presigned_url_carries_its_time_in_the_signed_query() -> None:
    # X-Amz-Date is a query parameter, in the canonical query: nothing more to sign.
    w = sign("GET", URL, params={"Action": "ListQueues"}, expires=60, only=("host",))
    assert verify(w).signed_headers == ("host",)


def test_require_signed() -> None:
    w = sign(data=JSON_BODY, headers=JSON_HEADERS, only=("host", "x-amz-date"))
    signed = verify(w)  # the signature is good for what it covers
    sigv4.require_signed(signed, ("host",), "why")
    with pytest.raises(UnsignedHeaderError, match=r"x-amz-target.*: the reason") as caught:
        sigv4.require_signed(signed, ("x-amz-target", "content-type"), "the reason")
    assert caught.value.header == "x-amz-target"
    # What botocore signs passes.
    sigv4.require_signed(verify(sign(data=JSON_BODY, headers=JSON_HEADERS)),
                         ("content-type", "x-amz-target"), "why")


def test_an_unsigned_header_is_a_403_incomplete_signature() -> None:
    spec = spec_for(UnsignedHeaderError("x-amz-target", "why"))
    assert (spec.status, spec.sqs_type, spec.query_code) == (
        403, "IncompleteSignature", "IncompleteSignature")
    # A malformed signature stays a 400.
    assert spec_for(IncompleteSignatureError("bad")).status == 400


def test_signed_in_header_and_query_at_once() -> None:
    w = sign(data=b"{}")
    q = sign("GET", URL, params={"A": "1"}, expires=60)
    with pytest.raises(IncompleteSignatureError, match="not both"):
        sigv4.parse(w.headers, q.query_string)


def test_two_authorization_headers() -> None:
    w = sign(data=b"{}")
    w.headers.add("Authorization", w.headers["Authorization"])
    with pytest.raises(IncompleteSignatureError, match="more than one"):
        sigv4.parse(w.headers, "")


def test_session_token_is_refused() -> None:
    w = sign(data=b"{}", token="FQoGZXIvYXdzEXAMPLE")
    assert "X-Amz-Security-Token" in w.headers
    with pytest.raises(InvalidClientTokenIdError) as caught:
        sigv4.parse(w.headers, "")
    assert caught.value.access_key_id == AKID
    q = sign("GET", URL, params={"A": "1"}, token="FQoGZXIvYXdzEXAMPLE", expires=60)
    assert "X-Amz-Security-Token=" in q.query_string
    with pytest.raises(InvalidClientTokenIdError):
        sigv4.parse(q.headers, q.query_string)


# --- requests that are not SigV4 at all -----------------------------------------------------


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer cvt1.AKID.1795000000.mac"},
    {"Authorization": "AWS AKIDEXAMPLE:frJIUN8DYpKDtOLCwo//yllqDzg="},
    {"Authorization": ""}, {"X-Amz-Date": "20261128T043000Z"},
])
@pytest.mark.parametrize("query", ["", "Action=ListQueues", "X-Amz-Meta=1&X-Amz-Date=2"])
def test_not_sigv4(headers: dict[str, str], query: str) -> None:
    assert sigv4.parse(CIMultiDict(headers), query) is None


# --- the signing-key cache ------------------------------------------------------------------


def test_signing_key_cache_is_bounded_and_evicts_the_oldest() -> None:
    verifier = sigv4.Verifier(key_cache_size=4)
    secrets = [f"secret-{i}" for i in range(10)]
    for secret in secrets:
        verify(sign(data=b"{}", secret=secret), secret=secret, verifier=verifier)
        assert verifier.cached_keys <= 4
    assert verifier.cached_keys == 4
    newest = verifier.signing_key(secrets[-1], "20261128", "us-east-1", "sqs")
    assert verifier.signing_key(secrets[-1], "20261128", "us-east-1", "sqs") is newest
    oldest = verifier.signing_key(secrets[0], "20261128", "us-east-1", "sqs")
    assert verifier.cached_keys == 4
    # Evicted and derived again: equal, but not the object the cache held.
    assert verifier.signing_key(secrets[0], "20261128", "us-east-1", "sqs") is oldest
    assert oldest == sigv4.Verifier().signing_key(secrets[0], "20261128", "us-east-1", "sqs")
    # A request signed with an evicted secret still verifies.
    verify(sign(data=b"{}", secret=secrets[1]), secret=secrets[1], verifier=verifier)


def test_signing_key_is_sigv4s_derivation() -> None:
    # The derivation example of the AWS SigV4 documentation.
    key = sigv4.Verifier().signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215",
                                       "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


# --- over the wire: urllib3 and aiohttp -------------------------------------------------------


KEYS = {AKID: SECRET}


@dataclasses.dataclass
class Seen:
    raw_path: str
    path: str
    query_string: str
    raw_query_string: str


class App:
    """A small aiohttp server in a thread of its own: 200 when the signature verifies, the
    SQS JSON error otherwise. It records what aiohttp handed it."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread.start()
        assert self._started.wait(10)

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._runner is not None
            await self._runner.cleanup()
            self._loop.stop()
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._started.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        raw_query = request.rel_url.raw_query_string
        self.seen.append(Seen(request.raw_path, request.path, request.query_string, raw_query))
        body = await request.read()
        try:
            signed = sigv4.parse(request.headers, raw_query)
            if signed is None:
                return web.json_response({"__type": "MissingAuthenticationToken"}, status=403)
            secret = KEYS.get(signed.access_key_id)
            if secret is None:
                raise InvalidClientTokenIdError(signed.access_key_id)
            sigv4.Verifier().verify(signed, secret, method=request.method,
                                    raw_path=request.raw_path, query_string=raw_query,
                                    headers=request.headers, body=body)
        except AuthenticationError as exc:
            spec = spec_for(exc)
            return web.json_response(
                {"__type": f"com.amazonaws.sqs#{spec.sqs_type}", "message": str(exc)},
                status=spec.status, content_type="application/x-amz-json-1.0",
                headers={"x-amzn-query-error": f"{spec.query_code};Sender"})
        target = request.headers.get("X-Amz-Target", "")
        if target == "AmazonSQS.SendMessage":
            message = json.loads(body)["MessageBody"]
            return web.json_response(
                {"MessageId": str(uuid.uuid4()),
                 "MD5OfMessageBody": hashlib.md5(message.encode()).hexdigest()},
                content_type="application/x-amz-json-1.0")
        return web.json_response({"QueueUrls": []}, content_type="application/x-amz-json-1.0")


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    # Proxies from the environment must not see loopback traffic.
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.lower().endswith("_proxy"):
                patch.delenv(name)
        server = App()
        server.start()
        try:
            yield server
        finally:
            server.stop()


def send(app: App, method: str, path: str, *, params: Any = None, data: bytes = b"",
         secret: str = SECRET, expires: int | None = None) -> int:
    """Sign with botocore at the present time and send with botocore's HTTP session."""
    request = AWSRequest(method=method, url=app.url + path, params=params or {}, data=data)
    credentials = Credentials(AKID, secret)
    signer = (SigV4Auth(credentials, "sqs", "us-east-1") if expires is None
              else SigV4QueryAuth(credentials, "sqs", "us-east-1", expires=expires))
    signer.add_auth(request)
    session = URLLib3Session()
    try:
        return int(session.send(request.prepare()).status_code)
    finally:
        session.close()


def test_aiohttp_hands_the_raw_path_and_a_decoded_query_string(app: App) -> None:
    assert send(app, "GET", "/a b/x%2Fy", params={"k y": "v /+é"}) == 200
    seen = app.seen[-1]
    # urllib3 escaped the space in the path and left the client's %2F alone.
    assert seen.raw_path == "/a%20b/x%2Fy?k+y=v+%2F%2B%C3%A9"
    assert seen.raw_query_string == "k+y=v+%2F%2B%C3%A9"
    assert seen.path == "/a b/x/y"
    # request.query_string is decoded by yarl: it cannot give the canonical query back.
    assert seen.query_string != seen.raw_query_string
    assert seen.query_string == "k y=v /%2Bé"


# Not here: a ';' in the last segment. botocore signs the path urlsplit gives, but its HTTP
# session sends the one urlparse gives, without the ';...' "parameters": no server can match.
@pytest.mark.parametrize("path", [
    "/", "/123456789012/orders", "/123456789012/orders/", "/a%2Fb", "/a b/c", "/é/ü✓",
    "/%C3%A9", "/a%20b", "/a b%2Fc", "/x/./y/../z", "//double//slash/",
    "/~user/*!$'()+,=:@;x/y", "/a%7Eb", "/quote\"<>`{}|^",
])
def test_paths_over_the_wire(app: App, path: str) -> None:
    assert send(app, "POST", path, data=b"{}") == 200
    assert send(app, "GET", path, params={"Action": "ListQueues", "n": "a b"},
                expires=60) == 200


def test_path_confusion_is_refused(app: App) -> None:
    # A signature for /a/b is none for /a%2Fb, and one for /a b (sent as /a%20b) none for
    # /a%2520b: the second try on the path never undoes an escape of '/' or '%'.
    for signed_path, sent_path in (("/a/b", "/a%2Fb"), ("/a b", "/a%2520b"),
                                   ("/a%2Fb", "/a/b")):
        request = AWSRequest(method="POST", url=app.url + signed_path, data=b"{}")
        SigV4Auth(Credentials(AKID, SECRET), "sqs", "us-east-1").add_auth(request)
        prepared = request.prepare()
        prepared.url = app.url + sent_path
        session = URLLib3Session()
        try:
            assert session.send(prepared).status_code == 403
        finally:
            session.close()
        assert app.seen[-1].raw_path == sent_path


def test_wrong_secret_over_the_wire(app: App) -> None:
    assert send(app, "POST", "/", data=b"{}", secret="wrong") == 403
    assert send(app, "GET", "/", params={"A": "1"}, secret="wrong", expires=60) == 403


# --- boto3 itself ---------------------------------------------------------------------------


def client(app: App, secret: str = SECRET) -> Any:
    session = boto3.session.Session(aws_access_key_id=AKID, aws_secret_access_key=secret,
                                    region_name="us-east-1")
    return session.client("sqs", endpoint_url=app.url,
                          config=Config(retries={"total_max_attempts": 1}))


def test_boto3_end_to_end(app: App) -> None:
    sqs = client(app)
    assert sqs.list_queues(QueueNamePrefix="a b/é")["ResponseMetadata"]["HTTPStatusCode"] == 200
    sent = sqs.send_message(QueueUrl=app.url + "/123456789012/orders",
                            MessageBody="héllo ✓ +/=& \t")
    assert sent["MD5OfMessageBody"] == hashlib.md5("héllo ✓ +/=& \t".encode()).hexdigest()


def test_boto3_wrong_secret(app: App) -> None:
    with pytest.raises(ClientError) as caught:
        client(app, secret="not the secret").list_queues()
    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_boto3_presigned_url(app: App) -> None:
    url = client(app).generate_presigned_url(
        "list_queues", Params={"QueueNamePrefix": "a b/é"}, ExpiresIn=60)
    # botocore signs the operation's method (POST) and, for SQS's JSON protocol, the
    # protocol headers: the URL serves only a caller that sends the same.
    assert "content-type%3Bhost%3Bx-amz-target" in url
    protocol_headers = {"Content-Type": "application/x-amz-json-1.0",
                        "X-Amz-Target": "AmazonSQS.ListQueues", "X-Amzn-Query-Mode": "true"}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    post = urllib.request.Request(url, data=b"", headers=protocol_headers, method="POST")
    with opener.open(post) as response:
        assert response.status == 200
    for request, status, code in (
            (urllib.request.Request(url, headers=protocol_headers), 403, b"SignatureDoesNotMatch"),
            (urllib.request.Request(url), 400, b"IncompleteSignature")):
        with pytest.raises(urllib.error.HTTPError) as caught:
            opener.open(request)
        with caught.value as error:
            assert error.code == status
            assert code in error.read()
