"""Helpers shared by the FrontEnd protection tests (encryption, throttling, isolation):
plain HTTP calls to the native API and /metrics, draining queues, and reading every byte a
server left in its data directory; and receipt handles forged from genuine ones (the
partition tests)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import Server

ACCOUNT = "000000000000"


class Reply:
    """A status, headers (lower-case names) and body, whatever the status."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:500]!r}>"


def http(server: Server, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
    request = urllib.request.Request(server.url + path, data=body, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()},
                         response.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def native(server: Server, method: str, path: str, payload: Any = None, *,
           raw: bytes | None = None, token: str | None = None,
           headers: dict[str, str] | None = None) -> Reply:
    """A native API call: ``payload`` is sent as JSON, ``raw`` as it is."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    body = raw
    if payload is not None:
        body = json.dumps(payload).encode()
        sent.setdefault("Content-Type", "application/json")
    elif raw is not None:
        sent.setdefault("Content-Type", "application/octet-stream")
    return http(server, method, path, body, sent)


def sqs_query(server: Server, fields: str, path: str = "/") -> Reply:
    """A query-protocol (form) request, unsigned."""
    return http(server, "POST", path, fields.encode(),
                {"Content-Type": "application/x-www-form-urlencoded"})


def drain(sqs: Any, url: str, timeout: float = 30) -> list[dict[str, Any]]:
    """Every message of the queue, each once: a long visibility timeout hides what was
    received for the rest of the drain."""
    messages: list[dict[str, Any]] = []
    empty = 0
    deadline = time.monotonic() + timeout
    while empty < 2:
        assert time.monotonic() < deadline, f"{url} did not drain in {timeout} s"
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=600,
                                  MessageAttributeNames=["All"], AttributeNames=["All"]
                                  ).get("Messages", [])
        messages += got
        empty = 0 if got else empty + 1
    return messages


def files_holding(data_dir: Path, needles: Iterable[bytes]) -> dict[bytes, list[str]]:
    """For each needle, the files under ``data_dir`` whose raw bytes contain it."""
    found: dict[bytes, list[str]] = {needle: [] for needle in needles}
    paths = sorted(p for p in data_dir.rglob("*") if p.is_file())
    assert paths, f"no files under {data_dir}"
    for path in paths:
        data = path.read_bytes()
        for needle in found:
            if needle in data:
                found[needle].append(str(path.relative_to(data_dir)))
    return found


def metrics(server: Server, token: str | None = None
            ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and sorted labels; ``token``: the metrics token
    the server was started with (--metrics-token-file)."""
    reply = http(server, "GET", "/metrics",
                 headers={"Authorization": f"Bearer {token}"} if token else None)
    assert reply.status == 200, reply
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metrics_token_file(path: Path, token: str | None = None) -> tuple[Path, str]:
    """A metrics token file (mode 0600, one line), as an operator makes one, and its
    token (``token``, or a random one)."""
    token = token or secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"{token}\n".encode())
    finally:
        os.close(fd)
    return path, token


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until ``condition()`` is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def forged_receipts(handle: str, foreign: str) -> list[str]:
    """Handles a queue must refuse, made from one of its own (``handle``) and one of
    another queue's (``foreign``): another uid under the same mac, a mac cut short, not a
    handle at all, and the other queue's handle as it is."""
    raw = bytearray(base64.urlsafe_b64decode(handle))
    raw[1] ^= 1  # another uid, same mac
    return [base64.urlsafe_b64encode(bytes(raw)).decode(), handle[:-4] + "AAA=",
            "not-a-receipt", foreign]

