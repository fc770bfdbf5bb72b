"""HTTP load generator: SQS JSON requests against a real Conveyor server.

    python -m bench.http_load [--seconds 8] [--concurrency 16] [--fsync always]

In one invocation it starts a Conveyor server and a bare aiohttp handler
(bench/bare_server.py) on loopback ports, then drives each with keep-alive connections:

- ``bare``: the baseline, one POST per request to the bare handler;
- ``send1``: SendMessage, one message per request;
- ``send10``: SendMessageBatch of 10;
- ``recv10``: ReceiveMessage of up to 10, then DeleteMessageBatch of what came;
- ``mixed``: half the connections send batches of 10, half receive and delete.

For each it prints requests/s, messages/s, p50 and p99 latency, and the server's CPU
microseconds per message (user + system time of the server process from /proc, over the
messages handled). Client and server share the machine's cores: the client's own cost is
part of every number, and the ratios against ``bare`` measured in the same run are what
carry over between machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

TARGET = "AmazonSQS."
HEADERS = {"Content-Type": "application/x-amz-json-1.0"}
QUEUE = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Result:
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = 0
        self.messages = 0
        self.latencies: list[float] = []
        self.seconds = 0.0
        self.cpu_s = 0.0

    def row(self) -> dict[str, Any]:
        lat = sorted(self.latencies) or [0.0]
        return {
            "scenario": self.name,
            "requests_per_s": self.requests / self.seconds,
            "messages_per_s": self.messages / self.seconds,
            "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": lat[int(len(lat) * 0.99) - 1 if len(lat) > 1 else 0] * 1000,
            "server_cpu_us_per_message": (self.cpu_s / self.messages * 1e6
                                          if self.messages else None),
        }


Op = Callable[[aiohttp.ClientSession], Awaitable[int]]


async def _drive(name: str, url: str, workers: list[Op], seconds: float, pid: int,
                 concurrency: int) -> Result:
    result = Result(name)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.monotonic() + seconds

        async def loop(op: Op) -> None:
            while time.monotonic() < stop:
                started = time.perf_counter()
                messages = await op(session)
                result.latencies.append(time.perf_counter() - started)
                result.requests += 1
                result.messages += messages

        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(loop(w) for w in workers))
        result.seconds = time.monotonic() - t0
        result.cpu_s = _cpu_seconds(pid) - cpu0
    return result


def _sqs(url: str, action: str, body: dict[str, Any]) -> Op:
    payload = json.dumps(body).encode()
    headers = {**HEADERS, "X-Amz-Target": TARGET + action}

    async def op(session: aiohttp.ClientSession) -> int:
        async with session.post(url, data=payload, headers=headers) as response:
            data = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{action}: {response.status} {data[:200]!r}")
        return 1 if action == "SendMessage" else len(body.get("Entries", [])) or 0

    return op


def _receive_delete(url: str, queue_url: str) -> Op:
    receive = json.dumps({"QueueUrl": queue_url, "MaxNumberOfMessages": 10}).encode()

    async def op(session: aiohttp.ClientSession) -> int:
        async with session.post(url, data=receive, headers={
                **HEADERS, "X-Amz-Target": TARGET + "ReceiveMessage"}) as response:
            messages = (await response.json(content_type=None)).get("Messages", [])
        if not messages:
            return 0
        delete = json.dumps({"QueueUrl": queue_url, "Entries": [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
            for i, m in enumerate(messages)]}).encode()
        async with session.post(url, data=delete, headers={
                **HEADERS, "X-Amz-Target": TARGET + "DeleteMessageBatch"}) as response:
            await response.read()
        return len(messages)

    return op


async def _bare_op(session: aiohttp.ClientSession, url: str, payload: bytes) -> int:
    async with session.post(url, data=payload, headers=HEADERS) as response:
        await response.read()
    return 1


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = tempfile.mkdtemp(prefix="conveyor-load-")
    port, bare_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--data-dir", f"{tmp}/data",
         "--port", str(port), "--fsync", args.fsync, "--no-access-log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare = subprocess.Popen([sys.executable, "-m", "bench.bare_server", str(bare_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url, bare_url = f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{bare_port}/"
        _wait_ready(url + "readyz")
        _wait_port(bare_port)
        return asyncio.run(_scenarios(args, url, bare_url, server.pid, bare.pid))
    finally:
        for process in (server, bare):
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


async def _scenarios(args: argparse.Namespace, url: str, bare_url: str, pid: int,
                     bare_pid: int) -> list[dict[str, Any]]:
    body = "x" * args.body
    create = {**HEADERS, "X-Amz-Target": TARGET + "CreateQueue"}
    async with (aiohttp.ClientSession() as session,
                session.post(url, data=json.dumps({"QueueName": QUEUE}),
                             headers=create) as response):
        queue_url = (await response.json(content_type=None))["QueueUrl"]
    one = {"QueueUrl": queue_url, "MessageBody": body}
    ten = {"QueueUrl": queue_url,
           "Entries": [{"Id": str(i), "MessageBody": body} for i in range(10)]}
    n = args.concurrency
    bare_payload = json.dumps(one).encode()
    results = [await _drive("bare", bare_url,
                            [lambda s: _bare_op(s, bare_url, bare_payload)] * n,
                            args.seconds, bare_pid, n)]
    results.append(await _drive("send1", url, [_sqs(url, "SendMessage", one)] * n,
                                args.seconds, pid, n))
    results.append(await _drive("send10", url, [_sqs(url, "SendMessageBatch", ten)] * n,
                                args.seconds, pid, n))
    results.append(await _drive("recv10", url, [_receive_delete(url, queue_url)] * n,
                                args.seconds, pid, n))
    half = max(1, n // 2)
    results.append(await _drive(
        "mixed", url, [_sqs(url, "SendMessageBatch", ten)] * half
        + [_receive_delete(url, queue_url)] * half, args.seconds, pid, n))
    return [r.row() for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--body", type=int, default=100, help="message body bytes")
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        print(json.dumps(rows))
        return
    base = rows[0]["requests_per_s"]
    send1 = rows[1]["messages_per_s"]
    print(f"fsync={args.fsync} concurrency={args.concurrency} body={args.body} B "
          f"seconds={args.seconds}")
    print(f"{'scenario':<8} {'req/s':>10} {'msgs/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cpu us/msg':>11}")
    for row in rows:
        cpu = row["server_cpu_us_per_message"]
        print(f"{row['scenario']:<8} {row['requests_per_s']:>10,.0f} "
              f"{row['messages_per_s']:>10,.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
              f"{cpu if cpu is not None else float('nan'):>11.1f}")
    print(f"send1 requests / bare requests: {rows[1]['requests_per_s'] / base:.2f}")
    print(f"send10 messages / send1 messages: {rows[2]['messages_per_s'] / send1:.2f}")
    print(f"recv10 messages / send1 messages: {rows[3]['messages_per_s'] / send1:.2f}")


if __name__ == "__main__":
    main()
