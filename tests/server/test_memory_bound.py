"""A real server at its memory bound (--memory-max): a producer with no consumer gets 503
with Retry-After instead of growing the process, loses nothing acknowledged, and is taken
again once a consumer drains the queue."""

from __future__ import annotations

import json
import random
import string
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from server.config import MEMORY_RESERVE_BYTES
from tests.support.server import Server

MiB = 1 << 20
# Room for messages above what the server holds at start. A FIFO message with its own
# 128-character deduplication id costs some 800 bytes of state, so the bound is met
# after about 30,000 of them.
ROOM_BYTES = 24 * MiB
ID_CHARS = 128
REFUSALS_WANTED = 20


def resident(server: Server) -> int:
    assert server.process is not None
    with open(f"/proc/{server.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def random_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=ID_CHARS))


def native(server: Server, path: str, document: dict[str, Any] | None = None
           ) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(
        server.url + path, data=json.dumps(document or {}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def test_a_producer_without_consumers_is_held_at_the_bound(tmp_path: Path) -> None:
    probe = Server(tmp_path / "probe", fsync="never")
    try:
        at_start = resident(probe)
    finally:
        probe.stop()
    bound = at_start + MEMORY_RESERVE_BYTES + ROOM_BYTES
    server = Server(tmp_path / "data", fsync="never", extra=("--memory-max", str(bound)))
    try:
        run(server, bound)
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


def run(server: Server, bound: int) -> None:
    sqs = server.sqs()
    url = sqs.create_queue(QueueName="backlog.fifo",
                           Attributes={"FifoQueue": "true"})["QueueUrl"]
    acked: set[str] = set()
    refusals = 0
    for i in range(20_000):
        if i % 100 == 0:  # under the bound all along, not only once refused
            assert resident(server) <= bound, (i, resident(server), bound)
        entries = [{"Id": str(j), "MessageBody": f"m {i} {j}", "MessageGroupId": f"g{i // 10}",
                    "MessageDeduplicationId": random_id()} for j in range(10)]
        try:
            response = sqs.send_message_batch(QueueUrl=url, Entries=entries)
        except ClientError as exc:
            meta = exc.response["ResponseMetadata"]
            assert (meta["HTTPStatusCode"], exc.response["Error"]["Code"]) == (
                503, "ServiceUnavailable"), exc.response
            assert int(meta["HTTPHeaders"]["retry-after"]) >= 1
            refusals += 1
            if refusals >= REFUSALS_WANTED:
                break
            continue
        assert not response.get("Failed"), response["Failed"]
        acked.update(e["MessageBody"] for e in entries)
    assert refusals == REFUSALS_WANTED, "never refused"
    assert len(acked) > 10_000, "refused before the room was used"
    # The refusals changed nothing, and the process stayed under its bound.
    assert resident(server) <= bound, (resident(server), bound)
    # The native API names the cause, and says when to try again.
    status, error, headers = native(
        server, "/v1/queues/backlog.fifo/messages/batch",
        {"messages": [{"body": "one more", "group_id": "g", "dedup_id": "one more"}]})
    assert (status, error["error"]["code"]) == (503, "MemoryFull"), error
    assert int(headers["Retry-After"]) >= 1
    # A consumer drains everything acknowledged, once each.
    received: list[str] = []
    while True:
        status, got, _ = native(server, "/v1/queues/backlog.fifo/messages/receive",
                                {"max_messages": 100, "visibility_timeout": 600})
        assert status == 200, got
        if not got["messages"]:
            break
        received += [m["body"] for m in got["messages"]]
        status, deleted, _ = native(server, "/v1/queues/backlog.fifo/messages/delete",
                                    {"receipts": [m["receipt"] for m in got["messages"]]})
        assert status == 200 and not any(deleted["results"]), deleted
    assert sorted(received) == sorted(acked)
    # And the producer is taken again.
    entries = [{"Id": "0", "MessageBody": "after", "MessageGroupId": "g",
                "MessageDeduplicationId": "after"}]
    assert not sqs.send_message_batch(QueueUrl=url, Entries=entries).get("Failed")
    assert resident(server) <= bound
