"""What only the operator sees: the whole cluster view (/v1/cluster) and /metrics.

**Admins.** Access keys carry no admin marker (server/protection/keystore.py: a key is a
principal of an account, nothing more), so the operator is the server's own account,
``ServerConfig.account_id`` (000000000000, the account ``conveyor keys create`` uses when
no ``--account`` is given, and the one everyone acts as under ``--auth none``): every
principal of it is an admin. Any other account is a tenant, and sees only its own queues.

**/metrics** names every account's queues and principals, so it takes no access key at
all: a scraper presents the metrics token (``--metrics-token-file``) as
``Authorization: Bearer <token>``, which Prometheus sends from its
``authorization: credentials_file``. A token rather than a listener of its own: Prometheus
usually scrapes from another host, which a loopback listener would shut out and any
other listener would need the same token to guard; and the nodes of a cluster on one host
would each need one more port. Under ``--auth none`` (loopback only, unless ``--insecure``)
/metrics is open, as everything else is, unless a token is configured; under
``--auth required`` without a token it is refused.
"""

from __future__ import annotations

import hmac
import os
import re
import stat

from aiohttp import web

from engine.errors import ConfigError
from server.errors import MetricsUnauthorizedError

# Characters of the metrics token: at least 32 (`openssl rand -hex 32` gives 64) so that it
# cannot be guessed, at most 1,024 so that reading it bounds memory; visible ASCII only,
# which any HTTP header carries unchanged.
METRICS_TOKEN_CHARS_MIN = 32
METRICS_TOKEN_CHARS_MAX = 1024
_TOKEN = re.compile(rb"[\x21-\x7e]+")


def is_admin(account: str, server_account: str) -> bool:
    """True for a principal of the server's own account (see the module docstring)."""
    return account == server_account


def load_metrics_token(path: str) -> bytes:
    """The token in ``path``, one line; a file group or others may read is refused, as the
    master key's is: a token that has been exposed is not a secret."""
    try:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError("metrics token file", path,
                              f"its mode is {stat.S_IMODE(mode):o}; it must be 0600 or stricter")
        with open(path, "rb") as f:
            raw = f.read(METRICS_TOKEN_CHARS_MAX + 3)
    except OSError as exc:
        raise ConfigError("metrics token file", path, exc.strerror or str(exc)) from None
    token = raw.rstrip(b"\r\n")
    if not (METRICS_TOKEN_CHARS_MIN <= len(token) <= METRICS_TOKEN_CHARS_MAX
            and _TOKEN.fullmatch(token)):
        raise ConfigError("metrics token file", path,
                          f"it must hold one line of {METRICS_TOKEN_CHARS_MIN} to "
                          f"{METRICS_TOKEN_CHARS_MAX} visible ASCII characters")
    return token


class MetricsGate:
    """Who may scrape /metrics: the holder of ``token``; with no token, anyone while
    authentication is off, and no one while it is required."""

    def __init__(self, token: bytes | None, auth_required: bool) -> None:
        self._token = token
        self._auth_required = auth_required

    def check(self, request: web.Request) -> None:
        if self._token is None:
            if self._auth_required:
                raise MetricsUnauthorizedError(
                    "this server requires authentication and has no metrics token: "
                    "start it with --metrics-token-file")
            return
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        # Compared as bytes: compare_digest raises TypeError on a str that is not ASCII.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode("utf-8", "surrogateescape"), self._token):
            raise MetricsUnauthorizedError(
                "/metrics needs Authorization: Bearer <the metrics token>")
