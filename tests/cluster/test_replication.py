"""Replication: every replica's log is the leader's, batch for batch, byte for byte."""

from __future__ import annotations

import time
from pathlib import Path

import jsonschema

from server.web.openapi import document
from tests.cluster.harness import cluster, read_log, state_digest
from tests.cluster.workload import Workload, create_queue, drain
from tests.support.consistency import History, check

DOCUMENT = document()


def test_mixed_workload_leaves_identical_replicas(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        url = create_queue(c, "mixed")
        fifo_url = create_queue(c, "mixed.fifo", node="n1",
                                attributes={"FifoQueue": "true",
                                            "ContentBasedDeduplication": "true"})
        history = History()
        with Workload(c, url, history):
            # Beside the workload: FIFO sends and receives, visibility changes and a
            # purge, each through a different node than the last.
            for i in range(30):
                client = c.sqs(f"n{i % 3}")
                client.send_message(QueueUrl=fifo_url, MessageBody=f"f{i}",
                                    MessageGroupId=f"g{i % 4}")
                got = client.receive_message(QueueUrl=fifo_url, MaxNumberOfMessages=2)
                for m in got.get("Messages", [])[:1]:
                    client.change_message_visibility(QueueUrl=fifo_url,
                                                     ReceiptHandle=m["ReceiptHandle"],
                                                     VisibilityTimeout=0)
            time.sleep(3)
        c.sqs("n2").purge_queue(QueueUrl=fifo_url)
        drain(c, url, history)
        report = check(history)
        assert report.ok, str(report)
        assert report.in_doubt == (), str(report)  # no fault: every delete is answered
        assert report.sends_acked > 100

        leader = c.leader("mixed")
        isr = c.wait_isr("mixed", 3)
        # /v1/cluster answers as the OpenAPI document says.
        jsonschema.validate(c.state(leader), DOCUMENT["components"]["schemas"]["Cluster"])
        assert {c.node_of(m) for m in isr} == {"n0", "n1", "n2"}  # a copy on each node
        fifo_leader = c.leader("mixed.fifo")
        replicas = {"mixed": c.replicas("mixed"), "mixed.fifo": c.replicas("mixed.fifo")}
        c.stop_all()
        for queue, queue_leader in (("mixed", leader), ("mixed.fifo", fifo_leader)):
            logs = {m: read_log(c.data_dir(m), queue) for m in replicas[queue]}
            assert len(logs) == 3 and len(logs[queue_leader]) > 0
            for member, data in logs.items():
                assert data == logs[queue_leader], \
                    f"{queue}: {member}'s log differs from the leader's"
            digests = {state_digest(c.data_dir(m), queue) for m in replicas[queue]}
            assert len(digests) == 1, digests
