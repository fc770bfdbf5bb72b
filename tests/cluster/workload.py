"""A producer and a consumer spread over every node, recording a client-side history.

Sends go in batches of ten unique bodies, each node in turn; the consumer receives with a
short visibility timeout (so a message received before a crash comes back soon) and
deletes what it got. Every outcome is recorded in a tests.support.consistency.History,
deletes that fail included, which the tests check once the queue is drained.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from typing import Any

from tests.cluster.harness import Cluster
from tests.support.consistency import History

VISIBILITY_S = 5
CLIENT = {"connect_timeout": 2, "read_timeout": 20}
# Messages one fault may leave in doubt (deleted by a call whose answer was lost): a
# consumer has one delete call of at most ten messages in flight when a node dies.
IN_DOUBT_PER_FAULT = 10


class Workload:
    def __init__(self, cluster: Cluster, queue_url: str, history: History,
                 nodes: list[str] | None = None, consume: bool = True) -> None:
        self.cluster = cluster
        self.url = queue_url
        self.history = history
        self.nodes = nodes or list(cluster.nodes)
        self.stopping = threading.Event()
        self.sent_ok = 0
        self.send_errors = 0
        self.acked_at: list[float] = []
        """When each acknowledged send batch came back (monotonic): failover timing."""
        self._prefix = uuid.uuid4().hex[:8]
        self._threads = [threading.Thread(target=self._produce, daemon=True)]
        if consume:
            self._threads.append(threading.Thread(target=self._consume, daemon=True))

    def __enter__(self) -> Workload:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(60)

    def _clients(self) -> itertools.cycle[Any]:
        return itertools.cycle([self.cluster.node(n).sqs(**CLIENT) for n in self.nodes])

    def _produce(self) -> None:
        clients = self._clients()
        for batch in itertools.count():
            if self.stopping.is_set():
                return
            client = next(clients)
            bodies = [f"{self._prefix}-{batch}-{i}" for i in range(10)]
            for body in bodies:
                self.history.send_attempted(body)
            try:
                reply = client.send_message_batch(QueueUrl=self.url, Entries=[
                    {"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies)])
            except Exception as exc:  # a crash or failover: every entry is ambiguous
                self.send_errors += 1
                for body in bodies:
                    self.history.send_failed(body, type(exc).__name__)
                time.sleep(0.05)
                continue
            for entry in reply.get("Successful", []):
                self.history.send_acked(bodies[int(entry["Id"])], entry["MessageId"])
                self.sent_ok += 1
            for entry in reply.get("Failed", []):
                self.history.send_failed(bodies[int(entry["Id"])], entry.get("Code", ""))
            if reply.get("Successful"):
                self.acked_at.append(time.monotonic())

    def _consume(self) -> None:
        clients = self._clients()
        while not self.stopping.is_set():
            receive_and_delete(next(clients), self.url, self.history, wait_s=1)


class FifoWorkload(Workload):
    """The same, on a FIFO queue: ``groups`` message groups, each sent in order.

    A group's next message is sent only once the one before was acknowledged; a send
    whose outcome is unknown is sent again with the same body and deduplication id, as a
    client retries, so a message the queue already holds must not be enqueued twice.
    Bodies are ``PREFIX:GROUP:INDEX`` (see ``fifo_position``).
    """

    def __init__(self, cluster: Cluster, queue_url: str, history: History,
                 groups: int = 8, **options: Any) -> None:
        super().__init__(cluster, queue_url, history, **options)
        self.groups = [f"g{i}" for i in range(groups)]

    def _produce(self) -> None:
        clients = self._clients()
        sent = dict.fromkeys(self.groups, 0)
        while not self.stopping.is_set():
            client = next(clients)
            bodies = {g: f"{self._prefix}:{g}:{sent[g]}" for g in self.groups}
            for body in bodies.values():
                self.history.send_attempted(body)
            try:
                reply = client.send_message_batch(QueueUrl=self.url, Entries=[
                    {"Id": g, "MessageBody": body, "MessageGroupId": g,
                     "MessageDeduplicationId": body} for g, body in bodies.items()])
            except Exception as exc:  # every entry is ambiguous, and sent again
                self.send_errors += 1
                for body in bodies.values():
                    self.history.send_failed(body, type(exc).__name__)
                time.sleep(0.05)
                continue
            for entry in reply.get("Successful", []):
                self.history.send_acked(bodies[entry["Id"]], entry["MessageId"])
                sent[entry["Id"]] += 1
                self.sent_ok += 1
            for entry in reply.get("Failed", []):
                self.history.send_failed(bodies[entry["Id"]], entry.get("Code", ""))
            if reply.get("Successful"):
                self.acked_at.append(time.monotonic())


def fifo_position(body: str) -> tuple[str, int]:
    """A FifoWorkload body's (group, index in the group's send order)."""
    _, group, index = body.split(":")
    return group, int(index)


def receive_and_delete(client: Any, url: str, history: History, wait_s: int) -> int:
    """One receive, and a delete of what it returned; the count received."""
    started = time.monotonic()
    try:
        reply = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                       WaitTimeSeconds=wait_s, VisibilityTimeout=VISIBILITY_S)
    except Exception:
        time.sleep(0.05)
        return 0
    messages = reply.get("Messages", [])
    for m in messages:
        history.received(m["Body"], m["MessageId"], m["ReceiptHandle"], started=started)
    if not messages:
        return 0
    for m in messages:
        history.delete_attempted(m["Body"], m["ReceiptHandle"])
    try:
        reply = client.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
            for i, m in enumerate(messages)])
    except Exception as exc:  # a crash or failover: each delete may or may not be done
        for m in messages:
            history.delete_failed(m["Body"], m["ReceiptHandle"], type(exc).__name__)
        return len(messages)
    for entry in reply.get("Successful", []):
        m = messages[int(entry["Id"])]
        history.delete_acked(m["Body"], m["ReceiptHandle"])
    for entry in reply.get("Failed", []):
        m = messages[int(entry["Id"])]
        # A client error changes nothing; a server's own fault may have come after the
        # delete took effect.
        record = history.delete_refused if entry.get("SenderFault") else history.delete_failed
        record(m["Body"], m["ReceiptHandle"], entry.get("Code", ""))
    return len(messages)


def drain(cluster: Cluster, url: str, history: History, timeout: float = 90) -> None:
    """Receive and delete until the queue is empty (in-flight messages included)."""
    client = cluster.node(cluster.live()[0]).sqs(**CLIENT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if receive_and_delete(client, url, history, wait_s=1):
            continue
        with contextlib.suppress(Exception):
            attributes = client.get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages",
                                              "ApproximateNumberOfMessagesNotVisible",
                                              "ApproximateNumberOfMessagesDelayed"]
            )["Attributes"]
            if not any(int(v) for v in attributes.values()):
                return
    raise TimeoutError(f"queue {url} not drained in {timeout:g} s")


def create_queue(cluster: Cluster, name: str, node: str = "n0",
                 attributes: dict[str, str] | None = None) -> str:
    client = cluster.node(node).sqs()
    url: str = client.create_queue(QueueName=name, Attributes=attributes or {})["QueueUrl"]
    return url
