"""A real server on a disk that fills (a small tmpfs): clean 503s, never a 500, and every
acknowledged message still there once space is freed and the server restarts.

Two queues: "big" takes large messages until the disk is full; "small.fifo" holds many
messages each with its own group and dedup id, so its snapshot is large. A little room
then comes back (less than that snapshot) and the server is stopped gracefully, which
snapshots every queue still working: the snapshot write comes up short. It must be
refused, not renamed into place over the last good one.
"""

from __future__ import annotations

import collections
import json
import random
import string
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from tests.support.disk import ballast, tmpfs
from tests.support.server import Server

MiB = 1 << 20
DISK_BYTES = 16 * MiB
BIG_BODY_CHARS = 200 * 1024
SMALL_BATCHES = 200
# Group and dedup ids of small.fifo's messages: random, so that its snapshot (which keeps
# both) is large, about 400 KiB, more than the stop frees (SLACK_BYTES, and the SQLite
# write-ahead logs of the server's other databases, deleted as they close).
ID_CHARS = 128
SLACK_BYTES = 16 * 1024
# Freed before the restart: the operator making room.
RESERVE_BYTES = 1 * MiB
REFUSALS_WANTED = 5


def random_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=ID_CHARS))


def drain(sqs: Any, url: str) -> set[str]:
    """Every body in the queue, each received once (the long visibility hides it)."""
    got: set[str] = set()
    empty = 0
    while empty < 2:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                       VisibilityTimeout=600).get("Messages", [])
        got.update(m["Body"] for m in messages)
        empty = 0 if messages else empty + 1
    return got


def native_send(server: Server, queue: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"{server.url}/v1/queues/{queue}/messages", data=body,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_full_disk_answers_503_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", DISK_BYTES) as disk:
        reserve = ballast(disk / "reserve", RESERVE_BYTES)
        server = Server(disk / "data")
        try:
            run(server, disk, reserve)
        finally:
            if server.process is not None and server.process.poll() is None:
                server.kill()


def run(server: Server, disk: Path, reserve: Path) -> None:
    sqs = server.sqs()
    small = sqs.create_queue(QueueName="small.fifo",
                             Attributes={"FifoQueue": "true"})["QueueUrl"]
    big = sqs.create_queue(QueueName="big")["QueueUrl"]
    acked: dict[str, set[str]] = {small: set(), big: set()}
    for i in range(SMALL_BATCHES):
        entries = [{"Id": str(j), "MessageBody": f"small {i} {j}",
                    "MessageGroupId": random_id(),
                    "MessageDeduplicationId": random_id()} for j in range(10)]
        response = sqs.send_message_batch(QueueUrl=small, Entries=entries)
        assert not response.get("Failed"), response["Failed"]
        acked[small].update(e["MessageBody"] for e in entries)
    slack = ballast(disk / "slack", SLACK_BYTES)

    refusals: collections.Counter[tuple[int, str]] = collections.Counter()
    for i in range(10_000):
        body = f"big {i:06d} " + uuid.uuid4().hex * (BIG_BODY_CHARS // 32)
        try:
            sqs.send_message(QueueUrl=big, MessageBody=body)
        except ClientError as exc:
            refusals[(exc.response["ResponseMetadata"]["HTTPStatusCode"],
                      exc.response["Error"]["Code"])] += 1
            if sum(refusals.values()) >= REFUSALS_WANTED:
                break
        else:
            acked[big].add(body)
    assert refusals == {(503, "ServiceUnavailable"): REFUSALS_WANTED}, refusals
    assert acked[big], "the disk filled before anything was acknowledged"
    # The native API names the cause.
    status, error = native_send(server, "big", b"one more")
    assert (status, error["error"]["code"]) == (503, "StorageFull"), error
    assert "No space left on device" in error["error"]["message"]
    # A queue cannot be made on the full disk either: the same 503, and nothing left over.
    queues = sorted((disk / "data" / "queues").iterdir())
    try:
        sqs.create_queue(QueueName="another")
        raise AssertionError("a queue was created on a full disk")
    except ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 503, exc.response
    assert sorted((disk / "data" / "queues").iterdir()) == queues

    slack.unlink()
    assert server.stop() == 0, server.log.read_text()[-3000:]
    # The stop snapshotted small.fifo into less room than its snapshot needs: the write
    # came up short, and was refused rather than renamed over the last good one.
    assert "queue 000000000000/small.fifo: no snapshot at close" in server.log.read_text()
    reserve.unlink()
    server.start()
    for url, bodies in acked.items():
        got = drain(sqs, url)  # a 500 here (a queue that no longer opens) raises
        assert not bodies - got, f"{len(bodies - got)} acknowledged messages lost from {url}"
    assert "Traceback" not in server.log.read_text()
