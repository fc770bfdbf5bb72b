"""The history checker's negative control: it must see loss where loss is possible.

Every node of a cluster is killed at once under load, then restarted. With fsync=always
an acknowledged send is on every in-sync replica's disk, and nothing is lost. With
fsync=never, followers acknowledge what is still in their write buffers, so the last
moments' acknowledged sends die with the processes: the checker has to report them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.cluster.harness import cluster
from tests.cluster.workload import Workload, create_queue, drain
from tests.support.consistency import History, Report, check

ATTEMPTS = 3


def _kill_all_under_load(root: Path, fsync: str) -> Report:
    with cluster(root, fsync=fsync) as c:
        url = create_queue(c, "control")
        history = History()
        with Workload(c, url, history, consume=False) as load:
            time.sleep(2)
            for node in c.nodes.values():
                assert node.process is not None
                os.kill(node.process.pid, signal.SIGKILL)
            assert load.sent_ok > 0
        for node in c.nodes.values():
            node.process.wait()  # type: ignore[union-attr]
        for node_id in c.nodes:
            c.restart(node_id)
        c.leader("control")
        drain(c, url, history)
        return check(history)


def test_nothing_lost_with_fsync(tmp_path: Path) -> None:
    report = _kill_all_under_load(tmp_path, "always")
    assert report.ok, str(report)


def test_checker_reports_loss_without_fsync(tmp_path: Path) -> None:
    reports = []
    for attempt in range(ATTEMPTS):
        report = _kill_all_under_load(tmp_path / f"attempt{attempt}", "never")
        reports.append(report)
        if report.lost:
            print(f"\nfsync=never, all nodes killed: {report.summary()}")
            return
    pytest.fail("the checker saw no loss in any attempt: "
                + "; ".join(r.summary() for r in reports))
