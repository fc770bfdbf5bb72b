"""Leader failure: SIGKILL the leader again and again under load; nothing acknowledged
is lost, nothing acknowledged as deleted comes back.

`make test` runs a short loop; `make soak` runs the long one (CONVEYOR_SOAK_S seconds,
default 150) and prints the failover times.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster, cluster
from tests.cluster.workload import Workload, create_queue, drain
from tests.support.consistency import History, check

LEASE_TTL_S = 3
FAILOVER_WAIT_S = 30


def kill_loop(c: Cluster, queue: str, url: str, seconds: float, pause: tuple[float, float]
              ) -> tuple[History, list[float]]:
    """Kill the queue's leader every `pause` seconds for `seconds`; return the history and
    each round's failover time (kill to the first acknowledged send after it)."""
    history = History()
    failovers: list[float] = []
    rng = random.Random(1)
    with Workload(c, url, history) as load:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(*pause))
            leader = c.leader(queue)
            killed_at = time.monotonic()
            c.kill(leader)
            c.leader(queue, other_than=leader)
            while not any(t > killed_at for t in load.acked_at[-50:]) and \
                    time.monotonic() - killed_at < FAILOVER_WAIT_S:
                time.sleep(0.02)
            c.restart(leader)
            after = [t for t in load.acked_at if t > killed_at]
            assert after, f"no send acknowledged in {FAILOVER_WAIT_S} s after a kill"
            failovers.append(min(after) - killed_at)
        assert load.sent_ok > 0
    drain(c, url, history)
    return history, failovers


def _run(tmp_path: Path, seconds: float, pause: tuple[float, float]) -> None:
    with cluster(tmp_path, lease_ttl=LEASE_TTL_S) as c:
        url = create_queue(c, "killed")
        history, failovers = kill_loop(c, "killed", url, seconds, pause)
        report = check(history)
        print(f"\n{len(failovers)} leader kills; failover p50 "
              f"{statistics.median(failovers):.2f} s, max {max(failovers):.2f} s "
              f"(lease TTL {LEASE_TTL_S} s); {report.summary()}")
        assert report.ok, f"{report}\n{c.logs()}"
        assert not report.lost and not report.delivered_after_delete


def test_leader_kills_lose_nothing(tmp_path: Path) -> None:
    _run(tmp_path, seconds=14, pause=(5, 7))


@pytest.mark.soak
def test_leader_kill_soak(tmp_path: Path) -> None:
    _run(tmp_path, seconds=float(os.environ.get("CONVEYOR_SOAK_S", "150")), pause=(10, 20))
