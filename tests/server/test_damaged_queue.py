"""A queue whose files are damaged: the server keeps it closed with 503 QueueDamaged and
every other queue serves on; the operator verifies and salvages, and it opens again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import botocore.exceptions

from engine import format
from tests.support.server import Server, queue_dir


def _conveyor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args],
                          capture_output=True, text=True, timeout=120)


def _segment(data: Path, queue: str) -> Path:
    [segment] = (queue_dir(data, queue) / "log").glob(f"*{format.LOG_SUFFIX}")
    return segment


def test_a_damaged_queue_is_refused_alone_until_it_is_salvaged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = Server(data)
    try:
        sqs = server.sqs()
        damaged = sqs.create_queue(QueueName="damaged")["QueueUrl"]
        fine = sqs.create_queue(QueueName="fine")["QueueUrl"]
        for i in range(50):  # one batch each: damage early in the file has valid ones after
            sqs.send_message(QueueUrl=damaged, MessageBody=f"m{i:02d}")
        sqs.send_message(QueueUrl=fine, MessageBody="untouched")
        server.stop()
        segment = _segment(data, "damaged")
        raw = bytearray(segment.read_bytes())
        at = len(raw) // 2
        raw[at] ^= 0x40
        segment.write_bytes(bytes(raw))

        server.start()
        sqs = server.sqs()
        for _ in range(2):  # the second answer comes from what the first found
            try:
                sqs.receive_message(QueueUrl=damaged)
            except botocore.exceptions.ClientError as exc:
                error = exc.response
            else:
                raise AssertionError("a damaged queue answered")
            assert error["ResponseMetadata"]["HTTPStatusCode"] == 503
            assert error["Error"]["Code"] == "QueueDamaged"
        assert segment.read_bytes() == bytes(raw), "opening changed the damaged file"
        got = sqs.receive_message(QueueUrl=fine)["Messages"]
        assert [m["Body"] for m in got] == ["untouched"]
        assert "queue 000000000000/damaged is damaged" in server.log.read_text()
        server.stop()

        # The operator's acts: verify names the damage, salvage keeps every valid record.
        found = _conveyor("log", "verify", "-q", str(data))
        assert found.returncode == 1, found.stdout + found.stderr
        salvaged = _conveyor("log", "salvage", str(data))
        assert salvaged.returncode == 0, salvaged.stderr
        server.start()
        sqs = server.sqs()
        bodies: set[str] = set()
        while got := sqs.receive_message(QueueUrl=damaged, MaxNumberOfMessages=10,
                                         VisibilityTimeout=60).get("Messages", []):
            bodies |= {m["Body"] for m in got}
        assert 45 <= len(bodies) < 50, sorted(bodies)  # the damaged batch's message is gone
        assert bodies <= {f"m{i:02d}" for i in range(50)}
    finally:
        server.kill()
