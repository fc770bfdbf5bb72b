"""Verification of AWS Signature Version 4, the server side of what botocore signs.

Every SQS client (boto3, the AWS CLI, the other AWS SDKs) proves who it is by signing the
request with the secret of an access key: an HMAC-SHA256, under a key derived from the
secret and the credential scope (date, region, service), over a *canonical request*. The
server never sees the secret travel; it rebuilds the canonical request from the request as
received, signs it with its copy of the secret and compares. So the whole difficulty is to
rebuild, from the bytes on the wire, exactly the string the client built from its own
view of the request before sending it. What botocore does, and what that asks of us:

- Canonical URI. botocore takes the path of the URL it was given, removes dot segments
  and empty segments, then percent-encodes it once more (safe characters ``/~``), so an
  already-encoded ``%2F`` is signed as ``%252F``: the "double encoding" of non-S3
  services. Its HTTP client (urllib3) sends that path unchanged, except that characters a
  path may not contain (a space, non-ASCII) are percent-encoded on the way out. The server
  therefore encodes the path it receives once more, which matches every well-formed URL,
  and, only when that fails and the path holds escapes urllib3 would have made itself,
  tries once more with those escapes undone (see :func:`_unescaped_uri`).
- Canonical query string. botocore encodes each key and value with the safe characters
  ``-_.~`` and sorts the pairs; on the wire the same parameters arrive form-encoded (a
  space as ``+``) or already in canonical form (presigned URLs). The server decodes each
  key and value and encodes it again, which gives the canonical form from either. It
  must start from the *raw* query: aiohttp's ``request.query_string`` is decoded by yarl;
  use ``request.rel_url.raw_query_string``, what the handlers read too (not the part of
  ``request.raw_path`` after ``?``, which keeps a '#' and what follows it).
- Canonical headers: the signed headers, lowercase, sorted, each value with its runs of
  whitespace collapsed to one space and trimmed, repeated headers joined with ``,``.
- Payload hash. For SQS botocore hashes the body with SHA-256 in both forms (the
  ``UNSIGNED-PAYLOAD`` of presigned URLs is an S3 rule, not a SigV4 one); when the request
  carries ``X-Amz-Content-SHA256`` it signs that value instead, so the server checks that
  the value is the body's hash before trusting it. The one other value botocore puts
  there, ``UNSIGNED-PAYLOAD`` (over HTTPS, when an operation turns payload signing off),
  leaves the body unsigned and is refused unless the verifier is told to allow it.

The string to sign names the timestamp and the scope, so a signature is worth nothing
outside a few minutes (:data:`SKEW_S_MAX`) or past a presigned URL's expiry.

A signature covers only the headers it names in SignedHeaders; any other header can be
changed in flight and the signature still verifies. So a verifier must also insist that
the headers it acts on are named: here, always ``host`` and the header the signing time
was read from (``x-amz-date``, or ``date`` when botocore signed with the Date header; a
presigned URL carries X-Amz-Date in its signed query), and whatever else the caller
names with :func:`require_signed` (the SQS JSON protocol's ``x-amz-target`` and
``content-type``: server/protection/auth.py). botocore signs every header the request
holds when it is signed, bar ``user-agent``, ``expect``, tracing and hop-by-hop headers,
so an AWS SDK's requests always pass; a refusal is :class:`~server.errors.UnsignedHeaderError`.

:func:`parse` does everything that needs neither the secret nor the clock, so that a
malformed request is refused before the access key is looked up; :meth:`Verifier.verify`
does the rest. Both run on the event loop for every request: their patterns are compiled
once, at import, and the signing key derived from a secret (four HMACs) is cached per
secret and scope, so a request costs a SHA-256 of its body, one of its canonical request
and an HMAC. The checks of a credential and its signed-header list are remembered per
pair, since a client signs every request with the same ones.
"""

from __future__ import annotations

import calendar
import datetime
import functools
import hashlib
import hmac
import re
import time
from collections.abc import Collection, Iterable, Mapping
from email.utils import parsedate_tz
from typing import NamedTuple
from urllib.parse import quote, unquote_plus, unquote_to_bytes

from multidict import CIMultiDict, CIMultiDictProxy

from server.errors import (
    IncompleteSignatureError,
    InvalidClientTokenIdError,
    RequestExpiredError,
    SignatureDoesNotMatchError,
    UnsignedHeaderError,
)

ALGORITHM = "AWS4-HMAC-SHA256"
# How far a request's timestamp may be from the server's clock, either way.
SKEW_S_MAX = 300
# A presigned URL lives at most a week, as on AWS.
EXPIRES_S_MAX = 7 * 24 * 60 * 60
# The credential-scope services this server answers to: SQS, and its own native API.
SERVICES = frozenset({"sqs", "conveyor"})
# Derived signing keys kept; one per (secret, day, region, service) in use.
KEY_CACHE_MAX = 1024
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

_SCOPE_TERMINATOR = "aws4_request"
_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_AMZ_DATE_RE = re.compile(r"\d{8}T\d{6}Z\Z", re.ASCII)
_SCOPE_DATE_RE = re.compile(r"\d{8}\Z", re.ASCII)
_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}\Z", re.ASCII)
# SignedHeaders: HTTP header names (tokens), lowercase, separated by ';'.
_SIGNED_HEADERS_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+(?:;[a-z0-9!#$%&'*+.^_`|~-]+)*\Z",
                                re.ASCII)
# A query component that is its own canonical form: nothing to decode, nothing to encode.
_UNRESERVED_RE = re.compile(r"[A-Za-z0-9_.~-]*\Z", re.ASCII)
_ESCAPE_RE = re.compile(rb"%([0-9A-Fa-f]{2})")
# The bytes urllib3 leaves as they are in a path (RFC 3986 pchar and '/', plus '%', whose
# escapes it keeps): an escape of any other byte may be urllib3's and not the client's.
_WIRE_PATH_BYTES = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-~!$&'()*+,;=:@/%")
# Parameters that make a query string a presigned SigV4 one (any of them).
_QUERY_MARKERS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature")
_QUERY_REQUIRED = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                   "X-Amz-SignedHeaders", "X-Amz-Signature")
_HEADER_COMPONENTS = frozenset({"Credential", "SignedHeaders", "Signature"})
# The Authorization header exactly as botocore writes it: parsed by one match, and giving
# the same components as the general parser (_header_components) would. The values are
# printable ASCII other than ',' and space: anything else (a Unicode space, which the
# general parser's strip() removes) goes the general way.
_BOTOCORE_HEADER_RE = re.compile(r"AWS4-HMAC-SHA256 Credential=([!-+\--~]+), "
                                 r"SignedHeaders=([!-+\--~]+), Signature=([!-+\--~]+)\Z")
# (credential, signed headers) pairs whose checks are remembered, and the longest kept.
CLAIMS_CACHE_MAX = 256
_CLAIMS_CACHED_CHARS_MAX = 512


class SignedRequest(NamedTuple):
    """What a request claims about its signature, checked for shape but not yet verified.

    A NamedTuple and not a frozen dataclass: one is made per request, and a frozen
    dataclass sets each of its ten fields through object.__setattr__."""

    access_key_id: str
    date: str  # YYYYMMDD of the credential scope
    region: str
    service: str
    amz_date: str  # the signing time, 20261128T043000Z
    timestamp: int  # the same, in unix seconds
    signed_headers: tuple[str, ...]  # lowercase, sorted
    signature: str  # 64 lowercase hex digits
    presigned: bool
    expires_s: int | None  # X-Amz-Expires of a presigned URL

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/{_SCOPE_TERMINATOR}"


Headers = Mapping[str, str]


def parse(headers: Headers, query_string: str) -> SignedRequest | None:
    """The SigV4 claims of a request, or None if it carries no SigV4 at all.

    ``headers`` are the request's headers (aiohttp's ``request.headers``); any other
    mapping is looked up case-insensitively too. ``query_string`` is the raw query, as
    on the wire (``request.rel_url.raw_query_string``, not ``request.query_string``).

    An Authorization header of another scheme (``Bearer``, SigV2's ``AWS``) is not SigV4
    and gives None; one of the AWS4 family that is not AWS4-HMAC-SHA256, or any SigV4
    that is not well formed, raises IncompleteSignatureError. Raises also
    InvalidClientTokenIdError for a session token (this server issues none),
    SignatureDoesNotMatchError for a scope that cannot be right (its date not that of the
    signing time, a service other than :data:`SERVICES`), and UnsignedHeaderError when
    ``host`` or the header of the signing time is not signed.
    """
    ci = _case_insensitive(headers)
    authorizations = ci.getall("Authorization", ())
    in_header = any(a.lstrip()[:4].upper() == "AWS4" for a in authorizations)
    query = _auth_params(query_string) if "X-Amz-" in query_string else None
    if in_header:
        if query is not None:
            raise IncompleteSignatureError("a request is signed in its Authorization header "
                                           "or in its query string, not both")
        if len(authorizations) != 1:
            raise IncompleteSignatureError("more than one Authorization header")
        return _parse_header(authorizations[0], ci, query_string)
    if query is not None:
        return _parse_query(query, ci)
    return None


def _parse_header(authorization: str, headers: CIMultiDictProxy[str] | CIMultiDict[str],
                  query_string: str) -> SignedRequest:
    botocore = _BOTOCORE_HEADER_RE.match(authorization)
    if botocore is not None:
        credential, names, signature = botocore.groups()
    else:
        credential, names, signature = _header_components(authorization)
    akid, date, region, service, signed_headers = _claims(credential, names)
    if "X-Amz-Security-Token" in headers or "X-Amz-Security-Token=" in query_string:
        raise InvalidClientTokenIdError(akid)
    signature = _signature(signature)
    amz_date = headers.get("X-Amz-Date")
    if amz_date is not None:
        timestamp = _parse_amz_date(amz_date)
        # The string to sign repeats the time, so a changed header fails anyway; but
        # SigV4 (and AWS) require the header signed, and botocore always signs it.
        _require(signed_headers, "x-amz-date", "it holds the signing time")
    else:
        # botocore signs with the Date header instead when the request already had one.
        http_date = headers.get("Date")
        if http_date is None:
            raise IncompleteSignatureError("a signed request needs an X-Amz-Date or a Date "
                                           "header")
        parsed = parsedate_tz(http_date)
        if parsed is None or not 1970 <= parsed[0] <= 9999:
            raise IncompleteSignatureError(f"the Date header {http_date[:40]!r} is not an "
                                           "HTTP date")
        # A date without a zone is GMT, as HTTP dates are (mktime_tz would take local time).
        timestamp = calendar.timegm((*parsed[:6], 0, 0, 0)) - (parsed[9] or 0)
        amz_date = time.strftime(_AMZ_DATE_FORMAT, time.gmtime(timestamp))
        _require(signed_headers, "date", "it holds the signing time (there is no X-Amz-Date)")
    return _checked(akid, date, region, service, amz_date, timestamp, signed_headers,
                    signature, presigned=False, expires_s=None)


def _header_components(authorization: str) -> tuple[str, str, str]:
    """Credential, SignedHeaders and Signature of any well-formed SigV4 header."""
    algorithm, _, rest = authorization.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise IncompleteSignatureError(f"unsupported algorithm {algorithm[:40]!r}; "
                                       f"only {ALGORITHM} is accepted")
    components: dict[str, str] = {}
    for part in rest.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in _HEADER_COMPONENTS or name in components:
            raise IncompleteSignatureError(
                "the Authorization header must be 'AWS4-HMAC-SHA256 Credential=..., "
                "SignedHeaders=..., Signature=...'")
        components[name] = value.strip()
    if len(components) != len(_HEADER_COMPONENTS):
        missing = sorted(_HEADER_COMPONENTS - components.keys())
        raise IncompleteSignatureError(f"the Authorization header lacks {', '.join(missing)}")
    return components["Credential"], components["SignedHeaders"], components["Signature"]


def _claims(credential: str, names: str) -> tuple[str, str, str, str, tuple[str, ...]]:
    """The access key id, scope and sorted signed headers; remembered for short values."""
    if len(credential) + len(names) <= _CLAIMS_CACHED_CHARS_MAX:
        return _cached_claims(credential, names)
    return _checked_claims(credential, names)


def _checked_claims(credential: str, names: str) -> tuple[str, str, str, str, tuple[str, ...]]:
    return (*_credential(credential), _signed_headers(names))


# A client signs every request with the same credential and header list, so their checks
# are done once per pair. Bounded in count, and in bytes by _CLAIMS_CACHED_CHARS_MAX; a
# pair that fails its checks raises and is not remembered.
_cached_claims = functools.lru_cache(maxsize=CLAIMS_CACHE_MAX)(_checked_claims)


def _parse_query(query: dict[str, str], headers: CIMultiDictProxy[str] | CIMultiDict[str]
                 ) -> SignedRequest:
    missing = [name for name in _QUERY_REQUIRED if name not in query]
    if missing:
        raise IncompleteSignatureError(f"a presigned query string lacks {', '.join(missing)}")
    if query["X-Amz-Algorithm"] != ALGORITHM:
        raise IncompleteSignatureError(f"unsupported algorithm {query['X-Amz-Algorithm'][:40]!r}"
                                       f"; only {ALGORITHM} is accepted")
    akid, date, region, service = _credential(query["X-Amz-Credential"])
    if "X-Amz-Security-Token" in query or "X-Amz-Security-Token" in headers:
        raise InvalidClientTokenIdError(akid)
    expires = query["X-Amz-Expires"]
    if not (expires.isascii() and expires.isdigit()
            and 1 <= int(expires) <= EXPIRES_S_MAX):
        raise IncompleteSignatureError(f"X-Amz-Expires must be 1..{EXPIRES_S_MAX} seconds")
    amz_date = query["X-Amz-Date"]
    return _checked(akid, date, region, service, amz_date, _parse_amz_date(amz_date),
                    _signed_headers(query["X-Amz-SignedHeaders"]),
                    _signature(query["X-Amz-Signature"]), presigned=True,
                    expires_s=int(expires))


def _checked(akid: str, date: str, region: str, service: str, amz_date: str, timestamp: int,
             signed_headers: tuple[str, ...], signature: str, *, presigned: bool,
             expires_s: int | None) -> SignedRequest:
    # The key is derived from the scope's date, the string to sign carries the timestamp:
    # a client signs both from one clock reading, so a difference is a forgery or a bug.
    if date != amz_date[:8]:
        raise SignatureDoesNotMatchError(f"the credential scope's date {date} is not the "
                                         f"date of the signing time {amz_date}")
    if service not in SERVICES:
        raise SignatureDoesNotMatchError(f"the credential scope names the service "
                                         f"{service[:40]!r}, not one of "
                                         f"{', '.join(sorted(SERVICES))}")
    return SignedRequest(akid, date, region, service, amz_date, timestamp, signed_headers,
                         signature, presigned, expires_s)


def _auth_params(query_string: str) -> dict[str, str] | None:
    """The decoded X-Amz-* parameters of a presigned query, None when it is not one."""
    params: dict[str, str] = {}
    for pair in query_string.split("&"):
        if not pair.startswith("X-Amz-"):
            continue
        name, _, value = pair.partition("=")
        if name in params:
            raise IncompleteSignatureError(f"the query string repeats {name[:40]}")
        params[name] = unquote_plus(value)
    if not any(marker in params for marker in _QUERY_MARKERS):
        return None
    return params


def _credential(credential: str) -> tuple[str, str, str, str]:
    parts = credential.split("/")
    if (len(parts) != 5 or parts[4] != _SCOPE_TERMINATOR or not _SCOPE_DATE_RE.match(parts[1])
            or not (parts[0] and parts[2] and parts[3])):
        raise IncompleteSignatureError(
            "the credential must be <access key id>/<YYYYMMDD>/<region>/<service>/aws4_request")
    return parts[0], parts[1], parts[2], parts[3]


def _signed_headers(value: str) -> tuple[str, ...]:
    if not _SIGNED_HEADERS_RE.match(value):
        raise IncompleteSignatureError("SignedHeaders must be lowercase header names "
                                       "separated by ';'")
    names = value.split(";")
    if len(set(names)) != len(names):
        raise IncompleteSignatureError("SignedHeaders names a header twice")
    # Without the host a signature could be replayed against another server.
    _require(names, "host", "a signature must name the server it is for")
    return tuple(sorted(names))


def require_signed(signed: SignedRequest, names: Iterable[str], why: str) -> None:
    """Raise UnsignedHeaderError unless every header of ``names`` (lowercase) is signed.

    For the headers a protocol reads to decide what a request does: the signature must
    cover them, or they could be changed in flight. Needs neither the secret nor the body,
    so it can run before the access key is looked up.
    """
    for name in names:
        _require(signed.signed_headers, name, why)


def _require(signed_headers: Collection[str], name: str, why: str) -> None:
    if name not in signed_headers:
        raise UnsignedHeaderError(name, why)


def _signature(value: str) -> str:
    if not _SIGNATURE_RE.match(value):
        raise IncompleteSignatureError("the signature must be 64 lowercase hex digits")
    return value


@functools.lru_cache(maxsize=4)  # every request signed in the same second has the same time
def _parse_amz_date(value: str) -> int:
    if _AMZ_DATE_RE.match(value):
        try:
            moment = datetime.datetime(
                int(value[0:4]), int(value[4:6]), int(value[6:8]), int(value[9:11]),
                int(value[11:13]), int(value[13:15]), tzinfo=datetime.UTC)
        except ValueError:
            pass
        else:
            return int(moment.timestamp())
    raise IncompleteSignatureError(f"X-Amz-Date {value[:40]!r} is not of the form "
                                   "YYYYMMDDTHHMMSSZ")


def _case_insensitive(headers: Headers) -> CIMultiDictProxy[str] | CIMultiDict[str]:
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):
        return headers
    return CIMultiDict(headers)


class Verifier:
    """Checks signatures against secrets; holds the cache of derived signing keys.

    ``allow_unsigned_payload``: accept ``X-Amz-Content-SHA256: UNSIGNED-PAYLOAD``, which
    botocore sends only over HTTPS when payload signing is turned off. Off by default:
    the body would then be covered by nothing but the transport.
    """

    def __init__(self, skew_s: int = SKEW_S_MAX, *, key_cache_size: int = KEY_CACHE_MAX,
                 allow_unsigned_payload: bool = False) -> None:
        if skew_s < 0 or key_cache_size < 1:
            raise ValueError("skew_s must be >= 0 and key_cache_size >= 1")
        self.skew_s = skew_s
        self.allow_unsigned_payload = allow_unsigned_payload
        self._key_cache_size = key_cache_size
        self._keys: dict[tuple[str, str, str, str], bytes] = {}

    @property
    def cached_keys(self) -> int:
        return len(self._keys)

    def signing_key(self, secret: str, date: str, region: str, service: str) -> bytes:
        """The key SigV4 derives from a secret for one day, region and service."""
        cache_key = (secret, date, region, service)
        key = self._keys.get(cache_key)
        if key is None:
            key = _hmac(("AWS4" + secret).encode("utf-8", "surrogateescape"), date)
            key = _hmac(key, region)
            key = _hmac(key, service)
            key = _hmac(key, _SCOPE_TERMINATOR)
            if len(self._keys) >= self._key_cache_size:
                # Dicts keep insertion order: the first key is the oldest.
                self._keys.pop(next(iter(self._keys)), None)
            self._keys[cache_key] = key
        return key

    def verify(self, signed: SignedRequest, secret: str, *, method: str, raw_path: str,
               query_string: str, headers: Headers, body: bytes,
               now: float | None = None) -> None:
        """Raise unless ``signed`` is a valid signature of this request under ``secret``.

        ``raw_path`` is the path as received (aiohttp's ``request.raw_path``; anything from
        ``?`` on is ignored), ``query_string`` the raw query (see :func:`parse`), ``body``
        the whole body. ``now`` defaults to the clock. Raises RequestExpiredError,
        IncompleteSignatureError (a signed header the request lacks) or
        SignatureDoesNotMatchError.
        """
        self._check_time(signed, time.time() if now is None else now)
        ci = _case_insensitive(headers)
        canonical_headers = _canonical_headers(ci, signed.signed_headers)
        payload_hash = self._payload_hash(ci, signed, body)
        query = _canonical_query(query_string, drop_signature=signed.presigned)
        path = _request_path(raw_path)
        key = self.signing_key(secret, signed.date, signed.region, signed.service)
        # Everything after the URI is the same for both candidate URIs.
        tail = "\n".join((query, canonical_headers, ";".join(signed.signed_headers),
                          payload_hash))
        if _matches(key, signed, method, _canonical_uri(path), tail):
            return
        unescaped = _unescaped_uri(path)
        if unescaped is not None and _matches(key, signed, method, unescaped, tail):
            return
        raise SignatureDoesNotMatchError()

    def _check_time(self, signed: SignedRequest, now: float) -> None:
        ahead = signed.timestamp - now
        if ahead > self.skew_s:
            raise RequestExpiredError(f"signed at {signed.amz_date}, {ahead:.0f} s ahead of "
                                      f"the server's clock (at most {self.skew_s} s)")
        if signed.presigned:
            if now > signed.timestamp + (signed.expires_s or 0):
                raise RequestExpiredError(f"the presigned URL of {signed.amz_date} expired "
                                          f"after {signed.expires_s} s")
        elif -ahead > self.skew_s:
            raise RequestExpiredError(f"signed at {signed.amz_date}, {-ahead:.0f} s behind "
                                      f"the server's clock (at most {self.skew_s} s)")

    def _payload_hash(self, headers: CIMultiDictProxy[str] | CIMultiDict[str],
                      signed: SignedRequest, body: bytes) -> str:
        # botocore signs the X-Amz-Content-SHA256 value in place of the body's hash when
        # the request carries one, so that value is only as good as its match with the body.
        declared = headers.get("X-Amz-Content-SHA256")
        if declared == UNSIGNED_PAYLOAD:
            if not self.allow_unsigned_payload:
                raise SignatureDoesNotMatchError("unsigned payloads are not accepted")
            if "x-amz-content-sha256" not in signed.signed_headers:
                raise SignatureDoesNotMatchError("UNSIGNED-PAYLOAD must be a signed header")
            return declared
        actual = hashlib.sha256(body).hexdigest()
        if declared is not None and declared.lower() != actual:
            raise SignatureDoesNotMatchError("X-Amz-Content-SHA256 is not the SHA-256 of "
                                             "the body")
        return actual if declared is None else declared


def _matches(key: bytes, signed: SignedRequest, method: str, uri: str, tail: str) -> bool:
    canonical_request = f"{method.upper()}\n{uri}\n{tail}"
    digest = hashlib.sha256(canonical_request.encode("utf-8", "surrogateescape")).hexdigest()
    string_to_sign = f"{ALGORITHM}\n{signed.amz_date}\n{signed.scope}\n{digest}"
    # hmac.digest: OpenSSL's one-shot HMAC, without the Python object hmac.new makes.
    expected = hmac.digest(key, string_to_sign.encode("utf-8", "surrogateescape"), "sha256")
    return hmac.compare_digest(expected.hex(), signed.signature)


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.digest(key, message.encode("utf-8", "surrogateescape"), "sha256")


def _canonical_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str],
                       names: tuple[str, ...]) -> str:
    lines = []
    for name in names:
        values = headers.getall(name, None)
        if values is None:
            raise IncompleteSignatureError(f"the signed header {name!r} is not in the request")
        # str.split() with no argument: botocore's "trimall" (runs of whitespace -> one space).
        if len(values) == 1:
            lines.append(f"{name}:{' '.join(values[0].split())}\n")
        else:
            lines.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}\n")
    return "".join(lines)


def _canonical_query(query_string: str, *, drop_signature: bool) -> str:
    if not query_string:
        return ""
    pairs = []
    for pair in query_string.split("&"):
        name, _, value = pair.partition("=")
        # Exactly the parameter parse() took the signature from, and only that one.
        if drop_signature and name == "X-Amz-Signature":
            continue
        pairs.append((_canonical_component(name), _canonical_component(value)))
    pairs.sort()
    return "&".join(f"{name}={value}" for name, value in pairs)


def _canonical_component(component: str) -> str:
    if _UNRESERVED_RE.match(component):
        return component
    # '+' is a space: what botocore's request preparation (urlencode) makes of one.
    raw = unquote_to_bytes(component.replace("+", " ").encode("utf-8", "surrogateescape"))
    return quote(raw, safe="-_.~")


def _request_path(raw_path: str) -> str:
    path = raw_path.partition("?")[0]
    if not path.startswith("/"):
        # An absolute-form target (through a proxy) or '*': the path is what follows the
        # authority, as it was in the URL the client signed.
        after_scheme = path.partition("://")[2]
        path = "/" + after_scheme.partition("/")[2] if after_scheme else "/"
    return path


def _canonical_uri(path: str) -> str:
    if path == "/":
        return path
    return quote(_remove_dot_segments(path), safe="/~", errors="surrogateescape")


def _unescaped_uri(path: str) -> str | None:
    """The canonical URI had the client's URL held raw what urllib3 escaped, or None.

    botocore signs the path of the URL it was given; urllib3 then escapes in it the
    characters a path may not hold (a space, non-ASCII): ``/a b`` is signed as ``/a%20b``
    and sent as ``/a%20b``, which the server, encoding once more, makes ``/a%2520b``. Undoing
    exactly the escapes of such characters recovers botocore's path. It never undoes an
    escape of '/', '%' or any character a path may hold, so the decoded path stays the
    same: a signature accepted this way is one for this very resource.
    """
    raw = _remove_dot_segments(path).encode("utf-8", "surrogateescape")
    if b"%" not in raw:
        return None
    unescaped = _ESCAPE_RE.sub(_unescape_foreign, raw)
    if unescaped == raw:
        return None
    return quote(unescaped, safe="/~")


def _unescape_foreign(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    return match.group(0) if byte in _WIRE_PATH_BYTES else bytes((byte,))


def _remove_dot_segments(path: str) -> str:
    # botocore's remove_dot_segments: RFC 3986 5.2.4, and empty segments dropped too.
    segments: list[str] = []
    for segment in path.split("/"):
        if segment and segment != ".":
            if segment == "..":
                if segments:
                    segments.pop()
            else:
                segments.append(segment)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and segments else ""
    return first + "/".join(segments) + last
