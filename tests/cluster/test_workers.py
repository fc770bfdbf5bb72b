"""A cluster whose servers run workers (`conveyor serve --cluster --workers N`): each
worker is a member of its own (server/workers/supervisor.py, "In a cluster").

`make cluster-workers` runs every cluster test with servers of two workers; this module
runs in `make test` and checks what is particular to them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from replication.peer import Channel
from server.calls.link import CALL_FRAME_BYTES_MAX, CallLink
from server.errors import DependencyUnavailableError
from server.workers.supervisor import RUN_DIR_ENV
from tests.cluster.harness import ACCOUNT, cluster
from tests.cluster.workload import IN_DOUBT_PER_FAULT, Workload, create_queue, drain
from tests.support.consistency import History, check
from tests.support.server import Server, free_port

QUEUES = [f"spread-{i}" for i in range(6)]
WORKERS = 2
RESTART_WAIT_S = 30


def test_servers_of_workers_hold_one_copy_each_and_lose_nothing_to_a_killed_worker(
        tmp_path: Path) -> None:
    with cluster(tmp_path, nodes=2, workers=WORKERS, lease_ttl=3,
                 extra=("--replication-factor", "3")) as c:
        urls = {q: create_queue(c, q) for q in QUEUES}
        leaders = {q: c.leader(q) for q in QUEUES}
        for queue in QUEUES:
            # Three copies asked for, two servers: one copy on each, never two on one.
            replicas = c.wait_isr(queue, 2)
            assert sorted(c.node_of(r) for r in replicas) == ["n0", "n1"], replicas
        assert len(set(leaders.values())) >= 3, leaders  # the workers share the leading

        # Any worker answers for its server: every worker's leaderships and leases.
        state = c.state("n0")
        assert set(state["workers"]) == {"n0/w0", "n0/w1"}, state
        assert all(w["lease_valid"] for w in state["workers"].values()), state
        assert state["node"] in state["workers"]
        assert set(state["leading"]) == {f"{ACCOUNT}/{q}" for q, leader in leaders.items()
                                         if c.node_of(leader) == "n0"}, state
        with urllib.request.urlopen(c.nodes["n0"].url + "/metrics") as reply:
            metrics = reply.read().decode()
        assert 'worker="0"' in metrics and 'worker="1"' in metrics
        # The workers' call sockets serve the views, and no engine call: a worker's
        # queues are reached only by the cluster's partition calls (authenticated).
        calls = asyncio.run(_sibling_calls(c.nodes["n0"], f"{ACCOUNT}/{QUEUES[0]}"))
        assert calls["metrics_text"].startswith(b"# HELP"), calls
        assert isinstance(calls["purge"], DependencyUnavailableError), calls
        assert isinstance(calls["receive"], DependencyUnavailableError), calls

        # SIGKILL one worker under load: its supervisor starts it again, the queue it led
        # gets a leader, and nothing acknowledged is lost.
        queue, victim = next((q, m) for q, m in leaders.items() if m.startswith("n0/"))
        index = int(victim.rsplit("/w", 1)[1])
        history = History()
        with Workload(c, urls[queue], history) as load:
            time.sleep(1)
            pid = c.nodes["n0"].worker_pid(index)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            deadline = killed_at + RESTART_WAIT_S
            while c.nodes["n0"].worker_pid(index) in (None, pid):
                assert time.monotonic() < deadline, "the worker was not started again"
                time.sleep(0.1)
            while not any(t > killed_at for t in load.acked_at[-50:]):
                assert time.monotonic() < deadline, f"no send acknowledged since\n{c.logs()}"
                time.sleep(0.05)
        c.leader(queue)
        drain(c, urls[queue], history)
        report = check(history)
        assert report.ok, f"{report}\n{c.logs()}"
        assert report.in_doubt_within(IN_DOUBT_PER_FAULT), str(report)
        assert c.nodes["n0"].process is not None and c.nodes["n0"].process.poll() is None


async def _sibling_calls(server: Server, partition: str) -> dict[str, Any]:
    """What worker 0's call socket answers to a view and to two engine calls."""
    pid = server.worker_pid(1)
    assert pid is not None
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [run_dir] = [v.split(b"=", 1)[1].decode() for v in environ
                 if v.startswith(RUN_DIR_ENV.encode() + b"=")]
    reader, writer = await asyncio.open_unix_connection(f"{run_dir}/w0.sock")
    link = CallLink(Channel(reader, writer, "worker 0", CALL_FRAME_BYTES_MAX, None),
                    "worker 0")
    answers: dict[str, Any] = {}
    try:
        for op, args in (("metrics_text", []), ("purge", []), ("receive", [10, 30, 0])):
            try:
                answers[op] = await link.call(op, "" if op == "metrics_text" else partition,
                                              args)
            except EngineError as exc:
                answers[op] = exc
    finally:
        writer.close()
    return answers


def test_worker_ids_and_ports_are_checked_before_the_server_starts(tmp_path: Path) -> None:
    common = ["serve", "--data-dir", str(tmp_path / "d"), "--port", str(free_port()),
              "--cluster", "etcd://127.0.0.1:1"]
    refused = subprocess.run(
        [sys.executable, "-m", "server.cli", *common, "--node-id", "n0/w1",
         "--replication-port", str(free_port()), "--workers", "2"],
        capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--node-id" in refused.stderr, refused.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "server.cli", *common, "--replication-port", "65535",
         "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "past 65535" in refused.stderr, refused.stderr
    http = free_port()
    refused = subprocess.run(
        [sys.executable, "-m", "server.cli", *common[:3], "--port", str(http), *common[5:],
         "--replication-port", str(http - 1), "--workers", "2"],
        capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "which hold --port" in refused.stderr, refused.stderr
