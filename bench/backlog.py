"""Backlogs: what a queued message costs in memory, how long a big queue takes to reopen,
and how fast it drains, against its size.

    python -m bench.backlog [--sizes 10000,1000000,10000000] [--fifo [--per-group N]]
                            [--delay S] [--seconds 3]
    python -m bench.backlog --server [--sizes ...]

For each size, in fresh processes (so that one step's memory is not another's), with the
library (fsync "never", 100-byte bodies, one queue):

1. **fill**: SendMessageBatch-sized batches of 10 until the queue holds the size. Resident
   memory is read at its peak while sending (VmHWM) and after a full collection at the
   end ("at rest"); each is given per queued message, less the process's memory with
   the queue made and empty. A FIFO queue's rest is also read once its deduplication
   window has let go of the fill's ids (its clock moved on five minutes): "rest/aged".
2. **drain** (the same process): receive 10 + delete those 10, for --seconds; messages
   per second, counting only the time inside receive and delete.
3. **reopen**, in a new process: the broker opened, the time from asking for the queue
   until its counts can be read, and resident memory per queued message once open (less
   the process's with the broker open); then the same drain.

The baseline for the drain rate is a near-empty queue measured in the same run: one
holding --near-empty messages, topped up outside the timed calls whenever it falls
below half of that. The ratio against it is what carries over between machines.
--delay sends every message delayed (memory only: nothing is receivable to drain).

With --server, the memory figures come from a real `conveyor serve` instead (see
run_server); the drain through HTTP is bench/http_load.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from engine import Broker, ManualClock, SendEntry

BATCH = 10
QUEUE = "backlog"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss() -> int:
    gc.collect()
    return _status_kib("VmRSS") * 1024


def _queue_name(fifo: bool) -> str:
    return QUEUE + ".fifo" if fifo else QUEUE


# Set by --per-group and --delay (the children are separate processes).
PER_GROUP = 100
DELAY_S: int | None = None


def _entries(fifo: bool, body: bytes, start: int) -> list[SendEntry]:
    if not fifo:
        return [SendEntry(body, delay_seconds=DELAY_S)] * BATCH
    # One group per PER_GROUP messages, each message its own deduplication id.
    return [SendEntry(body, group_id=f"g{(start + k) // PER_GROUP}",
                      dedup_id=f"d{start + k}")
            for k in range(BATCH)]


def _drain(queue: Any, seconds: float, top_up_to: int, fifo: bool, body: bytes,
           most: int = 0) -> float:
    """Messages per second through receive 10 + delete 10, timing only those calls, for
    seconds or until most are taken (half the backlog: the rate is that of a queue about
    that full); with top_up_to, the queue is topped up (untimed) whenever it holds less
    than half of that."""
    if DELAY_S:
        return float("nan")  # nothing is receivable: memory only
    spent = 0.0
    done = 0
    sent = 0
    deadline = time.monotonic() + seconds * 3  # the refills are not timed
    while spent < seconds and time.monotonic() < deadline and not (most and done >= most):
        if top_up_to and queue.stats().visible < top_up_to // 2:
            for _ in range(top_up_to // 2 // BATCH):
                queue.send_batch(_entries(fifo, body, 10**9 + sent))
                sent += BATCH
        t = time.perf_counter()
        messages = queue.receive(max_messages=BATCH)
        if not messages:
            raise RuntimeError("the queue ran dry during the drain")
        queue.delete_batch([m.receipt for m in messages])
        spent += time.perf_counter() - t
        done += len(messages)
    return done / spent


def child_fill(path: str, size: int, fifo: bool, body: bytes, seconds: float,
               near_empty: bool) -> dict[str, Any]:
    """Fill a queue to size and drain it for seconds; near_empty: top it up to size
    meanwhile (the baseline)."""
    # FIFO: a clock that can skip the deduplication window's five minutes.
    clock = ManualClock(int(time.time() * 1000)) if fifo else None
    with Broker(path, fsync="never", clock=clock) as broker:
        queue = broker.create_queue(_queue_name(fifo), fifo=fifo)
        base = _rss()
        t = time.perf_counter()
        for start in range(0, size, BATCH):
            queue.send_batch(_entries(fifo, body, start))
        fill_s = time.perf_counter() - t
        peak = _status_kib("VmHWM") * 1024
        rest = _rss()
        row = {"size": size, "fill_s": fill_s,
               "peak_bytes_per_message": (peak - base) / size,
               "rest_bytes_per_message": (rest - base) / size}
        if clock is not None:
            # Five minutes on, the window holds no id (the next record lets them go: here
            # a receive of one message), and the queue only its messages.
            clock.advance(5 * 60 + 1)
            queue.receive()
            row["aged_bytes_per_message"] = (_rss() - base) / size
        row["drain_per_s"] = (_drain(queue, seconds, size, fifo, body) if near_empty
                              else _drain(queue, seconds, 0, fifo, body, size // 2))
    return row


def child_reopen(path: str, fifo: bool, body: bytes, seconds: float) -> dict[str, Any]:
    t = time.perf_counter()
    # Past the fill's clock (ahead by the window it skipped), so the reopened window ages.
    clock = ManualClock(int((time.time() + 2 * 5 * 60) * 1000)) if fifo else None
    with Broker(path, fsync="never", clock=clock) as broker:
        base = _rss()  # the broker open, no queue yet
        broker_s = time.perf_counter() - t
        queue = broker.get_queue(_queue_name(fifo))
        stats = queue.stats()
        held = stats.visible + stats.in_flight + stats.delayed
        open_s = time.perf_counter() - t - broker_s
        rest = _rss()
        return {"reopen_s": open_s, "reopened_messages": held,
                "reopen_bytes_per_message": (rest - base) / max(held, 1),
                "reopen_drain_per_s": _drain(queue, seconds, 0, fifo, body, held // 2)}


def _server_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


async def _server_steps(url: str, pid: int, size: int, body: bytes) -> dict[str, Any]:
    import aiohttp

    from bench.http_load import HEADERS, TARGET, _post, _receive_delete, _sqs

    async with aiohttp.ClientSession() as session:
        answer = await session.post(url, data=json.dumps({"QueueName": QUEUE}),
                                    headers={**HEADERS, "X-Amz-Target": TARGET + "CreateQueue"})
        queue_url = json.loads(await answer.read())["QueueUrl"]
        send = _sqs(url, "SendMessageBatch", {"QueueUrl": queue_url, "Entries": [
            {"Id": str(i), "MessageBody": body.decode()} for i in range(BATCH)]})
        drain = _receive_delete(url, queue_url)

        async def sends(count: int) -> None:
            done = 0
            while done < count:
                done += sum(await asyncio.gather(*(send(session) for _ in range(16))))

        # Every path warmed (and the queue open) before the baseline: the server's first
        # requests load modules and fill caches that are not the messages' cost.
        await sends(20_000)
        while await drain(session):
            pass
        await asyncio.sleep(1)
        base = _server_kib(pid, "VmRSS") * 1024
        started = time.perf_counter()
        await sends(size)
        fill_s = time.perf_counter() - started
        await asyncio.sleep(2)
        rest = _server_kib(pid, "VmRSS") * 1024
        peak = _server_kib(pid, "VmHWM") * 1024
        query = json.dumps({"QueueUrl": queue_url, "AttributeNames": ["All"]}).encode()
        await _post(session, url, None, "GetQueueAttributes", query)
    return {"size": size, "fill_s": fill_s, "peak_bytes_per_message": (peak - base) / size,
            "rest_bytes_per_message": (rest - base) / size}


async def _server_reopen(url: str, pid: int, size: int) -> dict[str, Any]:
    import aiohttp

    from bench.http_load import _post

    base = _server_kib(pid, "VmRSS") * 1024
    queue_url = url + "000000000000/" + QUEUE
    query = json.dumps({"QueueUrl": queue_url,
                        "AttributeNames": ["ApproximateNumberOfMessages"]}).encode()
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        held = int(json.loads(await _post(session, url, None, "GetQueueAttributes", query))[
            "Attributes"]["ApproximateNumberOfMessages"])
        reopen_s = time.perf_counter() - started
    rest = _server_kib(pid, "VmRSS") * 1024
    return {"reopen_s": reopen_s, "reopened_messages": held,
            "reopen_bytes_per_message": (rest - base) / max(held, 1)}


def run_server(args: argparse.Namespace) -> dict[str, Any]:
    """The same memory figures through a real `conveyor serve` (fsync never), filled with
    SendMessageBatch of 10 from 16 connections: resident memory per queued message
    against the server's after 20,000 messages sent and drained, then after a restart."""
    from bench.http_load import _free_port, _serve, _wait_ready

    rows = []
    body = b"x" * args.body
    for size in args.sizes:
        tmp = tempfile.mkdtemp(prefix="conveyor-backlog-")
        port = _free_port()
        url = f"http://127.0.0.1:{port}/"
        try:
            server = _serve(f"{tmp}/data", port, "never")
            try:
                _wait_ready(url + "readyz")
                row = asyncio.run(_server_steps(url, server.pid, size, body))
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(120)
            server = _serve(f"{tmp}/data", port, "never")
            try:
                _wait_ready(url + "readyz")
                row |= asyncio.run(_server_reopen(url, server.pid, size))
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(120)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return {"server": True, "body": args.body, "rows": rows}


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.backlog", *args], check=True,
                         stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    common = ["--body", str(args.body), "--seconds", str(args.seconds),
              "--per-group", str(args.per_group)]
    if args.delay:
        common += ["--delay", str(args.delay)]
    if args.fifo:
        common.append("--fifo")
    rows = []
    tmp = tempfile.mkdtemp(prefix="conveyor-backlog-")
    try:
        near = _child(["--child", "near", f"{tmp}/near", str(args.near_empty), *common])
        shutil.rmtree(f"{tmp}/near", ignore_errors=True)
        for size in args.sizes:
            path = f"{tmp}/q{size}"
            row = _child(["--child", "fill", path, str(size), *common])
            row |= _child(["--child", "reopen", path, "0", *common])
            row["drain_ratio"] = row["drain_per_s"] / near["drain_per_s"]
            row["reopen_drain_ratio"] = row["reopen_drain_per_s"] / near["drain_per_s"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"fifo": args.fifo, "body": args.body, "per_group": args.per_group,
            "delay_s": args.delay, "near_empty_drain_per_s":
            near["drain_per_s"], "rows": rows}


def _print(report: dict[str, Any]) -> None:
    if report.get("server"):
        print(f"conveyor serve, standard queue, {report['body']}-byte bodies, SendMessageBatch")
        print(f"{'queued':>12} {'fill s':>7} {'peak B/msg':>10} {'rest B/msg':>10} "
              f"{'reopen s':>8} {'B/msg':>7}")
        for r in report["rows"]:
            print(f"{r['size']:>12,} {r['fill_s']:>7.1f} {r['peak_bytes_per_message']:>10.0f} "
                  f"{r['rest_bytes_per_message']:>10.0f} {r['reopen_s']:>8.2f} "
                  f"{r['reopen_bytes_per_message']:>7.0f}")
        return
    kind = (f"FIFO ({report['per_group']} messages per group)" if report["fifo"]
            else "standard" + (f", delayed {report['delay_s']} s" if report["delay_s"] else ""))
    print(f"{kind} queue, {report['body']}-byte bodies; drain from near-empty: "
          f"{report['near_empty_drain_per_s']:,.0f} msg/s")
    print(f"{'queued':>12} {'fill s':>7} {'peak B/msg':>10} {'rest B/msg':>10} "
          f"{'drain/s':>9} {'ratio':>6} {'reopen s':>8} {'B/msg':>7} {'drain/s':>9} "
          f"{'ratio':>6}")
    for r in report["rows"]:
        aged = r.get("aged_bytes_per_message")
        rest = (f"{r['rest_bytes_per_message']:.0f}" if aged is None
                else f"{r['rest_bytes_per_message']:.0f}/{aged:.0f}")
        print(f"{r['size']:>12,} {r['fill_s']:>7.1f} {r['peak_bytes_per_message']:>10.0f} "
              f"{rest:>10} {r['drain_per_s']:>9,.0f} "
              f"{r['drain_ratio']:>6.2f} {r['reopen_s']:>8.2f} "
              f"{r['reopen_bytes_per_message']:>7.0f} {r['reopen_drain_per_s']:>9,.0f} "
              f"{r['reopen_drain_ratio']:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,1000000,10000000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--fifo", action="store_true")
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--per-group", type=int, default=100,
                        help="FIFO messages per group (1,000,000 / 10: 100,000 groups).")
    parser.add_argument("--delay", type=int, default=0, metavar="S",
                        help="Send standard messages delayed S seconds (memory only: "
                             "nothing drains).")
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--near-empty", type=int, default=1000)
    parser.add_argument("--server", action="store_true",
                        help="Measure memory through a real server instead (standard "
                             "queue; no drain rates).")
    parser.add_argument("--json", help="Also write the report here.")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "PATH", "SIZE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PER_GROUP, DELAY_S
    PER_GROUP, DELAY_S = args.per_group, args.delay or None
    body = b"x" * args.body
    if args.child:
        step, path, size = args.child
        if step in ("fill", "near"):
            row = child_fill(path, int(size), args.fifo, body, args.seconds, step == "near")
        else:
            row = child_reopen(path, args.fifo, body, args.seconds)
        print(json.dumps(row))
        return
    report = run_server(args) if args.server else run(args)
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
