"""Backlogs: what a queued message costs in memory, how long a big queue takes to reopen,
and how fast it drains, against its size.

    python -m bench.backlog [--sizes 10000,1000000,10000000] [--fifo] [--seconds 3]

For each size, in fresh processes (so that one step's memory is not another's), with the
library (fsync "never", 100-byte bodies, one queue):

1. **fill**: SendMessageBatch-sized batches of 10 until the queue holds the size. Resident
   memory is read at its peak while sending (VmHWM) and after a full collection at the
   end ("at rest"); each is given per queued message, less the process's memory with
   the queue made and empty.
2. **drain** (the same process): receive 10 + delete those 10, for --seconds; messages
   per second, counting only the time inside receive and delete.
3. **reopen**, in a new process: the broker opened, the time from asking for the queue
   until its counts can be read, and resident memory per queued message once open (less
   the process's with the broker open); then the same drain.

The baseline for the drain rate is a near-empty queue measured in the same run: one
holding --near-empty messages, topped up outside the timed calls whenever it falls
below half of that. The ratio against it is what carries over between machines.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from engine import Broker, SendEntry

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


def _entries(fifo: bool, body: bytes, start: int) -> list[SendEntry]:
    if not fifo:
        return [SendEntry(body)] * BATCH
    # One group per 100 messages, each message its own deduplication id.
    return [SendEntry(body, group_id=f"g{(start + k) // 100}",
                      dedup_id=f"d{start + k}")
            for k in range(BATCH)]


def _drain(queue: Any, seconds: float, top_up_to: int, fifo: bool, body: bytes,
           most: int = 0) -> float:
    """Messages per second through receive 10 + delete 10, timing only those calls, for
    seconds or until most are taken (half the backlog: the rate is that of a queue about
    that full); with top_up_to, the queue is topped up (untimed) whenever it holds less
    than half of that."""
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
    with Broker(path, fsync="never") as broker:
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
        row["drain_per_s"] = (_drain(queue, seconds, size, fifo, body) if near_empty
                              else _drain(queue, seconds, 0, fifo, body, size // 2))
    return row


def child_reopen(path: str, fifo: bool, body: bytes, seconds: float) -> dict[str, Any]:
    t = time.perf_counter()
    with Broker(path, fsync="never") as broker:
        base = _rss()  # the broker open, no queue yet
        broker_s = time.perf_counter() - t
        queue = broker.get_queue(_queue_name(fifo))
        held = queue.stats().visible
        open_s = time.perf_counter() - t - broker_s
        rest = _rss()
        return {"reopen_s": open_s, "reopened_messages": held,
                "reopen_bytes_per_message": (rest - base) / max(held, 1),
                "reopen_drain_per_s": _drain(queue, seconds, 0, fifo, body, held // 2)}


def _child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.backlog", *args], check=True,
                         stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    common = ["--body", str(args.body), "--seconds", str(args.seconds)]
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
    return {"fifo": args.fifo, "body": args.body, "near_empty_drain_per_s":
            near["drain_per_s"], "rows": rows}


def _print(report: dict[str, Any]) -> None:
    kind = "FIFO" if report["fifo"] else "standard"
    print(f"{kind} queue, {report['body']}-byte bodies; drain from near-empty: "
          f"{report['near_empty_drain_per_s']:,.0f} msg/s")
    print(f"{'queued':>12} {'fill s':>7} {'peak B/msg':>10} {'rest B/msg':>10} "
          f"{'drain/s':>9} {'ratio':>6} {'reopen s':>8} {'B/msg':>7} {'drain/s':>9} "
          f"{'ratio':>6}")
    for r in report["rows"]:
        print(f"{r['size']:>12,} {r['fill_s']:>7.1f} {r['peak_bytes_per_message']:>10.0f} "
              f"{r['rest_bytes_per_message']:>10.0f} {r['drain_per_s']:>9,.0f} "
              f"{r['drain_ratio']:>6.2f} {r['reopen_s']:>8.2f} "
              f"{r['reopen_bytes_per_message']:>7.0f} {r['reopen_drain_per_s']:>9,.0f} "
              f"{r['reopen_drain_ratio']:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,1000000,10000000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--fifo", action="store_true")
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--near-empty", type=int, default=1000)
    parser.add_argument("--json", help="Also write the report here.")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "PATH", "SIZE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    body = b"x" * args.body
    if args.child:
        step, path, size = args.child
        if step in ("fill", "near"):
            row = child_fill(path, int(size), args.fifo, body, args.seconds, step == "near")
        else:
            row = child_reopen(path, args.fifo, body, args.seconds)
        print(json.dumps(row))
        return
    report = run(args)
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
