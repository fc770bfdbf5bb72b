"""Conveyor beside its peers: NATS JetStream, Redis Streams and RabbitMQ, in one run.

    python -m bench.peers [--messages 50000] [--rounds 2] [--concurrency 16]
                          [--chart docs/peers.png]

Each system runs as its own server process on a loopback port, from a fresh directory,
durable as it would be run for messages that must not be lost:

- Conveyor: ``conveyor serve`` on its defaults (fsync always, access log on, metrics),
  one process; the SQS JSON protocol through aiohttp (SendMessageBatch of 10;
  ReceiveMessage of 10 and DeleteMessageBatch).
- NATS JetStream (``nats-server -js``): a file-backed stream, which NATS fsyncs every two
  minutes by default; nats-py, each publish awaiting its ack, consumers fetching 10 from a
  pull consumer and acking each message.
- Redis Streams (``redis-server`` with ``appendonly yes`` and ``appendfsync always``):
  redis-py, XADD pipelined ten at a time; a consumer group read with XREADGROUP COUNT 10
  and XACK.
- RabbitMQ (``rabbitmq-server``): a quorum queue (a Raft log fsynced before a confirm);
  aio-pika with publisher confirms, persistent messages, consumers acking each message.

Every client is Python on asyncio, with ``--concurrency`` workers (each with ten messages
in flight on the producing side, as one SendMessageBatch carries ten), and the same
100-byte bodies. A round produces ``--messages`` into each system, then consumes them
all, one system after another; the order turns round every round so that the machine's
drift falls on all of them. The table gives each phase's median rate over the rounds, the
server's CPU per message (the process and its children, from /proc), and Conveyor's rate
as a multiple of each peer's. The chart (matplotlib) shows the median rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.http_load import (
    HEADERS,
    TARGET,
    _free_port,
    _tree_cpu_seconds,
    _wait_port,
    _wait_ready,
)

BODY = b"x" * 100
BATCH = 10
STARTUP_S = 60.0


@dataclass
class Phase:
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    client_cpu_us: list[float] = field(default_factory=list)


class Peer:
    """One system: how to start it, and how to produce and consume with its client."""

    name = ""
    durability = ""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Connect, and make the queue or stream: before any phase is timed."""
        raise NotImplementedError

    async def produce(self, count: int, concurrency: int) -> None:
        raise NotImplementedError

    async def consume(self, count: int, concurrency: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release the client's connections."""

    def stop(self) -> None:
        """Stop the server and whatever it started (its own process group)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=env,
                                        start_new_session=True)


async def _workers(count: int, concurrency: int,
                   step: Callable[[int], Awaitable[int]]) -> None:
    """Run ``step(n)`` on ``concurrency`` workers until ``count`` units are done in all;
    ``step`` is given the most it may do and returns how many it did."""
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            take = min(BATCH, remaining)
            remaining -= take
            done = await step(take)
            remaining += take - done  # a short read: the rest is for another step

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _until(count: int, concurrency: int, step: Callable[[], Awaitable[int]]) -> None:
    """Run ``step()`` on ``concurrency`` workers until they have done ``count`` in all,
    then cancel the steps still waiting (long polls of an empty queue), so that the phase
    ends with its last message rather than with their timeouts."""
    done = 0
    finished = asyncio.Event()

    async def worker() -> None:
        nonlocal done
        while done < count:
            did = await step()  # not `done += await step()`: that reads done before waiting
            done += did
        finished.set()

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        waiter = asyncio.create_task(finished.wait())
        await asyncio.wait([waiter, *workers], return_when=asyncio.FIRST_COMPLETED)
        for task in workers:
            if task.done():
                task.result()  # a step that failed fails the phase
    finally:
        waiter.cancel()
        for task in workers:
            task.cancel()
        await asyncio.gather(waiter, *workers, return_exceptions=True)


class Conveyor(Peer):
    name = "Conveyor"
    durability = "fsync per group commit"

    def start(self) -> None:
        self._spawn([sys.executable, "-m", "server.cli", "serve", "--data-dir",
                     f"{self.workdir}/data", "--port", str(self.port), "--fsync", "always"])
        self.url = f"http://127.0.0.1:{self.port}/"
        _wait_ready(self.url + "readyz", STARTUP_S)
        self.session: aiohttp.ClientSession | None = None
        self.queue_url = ""

    async def _call(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0))
        async with self.session.post(self.url, data=json.dumps(params).encode(), headers={
                **HEADERS, "X-Amz-Target": TARGET + action}) as response:
            data = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{action}: {response.status} {data[:200]!r}")
        answer: dict[str, Any] = json.loads(data) if data else {}
        return answer

    async def _queue(self) -> str:
        if not self.queue_url:
            self.queue_url = (await self._call("CreateQueue", {"QueueName": "bench"}))[
                "QueueUrl"]
        return self.queue_url

    async def prepare(self) -> None:
        await self._queue()

    async def produce(self, count: int, concurrency: int) -> None:
        queue_url = await self._queue()
        body = BODY.decode()

        async def step(n: int) -> int:
            answer = await self._call("SendMessageBatch", {"QueueUrl": queue_url, "Entries": [
                {"Id": str(i), "MessageBody": body} for i in range(n)]})
            if answer["Failed"]:
                raise RuntimeError(f"sends failed: {answer['Failed'][:1]}")
            return n

        await _workers(count, concurrency, step)

    async def consume(self, count: int, concurrency: int) -> None:
        queue_url = await self._queue()

        async def step() -> int:
            messages = (await self._call("ReceiveMessage", {
                "QueueUrl": queue_url, "MaxNumberOfMessages": BATCH, "WaitTimeSeconds": 1,
            })).get("Messages", [])
            if not messages:
                return 0
            answer = await self._call("DeleteMessageBatch", {"QueueUrl": queue_url, "Entries": [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(messages)]})
            if answer["Failed"]:
                raise RuntimeError(f"deletes failed: {answer['Failed'][:1]}")
            return len(messages)

        await _until(count, concurrency, step)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class Nats(Peer):
    name = "NATS JetStream"
    durability = "file store, fsync every 2 min"

    def start(self) -> None:
        self._spawn([_tool("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(self.port),
                     "-sd", f"{self.workdir}/nats"])
        _wait_port(self.port, STARTUP_S)
        self.client: Any = None

    async def _js(self) -> Any:
        import nats

        if self.client is None:
            self.client = await nats.connect(f"nats://127.0.0.1:{self.port}")
            self.js = self.client.jetstream()
            await self.js.add_stream(name="bench", subjects=["bench"], storage="file")
            self.pulls: list[Any] = []
        return self.js

    async def prepare(self) -> None:
        await self._js()

    async def produce(self, count: int, concurrency: int) -> None:
        js = await self._js()

        async def step(n: int) -> int:
            await asyncio.gather(*(js.publish("bench", BODY) for _ in range(n)))
            return n

        await _workers(count, concurrency, step)

    async def consume(self, count: int, concurrency: int) -> None:
        import nats.errors

        js = await self._js()
        # A subscription of its own for each worker, all bound to one durable consumer:
        # nats-py's fetch is not made to be awaited twice at once on one subscription.
        while len(self.pulls) < concurrency:
            self.pulls.append(await js.pull_subscribe("bench", "bench"))
        free = list(self.pulls)

        async def step() -> int:
            pull = free.pop()
            try:
                messages = await pull.fetch(BATCH, timeout=1)
            except nats.errors.TimeoutError:
                return 0
            finally:
                free.append(pull)
            await asyncio.gather(*(m.ack() for m in messages))
            return len(messages)

        await _until(count, concurrency, step)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


class Redis(Peer):
    name = "Redis Streams"
    durability = "AOF, appendfsync always"

    def start(self) -> None:
        os.makedirs(f"{self.workdir}/redis")
        self._spawn([_tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                     "--dir", f"{self.workdir}/redis", "--appendonly", "yes",
                     "--appendfsync", "always", "--save", "", "--daemonize", "no"])
        _wait_port(self.port, STARTUP_S)
        self.client: Any = None

    async def _redis(self) -> Any:
        import redis.asyncio
        import redis.exceptions

        if self.client is None:
            self.client = redis.asyncio.Redis(port=self.port, max_connections=1024)
            with contextlib.suppress(redis.exceptions.ResponseError):  # the group exists
                await self.client.xgroup_create("bench", "bench", id="0", mkstream=True)
        return self.client

    async def prepare(self) -> None:
        await self._redis()

    async def produce(self, count: int, concurrency: int) -> None:
        client = await self._redis()

        async def step(n: int) -> int:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(n):
                    pipe.xadd("bench", {"b": BODY})
                await pipe.execute()
            return n

        await _workers(count, concurrency, step)

    async def consume(self, count: int, concurrency: int) -> None:
        client = await self._redis()
        names = iter(range(1_000_000))

        async def step() -> int:
            # Not blocking: the phase starts with every message in the stream. Blocking
            # reads cancelled at the end of one phase slowed the next by a second or so.
            read = await client.xreadgroup("bench", f"c{next(names) % concurrency}",
                                           {"bench": ">"}, count=BATCH, block=None)
            if not read:
                return 0
            ids = [entry_id for entry_id, _ in read[0][1]]
            if ids:
                await client.xack("bench", "bench", *ids)
            return len(ids)

        await _until(count, concurrency, step)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


class RabbitMq(Peer):
    name = "RabbitMQ"
    durability = "quorum queue, fsync before confirm"

    def start(self) -> None:
        base = f"{self.workdir}/rabbitmq"
        os.makedirs(base)
        with open(f"{base}/enabled_plugins", "w") as f:
            f.write("[].\n")
        env = {**os.environ, "HOME": base,
               "RABBITMQ_NODENAME": f"bench{self.port}@localhost",
               "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
               "RABBITMQ_NODE_PORT": str(self.port),
               "RABBITMQ_DIST_PORT": str(_free_port()),
               "RABBITMQ_MNESIA_BASE": f"{base}/mnesia",
               "RABBITMQ_LOG_BASE": f"{base}/log",
               "RABBITMQ_ENABLED_PLUGINS_FILE": f"{base}/enabled_plugins",
               "RABBITMQ_CONFIG_FILE": f"{base}/rabbitmq"}
        # Debian's /usr/sbin/rabbitmq-server runs the broker as the rabbitmq user, who cannot
        # write to this directory; the script it wraps runs it as the caller.
        wrapped = "/usr/lib/rabbitmq/bin/rabbitmq-server"
        self._spawn([wrapped if os.path.exists(wrapped) else _tool("rabbitmq-server")], env)
        _wait_port(self.port, STARTUP_S)
        self.connection: Any = None

    async def _channel(self) -> tuple[Any, Any]:
        import aio_pika

        if self.connection is None:
            self.connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{self.port}/")
            self.channel = await self.connection.channel(publisher_confirms=True)
            self.queue = await self.channel.declare_queue(
                "bench", durable=True, arguments={"x-queue-type": "quorum"})
        return self.channel, self.queue

    async def prepare(self) -> None:
        await self._channel()

    async def produce(self, count: int, concurrency: int) -> None:
        import aio_pika

        channel, _ = await self._channel()
        exchange = channel.default_exchange

        async def step(n: int) -> int:
            await asyncio.gather(*(exchange.publish(
                aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="bench") for _ in range(n)))
            return n

        await _workers(count, concurrency, step)

    async def consume(self, count: int, concurrency: int) -> None:
        channel, queue = await self._channel()
        await channel.set_qos(prefetch_count=concurrency * BATCH)
        done = asyncio.get_running_loop().create_future()
        received = 0

        async def on_message(message: Any) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received >= count and not done.done():
                done.set_result(None)

        tag = await queue.consume(on_message)
        try:
            await done
        finally:
            await queue.cancel(tag)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


PEERS: list[type[Peer]] = [Conveyor, Nats, Redis, RabbitMq]


async def _timed(peer: Peer, others: list[Peer], phase: str, count: int, concurrency: int
                 ) -> tuple[float, float, float, float]:
    """(messages a second, server CPU µs a message, client CPU µs a message, the other
    servers' CPU as a share of a core) of one phase. The client is this process: the
    clients run on its event loop. The other servers sit idle meanwhile, and what they
    spend anyway is taken from the two cores the phase runs on."""
    assert peer.process is not None
    run = peer.produce if phase == "produce" else peer.consume
    idle = [p.process.pid for p in others if p.process is not None]
    cpu0, client0 = _tree_cpu_seconds(peer.process.pid), time.process_time()
    idle0 = sum(map(_tree_cpu_seconds, idle))
    t0 = time.monotonic()
    await run(count, concurrency)
    elapsed = time.monotonic() - t0
    cpu = _tree_cpu_seconds(peer.process.pid) - cpu0
    client = time.process_time() - client0
    idle_share = (sum(map(_tree_cpu_seconds, idle)) - idle0) / elapsed
    return count / elapsed, cpu / count * 1e6, client / count * 1e6, idle_share


async def _rounds(peers: list[Peer], args: argparse.Namespace
                  ) -> dict[tuple[str, str], Phase]:
    results = {(p.name, phase): Phase() for p in peers for phase in ("produce", "consume")}
    try:
        for peer in peers:
            await peer.prepare()
        for round_ in range(args.rounds):
            order = peers if round_ % 2 == 0 else peers[::-1]
            for peer in order:
                for phase in ("produce", "consume"):
                    rate, cpu_us, client_us, idle = await _timed(
                        peer, [p for p in peers if p is not peer], phase, args.messages,
                        args.concurrency)
                    measured = results[(peer.name, phase)]
                    measured.rates.append(rate)
                    measured.cpu_us.append(cpu_us)
                    measured.client_cpu_us.append(client_us)
                    print(f"round {round_ + 1} {peer.name:<15} {phase:<8} {rate:>9,.0f} msg/s "
                          f"{cpu_us:>7.1f} server, {client_us:>6.1f} client µs/msg; the idle "
                          f"servers {100 * idle:.1f}% of a core", flush=True)
    finally:
        for peer in peers:
            await peer.close()
    return results


def _table(peers: list[Peer], results: dict[tuple[str, str], Phase]) -> list[dict[str, Any]]:
    rows = []
    ours = {phase: statistics.median(results[(Conveyor.name, phase)].rates)
            for phase in ("produce", "consume")}
    for peer in peers:
        row: dict[str, Any] = {"system": peer.name, "durability": peer.durability}
        for phase in ("produce", "consume"):
            rate = statistics.median(results[(peer.name, phase)].rates)
            row[f"{phase}_per_s"] = rate
            row[f"{phase}_cpu_us"] = statistics.median(results[(peer.name, phase)].cpu_us)
            row[f"{phase}_client_cpu_us"] = statistics.median(
                results[(peer.name, phase)].client_cpu_us)
            row[f"conveyor_{phase}_ratio"] = ours[phase] / rate
        rows.append(row)
    return rows


def _chart(rows: list[dict[str, Any]], path: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    width = 0.38
    positions = range(len(rows))
    produce = axes.bar([x - width / 2 for x in positions], [r["produce_per_s"] for r in rows],
                       width, label="produce")
    consume = axes.bar([x + width / 2 for x in positions], [r["consume_per_s"] for r in rows],
                       width, label="consume + ack")
    axes.bar_label(produce, fmt="{:,.0f}", fontsize=7)
    axes.bar_label(consume, fmt="{:,.0f}", fontsize=7)
    axes.set_xticks(list(positions), [f"{r['system']}\n({r['durability']})" for r in rows],
                    fontsize=7)
    axes.set_ylabel("messages per second")
    axes.set_title(f"{args.messages:,} messages of 100 bytes, {args.concurrency} workers, "
                   f"median of {args.rounds} rounds", fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# Debian installs nats-server and rabbitmq-server in /usr/sbin, which is not on a user's PATH.
_TOOL_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin"))


def _tool(name: str) -> str:
    """The path of a server program, or SystemExit naming what is missing."""
    found = shutil.which(name, path=_TOOL_PATH)
    if found is None:
        raise SystemExit(f"{name} is missing: `make bench-peers` installs it")
    return found


def _epmd_running() -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", 4369)) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--chart", default=None, help="write the chart (PNG) here")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args()
    for name in ("nats-server", "redis-server", "rabbitmq-server"):
        _tool(name)
    epmd_before = _epmd_running()
    tmp = tempfile.mkdtemp(prefix="conveyor-peers-")
    peers = [kind(f"{tmp}/{kind.__name__.lower()}") for kind in PEERS]
    try:
        for peer in peers:
            os.makedirs(peer.workdir)
            peer.start()
        results = asyncio.run(_rounds(peers, args))
    finally:
        for peer in peers:
            peer.stop()
        if not epmd_before:  # RabbitMQ started the Erlang port mapper: stop it again
            with contextlib.suppress(OSError):
                subprocess.run(["epmd", "-kill"], capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = _table(peers, results)
    if args.chart:
        _chart(rows, args.chart, args)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"\n{args.messages:,} messages of {len(BODY)} bytes, {args.concurrency} workers, "
          f"median of {args.rounds} rounds")
    print("µs/msg: the server's CPU per message, then the client's (this process)")
    print(f"{'system':<16}{'durability':<36}{'produce/s':>10}{'µs/msg':>12}"
          f"{'consume/s':>10}{'µs/msg':>12}  Conveyor's rate as a multiple")
    for r in rows:
        print(f"{r['system']:<16}{r['durability']:<36}{r['produce_per_s']:>10,.0f}"
              f"{r['produce_cpu_us']:>6.1f}{r['produce_client_cpu_us']:>6.1f}"
              f"{r['consume_per_s']:>10,.0f}"
              f"{r['consume_cpu_us']:>6.1f}{r['consume_client_cpu_us']:>6.1f}"
              f"  produce {r['conveyor_produce_ratio']:.2f}x, consume "
              f"{r['conveyor_consume_ratio']:.2f}x")


if __name__ == "__main__":
    main()
