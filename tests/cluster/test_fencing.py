"""Fencing: a leader paused past its lease comes back to find it leads nothing.

While it is stopped, requests pile up in its sockets. When it resumes it may append
them to its log, but it cannot acknowledge them: its lease has lapsed, its followers
answer to a newer epoch, and etcd refuses its ISR changes. Those records are an
uncommitted suffix that the new leader cuts when the old one rejoins as a follower.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from tests.cluster.harness import cluster, read_log
from tests.cluster.workload import CLIENT, IN_DOUBT_PER_FAULT, create_queue, drain
from tests.support.consistency import History, check

LEASE_TTL_S = 2


def test_paused_leader_acknowledges_nothing_and_is_truncated(tmp_path: Path) -> None:
    with cluster(tmp_path, lease_ttl=LEASE_TTL_S) as c:
        url = create_queue(c, "fenced")
        history = History()
        old = c.leader("fenced")
        client = c.node(old).sqs(**CLIENT)
        for i in range(20):
            body = f"before-{i}"
            history.send_attempted(body)
            history.send_acked(body, client.send_message(QueueUrl=url,
                                                         MessageBody=body)["MessageId"])
        c.pause(old)
        paused_at = time.monotonic()
        outcomes: list[tuple[str, Any]] = []

        def send_to_paused(i: int) -> None:
            body = f"during-{i}"
            history.send_attempted(body)
            try:
                reply = c.node(old).sqs(**CLIENT).send_message(QueueUrl=url, MessageBody=body)
            except Exception as exc:
                history.send_failed(body, type(exc).__name__)
                outcomes.append(("refused", exc))
            else:
                history.send_acked(body, reply["MessageId"])
                outcomes.append(("acked", reply))

        senders = [threading.Thread(target=send_to_paused, args=(i,)) for i in range(5)]
        for sender in senders:
            sender.start()
        new = c.leader("fenced", other_than=old, timeout=30)
        # Not before the old leader's lease ran out: a full TTL from its last renewal,
        # which came up to a third of the TTL before the pause (renewed every ttl/3).
        assert time.monotonic() - paused_at >= LEASE_TTL_S * 2 / 3
        other = c.sqs(new)
        for i in range(20):
            body = f"after-{i}"
            history.send_attempted(body)
            history.send_acked(body, other.send_message(QueueUrl=url,
                                                        MessageBody=body)["MessageId"])
        c.resume(old)
        for sender in senders:
            sender.join(60)
        # Whatever the paused node answered, it acknowledged nothing by itself: each
        # "acked" send must be in the queue now, which the checker's drain proves.
        drain(c, url, history)
        report = check(history)
        assert report.ok, f"{report}\n{c.logs()}"
        assert report.in_doubt_within(IN_DOUBT_PER_FAULT), str(report)
        assert len(outcomes) == 5
        # The old leader rejoins as a follower, its divergent suffix cut.
        c.wait_isr("fenced", 3)
        c.stop_all()
        logs = {n: read_log(c.data_dir(n), "fenced") for n in (old, new)}
        assert logs[old] == logs[new], "the old leader's log still diverges"
        cut = "cut divergent records" in c.node(old).log.read_text(errors="replace")
        refused = sum(1 for kind, _ in outcomes if kind == "refused")
        print(f"\npaused leader: {refused} of 5 sends refused, the rest forwarded; "
              f"divergent suffix {'cut' if cut else 'not written'}")
