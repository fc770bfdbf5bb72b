"""The whole server on a disk that loses power: `conveyor serve` under a boto3 workload.

The data directory lives on PowerFS (tests/support/powerfs.py), which keeps only what was
synced. A boto3 workload (sqs_workload.py) sends, receives and deletes; at a random moment
the power goes, the server is SIGKILLed with it, the file system is remounted and the
server restarted on what survived, while the workload carries on. At the end every
acknowledged send is in the queue or was deleted, and no acknowledged delete is delivered
again. The negative control runs the same cycles with --fsync never and must lose sends.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server.test_server_crash import (
    VISIBILITY_S,
    WORKLOAD,
    acknowledged_sends,
    drain,
    events,
    wait_for,
)
from tests.support.powerfs import PowerFS, fuse_unavailable, sync_dir
from tests.support.server import Server

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None,
                                reason=fuse_unavailable() or "")

SEED = int(os.environ.get("CONVEYOR_POWERLOSS_SEED", "41_077"))
CYCLES_QUICK = 1
CYCLES_LONG = int(os.environ.get("CONVEYOR_FAULTS_CYCLES", "30")) // 3


def _server_power_loss_cycles(tmp_path: Path, cycles: int, seed: int, fsync: str = "always"
                              ) -> tuple[str, list[str]]:
    """Cycles of load, power loss and restart on one data directory; then the drain.
    Returns a summary and the problems found."""
    rng = random.Random(seed)
    log = tmp_path / "workload.log"
    errors_log = tmp_path / "workload.err"
    dropped = {"unsynced_bytes": 0, "unsynced_entries": 0}
    problems: list[str] = []
    with PowerFS(tmp_path / "fs") as fs:
        data = fs.mountpoint / "data"
        data.mkdir()
        sync_dir(fs.mountpoint)  # its creator's job, as for any data directory
        server = Server(data, fsync=fsync, log=tmp_path / "server.log")
        try:
            url = server.sqs().create_queue(
                QueueName="power", Attributes={"VisibilityTimeout": str(VISIBILITY_S)}
            )["QueueUrl"]
            with open(log, "wb") as out, open(errors_log, "wb") as err:
                workload = subprocess.Popen(
                    [sys.executable, str(WORKLOAD), server.url, url, "--seed", str(seed),
                     "--producers", "2"], stdin=subprocess.PIPE, stdout=out, stderr=err)
            try:
                wait_for(lambda: acknowledged_sends(log) >= 50, 60, "the workload to start")
                for _ in range(cycles):
                    time.sleep(rng.uniform(0.5, 2.0))
                    lost = fs.lose_power()
                    server.kill()  # the power takes the server with it
                    for key in dropped:
                        dropped[key] += lost[key]
                    fs.remount()
                    server.start()
                restarted_at = acknowledged_sends(log)
                wait_for(lambda: acknowledged_sends(log) > restarted_at + 20, 60,
                         "sends acknowledged after the last restart")
            finally:
                assert workload.stdin is not None
                workload.stdin.close()
                code = workload.wait(timeout=60)
            if code != 0:
                problems.append(f"the workload ended badly ({code}): {errors_log.read_text()}")
            time.sleep(VISIBILITY_S + 1)  # every lease the workload left open runs out
            drained = drain(server.sqs(), url)
        finally:
            if server.process is not None and server.process.poll() is None:
                server.kill()

    sent: set[str] = set()
    tried: set[str] = set()
    deleted: dict[str, float] = {}
    receives: list[tuple[str, float]] = []
    for kind, body, at in events(log):
        if kind == "S":
            sent.add(body)
        elif kind == "T":
            tried.add(body)
        elif kind == "D":
            assert at is not None
            deleted.setdefault(body, at)
        elif kind == "R":
            assert at is not None
            receives.append((body, at))
    drained_set = set(drained)
    # A delete whose answer the power loss swallowed may have happened.
    lost_sends = sorted(sent - tried - drained_set)
    resurrected = sorted({body for body, started in receives
                          if body in deleted and started > deleted[body]}
                         | (drained_set & set(deleted)))
    summary = (f"--fsync {fsync}: {cycles} power losses; {len(sent)} sends and {len(deleted)} "
               f"deletes acknowledged, {len(receives)} receives, {len(drained)} drained; the "
               f"losses dropped {dropped['unsynced_bytes']} unsynced bytes and "
               f"{dropped['unsynced_entries']} directory entries; workload errors: "
               f"{errors_log.read_text().strip()}")
    print(summary)
    if lost_sends:
        problems.append(f"{len(lost_sends)} acknowledged sends lost, e.g. {lost_sends[:10]}")
    if resurrected:
        problems.append(f"{len(resurrected)} bodies delivered after their delete was "
                        f"acknowledged, e.g. {resurrected[:10]}")
    if len(drained) != len(drained_set):
        problems.append("the drain received a body twice")
    if not problems and (len(sent) < 100 or len(deleted) < 50):
        problems.append("too little work to prove anything")
    return summary, problems


def test_server_power_loss_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    summary, problems = _server_power_loss_cycles(tmp_path, CYCLES_QUICK, SEED)
    assert not problems, f"{summary}\n" + "\n".join(problems)


@pytest.mark.faults
def test_server_many_power_losses_lose_nothing_acknowledged(tmp_path: Path) -> None:
    seed = int(os.environ.get("CONVEYOR_POWERLOSS_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (CONVEYOR_POWERLOSS_SEED reproduces the schedule)")
    summary, problems = _server_power_loss_cycles(tmp_path, CYCLES_LONG, seed)
    assert not problems, f"{summary}\n" + "\n".join(problems)


@pytest.mark.faults
def test_server_power_loss_catches_fsync_never(tmp_path: Path) -> None:
    summary, problems = _server_power_loss_cycles(tmp_path, CYCLES_QUICK, SEED + 1,
                                                  fsync="never")
    print("\n".join(problems))
    assert any("acknowledged sends lost" in p for p in problems), summary
