"""HTTP load generator: SQS JSON requests against a real Conveyor server.

    python -m bench.http_load [--seconds 8] [--concurrency 16] [--fsync always]
                              [--generator wrk|aiohttp] [--no-access-log]
    python -m bench.http_load --protection [--rounds 3]
    python -m bench.http_load --large [--large-kib 256] [--rounds 3]
    python -m bench.http_load --workers 2 [--rounds 3] [--concurrency 16]

In one invocation it starts a Conveyor server (its access log on, written to /dev/null,
unless ``--no-access-log``) and a bare aiohttp handler (bench/bare_server.py) on loopback
ports, then drives each with keep-alive connections:

- ``bare``: the baseline, one POST per request to the bare handler;
- ``send1``: SendMessage, one message per request;
- ``send10``: SendMessageBatch of 10;
- ``recv10``: ReceiveMessage of up to 10, then DeleteMessageBatch of what came;
- ``mixed``: half the connections send batches of 10, half receive and delete.

``bare``, ``send1``, ``send10`` and ``recv10`` are driven by wrk when it is installed (one
thread; ``_wrk`` sends one fixed request, ``_wrk_receive`` turns each receive's answer
into the next delete), ``mixed`` by an aiohttp client; ``--generator aiohttp`` drives all
of them with it.

For each it prints requests/s, messages/s, p50 and p99 latency, and the server's CPU
microseconds per message (user + system time of the server process from /proc, over the
messages handled), and the load generator's own CPU microseconds per message (this
process). Client and server share the machine's cores: the client's own cost is part of
every number, and the ratios against ``bare`` measured in the same run are what carry over
between machines.

With ``--protection`` it instead compares two servers started side by side: one with
authentication and encryption off, one with ``--auth required`` and an encrypted queue
(SqsManagedSseEnabled), every request signed with SigV4 by a real access key made with
``conveyor keys create``. It alternates send10 and recv10 between them for ``--rounds``
rounds and prints the protected server's message rate as a fraction of the plain one's.
send10 runs on wrk (with ``--generator wrk``, the default where wrk is installed), one
signed request re-sent; recv10 on the aiohttp client, which signs each delete it builds.

With ``--workers N`` it compares a server of one process against one of N workers
(``serve --workers N``), started side by side, alternating send10 and recv10 (both on wrk)
between them for ``--rounds`` rounds: messages/s, server CPU per message (summed over the
supervisor and its workers, as every server CPU figure here is) and the load generator's
CPU per message for each. Every other
mode serves with ``--workers 1``: they measure the request path itself.

With ``--large`` it measures the per-byte work of large bodies on one server, driven by
wrk: ``send-large``, SendMessage of ``--large-kib`` KiB from 4 connections, then
``recv-large``, ReceiveMessage of one message with VisibilityTimeout 0 from one connection
(the same backlog is received over and over, its bodies read from the log each time). It
prints the server's CPU microseconds per KiB of body for each, ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import hashlib
import hmac
import json
import os
import resource
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
from urllib.parse import urlsplit

import aiohttp

TARGET = "AmazonSQS."
HEADERS = {"Content-Type": "application/x-amz-json-1.0"}
QUEUE = "bench"
# Messages per measured second put in each queue before a --protection recv10 round: more
# than either server receives and deletes per second here.
FILL_PER_S = 15_000


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


def _tree_cpu_seconds(pid: int) -> float:
    """User + system seconds of the process and every descendant alive now: a server of
    workers is its supervisor and each worker."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry))
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += times.get(current, 0.0)
        stack.extend(children.get(current, ()))
    return total


class Result:
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = 0
        self.messages = 0
        self.latencies: list[float] = []
        self.seconds = 0.0
        self.cpu_s = 0.0
        self.client_cpu_s = 0.0
        self.percentiles: tuple[float, float] | None = None
        """p50 and p99 in seconds, when the generator gave them rather than latencies."""

    def row(self) -> dict[str, Any]:
        lat = sorted(self.latencies) or [0.0]
        p50, p99 = self.percentiles or (
            statistics.median(lat), lat[int(len(lat) * 0.99) - 1 if len(lat) > 1 else 0])
        return {
            "scenario": self.name,
            "requests_per_s": self.requests / self.seconds,
            "messages_per_s": self.messages / self.seconds,
            "p50_ms": p50 * 1000,
            "p99_ms": p99 * 1000,
            "server_cpu_us_per_message": (self.cpu_s / self.messages * 1e6
                                          if self.messages else None),
            # The load generator shares the cores: past a fifth of the server's CPU it
            # starts to measure itself.
            "client_cpu_us_per_message": (self.client_cpu_s / self.messages * 1e6
                                          if self.messages else None),
        }


Op = Callable[[aiohttp.ClientSession], Awaitable[int]]


async def _drive(name: str, url: str, workers: list[Op], seconds: float,
                 pid: int | list[int], concurrency: int) -> Result:
    """Run the workers for seconds; CPU is summed over pid (every node of a cluster)."""
    pids = [pid] if isinstance(pid, int) else pid
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

        cpu0, t0 = sum(map(_tree_cpu_seconds, pids)), time.monotonic()
        client0 = time.process_time()
        await asyncio.gather(*(loop(w) for w in workers))
        result.seconds = time.monotonic() - t0
        result.cpu_s = sum(map(_tree_cpu_seconds, pids)) - cpu0
        result.client_cpu_s = time.process_time() - client0
    return result


# wrk (Debian's) sends one fixed request over and over; its done() prints what it counted.
# A ``response`` hook may count answers as failed in its thread's ``bad``, which fails the
# run; without one wrk does not look at the answers.
_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "{content_type}"
{headers}
bad = 0
{response}
local threads = {{}}
setup = function(thread) threads[#threads + 1] = thread end
done = function(summary, latency, requests)
  local e = summary.errors
  local failed = 0
  for _, thread in ipairs(threads) do failed = failed + thread:get("bad") end
  io.write(string.format("WRK %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout + failed,
    latency:percentile(50), latency:percentile(99)))
end
"""

# recv-large's hook: an answer without a message counts as failed (a receive of nothing is
# cheap, and would pass for a fast one).
_EMPTY_RECEIVE_FAILS = """
response = function(status, headers, body)
  if status < 400 and not string.find(body, '"ReceiptHandle"', 1, true) then
    bad = bad + 1
  end
end
"""


# wrk's recv10: each answer to a ReceiveMessage becomes the next DeleteMessageBatch sent
# (on whichever connection asks next), otherwise a ReceiveMessage of 10 is sent. A receipt
# handle is URL-safe base64 (docs/FORMAT.md), so it is copied into the JSON unescaped. A
# delete with any Failed entry counts as failed, which fails the run.
_WRK_RECEIVE_SCRIPT = """
local queue_url = [==[{queue_url}]==]
local receive_headers = {{["Content-Type"] = "{content_type}",
  ["X-Amz-Target"] = "{target}ReceiveMessage"}}
local receive_body = '{{"QueueUrl":"' .. queue_url .. '","MaxNumberOfMessages":10}}'
local receive
local delete_headers = {{["Content-Type"] = "{content_type}",
  ["X-Amz-Target"] = "{target}DeleteMessageBatch"}}
local pending = {{}}
deleted, failed = 0, 0
request = function()
  local body = table.remove(pending)
  if body then return wrk.format("POST", nil, delete_headers, body) end
  -- Made on first use: wrk sets the Host header that wrk.format copies after loading.
  receive = receive or wrk.format("POST", nil, receive_headers, receive_body)
  return receive
end
response = function(status, headers, body)
  if status >= 400 then return end
  if string.find(body, '"Successful"', 1, true) then
    if not string.find(body, '"Failed":[]', 1, true) then failed = failed + 1 end
    for _ in string.gmatch(body, '"Id"') do deleted = deleted + 1 end
    return
  end
  local entries, n = {{}}, 0
  for handle in string.gmatch(body, '"ReceiptHandle":"([^"]*)"') do
    entries[#entries + 1] = '{{"Id":"' .. n .. '","ReceiptHandle":"' .. handle .. '"}}'
    n = n + 1
  end
  if n > 0 then
    pending[#pending + 1] = '{{"QueueUrl":"' .. queue_url .. '","Entries":[' ..
      table.concat(entries, ",") .. ']}}'
  end
end
local threads = {{}}
setup = function(thread) threads[#threads + 1] = thread end
done = function(summary, latency, requests)
  local e = summary.errors
  local done_deletes, bad = 0, 0
  for _, thread in ipairs(threads) do
    done_deletes = done_deletes + thread:get("deleted")
    bad = bad + thread:get("failed")
  end
  io.write(string.format("WRK %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout + bad,
    latency:percentile(50), latency:percentile(99), done_deletes))
end
"""


async def _wrk(name: str, url: str, action: str | None, payload: bytes, seconds: float,
               pid: int, concurrency: int, messages_per_request: int,
               signer: Signer | None = None, response: str = "") -> Result:
    """Drive url with wrk (one thread, concurrency connections) posting payload, as the
    SQS JSON action (None: no X-Amz-Target, for the bare handler). A C generator spends a
    few microseconds a request where the aiohttp client spends about a hundred, so on a
    machine of two cores it leaves the server the cores it would otherwise take.
    With ``signer``, the one request is signed once and sent as it is: the server verifies
    every copy in full, and a signature stays good for the server's five minutes of clock
    skew, longer than a run.
    Any answer of 400 or more (what wrk counts as an error), or a socket error, fails the
    run: the rate of refusals is not the rate of work."""
    if b"]==]" in payload:
        raise ValueError("payload cannot be quoted for wrk")
    if signer is not None and action is not None:
        extra = signer.headers(TARGET + action, payload)
        del extra["Content-Type"]  # the script sets it
    else:
        extra = {"X-Amz-Target": TARGET + action} if action else {}
    if any('"' in v or "\\" in v for v in extra.values()):
        raise ValueError("headers cannot be quoted for wrk")
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in extra.items())
    script = _WRK_SCRIPT.format(body=payload.decode(), headers=headers,
                                content_type=HEADERS["Content-Type"], response=response)
    result, _ = await _run_wrk(name, url, script, seconds, pid, concurrency)
    result.messages = result.requests * messages_per_request
    return result


async def _wrk_receive(name: str, url: str, queue_url: str, seconds: float, pid: int,
                       concurrency: int) -> Result:
    """recv10 driven by wrk: ReceiveMessage of 10, and a DeleteMessageBatch of what each
    brought; the messages counted are those deleted."""
    if "]==]" in queue_url or '"' in queue_url or "\\" in queue_url:
        raise ValueError("queue URL cannot be quoted for wrk")
    script = _WRK_RECEIVE_SCRIPT.format(queue_url=queue_url, target=TARGET,
                                        content_type=HEADERS["Content-Type"])
    result, fields = await _run_wrk(name, url, script, seconds, pid, concurrency)
    result.messages = fields[6]
    return result


async def _run_wrk(name: str, url: str, script_text: str, seconds: float, pid: int,
                   concurrency: int) -> tuple[Result, list[int]]:
    """Run wrk with script_text, whose done() prints a "WRK" line (requests, duration,
    bad answers, failures, p50, p99, then anything of the script's own); the result
    without its messages, and the line's numbers."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(script_text)
    try:
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = _tree_cpu_seconds(pid)
        process = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
            "-s", script.name, url, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        cpu = _tree_cpu_seconds(pid) - cpu0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        os.unlink(script.name)
    line = next((x for x in out.decode().splitlines() if x.startswith("WRK ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.decode().strip()}")
    fields = [int(x) for x in line.split()[1:]]
    requests, duration_us, bad_status, failures, p50_us, p99_us = fields[:6]
    if bad_status or failures:
        raise RuntimeError(f"{name}: {bad_status} answers of 400 or more and {failures} "
                           f"socket errors or failed entries out of {requests} requests")
    result = Result(name)
    result.requests = requests
    result.seconds = duration_us / 1e6
    result.cpu_s = cpu
    result.client_cpu_s = (children.ru_utime + children.ru_stime
                           - children0.ru_utime - children0.ru_stime)
    result.percentiles = (p50_us / 1e6, p99_us / 1e6)
    return result, fields


def run_large(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of (round, scenario, KiB/s, server CPU µs per KiB) for large bodies."""
    if shutil.which("wrk") is None:
        raise SystemExit("--large needs wrk (Debian's wrk package; `make wrk` installs it)")
    tmp = tempfile.mkdtemp(prefix="conveyor-load-")
    port = _free_port()
    server = _serve(f"{tmp}/data", port, args.fsync, access_log=args.access_log)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_ready(url + "readyz")
        return asyncio.run(_large(args, url, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


async def _large(args: argparse.Namespace, url: str, pid: int) -> list[dict[str, Any]]:
    kib = args.large_kib
    # Bodies past the default limit (256 KiB) need the queue's own limit raised to them.
    create = {"QueueName": QUEUE, "Attributes": {"MaximumMessageSize": str(kib * 1024)}
              if kib > 256 else {}}
    async with aiohttp.ClientSession() as session:
        queue_url = json.loads(await _post(session, url, None, "CreateQueue",
                                           json.dumps(create).encode()))["QueueUrl"]
    send = json.dumps({"QueueUrl": queue_url, "MessageBody": "x" * (kib * 1024)}).encode()
    receive = json.dumps({"QueueUrl": queue_url, "MaxNumberOfMessages": 1,
                          "VisibilityTimeout": 0}).encode()
    rows = []
    for round_ in range(1, args.rounds + 1):
        # The first send round also fills the queue that every receive round reads.
        measured = [
            await _wrk("send-large", url, "SendMessage", send, args.seconds, pid, 4, 1),
            await _wrk("recv-large", url, "ReceiveMessage", receive, args.seconds, pid, 1, 1,
                       response=_EMPTY_RECEIVE_FAILS)]
        for m in measured:
            if not m.messages:
                raise RuntimeError(f"{m.name}: no message moved in {m.seconds:.1f} s")
            rows.append({"round": round_, "scenario": m.name, "kib": kib,
                         "kib_per_s": m.messages * kib / m.seconds,
                         "server_cpu_us_per_kib": m.cpu_s / (m.messages * kib) * 1e6})
    return rows


def _print_large(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"fsync={args.fsync} body={args.large_kib} KiB seconds={args.seconds} "
          f"rounds={args.rounds} access log {'on' if args.access_log else 'off'}")
    print(f"{'round':<6}{'scenario':<12}{'MiB/s':>8}{'cpu us/KiB':>12}")
    for row in rows:
        print(f"{row['round']:<6}{row['scenario']:<12}{row['kib_per_s'] / 1024:>8.1f}"
              f"{row['server_cpu_us_per_kib']:>12.2f}")


class Signer:
    """Signs SQS JSON requests with AWS Signature Version 4, as an SDK does, but with the
    fixed header set of this load generator and the day's signing key kept: botocore
    spends about 190 µs per request here, which on a shared two-core machine would be
    billed to the server being measured. Every request still gets its own signature over
    its own body and time, and the server verifies each in full."""

    def __init__(self, url: str, access_key_id: str, secret: str,
                 region: str = "us-east-1") -> None:
        self.host = urlsplit(url).netloc
        self.access_key_id = access_key_id
        self.secret = secret
        self.region = region
        self._day = ""
        self._key = b""

    def headers(self, target: str, payload: bytes) -> dict[str, str]:
        now = datetime.datetime.now(datetime.UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        if day != self._day:
            key = ("AWS4" + self.secret).encode()
            for part in (day, self.region, "sqs", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._day, self._key = day, key
        signed = "content-type;host;x-amz-date;x-amz-target"
        canonical = (f"POST\n/\n\ncontent-type:{HEADERS['Content-Type']}\nhost:{self.host}\n"
                     f"x-amz-date:{amz_date}\nx-amz-target:{target}\n\n{signed}\n"
                     f"{hashlib.sha256(payload).hexdigest()}")
        scope = f"{day}/{self.region}/sqs/aws4_request"
        to_sign = (f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n"
                   f"{hashlib.sha256(canonical.encode()).hexdigest()}")
        signature = hmac.new(self._key, to_sign.encode(), hashlib.sha256).hexdigest()
        return {**HEADERS, "X-Amz-Target": target, "X-Amz-Date": amz_date,
                "Authorization": f"AWS4-HMAC-SHA256 Credential={self.access_key_id}/{scope}, "
                                 f"SignedHeaders={signed}, Signature={signature}"}


def _headers(signer: Signer | None, action: str, payload: bytes) -> dict[str, str]:
    if signer is None:
        return {**HEADERS, "X-Amz-Target": TARGET + action}
    return signer.headers(TARGET + action, payload)


async def _post(session: aiohttp.ClientSession, url: str, signer: Signer | None, action: str,
                payload: bytes) -> bytes:
    async with session.post(url, data=payload,
                            headers=_headers(signer, action, payload)) as response:
        data = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{action}: {response.status} {data[:200]!r}")
    return data


def _sqs(url: str, action: str, body: dict[str, Any], signer: Signer | None = None) -> Op:
    payload = json.dumps(body).encode()
    messages = 1 if action == "SendMessage" else len(body.get("Entries", []))

    async def op(session: aiohttp.ClientSession) -> int:
        await _post(session, url, signer, action, payload)
        return messages

    return op


def _receive_delete(url: str, queue_url: str, signer: Signer | None = None) -> Op:
    receive = json.dumps({"QueueUrl": queue_url, "MaxNumberOfMessages": 10}).encode()

    async def op(session: aiohttp.ClientSession) -> int:
        answer = await _post(session, url, signer, "ReceiveMessage", receive)
        messages = json.loads(answer).get("Messages", [])
        if not messages:
            return 0
        delete = json.dumps({"QueueUrl": queue_url, "Entries": [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
            for i, m in enumerate(messages)]}).encode()
        await _post(session, url, signer, "DeleteMessageBatch", delete)
        return len(messages)

    return op


async def _bare_op(session: aiohttp.ClientSession, url: str, payload: bytes) -> int:
    async with session.post(url, data=payload, headers=HEADERS) as response:
        await response.read()
    return 1


def _serve(data_dir: str, port: int, fsync: str, *extra: str, access_log: bool = False,
           workers: int = 1) -> subprocess.Popen[bytes]:
    """A server on the port; its access log, when on, goes to /dev/null (the lines are
    still made and written, once per turn of the loop, as in production). One process
    unless ``workers`` says more: the scenarios measure the request path itself."""
    log = [] if access_log else ["--no-access-log"]
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--data-dir", data_dir,
         "--port", str(port), "--fsync", fsync, "--workers", str(workers), *log, *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = tempfile.mkdtemp(prefix="conveyor-load-")
    port, bare_port = _free_port(), _free_port()
    server = _serve(f"{tmp}/data", port, args.fsync, access_log=args.access_log)
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
    one_payload = json.dumps(one).encode()  # send1's body, which the bare handler gets too
    if args.generator == "wrk":
        results = [
            await _wrk("bare", bare_url, None, one_payload, args.seconds, bare_pid, n, 1),
            await _wrk("send1", url, "SendMessage", one_payload, args.seconds, pid, n, 1),
            await _wrk("send10", url, "SendMessageBatch", json.dumps(ten).encode(),
                       args.seconds, pid, n, 10)]
    else:
        results = [
            await _drive("bare", bare_url, [lambda s: _bare_op(s, bare_url, one_payload)] * n,
                         args.seconds, bare_pid, n),
            await _drive("send1", url, [_sqs(url, "SendMessage", one)] * n, args.seconds,
                         pid, n),
            await _drive("send10", url, [_sqs(url, "SendMessageBatch", ten)] * n,
                         args.seconds, pid, n)]
    if args.generator == "wrk":
        results.append(await _wrk_receive("recv10", url, queue_url, args.seconds, pid, n))
    else:
        results.append(await _drive("recv10", url, [_receive_delete(url, queue_url)] * n,
                                    args.seconds, pid, n))
    half = max(1, n // 2)
    results.append(await _drive(
        "mixed", url, [_sqs(url, "SendMessageBatch", ten)] * half
        + [_receive_delete(url, queue_url)] * half, args.seconds, pid, n))
    return [r.row() for r in results]


def run_protection(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of (round, scenario, plain msgs/s, protected msgs/s, CPU µs/msg of each)."""
    tmp = tempfile.mkdtemp(prefix="conveyor-load-")
    protected_dir = f"{tmp}/protected"
    key = json.loads(subprocess.run(
        [sys.executable, "-m", "server.cli", "keys", "create", "--data-dir", protected_dir,
         "--principal", "load"], check=True, capture_output=True).stdout)
    port, protected_port = _free_port(), _free_port()
    plain = _serve(f"{tmp}/plain", port, args.fsync, access_log=args.access_log)
    protected = _serve(protected_dir, protected_port, args.fsync, "--auth", "required",
                       access_log=args.access_log)
    try:
        url, protected_url = (f"http://127.0.0.1:{port}/",
                              f"http://127.0.0.1:{protected_port}/")
        _wait_ready(url + "readyz")
        _wait_ready(protected_url + "readyz")
        signer = Signer(protected_url, key["access_key_id"], key["secret_access_key"])
        return asyncio.run(_compare(args, (url, None, plain.pid, {}),
                                    (protected_url, signer, protected.pid,
                                     {"SqsManagedSseEnabled": "true"})))
    finally:
        for process in (plain, protected):
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


Target = tuple[str, Signer | None, int, dict[str, str]]


async def _compare(args: argparse.Namespace, plain: Target, protected: Target,
                   labels: tuple[str, str] = ("plain", "protected")) -> list[dict[str, Any]]:
    body = "x" * args.body
    n = args.concurrency
    scenarios: dict[str, list[Callable[[], Awaitable[Result]]]] = {"send10": [],
                                                                     "recv10": []}
    fill: list[tuple[str, Signer | None, str, Op]] = []
    for url, signer, pid, attributes in (plain, protected):
        create = json.dumps({"QueueName": QUEUE, "Attributes": attributes}).encode()
        async with aiohttp.ClientSession() as session:
            queue_url = json.loads(await _post(session, url, signer, "CreateQueue",
                                               create))["QueueUrl"]
        ten = {"QueueUrl": queue_url,
               "Entries": [{"Id": str(i), "MessageBody": body} for i in range(10)]}
        send = _sqs(url, "SendMessageBatch", ten, signer)
        if args.generator == "wrk":
            # One signed request, re-sent by wrk: the signing stays out of the cores the
            # servers share. recv10 stays on the aiohttp client, which signs each delete
            # it builds from a receive's answer (wrk's Lua cannot sign).
            scenarios["send10"].append(functools.partial(
                _wrk, "send10", url, "SendMessageBatch", json.dumps(ten).encode(),
                args.seconds, pid, n, 10, signer))
        else:
            scenarios["send10"].append(functools.partial(
                _drive, "send10", url, [send] * n, args.seconds, pid, n))
        if signer is None and args.generator == "wrk":
            scenarios["recv10"].append(functools.partial(
                _wrk_receive, "recv10", url, queue_url, args.seconds, pid, n))
        else:
            scenarios["recv10"].append(functools.partial(
                _drive, "recv10", url, [_receive_delete(url, queue_url, signer)] * n,
                args.seconds, pid, n))
        fill.append((url, signer, queue_url, send))
    rows = []
    # Alternating the two servers within each round spreads the machine's drift over both.
    for round_ in range(1, args.rounds + 1):
        for name, targets in scenarios.items():
            if name == "recv10":
                # Neither queue may run dry while measured: a receive of nothing is cheap.
                for url, signer, queue_url, fill_op in fill:
                    await _fill(url, signer, queue_url, fill_op,
                                int(args.seconds * FILL_PER_S))
            measured = [await run() for run in targets]
            row: dict[str, Any] = {"round": round_, "scenario": name}
            for label, result in zip(labels, (m.row() for m in measured), strict=True):
                row[f"{label}_messages_per_s"] = result["messages_per_s"]
                row[f"{label}_cpu_us_per_message"] = result["server_cpu_us_per_message"]
                row[f"{label}_client_cpu_us_per_message"] = result[
                    "client_cpu_us_per_message"]
            rows.append(row)
    return rows


async def _fill(url: str, signer: Signer | None, queue_url: str, send: Op, depth: int) -> None:
    """Send batches, untimed, until the queue holds at least ``depth`` messages."""
    query = json.dumps({"QueueUrl": queue_url,
                        "AttributeNames": ["ApproximateNumberOfMessages"]}).encode()
    async with aiohttp.ClientSession() as session:
        held = int(json.loads(await _post(session, url, signer, "GetQueueAttributes", query))[
            "Attributes"]["ApproximateNumberOfMessages"])
        while held < depth:
            held += sum(await asyncio.gather(*(send(session) for _ in range(16))))


WORKER_LABELS = ("one", "workers")


def run_workers(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of (round, scenario, msgs/s and CPU µs/msg of --workers 1 and of N)."""
    tmp = tempfile.mkdtemp(prefix="conveyor-load-")
    port, workers_port = _free_port(), _free_port()
    one = _serve(f"{tmp}/one", port, args.fsync, access_log=args.access_log)
    many = _serve(f"{tmp}/workers", workers_port, args.fsync, access_log=args.access_log,
                  workers=args.workers)
    try:
        url, workers_url = (f"http://127.0.0.1:{port}/",
                            f"http://127.0.0.1:{workers_port}/")
        _wait_ready(url + "readyz")
        _wait_ready(workers_url + "readyz")
        return asyncio.run(_compare(args, (url, None, one.pid, {}),
                                    (workers_url, None, many.pid, {}), WORKER_LABELS))
    finally:
        for process in (one, many):
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


def _print_pair(args: argparse.Namespace, rows: list[dict[str, Any]],
                labels: tuple[str, str] = ("plain", "protected")) -> None:
    a, b = labels
    print(f"fsync={args.fsync} concurrency={args.concurrency} body={args.body} B "
          f"seconds={args.seconds} rounds={args.rounds} "
          f"access log {'on' if args.access_log else 'off'}")
    print(f"{'round':<6}{'scenario':<9}{a + ' msgs/s':>15}{b:>11}{'ratio':>7}"
          f"{'cpu us/msg ' + a:>20}{b:>11}{'client us/msg ' + a:>22}{b:>11}")
    for row in rows:
        print(f"{row['round']:<6}{row['scenario']:<9}{row[a + '_messages_per_s']:>15,.0f}"
              f"{row[b + '_messages_per_s']:>11,.0f}"
              f"{row[b + '_messages_per_s'] / row[a + '_messages_per_s']:>7.2f}"
              f"{row[a + '_cpu_us_per_message']:>20.1f}"
              f"{row[b + '_cpu_us_per_message']:>11.1f}"
              f"{row[a + '_client_cpu_us_per_message']:>22.1f}"
              f"{row[b + '_client_cpu_us_per_message']:>11.1f}")
    for name in ("send10", "recv10"):
        first = sum(r[a + "_messages_per_s"] for r in rows if r["scenario"] == name)
        second = sum(r[b + "_messages_per_s"] for r in rows if r["scenario"] == name)
        cpu = [r[b + "_cpu_us_per_message"] / r[a + "_cpu_us_per_message"]
               for r in rows if r["scenario"] == name]
        print(f"{name}: {b} / {a} over all rounds: messages/s {second / first:.2f}, "
              f"server CPU per message {statistics.median(cpu):.2f} (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--body", type=int, default=100, help="message body bytes")
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.add_argument("--generator", choices=["wrk", "aiohttp"],
                        default="wrk" if shutil.which("wrk") else "aiohttp",
                        help="what drives bare, send1, send10 and recv10 (mixed: aiohttp)")
    parser.add_argument("--protection", action="store_true",
                        help="compare auth+encryption on against off (send10, recv10)")
    parser.add_argument("--large", action="store_true",
                        help="measure server CPU per KiB of large bodies, sent and received")
    parser.add_argument("--large-kib", type=int, default=256, help="body KiB of --large")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="compare a server of N workers against one of 1 (send10, "
                             "recv10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --protection and --large")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="run the server without its access log (on by default, as "
                             "`conveyor serve` runs)")
    args = parser.parse_args()
    rows = (run_protection(args) if args.protection else run_large(args) if args.large
            else run_workers(args) if args.workers else run(args))
    if args.json:
        print(json.dumps(rows))
        return
    if args.large:
        _print_large(args, rows)
        return
    if args.protection:
        _print_pair(args, rows)
        return
    if args.workers:
        _print_pair(args, rows, WORKER_LABELS)
        return
    base = rows[0]["requests_per_s"]
    send1 = rows[1]["messages_per_s"]
    print(f"fsync={args.fsync} concurrency={args.concurrency} body={args.body} B "
          f"seconds={args.seconds} generator={args.generator} (mixed: aiohttp) "
          f"access log {'on' if args.access_log else 'off'}")
    print(f"{'scenario':<8} {'req/s':>10} {'msgs/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cpu us/msg':>11} {'client us/msg':>14}")
    nan = float("nan")
    for row in rows:
        cpu, client = row["server_cpu_us_per_message"], row["client_cpu_us_per_message"]
        print(f"{row['scenario']:<8} {row['requests_per_s']:>10,.0f} "
              f"{row['messages_per_s']:>10,.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
              f"{cpu if cpu is not None else nan:>11.1f} "
              f"{client if client is not None else nan:>14.1f}")
    print(f"send1 requests / bare requests: {rows[1]['requests_per_s'] / base:.2f}")
    print(f"send10 messages / send1 messages: {rows[2]['messages_per_s'] / send1:.2f}")
    print(f"recv10 messages / send1 messages: {rows[3]['messages_per_s'] / send1:.2f}")


if __name__ == "__main__":
    main()
