"""How fast a new replica joins a queue with churn: from a snapshot, and from the whole log.

In one process, with the replication roles over real TCP on loopback and real brokers on
disk (the fixtures of tests/replication/test_roles.py, a control plane held in memory): a
leader makes a queue whose log is many times its state (sends, receives, deletes, and a
backlog left live), takes a snapshot, and a follower joins; the time until the follower
is back in the ISR is the join. Run twice: with the rule (replication.leader,
SNAPSHOT_SHIP_RATIO), and with snapshots off (the whole log). Prints MB/s of state, where
state is the queue's canonical encoding (engine.snapshot.encode_state) plus the live
messages' bodies (the log the follower needs from the oldest of them); the snapshot file
is the encoding compressed.

    python -m bench.snapshot_ship [--live 100000] [--churn-rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from engine import AsyncQueue
from engine.queue import SNAPSHOT_FILE
from engine.snapshot import encode_state
from replication import leader as leader_module
from replication import link as link_module
from tests.replication.test_roles import QUEUE, Cluster

BATCH = 1000


async def _join(root: Path, live: int, rounds: int, snapshots: bool) -> dict[str, float]:
    link_module.RETRY_S = 0.05
    leader_module.SNAPSHOT_SHIP_RATIO = 2 if snapshots else 1 << 40
    cluster = Cluster(root)
    try:
        leader = await cluster.add("l")
        cluster.control.create(QUEUE, ("l", "f"))
        epoch = cluster.control.elect(QUEUE, "l")
        leader_module.REPLICA_LAG_S = 0.2
        await leader.lead(QUEUE, epoch, min_insync=1)
        queue = AsyncQueue(leader.broker, QUEUE)
        for i in range(rounds):
            await queue.send_batch([b"churn-%d-%d." % (i, j) + b"c" * 200
                                    for j in range(BATCH)])
            got = await queue.receive(max_messages=10, visibility_timeout=600)
            while got:
                await queue.delete_batch([m.receipt for m in got])
                got = await queue.receive(max_messages=10, visibility_timeout=600)
        for i in range(0, live, BATCH):
            await queue.send_batch([b"live-%d." % (i + j) + b"l" * 100
                                    for j in range(min(BATCH, live - i))])
        core = leader.broker.open_core(QUEUE)
        assert core is not None
        core.maybe_snapshot(force=True)
        state_bytes = len(encode_state(core.state))
        snapshot_bytes = os.path.getsize(os.path.join(core.directory, SNAPSHOT_FILE))
        log_bytes = core.log.size_bytes
        oldest = core.oldest_location()
        live_bytes = core.log.approx_bytes(oldest or 0, core.log.next_offset)
        role = leader.leading[QUEUE]
        started = time.perf_counter()
        await cluster.add("f")
        # Caught up: the follower's log reaches the leader's end (the ISR then follows at
        # the leader's next check, MONITOR_S, which is not the transfer's).
        end = core.log.next_offset
        while role.acked.get("f", -1) < end:
            await asyncio.sleep(0.002)
        seconds = time.perf_counter() - started
        follower_log = cluster.nodes["f"].replicas[QUEUE].log.size_bytes
        return {"seconds": seconds, "state_bytes": state_bytes,
                "snapshot_bytes": snapshot_bytes, "leader_log_bytes": log_bytes,
                "follower_log_bytes": follower_log, "live_bytes": live_bytes,
                "snapshots": role._streams["f"].snapshots}
    finally:
        for node in cluster.nodes.values():
            await node.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=100_000)
    parser.add_argument("--churn-rounds", type=int, default=100)
    args = parser.parse_args()
    for snapshots in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            r = asyncio.run(_join(Path(tmp), args.live, args.churn_rounds, snapshots))
        mib = 1024 * 1024
        print(f"join {'from a snapshot' if snapshots else 'from the whole log'}: "
              f"{r['seconds']:.2f} s; state {r['state_bytes'] / mib:.1f} MiB "
              f"(snapshot file {r['snapshot_bytes'] / mib:.1f} MiB), leader log "
              f"{r['leader_log_bytes'] / mib:.1f} MiB, sent log "
              f"{r['follower_log_bytes'] / mib:.1f} MiB, snapshots {r['snapshots']:.0f}: "
              f"{(r['state_bytes'] + r['live_bytes']) / mib / r['seconds']:.1f} "
              "MiB/s of state (encoding + live bodies)")


if __name__ == "__main__":
    main()
