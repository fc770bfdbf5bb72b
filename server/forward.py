"""Forwarding: any node serves any request by passing it to the queue's leader.

The request goes on as it came - method, path, query, headers (Host and the signature
among them, so the leader checks the caller's SigV4 itself) and body - and the leader's
response comes back as it is. A forwarded request carries FORWARDED_HEADER; a node that
does not lead the queue either answers it 503 rather than forwarding again, so a
leadership change in flight costs a retry, never a loop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from replication.errors import NotLeaderError
from server.errors import DependencyUnavailableError

if TYPE_CHECKING:
    from replication.node import ClusterNode

_log = logging.getLogger("conveyor.server")

FORWARDED_HEADER = "X-Conveyor-Forwarded-By"
# Longer than the longest long poll (20 s) plus a commit wait.
FORWARD_TIMEOUT_S = 45.0
# Connection-level headers, and those the leader's response recomputes.
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding",
                  "te", "trailer", "upgrade", "content-length"})
_RESPONSE_DROP = _HOP | {"date", "server", "content-encoding"}


class Forwarder:
    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S),
            auto_decompress=False, connector=aiohttp.TCPConnector(limit=256))

    async def forward(self, request: web.Request, refusal: NotLeaderError) -> web.Response:
        """The leader's response to request; raises refusal if it cannot be forwarded."""
        if FORWARDED_HEADER in request.headers:
            raise refusal
        # The node's view is up to RECONCILE_S old: a queue made or failed over since has
        # a leader that only etcd knows yet.
        leader_url = refusal.leader_url or await self.node.locate(refusal.name)
        if leader_url is None:
            raise refusal
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers[FORWARDED_HEADER] = self.node.node_id
        body = await request.read()
        try:
            async with self._session.request(request.method, leader_url + request.path_qs,
                                             headers=headers, data=body,
                                             allow_redirects=False) as reply:
                payload = await reply.read()
                kept = [(k, v) for k, v in reply.headers.items()
                        if k.lower() not in _RESPONSE_DROP]
                response = web.Response(status=reply.status, body=payload)
                for k, v in kept:
                    response.headers.add(k, v)
                return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The address stays in the log, not in the client's message.
            _log.warning("forwarding to %s failed: %s", leader_url, exc or type(exc).__name__)
            raise DependencyUnavailableError("queue's leader node",
                                             "it could not be reached; retry") from exc

    async def close(self) -> None:
        await self._session.close()
