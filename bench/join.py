"""A new node joining a loaded cluster: how fast it takes its share of the queues, and
whether the queues that move keep serving.

    python -m bench.join [--queues 40] [--state-mb 400] [--json join.json]

In one invocation it starts etcd and three ``conveyor serve --cluster`` nodes (RF=3, fsync
always, access log off: bench/scale.py), then:

1. **fill**: --queues queues, created through the SQS JSON API and filled with
   SendMessageBatch (10 bodies of --body-kib KiB a request, at each queue's leader) to
   --state-mb of live messages in all. Every other queue is *churned* first: sent twice
   its final state, all of which is received and deleted, so that its log is about three
   times its state and a new replica is to be sent its snapshot and the log's tail
   (replication/leader.py, SNAPSHOT_SHIP_RATIO); the others' log is about their state,
   and a new replica is copied the log.
2. **load**: on --load-queues of the queues that the ring over four nodes places on n3
   (churned and not, half each), a producer (SendMessageBatch) and a consumer
   (ReceiveMessage, then DeleteMessageBatch) at --load-rate requests/s each, through
   n0, n1 and n2 in turn as a load balancer would; every answer that is not a 200 is
   recorded, and latency before, during and after the move.
3. **join**: after --before-s of load (and once the leaders have watched the cluster for
   replication.node.NODE_GONE_S, before which no leader moves a replica), n3 is started.
   The leaders move replicas to the ring over four members (replication/leader.py,
   _rebalance): n3 is added to about 3/4 of the queues, and an old replica let go once
   it is in sync. From n3's /readyz, polling GET /v1/cluster: the seconds until every
   queue the ring places on n3 has it in its ISR, and until every queue's replicas are
   what the ring says with all of them in the ISR (the old ones released); the state n3
   took (the live message bytes of its queues, and its data directory's growth) and MB/s
   of it; which queues were sent a snapshot (the leaders' log lines). With --py-spy, where
   the busiest shipping leader's and n3's Python time goes during the move.
4. **history**: the load queues drained; every acknowledged send was received, and
   nothing was received that was not sent.

It prints a table, and writes the report as JSON with --json. Every process shares the
machine's cores, so the load conditions are part of the report: the load average, and
over the move the machine's busy CPU against that of the cluster and of this process.

This is its own run, not a phase of bench/scale.py: it needs hundreds of MB of message
bodies and a fourth node, where scale.py needs thousands of near-empty queues; together
they would make each run an hour.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from bench.http_load import HEADERS, TARGET, _cpu_seconds
from bench.scale import (
    ACCOUNT,
    Cluster,
    _create,
    _leaders,
    _start,
    _top_frames,
    _wait_led,
    start_node,
)
from engine._ring import HashRing
from replication.node import NODE_GONE_S

T = TypeVar("T")

NEW = "n3"
OLD = ("n0", "n1", "n2")
RF = 3
MIB = 1024 * 1024
# A request of the bench's that has no answer in this long is counted as failed.
REQUEST_TIMEOUT_S = 60.0
# The cluster view is polled this often while the replicas move.
POLL_S = 0.1


@dataclass
class Book:
    """What this bench sent to one queue and received from it, by message id (each body
    begins with its id and a colon)."""

    name: str
    churned: bool
    sizes: dict[str, int] = field(default_factory=dict)
    """Every message sent, acknowledged or not: its body's bytes."""
    acked: set[str] = field(default_factory=set)
    received: collections.Counter[str] = field(default_factory=collections.Counter)
    deleted: set[str] = field(default_factory=set)

    @property
    def key(self) -> str:
        """The queue's partition, as /v1/cluster and the ring name it."""
        return f"{ACCOUNT}/{self.name}"

    def live_bytes(self) -> int:
        return sum(self.sizes[i] for i in self.acked - self.deleted)


@dataclass
class Sample:
    at: float
    """When the request was sent (time.monotonic)."""
    op: str
    seconds: float
    status: str
    """"200", or the status and the SQS error code, or the exception's name."""


class Client:
    """SQS JSON calls that record every answer and keep the books."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.answers: collections.Counter[str] = collections.Counter()

    async def call(self, url: str, action: str, body: dict[str, Any]
                   ) -> tuple[str, dict[str, Any]]:
        """("200", answer), or (what went wrong, {})."""
        payload = json.dumps(body).encode()
        try:
            async with self.session.post(
                    url, data=payload, headers={**HEADERS, "X-Amz-Target": TARGET + action},
                    timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as response:
                data = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = type(exc).__name__
            self.answers[f"{action} {outcome}"] += 1
            return outcome, {}
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {}
        if status == 200:
            self.answers[f"{action} 200"] += 1
            return "200", answer
        code = str(answer.get("__type", "")).rpartition("#")[2]
        outcome = f"{status} {code}".strip()
        self.answers[f"{action} {outcome}"] += 1
        return outcome, {}

    async def send(self, url: str, book: Book, bodies: list[str]) -> str:
        for body in bodies:
            book.sizes[body.partition(":")[0]] = len(body)
        outcome, answer = await self.call(url, "SendMessageBatch", {
            "QueueUrl": f"{url}{ACCOUNT}/{book.name}",
            "Entries": [{"Id": str(k), "MessageBody": b} for k, b in enumerate(bodies)]})
        for entry in answer.get("Successful", []):
            book.acked.add(bodies[int(entry["Id"])].partition(":")[0])
        return outcome

    async def receive(self, url: str, book: Book, count: int) -> tuple[str, list[str]]:
        """Receive up to count messages (leased for 600 s: none comes back during the run);
        their receipt handles."""
        outcome, answer = await self.call(url, "ReceiveMessage", {
            "QueueUrl": f"{url}{ACCOUNT}/{book.name}", "MaxNumberOfMessages": count,
            "VisibilityTimeout": 600})
        receipts = []
        for message in answer.get("Messages", []):
            book.received[message["Body"].partition(":")[0]] += 1
            receipts.append(f"{message['Body'].partition(':')[0]} {message['ReceiptHandle']}")
        return outcome, receipts

    async def delete(self, url: str, book: Book, receipts: list[str]) -> str:
        pairs = [r.split(" ", 1) for r in receipts]
        outcome, answer = await self.call(url, "DeleteMessageBatch", {
            "QueueUrl": f"{url}{ACCOUNT}/{book.name}",
            "Entries": [{"Id": str(k), "ReceiptHandle": h} for k, (_, h) in enumerate(pairs)]})
        for entry in answer.get("Successful", []):
            book.deleted.add(pairs[int(entry["Id"])][0])
        return outcome


def _bodies(book: Book, kind: str, start: int, size: int, count: int = 10) -> list[str]:
    out = []
    for seq in range(start, start + count):
        head = f"{book.name}.{kind}{seq}:"
        out.append(head + "x" * max(size - len(head), 0))
    return out


async def _fill(cluster: Cluster, books: list[Book], args: argparse.Namespace
                ) -> dict[str, Any]:
    """Churn, then fill, every queue at its leader, --fill-concurrency queues at a time."""
    leaders = await asyncio.to_thread(_leaders, cluster, [b.name for b in books])
    size = args.body_kib * 1024
    batches = max(1, round(args.state_mb * MIB / len(books) / size / 10))
    slots = asyncio.Semaphore(args.fill_concurrency)
    connector = aiohttp.TCPConnector(limit=args.fill_concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = Client(session)

        async def drain_some(url: str, book: Book) -> bool:
            _, receipts = await client.receive(url, book, 10)
            if receipts:
                await client.delete(url, book, receipts)
            return bool(receipts)

        async def one(book: Book) -> None:
            async with slots:
                url = cluster.nodes[leaders[book.name] or "n0"].url
                if book.churned:
                    for i in range(2 * batches):
                        await client.send(url, book, _bodies(book, "c", 10 * i, size))
                        await drain_some(url, book)
                    while await drain_some(url, book):
                        pass
                for i in range(batches):
                    await client.send(url, book, _bodies(book, "f", 10 * i, size))

        started = time.monotonic()
        await asyncio.gather(*(one(b) for b in books))
        seconds = time.monotonic() - started
    sent = sum(sum(b.sizes.values()) for b in books)
    return {"seconds": seconds, "sent_bytes": sent, "sent_mb_per_s": sent / MIB / seconds,
            "state_bytes": sum(b.live_bytes() for b in books),
            "answers": dict(client.answers)}


class Load:
    """A producer and a consumer on each load queue, paced at rate requests/s each, through
    the nodes in turn."""

    def __init__(self, urls: list[str], books: list[Book], args: argparse.Namespace) -> None:
        self.urls = urls
        self.books = books
        self.rate = args.load_rate
        self.consume = args.consume_batch
        self.body = args.load_body
        self.samples: list[Sample] = []
        self.stop = asyncio.Event()
        self.consumed_bytes = 0

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            client = Client(session)
            await asyncio.gather(*(self._paced(client, b, role) for b in self.books
                                   for role in ("produce", "consume")))

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        started = time.monotonic()
        result = await call
        outcome = str(result[0]) if isinstance(result, tuple) else str(result)
        self.samples.append(Sample(started, op, time.monotonic() - started, outcome))
        return result

    async def _paced(self, client: Client, book: Book, role: str) -> None:
        due = time.monotonic()
        turn = 0
        while not self.stop.is_set():
            url = self.urls[turn % len(self.urls)]
            if role == "produce":
                await self._timed("send10", client.send(
                    url, book, _bodies(book, "p", 10 * turn, self.body)))
            else:
                _, receipts = await self._timed("receive", client.receive(
                    url, book, self.consume))
                if receipts:
                    self.consumed_bytes += sum(book.sizes.get(r.partition(" ")[0], 0)
                                               for r in receipts)
                    await self._timed("delete", client.delete(url, book, receipts))
            turn += 1
            # Paced, not closed-loop: a slow answer does not lower the offered load, and
            # the requests after it are not sent in a burst either.
            due = max(due + 1 / self.rate, time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(due - time.monotonic()):
                    await self.stop.wait()


class Spy:
    """py-spy sampling a process from now until stop(): only the thread holding the GIL
    (--gil), so the samples say where the Python time goes; or, idle, every thread
    whether it runs or waits (--idle), so they say where the wall time goes."""

    RATE = 100
    """Samples a second (py-spy's default, said explicitly: the idle summary counts on it)."""

    def __init__(self, py_spy: str, pid: int, idle: bool) -> None:
        fd, self.path = tempfile.mkstemp(suffix=".txt")
        os.close(fd)
        self.idle = idle
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [py_spy, "record", "--format", "raw", "--pid", str(pid), "--output", self.path,
             "--nonblocking", "--rate", str(self.RATE), "--idle" if idle else "--gil"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> list[str]:
        seconds = time.monotonic() - self.started
        self.process.send_signal(signal.SIGINT)  # py-spy writes what it has, and exits
        try:
            _, err = self.process.communicate(timeout=60)
            if self.process.returncode != 0 or not os.path.getsize(self.path):
                return [f"py-spy failed ({self.process.returncode}): {err.decode()[-300:]}"]
            lines = _top_frames(self.path, seconds)
        finally:
            os.unlink(self.path)
        if self.idle:
            # Every thread is sampled, waiting or not: a share is of all threads' time.
            samples = int(lines[0].split()[0])
            lines.insert(1, f"one thread for the whole time = "
                            f"{100 * self.RATE * seconds / max(samples, 1):.1f}% of samples")
        return lines


def _placement(books: list[Book], members: list[str]) -> dict[str, list[str]]:
    """What replication.node.ClusterNode.placement gives each queue over members."""
    ring = HashRing()
    for node in sorted(members):
        ring.add(node)
    return {b.key: ring.preference_list(b.key, min(RF, len(members))) for b in books}


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


async def _view(session: aiohttp.ClientSession, cluster: Cluster) -> dict[str, Any]:
    for node in cluster.live():
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with session.get(node.url + "v1/cluster",
                                   timeout=aiohttp.ClientTimeout(total=10)) as reply:
                if reply.status == 200:
                    view: dict[str, Any] = json.loads(await reply.read())
                    return view
    raise RuntimeError("no node answers /v1/cluster")


async def _watch(cluster: Cluster, placement: dict[str, list[str]], ready_at: float,
                 timeout: float) -> dict[str, Any]:
    """Poll the cluster's view from n3's readiness until every queue's replicas are those
    of the ring over four members, all in the ISR and led; when each step happened
    (seconds after ready_at)."""
    placed = {q for q, nodes in placement.items() if NEW in nodes}
    added: dict[str, float] = {}
    seen: float | None = None
    in_isr: dict[str, float] = {}
    settled: dict[str, float] = {}
    done: float | None = None
    released: float | None = None
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - ready_at < timeout:
            view = await _view(session, cluster)
            now = time.monotonic() - ready_at
            queues = view["queues"]
            if seen is None and NEW in view["nodes"]:
                seen = now
            for key in placement:
                info = queues.get(key) or {"replicas": [], "isr": [], "leader": None}
                replicas, isr = set(info["replicas"]), set(info["isr"])
                if NEW in replicas:
                    added.setdefault(key, now)
                if NEW in isr:
                    in_isr.setdefault(key, now)
                if key in placed and replicas == set(placement[key]) and isr == replicas \
                        and info["leader"] in replicas:
                    settled.setdefault(key, now)
            if released is None and all(
                    set((queues.get(k) or {}).get("replicas", [])) == set(p)
                    for k, p in placement.items()):
                released = now
            if released is not None and all(
                    set((queues.get(k) or {}).get("isr", [])) == set(p)
                    and (queues.get(k) or {}).get("leader") in p
                    for k, p in placement.items()):
                done = now
                break
            await asyncio.sleep(POLL_S)
    missing = sorted(placed - in_isr.keys())
    return {"placed": len(placed), "n3_in_view_s": seen,
            "first_added_s": min(added.values(), default=None), "added": added,
            "in_isr": in_isr, "settled": settled,
            "all_in_isr_s": max(in_isr.values()) if not missing else None,
            "released_s": released, "done_s": done, "missing": missing}


SENDING = re.compile(r"queue (\S+): sending n3 the snapshot at (\d+) \((\d+) bytes\)")
INSTALLED = re.compile(r"queue (\S+): n3 installed the snapshot at (\d+)")
STARTS_OVER = re.compile(r"queue (\S+): stream to n3 starts over: (.*)")


BOILERPLATE = re.compile(r"\((click/core\.py|<frozen runpy>|server/cli\.py|threading\.py|"
                         r"server/web/listener\.py)\)$")


def _log_tails(cluster: Cluster, marks: dict[str, int]) -> dict[str, str]:
    """What each node logged past marks (byte offsets; 0 for a node not marked)."""
    out = {}
    for key, node in cluster.nodes.items():
        with open(node.log, "rb") as f:
            f.seek(marks.get(key, 0))
            out[key] = f.read().decode(errors="replace")
    return out


def _shipping(tails: dict[str, str]) -> dict[str, Any]:
    """Snapshots sent to n3, by queue, and its streams' restarts, from the nodes' logs."""
    sent: dict[str, int] = {}
    installed: set[str] = set()
    restarts: collections.Counter[str] = collections.Counter()
    for text in tails.values():
        for m in SENDING.finditer(text):
            sent[m.group(1)] = int(m.group(3))
        installed |= {m.group(1) for m in INSTALLED.finditer(text)}
        for m in STARTS_OVER.finditer(text):
            restarts[re.sub(r"\d+", "N", m.group(2))] += 1
    return {"snapshot_bytes": sent, "installed": sorted(installed),
            "restarts": dict(restarts)}


def _latency(samples: list[Sample], start: float, end: float) -> dict[str, Any]:
    """Per op, between start and end: requests, p50/p99/max ms, and what was not a 200."""
    out: dict[str, Any] = {}
    ops = sorted({s.op for s in samples})
    for op in ops:
        chosen = [s for s in samples if s.op == op and start <= s.at < end]
        lat = sorted(s.seconds for s in chosen) or [0.0]
        out[op] = {"requests": len(chosen),
                   "p50_ms": statistics.median(lat) * 1000,
                   "p99_ms": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000,
                   "max_ms": lat[-1] * 1000,
                   "not_200": dict(collections.Counter(s.status for s in chosen
                                                       if s.status != "200"))}
    return out


async def _drain(urls: list[str], books: list[Book]) -> dict[str, str]:
    """Receive every message left in books' queues; what went wrong, per queue."""
    problems = {}
    async with aiohttp.ClientSession() as session:
        client = Client(session)
        for book in books:
            empty = 0
            turn = 0
            while empty < 3:  # an empty answer, three times over, through different nodes
                outcome, receipts = await client.receive(urls[turn % len(urls)], book, 10)
                turn += 1
                if outcome != "200":
                    problems[book.name] = outcome
                    await asyncio.sleep(1)
                    if turn > 1000:
                        break
                    continue
                empty = 0 if receipts else empty + 1
    return problems


def _history(books: list[Book], problems: dict[str, str]) -> dict[str, Any]:
    acked = sum(len(b.acked) for b in books)
    lost = {b.name: sorted(b.acked - b.received.keys())[:5] for b in books
            if b.acked - b.received.keys()}
    unsent = {b.name: sorted(b.received.keys() - b.sizes.keys())[:5] for b in books
              if b.received.keys() - b.sizes.keys()}
    return {"queues": len(books), "acknowledged": acked,
            "sent_unacknowledged": sum(len(b.sizes.keys() - b.acked) for b in books),
            "received": sum(len(b.received) for b in books),
            "lost": sum(len(b.acked - b.received.keys()) for b in books),
            "lost_examples": lost,
            "unsent_delivered": sum(len(b.received.keys() - b.sizes.keys()) for b in books),
            "unsent_examples": unsent,
            "received_twice": sum(1 for b in books for c in b.received.values() if c > 1),
            "drain_problems": problems}


async def _move(cluster: Cluster, books: list[Book], load_books: list[Book],
                placement: dict[str, list[str]], started: float, args: argparse.Namespace
                ) -> dict[str, Any]:
    # No leader moves a replica before it has watched the cluster for NODE_GONE_S
    # (replication.node.ClusterNode.knows_members): n3 starts after that.
    await asyncio.sleep(max(0.0, NODE_GONE_S + 1 - args.before_s
                            - (time.monotonic() - started)))
    urls = [cluster.nodes[n].url for n in OLD]
    load = Load(urls, load_books, args)
    load_task = asyncio.create_task(load.run())
    report: dict[str, Any] = {}
    await asyncio.sleep(args.before_s)
    marks = {k: os.path.getsize(n.log) for k, n in cluster.nodes.items()}
    dirs_before = {k: _dir_bytes(f"{cluster.root}/{k}") for k in OLD}
    state = {b.key: b.live_bytes() for b in books}
    leaders = await asyncio.to_thread(_leaders, cluster, [b.name for b in books])
    load0 = _loadavg()
    t_start = time.monotonic()
    node = start_node(cluster, 3)
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(node.url + "readyz",
                                       timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        break
            if node.process.poll() is not None:
                raise RuntimeError(f"n3 exited {node.process.returncode}: see {node.log}")
            await asyncio.sleep(0.05)
    ready = time.monotonic()
    dir_ready = _dir_bytes(f"{cluster.root}/{NEW}")
    pids = {k: n.pid for k, n in cluster.nodes.items()} | {"etcd": cluster.etcd.pid}
    cpu0 = {k: _cpu_seconds(p) for k, p in pids.items()}
    bench0, busy0 = _cpu_seconds(os.getpid()), _machine_busy_s()
    spies: dict[str, Spy] = {}
    if args.py_spy:
        # The node leading the most of the queues n3 takes ships most of them.
        shippers = collections.Counter(leaders[b.name] for b in books if NEW in placement[b.key])
        shipper = shippers.most_common(1)[0][0] or "n0"
        spies = {f"{shipper} (leader)": Spy(args.py_spy, cluster.nodes[shipper].pid,
                                            args.py_spy_idle),
                 NEW: Spy(args.py_spy, node.pid, args.py_spy_idle)}
    watched = await _watch(cluster, placement, ready, args.move_timeout_s)
    end = time.monotonic()
    report["profiles"] = {name: spy.stop() for name, spy in spies.items()}
    seconds = end - ready
    report["cpu_percent"] = {k: 100 * (_cpu_seconds(p) - cpu0[k]) / seconds
                             for k, p in pids.items()}
    report["cpu_percent"]["bench"] = 100 * (_cpu_seconds(os.getpid()) - bench0) / seconds
    report["machine_busy_percent"] = 100 * (_machine_busy_s() - busy0) / seconds
    report["loadavg"] = {"n3_start": load0, "move_done": _loadavg()}
    await asyncio.sleep(args.after_s)
    load.stop.set()
    await load_task
    stop = time.monotonic()
    report["start_to_ready_s"] = ready - t_start
    report["watch"] = watched
    report["state_before"] = state
    report["dir_bytes"] = {"old_before": dirs_before,
                           "old_after": {k: _dir_bytes(f"{cluster.root}/{k}") for k in OLD},
                           "n3_ready": dir_ready,
                           "n3_after": _dir_bytes(f"{cluster.root}/{NEW}")}
    report["shipping"] = _shipping(_log_tails(cluster, marks))
    after = _leaders(cluster, [b.name for b in books])
    report["leaders_moved"] = {n: f"{leaders[n]} -> {after[n]}" for n in after
                               if after[n] != leaders[n]}
    report["latency"] = {
        "before": _latency(load.samples, 0, t_start),
        "during": _latency(load.samples, t_start, end),
        "after": _latency(load.samples, end, stop)}
    report["load_consumed_bytes"] = load.consumed_bytes
    report["load_answers"] = dict(collections.Counter(
        f"{s.op} {s.status}" for s in load.samples))
    return report


def _pick_load(books: list[Book], placement: dict[str, list[str]], count: int) -> list[Book]:
    moving = [b for b in books if NEW in placement[b.key]]
    churned = [b for b in moving if b.churned]
    plain = [b for b in moving if not b.churned]
    picked = churned[: (count + 1) // 2] + plain[: count // 2]
    return picked


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="conveyor-join-")
    report: dict[str, Any] = {"args": vars(args), "loadavg_at_start": _loadavg(),
                              "cpus": os.cpu_count()}
    cluster: Cluster | None = None
    try:
        cluster = _start(f"{tmp}/cluster", args.fsync)
        # Each node's clock for NODE_GONE_S started before it was ready (ClusterNode).
        started = time.monotonic()
        books = [Book(f"j{i:03d}", churned=i % 2 == 0) for i in range(args.queues)]
        names = [b.name for b in books]
        seconds, answers = asyncio.run(_create(cluster, names, 8))
        report["create"] = {"seconds": seconds, "answers": dict(answers)}
        _wait_led(cluster, names, 60)
        print(f"created {len(names)} queues; filling {args.state_mb} MB", file=sys.stderr)
        report["fill"] = asyncio.run(_fill(cluster, books, args))
        report["loadavg_after_fill"] = _loadavg()
        print(f"filled in {report['fill']['seconds']:.0f} s: "
              f"{report['fill']['sent_mb_per_s']:.1f} MB/s sent", file=sys.stderr)
        placement = _placement(books, [*OLD, NEW])
        load_books = _pick_load(books, placement, args.load_queues)
        report["load_queues"] = [b.name for b in load_books]
        report["move"] = asyncio.run(_move(cluster, books, load_books, placement, started,
                                           args))
        urls = [cluster.nodes[n].url for n in (*OLD, NEW)]
        problems = asyncio.run(_drain(urls, load_books))
        report["history"] = _history(load_books, problems)
        report["queues"] = {
            "total": len(books), "churned": sum(b.churned for b in books),
            "placed_on_n3": sorted(k for k, p in placement.items() if NEW in p),
            "churned_keys": sorted(b.key for b in books if b.churned)}
        _summarise(report)
        return report
    finally:
        if cluster is not None:
            cluster.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _summarise(report: dict[str, Any]) -> None:
    """The derived numbers: state n3 took, MB/s, snapshots by kind of queue."""
    move = report["move"]
    placed = report["queues"]["placed_on_n3"]
    churned = set(report["queues"]["churned_keys"])
    state = sum(move["state_before"][k] for k in placed)
    grew = move["dir_bytes"]["n3_after"] - move["dir_bytes"]["n3_ready"]
    in_isr = move["watch"]["all_in_isr_s"]
    first = move["watch"]["first_added_s"]
    snap = set(move["shipping"]["snapshot_bytes"])
    times = sorted(move["watch"]["in_isr"].get(k, float("nan")) for k in placed)
    report["summary"] = {
        "state_bytes": state, "n3_dir_growth_bytes": grew,
        "state_mb_per_s": state / MIB / in_isr if in_isr else None,
        "dir_mb_per_s": grew / MIB / in_isr if in_isr else None,
        "state_mb_per_s_from_first_added": (state / MIB / (in_isr - first)
                                            if in_isr and first is not None else None),
        "in_isr_s_median": statistics.median(times) if times else None,
        "snapshot_churned": len(snap & churned & set(placed)),
        "snapshot_plain": len((snap - churned) & set(placed)),
        "log_copy_churned": len((churned & set(placed)) - snap),
        "log_copy_plain": len(set(placed) - churned - snap),
    }


def _ms(lat: dict[str, Any]) -> str:
    return ", ".join(f"{op} {v['p50_ms']:.0f}/{v['p99_ms']:.0f}/{v['max_ms']:.0f} "
                     f"({v['requests']})" for op, v in lat.items())


def _print(report: dict[str, Any]) -> None:
    move, summary, fill = report["move"], report["summary"], report["fill"]
    watch, dirs, history = move["watch"], move["dir_bytes"], report["history"]
    cpu = move["cpu_percent"]

    def seconds(v: float | None) -> str:
        return "not reached" if v is None else f"{v:.1f} s"

    rows = [
        ("cores; load average at start, after fill, at n3 start, move done",
         f"{report['cpus']}; {report['loadavg_at_start'][0]:.1f}, "
         f"{report['loadavg_after_fill'][0]:.1f}, {move['loadavg']['n3_start'][0]:.1f}, "
         f"{move['loadavg']['move_done'][0]:.1f}"),
        ("CPU over the move, % of a core",
         ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
         + f"; machine {move['machine_busy_percent']:.0f}, others "
           f"{move['machine_busy_percent'] - sum(cpu.values()):.0f}"),
        ("fill: sent, seconds, MB/s",
         f"{fill['sent_bytes'] / MIB:.0f} MiB, {fill['seconds']:.0f} s, "
         f"{fill['sent_mb_per_s']:.1f}"),
        ("fill: live state in all", f"{fill['state_bytes'] / MIB:.0f} MiB"),
        ("fill: answers", str(fill["answers"])),
        ("queues (churned); placed on n3", f"{report['queues']['total']} "
         f"({report['queues']['churned']}); {watch['placed']}"),
        ("n3 start to ready", f"{move['start_to_ready_s']:.1f} s"),
        ("from ready: n3 in n0's view; first replica added",
         f"{seconds(watch['n3_in_view_s'])}; {seconds(watch['first_added_s'])}"),
        ("from ready: all of n3's queues in its ISR", seconds(watch["all_in_isr_s"])),
        ("from ready: median queue in n3's ISR", seconds(summary["in_isr_s_median"])),
        ("from ready: old replicas released", seconds(watch["released_s"])),
        ("from ready: every ISR = ring's replicas, led", seconds(watch["done_s"])),
        ("state n3 took (live message bytes)", f"{summary['state_bytes'] / MIB:.0f} MiB"),
        ("n3 data dir growth", f"{summary['n3_dir_growth_bytes'] / MIB:.0f} MiB"),
        ("MiB/s of state from ready (live bytes; dir growth)",
         "n/a" if summary["state_mb_per_s"] is None else
         f"{summary['state_mb_per_s']:.1f} (= {summary['state_mb_per_s'] * MIB / 1e6:.1f} "
         f"MB/s); {summary['dir_mb_per_s']:.1f}"),
        ("MiB/s of state from the first replica added",
         "n/a" if summary["state_mb_per_s_from_first_added"] is None else
         f"{summary['state_mb_per_s_from_first_added']:.1f}"),
        ("snapshot shipped: churned, not churned",
         f"{summary['snapshot_churned']}, {summary['snapshot_plain']}"),
        ("log copied: churned, not churned",
         f"{summary['log_copy_churned']}, {summary['log_copy_plain']}"),
        ("streams to n3 started over", str(move["shipping"]["restarts"])),
        ("queues whose leader moved (to n3)", f"{len(move['leaders_moved'])} ("
         f"{sum(v.endswith(NEW) for v in move['leaders_moved'].values())})"),
        ("old nodes' data dirs before, after (MiB)", ", ".join(
            f"{k} {dirs['old_before'][k] / MIB:.0f}/{dirs['old_after'][k] / MIB:.0f}"
            for k in OLD)),
        ("load queues", ", ".join(report["load_queues"])),
        ("latency before, ms p50/p99/max (requests)", _ms(move["latency"]["before"])),
        ("latency during", _ms(move["latency"]["during"])),
        ("latency after", _ms(move["latency"]["after"])),
        ("answers not 200 (load)", str({k: v for k, v in move["load_answers"].items()
                                        if not k.endswith(" 200")})),
        ("load: consumed during the run", f"{move['load_consumed_bytes'] / MIB:.1f} MiB"),
        ("history: acknowledged, received", f"{history['acknowledged']}, "
                                            f"{history['received']}"),
        ("history: lost, unsent delivered, received twice",
         f"{history['lost']}, {history['unsent_delivered']}, {history['received_twice']}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for name, lines in move["profiles"].items():
        callees = False
        for line in lines:
            callees = callees or line == "-- with callees"
            # The frames under every stack say nothing (--json has them).
            if not (callees and BOILERPLATE.search(line)):
                print(f"{name}: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queues", type=int, default=40)
    parser.add_argument("--state-mb", type=float, default=400,
                        help="live message bytes in all the queues, MiB")
    parser.add_argument("--body-kib", type=int, default=16)
    parser.add_argument("--fill-concurrency", type=int, default=8)
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--load-queues", type=int, default=8)
    parser.add_argument("--load-rate", type=float, default=4,
                        help="requests/s of each producer and of each consumer")
    parser.add_argument("--load-body", type=int, default=1024)
    parser.add_argument("--consume-batch", type=int, default=1,
                        help="MaxNumberOfMessages of the consumer: small, so that it takes "
                             "little of the state being moved")
    parser.add_argument("--before-s", type=float, default=15)
    parser.add_argument("--after-s", type=float, default=5)
    parser.add_argument("--move-timeout-s", type=float, default=900)
    parser.add_argument("--py-spy", default="",
                        help="a py-spy binary: sample the busiest shipping leader and n3 "
                             "(--gil) from n3's readiness until the move is done")
    parser.add_argument("--py-spy-idle", action="store_true",
                        help="sample every thread, waiting or not (--idle), not --gil")
    parser.add_argument("--keep", action="store_true", help="keep the data and node logs")
    parser.add_argument("--json", help="Also write the report here.")
    args = parser.parse_args()
    report = run(args)
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    main()
