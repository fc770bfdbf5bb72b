"""Idle cost: the CPU a 3-node dev cluster burns at rest while it holds many queues.

    python -m bench.idle_cluster [--queues 500] [--seconds 30] [--nodes 3]

It starts ``conveyor dev-cluster`` in a temporary directory, creates --queues queues
(RF=3: every node holds a copy of each, and leads about a third), waits until every
node leads what it will lead and the cluster has settled, then reads each process's
user + system time from /proc/<pid>/stat over --seconds and prints each node's CPU as a
percentage of one core, etcd's, and each node's inter-node TCP connections (counted in
/proc/<pid>/net/tcp by the replication port, in either direction).

Nothing is sent to the queues: this is what the cluster costs a machine for merely
holding them. It runs a few minutes; the machine is shared, so run it when it is quiet.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import boto3
from botocore.config import Config

from tests.cluster.test_dev_cluster import _free_base

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of every process whose parent is pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rpartition(")")[2].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                    found[int(entry)] = cmd.read().replace(b"\0", b" ").decode()
    return found


def _connections(pid: int, ports: set[int]) -> int:
    """Established TCP connections of pid with a local or remote port in ports."""
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as lines:
            inodes = _socket_inodes(pid)
            for line in list(lines)[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if state != "01" or inode not in inodes:
                    continue
                if int(local.rpartition(":")[2], 16) in ports or \
                        int(remote.rpartition(":")[2], 16) in ports:
                    count += 1
    return count


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queues", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds to wait after the last queue is led")
    parser.add_argument("--py-spy", default="",
                        help="a py-spy binary: after the measurement, sample node0 for 10 s "
                             "and print where its time goes")
    args = parser.parse_args()
    base = _free_base()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "dev-cluster", "--nodes", str(args.nodes),
             "--base-port", str(base), "--data-dir", os.path.join(tmp, "c")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _run(cluster, base, args)
        finally:
            cluster.send_signal(signal.SIGINT)
            try:
                cluster.wait(60)
            except subprocess.TimeoutExpired:
                cluster.kill()


def _run(cluster: subprocess.Popen[str], base: int, args: argparse.Namespace) -> None:
    assert cluster.stdout is not None
    lines = []
    while True:
        line = cluster.stdout.readline()
        if not line:
            raise RuntimeError("dev-cluster ended: " + "".join(lines))
        lines.append(line)
        if "Ctrl-C" in line:
            break
    urls = re.findall(r"node\d: (http://\S+)", "".join(lines))
    clients = [boto3.client("sqs", endpoint_url=u, region_name="us-east-1",
                            aws_access_key_id="x", aws_secret_access_key="x",
                            config=Config(retries={"total_max_attempts": 5}))
               for u in urls]
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: clients[i % len(clients)].create_queue(
            QueueName=f"idle-{i:05d}"), range(args.queues)))
    print(f"{args.queues} queues created in {time.monotonic() - started:.1f} s", flush=True)
    _wait_led(urls[0], args.queues)
    time.sleep(args.settle)
    processes = _children(cluster.pid)
    names = {pid: ("etcd" if "etcd" in cmd.split()[0] else
                   re.search(r"--node-id (\S+)", cmd).group(1))  # type: ignore[union-attr]
             for pid, cmd in processes.items()}
    ports = {base + 100 + i for i in range(args.nodes)}
    before = {pid: _cpu_ticks(pid) for pid in processes}
    began = time.monotonic()
    time.sleep(args.seconds)
    spent = time.monotonic() - began
    for pid in sorted(processes, key=lambda p: names[p]):
        cpu = (_cpu_ticks(pid) - before[pid]) / CLOCK_TICKS / spent * 100
        links = "" if names[pid] == "etcd" else \
            f"  inter-node connections {_connections(pid, ports)}"
        print(f"{names[pid]:>6}: {cpu:6.1f}% of a core{links}", flush=True)
    if args.py_spy:
        node0 = next(pid for pid, name in names.items() if name == "node0")
        _profile(args.py_spy, node0)


def _profile(py_spy: str, pid: int) -> None:
    """Sample pid for 10 s; print the functions that most samples were in (their own
    time, and their time with what they called)."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        subprocess.run([py_spy, "record", "--format", "raw", "--duration", "10", "--pid",
                        str(pid), "--output", out.name, "--nonblocking"],
                       check=True, capture_output=True)
        with open(out.name) as lines:
            stacks = [line.rpartition(" ") for line in lines if line.strip()]
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for stack, _, count in stacks:
        n = int(count)
        samples += n
        # "function (file:line)" -> "function (file)": a function's lines count as one
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    print(f"node0: {samples} samples in 10 s")
    for title, table in (("own", own), ("with callees", total)):
        print(f"-- {title}")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:40]:
            print(f"{n / samples * 100:5.1f}%  {frame}")


def _wait_led(url: str, queues: int) -> None:
    """Until every partition has a leader and a full ISR, as node0 sees it."""
    import json
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(url + "/v1/cluster", timeout=30) as reply:
                state = json.load(reply)
            parts = state.get("queues", {})
            ready = sum(1 for p in parts.values() if p.get("leader") and len(p["isr"]) >= 3)
            if ready >= queues:
                return
        time.sleep(2)
    raise RuntimeError("the queues were not all led with a full ISR in time")


if __name__ == "__main__":
    main()
