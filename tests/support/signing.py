"""botocore's SigV4 signers, made to sign fewer headers than they would.

botocore signs every header a request holds (bar user-agent, tracing and hop-by-hop ones),
so it never makes a signature that leaves out X-Amz-Target or X-Amz-Date. Another client,
or an attacker holding one captured request, can: SigV4 itself lets the signer choose its
SignedHeaders. These signers make exactly such signatures, genuine ones, with botocore's
own canonicalisation, so a refusal is the server's rule at work and not a signing bug.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials


def _only(headers: HTTPHeaders, names: Collection[str]) -> HTTPHeaders:
    kept = HTTPHeaders()
    for name, value in headers.items():
        if name.lower() in names:
            kept[name] = value
    return kept


class SelectiveSigV4Auth(SigV4Auth):
    """SigV4Auth that signs only the headers named in ``signed`` (lowercase)."""

    def __init__(self, credentials: Credentials, service: str, region: str,
                 signed: Collection[str]) -> None:
        super().__init__(credentials, service, region)
        self.signed = frozenset(signed)

    def headers_to_sign(self, request: AWSRequest) -> Any:
        return _only(super().headers_to_sign(request), self.signed)


class SelectiveSigV4QueryAuth(SigV4QueryAuth):
    """SigV4QueryAuth (a presigned URL) that signs only the headers named in ``signed``."""

    def __init__(self, credentials: Credentials, service: str, region: str, expires: int,
                 signed: Collection[str]) -> None:
        super().__init__(credentials, service, region, expires=expires)
        self.signed = frozenset(signed)

    def headers_to_sign(self, request: AWSRequest) -> Any:
        return _only(super().headers_to_sign(request), self.signed)
