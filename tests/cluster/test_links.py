"""Links between the leader and its followers: delayed, blackholed, cut, healed.

Each node's replication port sits behind a fault-injecting proxy. A follower that stops
answering leaves the ISR and writes go on; with fewer than min_insync_replicas in sync,
no write is acknowledged at all; after healing, the followers catch up and rejoin, and a
failover then loses nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.cluster.harness import cluster
from tests.cluster.workload import IN_DOUBT_PER_FAULT, Workload, create_queue, drain
from tests.support.consistency import History, check


def _grows(load: Workload, seconds: float) -> bool:
    before = load.sent_ok
    time.sleep(seconds)
    return load.sent_ok > before


def test_faulty_links_stall_or_refuse_and_lose_nothing(tmp_path: Path) -> None:
    with cluster(tmp_path, proxies=True, lease_ttl=3) as c:
        url = create_queue(c, "links")
        leader = c.leader("links")
        first, second = sorted(n for n in c.replicas("links") if n != leader)
        history = History()
        with Workload(c, url, history, nodes=[leader]) as load:
            assert _grows(load, 2)
            # A slow link: writes wait for it, and still go on.
            c.proxies[first].delay(0.3)
            assert _grows(load, 2)
            assert len(c.queue_state("links")["isr"]) == 3
            # One follower silent: it leaves the ISR; two in sync are enough.
            c.proxies[first].blackhole()
            assert set(c.wait_isr("links", 2)) == {leader, second}
            assert _grows(load, 2)
            # Both silent: below min_insync_replicas, nothing is acknowledged.
            below_from = time.monotonic()
            c.proxies[second].cut()
            assert c.wait_isr("links", 1) == [leader]
            time.sleep(0.5)
            assert not _grows(load, 3), "a write was acknowledged with one replica in sync"
            # Healed: both catch up and rejoin, and writes flow again.
            c.proxies[first].heal()
            c.proxies[second].heal()
            c.wait_isr("links", 3)
            below_until = time.monotonic()
            assert _grows(load, 2)
        # Everything acknowledged is on the followers too: the leader's loss loses nothing.
        c.kill(leader)
        c.leader("links", other_than=leader)
        drain(c, url, history)
        report = check(history)
        assert report.ok, f"{report}\n{c.logs()}"
        # A delete answered 503 while fewer than min_insync_replicas were in sync is in the
        # leader's log already, and takes effect once the followers are back: messages so
        # deleted are in doubt, and never seen again. Elsewhere, only the kill may leave
        # messages in doubt.
        failed_at = {e.body: e.at for e in history.events if e.kind == "delete_fail"}
        elsewhere = [b for b in report.in_doubt
                     if not below_from <= failed_at[b] <= below_until]
        print(f"\n{report.summary()}")
        assert len(elsewhere) <= IN_DOUBT_PER_FAULT, (
            f"{len(elsewhere)} in doubt from deletes that failed outside the outage: "
            f"{elsewhere[:10]}")
