"""Authentication: which principal of which account sent a request.

Two proofs are accepted, each tied to an access key (server/protection/keystore.py):

- an AWS Signature Version 4, as every AWS SDK and the AWS CLI sign requests, in the
  Authorization header or a presigned query string (SQS protocols and the native API);
- on the native API, ``Authorization: Bearer <token>``, a token derived from a key with
  ``conveyor keys token`` for tools such as curl that cannot sign. The token names its key
  and an expiry and is an HMAC under the key's secret, so it dies with the key and needs
  no server-side state.

With ``--auth none`` nothing is checked, and every request acts as the configured
default account (principal "anonymous"); a signature, if present, is not verified.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import time

from aiohttp import web

from server.errors import (
    IncompleteSignatureError,
    InvalidClientTokenIdError,
    MalformedRequestError,
    MissingAuthenticationTokenError,
    RequestExpiredError,
    SignatureDoesNotMatchError,
)
from server.protection import sigv4
from server.protection.keystore import KeyCache
from server.sqs import json_protocol
from server.web import appkeys

ANONYMOUS = "anonymous"
# The longest a bearer token may live: it cannot be revoked alone, only with its key.
TOKEN_TTL_S_MAX = 7 * 24 * 60 * 60
_TOKEN_PREFIX = "cvt1"
# Unix seconds have 10 digits until the year 2286; 12 leaves room and bounds int().
_EXPIRY_DIGITS_MAX = 12


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    principal: str
    account: str
    access_key_id: str | None


def bearer_token(access_key_id: str, secret: str, expires_at: int) -> str:
    """A bearer token for the native API, valid until ``expires_at`` (unix seconds)."""
    mac = _token_mac(secret, access_key_id, expires_at)
    return f"{_TOKEN_PREFIX}.{access_key_id}.{expires_at}.{mac}"


def _token_mac(secret: str, access_key_id: str, expires_at: int) -> str:
    mac = hmac.new(secret.encode(), f"conveyor-bearer\0{access_key_id}\0{expires_at}".encode(),
                   hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


class Authenticator:
    def __init__(self, keys: KeyCache | None, default_account: str) -> None:
        """``keys`` None: authentication is off (``--auth none``)."""
        self.keys = keys
        self._anonymous = Caller(ANONYMOUS, default_account, None)
        # Never UNSIGNED-PAYLOAD: the body would then be bound by nothing, and both SQS
        # protocols carry the action's parameters there (the query protocol its Action too).
        self._verifier = sigv4.Verifier(allow_unsigned_payload=False)

    @property
    def required(self) -> bool:
        return self.keys is not None

    async def authenticate(self, request: web.Request) -> Caller:
        if self.keys is None:
            return self._anonymous
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            if request.path.startswith("/v1/"):
                return await self._bearer(authorization[7:].strip())
            raise IncompleteSignatureError("bearer tokens are accepted on the native API "
                                           "(/v1) only; SQS requests must be signed")
        target = request.raw_path
        if "#" in target:
            # aiohttp takes what follows '#' for a fragment, which no handler reads, while
            # a signature over the raw target would cover it: the two could then differ.
            raise MalformedRequestError("a request target may not hold '#'")
        query_string = request.rel_url.raw_query_string
        signed = sigv4.parse(request.headers, query_string)
        if signed is None:
            raise MissingAuthenticationTokenError()
        if request.get(appkeys.PROTOCOL) == "sqs-json":
            sigv4.require_signed(signed, json_protocol.SIGNED_HEADERS,
                                 "an SQS JSON request's action and protocol are read from it")
        key = await self.keys.lookup(signed.access_key_id)
        if key is None:
            raise InvalidClientTokenIdError(signed.access_key_id)
        body = await request.read() if request.body_exists else b""
        self._verifier.verify(signed, key.secret, method=request.method,
                              raw_path=target.partition("?")[0],
                              query_string=query_string,
                              headers=request.headers,
                              body=body, now=time.time())
        return Caller(key.principal, key.account, key.access_key_id)

    async def _bearer(self, token: str) -> Caller:
        parts = token.split(".")
        # ASCII digits only, and few of them: str.isdigit() alone admits "²", which int()
        # refuses, and int() refuses more than 4,300 digits; either would be a 500.
        if (len(parts) != 4 or parts[0] != _TOKEN_PREFIX or not parts[2].isascii()
                or not parts[2].isdigit() or len(parts[2]) > _EXPIRY_DIGITS_MAX):
            raise IncompleteSignatureError("a bearer token is cvt1.<key id>.<expiry>.<mac>")
        _, key_id, expiry, mac = parts
        key = await self.keys.lookup(key_id) if self.keys is not None else None
        if key is None:
            raise InvalidClientTokenIdError(key_id)
        expires_at = int(expiry)
        # Compared as bytes: compare_digest raises TypeError on a str that is not ASCII.
        expected = _token_mac(key.secret, key_id, expires_at).encode()
        if not hmac.compare_digest(mac.encode("utf-8", "surrogateescape"), expected):
            raise SignatureDoesNotMatchError("the bearer token's mac is wrong")
        now = time.time()
        if expires_at < now:
            raise RequestExpiredError("the bearer token has expired")
        # A token cannot be revoked alone, so one made (by anything holding the secret) to
        # outlive TOKEN_TTL_S_MAX is refused, as docs/FORMAT.md promises; the clock skew
        # allowed to signatures covers a token made on another machine.
        if expires_at > now + TOKEN_TTL_S_MAX + sigv4.SKEW_S_MAX:
            raise IncompleteSignatureError(f"a bearer token lives at most "
                                           f"{TOKEN_TTL_S_MAX} s")
        return Caller(key.principal, key.account, key.access_key_id)
