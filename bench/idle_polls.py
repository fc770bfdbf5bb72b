"""What idle long polls cost: the server's CPU while many connections wait on empty queues.

    python -m bench.idle_polls [--connections 1000] [--queues 10] [--seconds 40]

It starts a Conveyor server (fsync always, access log on, as `conveyor serve` runs) and
opens ``--connections`` keep-alive connections, each sending ReceiveMessage with
WaitTimeSeconds=20 to one of ``--queues`` empty queues, again as soon as the last one
answers (empty, after 20 s), as an SQS consumer does. After 5 s to let every poll arrive,
it reads the server's CPU (user + system time from /proc) over ``--seconds`` and prints
it as a share of one core, with the polls answered meanwhile. Every answer must be a 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import aiohttp

from bench.http_load import HEADERS, TARGET, _free_port, _tree_cpu_seconds, _wait_ready

WAIT_S = 20
SETTLE_S = 5.0


async def measure(url: str, pid: int, connections: int, queues: int, seconds: float
                  ) -> tuple[float, int]:
    """(share of a core the server used, polls answered) over ``seconds``."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        urls = []
        for i in range(queues):
            async with session.post(url, data=json.dumps({"QueueName": f"idle-{i}"}),
                                    headers={**HEADERS, "X-Amz-Target": TARGET + "CreateQueue"}
                                    ) as response:
                urls.append((await response.json(content_type=None))["QueueUrl"])
        answered = 0
        stop = time.monotonic() + SETTLE_S + seconds

        async def poll(queue_url: str) -> None:
            nonlocal answered
            body = json.dumps({"QueueUrl": queue_url, "WaitTimeSeconds": WAIT_S,
                               "MaxNumberOfMessages": 10})
            headers = {**HEADERS, "X-Amz-Target": TARGET + "ReceiveMessage"}
            while time.monotonic() < stop:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"a long poll was answered {response.status}")
                    answered += 1

        tasks = [asyncio.create_task(poll(urls[i % queues])) for i in range(connections)]
        try:
            await asyncio.sleep(SETTLE_S)
            cpu0, t0, answered0 = _tree_cpu_seconds(pid), time.monotonic(), answered
            await asyncio.sleep(seconds)
            cpu, elapsed = _tree_cpu_seconds(pid) - cpu0, time.monotonic() - t0
            for task in tasks:
                if task.done():
                    task.result()  # a poll that failed fails the run
            return cpu / elapsed, answered - answered0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--queues", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=40)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="conveyor-idle-")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--data-dir", f"{tmp}/data",
         "--port", str(port), "--fsync", "always"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_ready(url + "readyz")
        share, answered = asyncio.run(measure(url, server.pid, args.connections, args.queues,
                                              args.seconds))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.connections} idle long polls (WaitTimeSeconds={WAIT_S}) on {args.queues} "
          f"queues: server CPU {100 * share:.2f}% of a core over {args.seconds:g} s, "
          f"{answered} polls answered empty")


if __name__ == "__main__":
    main()
