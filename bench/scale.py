"""A cluster at scale: many queues on three nodes, measured at rest, under load, through a
leader kill.

    python -m bench.scale [--queues 10000] [--rest-s 600] [--load-queues 100] [--seconds 6]

In one invocation it starts etcd and three ``conveyor serve --cluster`` nodes (RF=3,
fsync always, access log off) twice:

1. **large**: --queues queues created through the SQS JSON API, --create-concurrency at a
   time, spread over the three nodes. Then:
   - creation: queues per second and every non-200 answer by status;
   - at rest: after --settle-s, CPU of each node and of etcd over --rest-s (percent of one
     core), node leases lost meanwhile (the node's own log line), and resident memory
     per queue (RSS after creation less RSS before, over the queue count), and each
     node's established inter-node connections; with --py-spy, where n0's time goes.
2. **small**, started once the rest is measured: a cluster holding only the first
   --small-queues (10) of those queues. send10 (SendMessageBatch of 10, --concurrency
   requests in flight) at the leaders of those queues, on both clusters, in interleaved
   rounds of --seconds (small, large, large, small; --send10-cycles times): what the idle
   queues cost, as the large cluster's rate and server CPU per message over the small
   one's. Interleaving matters here: this machine's rate drifts by a third over minutes,
   so rounds run one cluster after the other measure the drift. With --py-spy, where
   n0's time goes in each cluster's first round. The small cluster is then stopped.
3. On the large cluster again:
   - send10 spread over --load-queues of its queues;
   - a leader kill: the node leading most queues is killed (SIGKILL); the time until every
     queue it led has a new leader, and, for a sample of those queues that were sent to
     before the kill, every acknowledged message drained from the new leaders.

It prints a table and writes the rows as JSON (--json). All the processes share this
machine's cores: ratios against the baseline run in the same invocation are what carry
over.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.http_load import (
    HEADERS,
    TARGET,
    _cpu_seconds,
    _drive,
    _free_port,
    _post,
    _sqs,
    _wait_ready,
)
from server.cluster.devcluster import etcd_command
from server.protection import masterkey

ACCOUNT = "000000000000"
LEASE_LOST = "node lease lost"


@dataclass
class Node:
    node_id: str
    url: str
    process: subprocess.Popen[bytes]
    log: str
    replication_port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def leases_lost(self) -> int:
        with open(self.log, errors="replace") as f:
            return f.read().count(LEASE_LOST)


@dataclass
class Cluster:
    root: str
    etcd: subprocess.Popen[bytes]
    etcd_port: int = 0
    fsync: str = "always"
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def secret(self) -> str:
        """The cluster secret's file, which every node is started with."""
        return f"{self.root}/cluster.secret"

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [self.etcd, *(n.process for n in self.nodes.values())]

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.process.poll() is None]

    def stop(self) -> None:
        for process in reversed(self.processes()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(60)
            if process.poll() is None:
                process.kill()


def _start(root: str, fsync: str, nodes: int = 3) -> Cluster:
    """etcd and nodes n0.. (RF=3, access log off), each ready."""
    binary = shutil.which("etcd")
    if binary is None:
        raise SystemExit("etcd is not installed: apt-get install etcd-server")
    os.makedirs(root)
    client = _free_port()
    etcd = subprocess.Popen(etcd_command(binary, "scale", f"{root}/etcd", client, _free_port()),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster = Cluster(root, etcd, client, fsync)
    _wait_ready(f"http://127.0.0.1:{client}/health")
    masterkey.load_or_create(cluster.secret)
    for i in range(nodes):
        start_node(cluster, i)
    for node in cluster.nodes.values():
        _wait_ready(node.url + "readyz", timeout=60)
    return cluster


def start_node(cluster: Cluster, i: int) -> Node:
    """Start node n{i} against the cluster's etcd and secret, on data of its own under the
    cluster's root (added to a running cluster, it joins it); its /readyz is not waited
    for."""
    port, replication_port = _free_port(), _free_port()
    log = f"{cluster.root}/n{i}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--data-dir", f"{cluster.root}/n{i}",
             "--port", str(port), "--fsync", cluster.fsync, "--no-access-log",
             "--cluster", f"etcd://127.0.0.1:{cluster.etcd_port}", "--node-id", f"n{i}",
             "--replication-port", str(replication_port),
             "--cluster-secret-file", cluster.secret],
            stdout=out, stderr=subprocess.STDOUT)
    node = cluster.nodes[f"n{i}"] = Node(f"n{i}", f"http://127.0.0.1:{port}/", process, log,
                                         replication_port)
    return node


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _connections(pid: int, ports: set[int]) -> int:
    """Established TCP connections of pid with a local or remote port in ports."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if state == "01" and inode in inodes and (
                        int(local.rpartition(":")[2], 16) in ports
                        or int(remote.rpartition(":")[2], 16) in ports):
                    count += 1
    return count


def _profile(py_spy: str, pid: int, seconds: float = 10) -> list[str]:
    """Sample pid with py-spy; the functions most samples were in (own time, and with
    what they called), as lines to print."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        sampler = _sampler(py_spy, pid, seconds, out.name)
        if sampler.wait():
            raise RuntimeError(f"py-spy exited {sampler.returncode}")
        return _top_frames(out.name, seconds)


def _sampler(py_spy: str, pid: int, seconds: float, output: str) -> subprocess.Popen[bytes]:
    """py-spy sampling pid for seconds into output (its raw format), started."""
    return subprocess.Popen([py_spy, "record", "--format", "raw", "--duration",
                             f"{seconds:g}", "--pid", str(pid), "--output", output,
                             "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _top_frames(raw: str, seconds: float) -> list[str]:
    """py-spy's raw output (a stack and its count a line), summarised: the functions most
    samples were in, by own time and with what they called, as lines to print."""
    with open(raw) as lines:
        stacks = [line.rpartition(" ") for line in lines if line.strip()]
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    for stack, _, count in stacks:
        # "function (file:line)" -> "function (file)": a function's lines count as one
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] += int(count)
        for frame in set(frames):
            total[frame] += int(count)
    samples = max(sum(own.values()), 1)
    lines_out = [f"{samples} samples in {seconds:g} s"]
    for title, table in (("own", own), ("with callees", total)):
        lines_out.append(f"-- {title}")
        lines_out += [f"{n / samples * 100:5.1f}%  {frame}" for frame, n in table.most_common(25)]
    return lines_out


def _name(i: int) -> str:
    return f"q{i:05d}"


async def _create(cluster: Cluster, names: list[str], concurrency: int
                  ) -> tuple[float, collections.Counter[str]]:
    """Create the queues, spread over the nodes; (seconds, answers by status)."""
    urls = [n.url for n in cluster.nodes.values()]
    answers: collections.Counter[str] = collections.Counter()
    todo = iter(enumerate(names))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for i, name in todo:
                url = urls[i % len(urls)]
                body = json.dumps({"QueueName": name}).encode()
                try:
                    async with session.post(url, data=body, headers={
                            **HEADERS, "X-Amz-Target": TARGET + "CreateQueue"},
                            timeout=aiohttp.ClientTimeout(total=60)) as response:
                        await response.read()
                        answers[str(response.status)] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    answers[type(exc).__name__] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - started, answers


def _leaders(cluster: Cluster, names: list[str]) -> dict[str, str | None]:
    """Each queue's leader, read from etcd's leader keys (through its JSON gateway). Not
    from a node's /v1/cluster: at 10,000 queues each answer costs a node 0.4 s of CPU,
    and polling it while a node takes over thousands of partitions slowed the very
    takeover it timed."""
    prefix = b"/conveyor/leaders/"
    body = json.dumps({"key": base64.b64encode(prefix).decode(),
                       "range_end": base64.b64encode(prefix[:-1] + b"0").decode()}).encode()
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.etcd_port}/v3/kv/range", body,
                                timeout=30) as reply:
        kvs = json.loads(reply.read()).get("kvs", [])
    found = {base64.b64decode(kv["key"])[len(prefix):].decode():
             base64.b64decode(kv["value"]).decode() for kv in kvs}
    return {name: found.get(f"{ACCOUNT}/{name}") for name in names}


def _wait_led(cluster: Cluster, names: list[str], timeout: float) -> float:
    """Seconds until every queue has a live leader."""
    return max(_led_again(cluster, names, timeout).values(), default=0.0)


def _led_again(cluster: Cluster, names: list[str], timeout: float) -> dict[str, float]:
    """Seconds until each queue had a live leader (read every 0.2 s)."""
    started = time.monotonic()
    live = {n.node_id for n in cluster.live()}
    wanted = set(names)
    led: dict[str, float] = {}
    while time.monotonic() - started < timeout:
        with contextlib.suppress(OSError, ValueError):
            leaders = _leaders(cluster, sorted(wanted - led.keys()))
            now = time.monotonic() - started
            led |= {name: now for name, leader in leaders.items() if leader in live}
            if len(led) == len(wanted):
                return led
        time.sleep(0.2)
    raise RuntimeError(f"not every queue had a leader in {timeout:g} s")


async def _send10(cluster: Cluster, names: list[str], seconds: float, concurrency: int,
                  body: str) -> dict[str, Any]:
    leaders = _leaders(cluster, names)
    ops = []
    for i in range(concurrency):
        name = names[i % len(names)]
        node = cluster.nodes[leaders[name] or "n0"]
        queue_url = f"{node.url}{ACCOUNT}/{name}"
        ops.append(_sqs(node.url, "SendMessageBatch", {
            "QueueUrl": queue_url,
            "Entries": [{"Id": str(k), "MessageBody": body} for k in range(10)]}))
    result = await _drive("send10", cluster.nodes["n0"].url, ops, seconds,
                          [n.pid for n in cluster.live()], concurrency)
    return result.row()


def _send10_interleaved(small: Cluster, large: Cluster, names: list[str],
                        args: argparse.Namespace, body: str) -> list[dict[str, Any]]:
    """send10 on the same queues of both clusters, both up, in rounds ordered small,
    large, large, small (--send10-cycles times), so that the machine's drift in the
    course of the run falls on both alike. Each row says which cluster ran it and how
    much CPU the other (nodes and etcd) used meanwhile, idle. With --py-spy, where n0's
    time went in each cluster's first round (in the row, "profile")."""
    rows: list[dict[str, Any]] = []
    profiled: set[str] = set()
    for label in ("small", "large", "large", "small") * args.send10_cycles:
        cluster, other = (small, large) if label == "small" else (large, small)
        others = [n.pid for n in other.live()] + [other.etcd.pid]
        idle_before = sum(map(_cpu_seconds, others))
        sampler = None
        with tempfile.NamedTemporaryFile(suffix=".txt") as out:
            if args.py_spy and label not in profiled:
                profiled.add(label)
                sampler = _sampler(args.py_spy, cluster.nodes["n0"].pid, args.seconds,
                                   out.name)
            row = asyncio.run(_send10(cluster, names, args.seconds, args.concurrency, body))
            if sampler is not None:
                sampler.wait()
                row["profile"] = [f"{label}: {line}"
                                  for line in _top_frames(out.name, args.seconds)]
        row["cluster"] = label
        row["other_cluster_cpu_percent"] = (
            100 * (sum(map(_cpu_seconds, others)) - idle_before) / args.seconds)
        rows.append(row)
    return rows


def _send10_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Large over small, summed over each cluster's rounds: the rate, and the server CPU
    per message."""
    def total(label: str, key: str) -> float:
        return float(sum(r[key] for r in rows if r["cluster"] == label))
    return {"rate": total("large", "messages_per_s") / total("small", "messages_per_s"),
            "cpu_per_message": (total("large", "server_cpu_us_per_message")
                                / total("small", "server_cpu_us_per_message"))}


def _cpu_percent(pids: dict[str, int], seconds: float) -> dict[str, float]:
    before = {k: _cpu_seconds(p) for k, p in pids.items()}
    time.sleep(seconds)
    return {k: 100 * (_cpu_seconds(p) - before[k]) / seconds for k, p in pids.items()}


async def _sample_history(cluster: Cluster, names: list[str], per_queue: int,
                          refused: collections.Counter[str]) -> dict[str, set[str]]:
    """Send per_queue messages to each queue at its leader; the acknowledged bodies. The
    answers other than 200 are counted in refused, by their text."""
    leaders = _leaders(cluster, names)
    sent: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as session:
        for name in names:
            node = cluster.nodes[leaders[name] or "n0"]
            sent[name] = set()
            for k in range(per_queue):
                body = f"{name}-{k}"
                payload = json.dumps({"QueueUrl": f"{node.url}{ACCOUNT}/{name}",
                                      "MessageBody": body}).encode()
                try:
                    await _post(session, node.url, None, "SendMessage", payload)
                except RuntimeError as exc:  # not acknowledged: not counted
                    refused[re.sub(r"[0-9a-f]{8,}|q\d+", "#", str(exc))[:160]] += 1
                else:
                    sent[name].add(body)
    return sent


async def _drain(cluster: Cluster, names: list[str]) -> dict[str, set[str]]:
    leaders = _leaders(cluster, names)
    got: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as session:
        for name in names:
            node = cluster.nodes[leaders[name] or "n0"]
            got[name] = set()
            payload = json.dumps({"QueueUrl": f"{node.url}{ACCOUNT}/{name}",
                                  "MaxNumberOfMessages": 10, "VisibilityTimeout": 600}).encode()
            while True:
                answer = json.loads(await _post(session, node.url, None, "ReceiveMessage",
                                                payload))
                messages = answer.get("Messages", [])
                if not messages:
                    break
                got[name] |= {m["Body"] for m in messages}
    return got


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="conveyor-scale-")
    body = "x" * args.body
    report: dict[str, Any] = {"queues": args.queues}
    clusters: list[Cluster] = []
    try:
        large = _start(f"{tmp}/large", args.fsync)
        clusters.append(large)
        rss0 = {k: _rss_bytes(n.pid) for k, n in large.nodes.items()}
        names = [_name(i) for i in range(args.queues)]
        few = names[: args.small_queues]
        seconds, answers = asyncio.run(_create(large, names, args.create_concurrency))
        report["create"] = {"seconds": seconds, "per_s": args.queues / seconds,
                            "answers": dict(answers)}
        print(f"created {args.queues} queues in {seconds:.1f} s: {dict(answers)}",
              file=sys.stderr)
        time.sleep(args.settle_s)
        lost0 = {k: n.leases_lost() for k, n in large.nodes.items()}
        pids = {k: n.pid for k, n in large.nodes.items()} | {"etcd": large.etcd.pid}
        report["rest_cpu_percent"] = _cpu_percent(pids, args.rest_s)
        report["rest_seconds"] = args.rest_s
        report["leases_lost_at_rest"] = {k: n.leases_lost() - lost0[k]
                                         for k, n in large.nodes.items()}
        report["leases_lost_total"] = {k: n.leases_lost() for k, n in large.nodes.items()}
        report["rss_bytes_per_queue"] = {
            k: (_rss_bytes(n.pid) - rss0[k]) / args.queues for k, n in large.nodes.items()}
        ports = {n.replication_port for n in large.nodes.values()}
        report["inter_node_connections"] = {k: _connections(n.pid, ports)
                                            for k, n in large.nodes.items()}
        if args.py_spy:
            report["profile_n0_at_rest"] = _profile(args.py_spy, large.nodes["n0"].pid)
        # The baseline: a cluster holding only --small-queues queues, started after the
        # rest was measured so that it was measured alone.
        small = _start(f"{tmp}/small", args.fsync)
        clusters.append(small)
        asyncio.run(_create(small, few, args.create_concurrency))
        _wait_led(small, few, 60)
        _wait_led(large, few, 60)
        report["send10_rounds"] = _send10_interleaved(small, large, few, args, body)
        report["send10_ratio"] = _send10_ratios(report["send10_rounds"])
        small.stop()
        load = names[: args.load_queues]
        _wait_led(large, load, 60)
        report["large_send10_spread"] = asyncio.run(_send10(large, load, args.seconds,
                                                            args.concurrency, body))

        leaders = _leaders(large, names)
        counts = collections.Counter(v for v in leaders.values() if v)
        victim = counts.most_common(1)[0][0]
        led = [n for n, leader in leaders.items() if leader == victim]
        # Not the queues sent to under load: their bodies are all alike, and only the
        # history's own are checked.
        loaded = set(load)
        sample = [n for n in led if n not in loaded][: args.history_queues]
        refused: collections.Counter[str] = collections.Counter()
        sent = asyncio.run(_sample_history(large, sample, args.history_messages, refused))
        large.nodes[victim].process.kill()
        large.nodes[victim].process.wait()
        report["kill"] = {"node": victim, "queues_led": len(led)}
        times = _led_again(large, led, args.kill_timeout_s)
        report["kill"]["all_led_again_s"] = max(times.values())
        # The queues led again only at the last reading, and which of them were sent to
        # under load (a backlog makes a queue slower to open).
        last = [name for name, at in times.items() if at == max(times.values())]
        report["kill"]["last_led"] = {"count": len(last),
                                      "loaded": sorted(n for n in last if n in loaded)}
        got = asyncio.run(_drain(large, sample))
        lost = {n: sorted(sent[n] - got.get(n, set())) for n in sample}
        report["kill"]["sampled_queues"] = len(sample)
        report["kill"]["acknowledged"] = sum(map(len, sent.values()))
        report["kill"]["lost"] = sum(map(len, lost.values()))
        report["kill"]["unsent_delivered"] = sum(len(got[n] - sent[n]) for n in sample)
        report["kill"]["sends_refused"] = dict(refused)
        large.stop()
        return report
    finally:
        for cluster in clusters:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _print(report: dict[str, Any]) -> None:
    cpu = report["rest_cpu_percent"]
    rows = [
        ("queues", f"{report['queues']:,}"),
        ("created per second", f"{report['create']['per_s']:.0f} "
                               f"(answers {report['create']['answers']})"),
        (f"CPU at rest over {report['rest_seconds']:g} s, % of a core",
         ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())),
        ("leases lost at rest", str(report["leases_lost_at_rest"])),
        ("leases lost in all", str(report["leases_lost_total"])),
        ("resident bytes per queue", ", ".join(
            f"{k} {v:,.0f}" for k, v in report["rss_bytes_per_queue"].items())),
        ("inter-node connections per node", str(report["inter_node_connections"])),
        ("send10 on the same queues, large / small: rate",
         f"{report['send10_ratio']['rate']:.2f}x"),
        ("send10 on the same queues, large / small: CPU per message",
         f"{report['send10_ratio']['cpu_per_message']:.2f}x"),
        ("send10, large cluster, over --load-queues, msg/s",
         f"{report['large_send10_spread']['messages_per_s']:,.0f}"),
        ("leader kill: queues it led", str(report["kill"]["queues_led"])),
        ("leader kill: all led again in", f"{report['kill']['all_led_again_s']:.1f} s"),
        ("leader kill: led again only at the last reading",
         f"{report['kill']['last_led']['count']} queues, of them loaded: "
         f"{', '.join(report['kill']['last_led']['loaded']) or 'none'}"),
        ("leader kill: sampled messages lost",
         f"{report['kill']['lost']} of {report['kill']['acknowledged']} "
         f"({report['kill']['sampled_queues']} queues)"),
        ("leader kill: delivered, never acknowledged",
         f"{report['kill']['unsent_delivered']} (sends refused before the kill: "
         f"{report['kill'].get('sends_refused') or 'none'})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for line in report.get("profile_n0_at_rest", []):
        print(f"n0 at rest: {line}")
    print("send10 rounds: cluster, msg/s, server CPU µs per message, "
          "the other cluster's CPU meanwhile (% of a core)")
    for row in report["send10_rounds"]:
        print(f"  {row['cluster']:<6}{row['messages_per_s']:>9,.0f}"
              f"{row['server_cpu_us_per_message']:>8.0f}{row['other_cluster_cpu_percent']:>8.1f}")
    for row in report["send10_rounds"]:
        for line in row.get("profile", []):
            print(f"n0 in send10, {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queues", type=int, default=10_000)
    parser.add_argument("--create-concurrency", type=int, default=16)
    parser.add_argument("--settle-s", type=float, default=30)
    parser.add_argument("--rest-s", type=float, default=600)
    parser.add_argument("--small-queues", type=int, default=10)
    parser.add_argument("--load-queues", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--send10-cycles", type=int, default=3,
                        help="cycles of four send10 rounds: small, large, large, small")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--history-queues", type=int, default=20)
    parser.add_argument("--history-messages", type=int, default=10)
    parser.add_argument("--kill-timeout-s", type=float, default=120)
    parser.add_argument("--json", help="Also write the report here.")
    parser.add_argument("--py-spy", default="",
                        help="a py-spy binary: sample n0 at rest for 10 s and print where "
                             "its time goes")
    args = parser.parse_args()
    report = run(args)
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
