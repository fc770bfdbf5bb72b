"""Cluster load: a 3-node cluster (RF=3, acknowledgement after ISR commit) against one node.

    python -m bench.cluster_load [--seconds 6] [--rounds 3] [--concurrency 16]

In one invocation it starts etcd, three ``conveyor serve --cluster`` nodes and one
single-node server, all with the same fsync policy, and creates a queue on each. Then,
for --rounds rounds, it alternates between them:

- ``send10``: SendMessageBatch of 10 bodies of --body bytes, to the queue's leader;
- ``recv10``: ReceiveMessage of up to 10 and DeleteMessageBatch, at the leader (both
  queues are filled, untimed, before each round);
- ``send10-fwd``: send10 to a node that does not lead the queue, which passes the engine
  call to the leader;
- ``send10-p3`` and ``recv10-p3``: the same on a queue of three partitions (RF=3 each),
  the requests spread over all three nodes in turn.

It prints messages/s of each, the cluster's as a fraction of the single node's, and the
CPU microseconds per message summed over every node of the cluster.

A second 3-node cluster, its nodes started with peer authentication off, runs ``send10``
and ``send10-fwd`` in the same rounds: the cost of authenticating and sealing every
frame between nodes is the first cluster's rate as a fraction of the second's. All the processes -
etcd, four servers and this client - share this machine's cores, so the cluster's three
nodes compete with each other for CPU: the ratio is a floor for separate machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

from bench.http_load import (
    FILL_PER_S,
    HEADERS,
    TARGET,
    _drive,
    _fill,
    _free_port,
    _receive_delete,
    _serve,
    _sqs,
    _wait_ready,
)
from server.cluster.devcluster import etcd_command
from server.protection import masterkey

QUEUE = "bench"


def _etcd(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("etcd")
    if binary is None:
        raise SystemExit("etcd is not installed: apt-get install etcd-server")
    client = _free_port()
    process = subprocess.Popen(etcd_command(binary, "bench", f"{tmp}/etcd", client,
                                            _free_port()),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_ready(f"http://127.0.0.1:{client}/health")
    return process, f"etcd://127.0.0.1:{client}"


async def _create(url: str, name: str = QUEUE, partitions: int = 1) -> str:
    import aiohttp

    body = {"QueueName": name, "Attributes": {"ConveyorPartitions": str(partitions)}}
    async with (aiohttp.ClientSession() as session,
                session.post(url, data=json.dumps(body),
                             headers={**HEADERS, "X-Amz-Target": TARGET + "CreateQueue"})
                as response):
        return str((await response.json(content_type=None))["QueueUrl"])


def _leader(urls: dict[str, str]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(next(iter(urls.values())) + "v1/cluster") as reply:
            queue = json.loads(reply.read())["queues"].get(f"000000000000/{QUEUE}", {})
        if queue.get("leader") and len(queue.get("isr", [])) == 3:
            return str(queue["leader"])
        time.sleep(0.1)
    raise RuntimeError("the cluster queue got no leader with 3 in sync")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = tempfile.mkdtemp(prefix="conveyor-cluster-load-")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        etcd, etcd_url = _etcd(tmp)
        processes.append(etcd)
        single_port = _free_port()
        single = _serve(f"{tmp}/single", single_port, args.fsync)
        processes.append(single)
        secret = f"{tmp}/cluster.secret"
        masterkey.load_or_create(secret)
        nodes = _cluster(tmp, "n", etcd_url, args.fsync, processes,
                         "--cluster-secret-file", secret)
        open_etcd, open_etcd_url = _etcd(f"{tmp}/open")
        processes.append(open_etcd)
        open_nodes = _cluster(tmp, "open", open_etcd_url, args.fsync, processes,
                              "--unsafe-no-peer-auth")
        for url in [f"http://127.0.0.1:{single_port}/",
                    *(u for u, _ in [*nodes.values(), *open_nodes.values()])]:
            _wait_ready(url + "readyz")
        return asyncio.run(_rounds(args, f"http://127.0.0.1:{single_port}/", single.pid,
                                   nodes, open_nodes))
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def _cluster(tmp: str, prefix: str, etcd_url: str, fsync: str,
             processes: list[subprocess.Popen[bytes]], *extra: str
             ) -> dict[str, tuple[str, int]]:
    """Three nodes joined to etcd_url: node id -> (URL, pid)."""
    nodes: dict[str, tuple[str, int]] = {}
    for i in range(3):
        port = _free_port()
        node = _serve(f"{tmp}/{prefix}{i}", port, fsync, "--cluster", etcd_url,
                      "--node-id", f"n{i}", "--replication-port", str(_free_port()), *extra)
        processes.append(node)
        nodes[f"n{i}"] = (f"http://127.0.0.1:{port}/", node.pid)
    return nodes


async def _rounds(args: argparse.Namespace, single_url: str, single_pid: int,
                  nodes: dict[str, tuple[str, int]], open_nodes: dict[str, tuple[str, int]]
                  ) -> list[dict[str, Any]]:
    body = "x" * args.body
    n = args.concurrency
    single_queue = await _create(single_url)
    cluster_queue = await _create(nodes["n0"][0])
    partitioned_queue = await _create(nodes["n0"][0], QUEUE + "-p3", 3)
    node_urls = [u for u, _ in nodes.values()]
    leader = _leader({k: u for k, (u, _) in nodes.items()})
    leader_url = nodes[leader][0]
    follower_url = next(u for k, (u, _) in nodes.items() if k != leader)
    pids = [pid for _, pid in nodes.values()]
    open_queue = await _create(open_nodes["n0"][0])
    open_leader = _leader({k: u for k, (u, _) in open_nodes.items()})
    open_leader_url = open_nodes[open_leader][0]
    open_follower_url = next(u for k, (u, _) in open_nodes.items() if k != open_leader)
    open_pids = [pid for _, pid in open_nodes.values()]

    def ten(queue_url: str) -> dict[str, Any]:
        return {"QueueUrl": queue_url,
                "Entries": [{"Id": str(i), "MessageBody": body} for i in range(10)]}

    rows = []
    for round_ in range(1, args.rounds + 1):
        single_send = await _drive("send10", single_url,
                                   [_sqs(single_url, "SendMessageBatch", ten(single_queue))] * n,
                                   args.seconds, single_pid, n)
        cluster_send = await _drive(
            "send10", leader_url,
            [_sqs(leader_url, "SendMessageBatch", ten(cluster_queue))] * n,
            args.seconds, pids, n)
        forwarded = await _drive(
            "send10-fwd", follower_url,
            [_sqs(follower_url, "SendMessageBatch", ten(cluster_queue))] * n,
            args.seconds, pids, n)
        spread_send = await _drive(
            "send10-p3", node_urls[0],
            [_sqs(node_urls[i % 3], "SendMessageBatch", ten(partitioned_queue))
             for i in range(n)], args.seconds, pids, n)
        depth = int(args.seconds * FILL_PER_S)
        await _fill(single_url, None, single_queue,
                    _sqs(single_url, "SendMessageBatch", ten(single_queue)), depth)
        await _fill(leader_url, None, cluster_queue,
                    _sqs(leader_url, "SendMessageBatch", ten(cluster_queue)), depth)
        single_recv = await _drive("recv10", single_url,
                                   [_receive_delete(single_url, single_queue)] * n,
                                   args.seconds, single_pid, n)
        cluster_recv = await _drive("recv10", leader_url,
                                    [_receive_delete(leader_url, cluster_queue)] * n,
                                    args.seconds, pids, n)
        await _fill(node_urls[0], None, partitioned_queue,
                    _sqs(node_urls[0], "SendMessageBatch", ten(partitioned_queue)), depth)
        spread_recv = await _drive(
            "recv10-p3", node_urls[0],
            [_receive_delete(node_urls[i % 3], partitioned_queue) for i in range(n)],
            args.seconds, pids, n)
        open_send = await _drive(
            "send10", open_leader_url,
            [_sqs(open_leader_url, "SendMessageBatch", ten(open_queue))] * n,
            args.seconds, open_pids, n)
        open_forwarded = await _drive(
            "send10-fwd", open_follower_url,
            [_sqs(open_follower_url, "SendMessageBatch", ten(open_queue))] * n,
            args.seconds, open_pids, n)
        for name, off, on in (("auth-send10", open_send, cluster_send),
                              ("auth-send10-fwd", open_forwarded, forwarded)):
            a, b = off.row(), on.row()
            rows.append({"round": round_, "scenario": name,
                         "off_messages_per_s": a["messages_per_s"],
                         "on_messages_per_s": b["messages_per_s"],
                         "off_cpu_us_per_message": a["server_cpu_us_per_message"],
                         "on_cpu_us_per_message": b["server_cpu_us_per_message"]})
        for name, one, many in (("send10", single_send, cluster_send),
                                ("send10-fwd", single_send, forwarded),
                                ("send10-p3", single_send, spread_send),
                                ("recv10", single_recv, cluster_recv),
                                ("recv10-p3", single_recv, spread_recv)):
            a, b = one.row(), many.row()
            rows.append({"round": round_, "scenario": name,
                         "single_messages_per_s": a["messages_per_s"],
                         "cluster_messages_per_s": b["messages_per_s"],
                         "single_cpu_us_per_message": a["server_cpu_us_per_message"],
                         "cluster_cpu_us_per_message": b["server_cpu_us_per_message"],
                         "cluster_p99_ms": b["p99_ms"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"fsync={args.fsync} concurrency={args.concurrency} body={args.body} B "
          f"seconds={args.seconds} rounds={args.rounds}; etcd, 4 servers and the client "
          "share this machine")
    print(f"{'round':<6}{'scenario':<11}{'single msgs/s':>14}{'RF=3':>9}{'ratio':>7}"
          f"{'cpu us/msg single':>19}{'cluster':>9}{'p99 ms':>8}")
    for row in rows:
        if row["scenario"].startswith("auth-"):
            continue
        print(f"{row['round']:<6}{row['scenario']:<11}{row['single_messages_per_s']:>14,.0f}"
              f"{row['cluster_messages_per_s']:>9,.0f}"
              f"{row['cluster_messages_per_s'] / row['single_messages_per_s']:>7.2f}"
              f"{row['single_cpu_us_per_message']:>19.1f}"
              f"{row['cluster_cpu_us_per_message']:>9.1f}{row['cluster_p99_ms']:>8.1f}")
    for name in ("send10", "send10-fwd", "send10-p3", "recv10", "recv10-p3"):
        single = sum(r["single_messages_per_s"] for r in rows if r["scenario"] == name)
        cluster = sum(r["cluster_messages_per_s"] for r in rows if r["scenario"] == name)
        print(f"{name}: RF=3 cluster / single node over all rounds: {cluster / single:.2f}")
    print(f"\nPeer authentication on against off (two RF=3 clusters, same rounds)\n"
          f"{'round':<6}{'scenario':<17}{'off msgs/s':>11}{'on':>9}{'ratio':>7}"
          f"{'cpu us/msg off':>16}{'on':>7}")
    for row in rows:
        if row["scenario"].startswith("auth-"):
            print(f"{row['round']:<6}{row['scenario']:<17}{row['off_messages_per_s']:>11,.0f}"
                  f"{row['on_messages_per_s']:>9,.0f}"
                  f"{row['on_messages_per_s'] / row['off_messages_per_s']:>7.2f}"
                  f"{row['off_cpu_us_per_message']:>16.1f}{row['on_cpu_us_per_message']:>7.1f}")
    for name in ("auth-send10", "auth-send10-fwd"):
        off = sum(r["off_messages_per_s"] for r in rows if r["scenario"] == name)
        on = sum(r["on_messages_per_s"] for r in rows if r["scenario"] == name)
        print(f"{name}: peer authentication on / off over all rounds: {on / off:.2f}")


if __name__ == "__main__":
    main()
