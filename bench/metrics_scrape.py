"""How long one /metrics scrape holds the event loop, with many queues open.

    python -m bench.metrics_scrape [--queues 1000] [--rounds 10]

One process, one event loop, the server's own Metrics over a real Broker with ``--queues``
open queues (a message in each) and usage rows for each, measured two ways in the same run:

- ``on-loop``: the baseline, the whole text built on the loop (what /metrics did before
  server/metrics.py moved it to a thread): snapshot and render back to back;
- ``exposition``: what the server does now, ``Exposition.text()``.

For each it prints the median and worst over ``--rounds`` of the longest stall of the loop
during the scrape (a task that wakes every millisecond measures the gaps), and the text's
size. On the thread the render still competes for the GIL, so the loop sees stalls of up
to the interpreter's switch interval (5 ms) while it runs: that, not zero, is the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

from engine import Broker
from server.metrics import Exposition, Metrics
from server.protection.usage import Usage

TICK_S = 0.001


async def longest_stall_ms(scrape: Callable[[], Awaitable[bytes]]) -> tuple[float, int]:
    """The longest the loop went without running a 1 ms ticker while ``scrape`` ran."""
    longest = 0.0
    done = False

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            longest = max(longest, now - last - TICK_S)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)  # the ticker is running before the scrape starts
    body = await scrape()
    done = True
    await task
    return longest * 1000, len(body)


async def measure(queues: int, rounds: int, path: str) -> None:
    broker = Broker(path, fsync="never", open_queues_max=2 * queues)
    try:
        usage = Usage()
        for i in range(queues):
            account = f"{i % 50:012d}"
            broker.create_queue(f"{account}/queue-{i:05d}").send(b"x")
            usage.record(account, f"principal-{i % 100}", f"{account}/queue-{i:05d}", 1, 10,
                         10, False)
        metrics = Metrics()
        metrics.watch(broker)
        metrics.watch_source(usage)
        for action in ("SendMessage", "ReceiveMessage", "DeleteMessage", "get_queue"):
            for status in (200, 400, 404):
                metrics.requests.record("sqs-json", action, status, 0.002, 100)
        exposition = Exposition(metrics, gap_s=0)

        async def on_loop() -> bytes:
            return metrics.snapshot()()

        try:
            for name, scrape in (("on-loop", on_loop), ("exposition", exposition.text)):
                stalls, size = [], 0
                for _ in range(rounds):
                    stall, size = await longest_stall_ms(scrape)
                    stalls.append(stall)
                print(f"{name:>10}: {queues} queues, {size / 1e6:.2f} MB, longest loop stall "
                      f"median {statistics.median(stalls):.1f} ms, worst {max(stalls):.1f} ms")
        finally:
            await exposition.close()
    finally:
        broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queues", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    path = tempfile.mkdtemp(prefix="conveyor-bench-")
    try:
        asyncio.run(measure(args.queues, args.rounds, path))
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
