"""`conveyor dev-cluster`: etcd and three nodes on loopback, usable at once through any
node, and all of it gone after Ctrl-C."""

from __future__ import annotations

import contextlib
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config


def _free_base() -> int:
    """A base port whose node, replication and etcd ports are all free."""
    for _ in range(50):
        base = random.randrange(20000, 40000)
        ports = [base + i for i in range(3)] + [base + 100 + i for i in range(3)] \
            + [base + 200, base + 201]
        with contextlib.ExitStack() as stack:
            try:
                for port in ports:
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError("no free port range")


def _sqs(url: str) -> object:
    return boto3.client("sqs", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=Config(retries={"total_max_attempts": 1}))


def test_dev_cluster_serves_through_every_node_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    base = _free_base()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "dev-cluster", "--nodes", "3", "--base-port",
         str(base), "--data-dir", str(tmp_path / "cluster")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, f"dev-cluster ended early: {''.join(lines)}"
            lines.append(line)
            if "Ctrl-C" in line:
                break
        urls = re.findall(r"node\d: (http://\S+)", "".join(lines))
        assert len(urls) == 3, lines
        first, second, third = (_sqs(u) for u in urls)
        url = first.create_queue(QueueName="jobs")["QueueUrl"]  # type: ignore[attr-defined]
        second.send_message(QueueUrl=url, MessageBody="hello")  # type: ignore[attr-defined]
        got = third.receive_message(QueueUrl=url,  # type: ignore[attr-defined]
                                    WaitTimeSeconds=5, VisibilityTimeout=1)["Messages"]
        assert [m["Body"] for m in got] == ["hello"]
        # Deleted and made again, the queue is new: the old message does not come back.
        second.delete_queue(QueueUrl=url)  # type: ignore[attr-defined]
        url = third.create_queue(QueueName="jobs")["QueueUrl"]  # type: ignore[attr-defined]
        time.sleep(1.5)
        again = first.receive_message(QueueUrl=url,  # type: ignore[attr-defined]
                                      WaitTimeSeconds=1)
        assert again.get("Messages", []) == []

        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        assert "stopped" in process.stdout.read()
        for port in [base, base + 1, base + 2, base + 200]:
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
