"""An outsider on the replication port: raw sockets against a real 3-node cluster.

The attacker knows what ``GET /v1/cluster`` shows (each queue's uid, leader and epoch,
every node's replication address) but not the cluster secret, so it speaks the protocol
as it goes without peer authentication: the magic, the two node ids, then plain frames.
Every attack must leave the followers' logs, the ISR and the queues as they were while a
producer keeps being acknowledged. The negative control makes the same attack on a
cluster whose nodes run with peer authentication off and shows that it succeeds there:
the follower cuts its log on the attacker's word.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from replication import frames as fr
from server.calls.codec import pack
from server.protection import masterkey
from tests.cluster.harness import ACCOUNT, Cluster, cluster, read_log
from tests.cluster.workload import create_queue
from tests.support.server import Server, free_port

QUEUE = "target"
NAME = f"{ACCOUNT}/{QUEUE}"
# How long an attacker waits for an answer that should never come.
ANSWER_S = 2.0


def _address(state: dict[str, Any], node: str) -> tuple[str, int]:
    host, _, port = state["nodes"][node]["replication"].rpartition(":")
    return host, int(port)


def _with_length(data: bytes) -> bytes:
    return bytes((len(data),)) + data


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _talk(address: tuple[str, int], opening: bytes, frames: list[bytes]) -> bytes:
    """Send opening and each frame, then end the stream; return every byte the node
    answered until it closed the connection (or ANSWER_S passed in silence)."""
    answer = b""
    with socket.create_connection(address, timeout=ANSWER_S) as conn:
        with contextlib.suppress(OSError):
            conn.sendall(opening + b"".join(_frame(f) for f in frames))
            # The node reads to the end of what was sent, and no further.
            conn.shutdown(socket.SHUT_WR)
        while True:
            try:
                chunk = conn.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            answer += chunk
    return answer


def _converse(address: tuple[str, int], opening: bytes, frames: list[bytes]) -> list[fr.Frame]:
    """Send opening and the first frame, then each next frame once the node has answered
    the one before (a follower checks an OPEN with etcd before it answers, and takes the
    stream's next frame only after); return the plain frames the node answered."""
    answered: list[fr.Frame] = []
    with socket.create_connection(address, timeout=ANSWER_S) as conn:
        conn.sendall(opening)
        for frame in frames:
            conn.sendall(_frame(frame))
            (length,) = struct.unpack(">I", _read_exactly(conn, 4))
            answered.append(fr.decode(_read_exactly(conn, length)))
    return answered


def _read_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"the node closed the connection after {data!r}")
        data += chunk
    return data


def _as_leader(state: dict[str, Any], follower: str) -> tuple[bytes, int, int]:
    """The opening of a connection that claims to come from the queue's leader, and the
    uid and epoch the attacker read off /v1/cluster."""
    queue = state["queues"][NAME]
    opening = fr.MAGIC + _with_length(queue["leader"].encode()) + _with_length(
        follower.encode())
    return opening, queue["uid"], queue["epoch"]


def _attacks(state: dict[str, Any], follower: str) -> Iterator[tuple[str, bytes,
                                                                      list[bytes]]]:
    """(what, opening, frames) of every attack on a follower's replication port."""
    opening, uid, epoch = _as_leader(state, follower)
    open_frame = fr.encode(fr.Open(epoch, uid, NAME, {}))
    yield "OPEN, SYNC to 0", opening, [open_frame, fr.encode(fr.Sync(uid, epoch, 0))]
    forged = fr.encode(fr.Append(uid, epoch, 0, 0, b"\x00" * 64))
    yield "OPEN, APPEND forged", opening, [open_frame, forged]
    yield "ACK", opening, [fr.encode(fr.Ack(uid, epoch, 1 << 40))]
    yield "OPEN with the epoch 0", opening, [fr.encode(fr.Open(0, uid, NAME, {}))]
    wrong_uid = fr.encode(fr.Open(epoch, uid ^ 1, NAME, {}))
    for _ in range(10):  # a loop of these once dropped the live replica
        yield "OPEN with a wrong uid", opening, [wrong_uid]
    # An oversized frame before authentication: the node reads a handshake's worth.
    yield "8 MiB before authentication", opening, [b"\x01" * (8 << 20)]
    yield "an unknown magic", b"XXXX", [open_frame]
    # A partition call: purge the queue, which would skip every check of the API.
    calls = fr.CALLS_MAGIC + _with_length(state["queues"][NAME]["leader"].encode()) \
        + _with_length(follower.encode())
    yield "partition call", calls, [pack([1, "purge", NAME, []])]


class _Background:
    """A thread that runs ``_run`` for the length of a ``with`` block."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        raise NotImplementedError


class _Producer(_Background):
    """Sends batches of ten to the queue's leader and counts what is acknowledged."""

    def __init__(self, c: Cluster, leader: str, url: str) -> None:
        self.client = c.sqs(leader)
        self.url = url
        self.acked = 0
        self.failures: list[str] = []
        super().__init__()

    def _run(self) -> None:
        for batch in itertools.count():
            if self._stop.is_set():
                return
            entries = [{"Id": str(i), "MessageBody": f"b{batch}-{i}"} for i in range(10)]
            try:
                reply = self.client.send_message_batch(QueueUrl=self.url, Entries=entries)
                self.acked += len(reply.get("Successful", []))
                self.failures += [f["Code"] for f in reply.get("Failed", [])]
            except Exception as exc:  # every failure is the finding
                self.failures.append(repr(exc))
            time.sleep(0.02)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster(tmp_path_factory.mktemp("guarded")) as c:
        yield c


def test_an_outsider_changes_nothing_on_the_replication_port(guarded: Cluster) -> None:
    c = guarded
    url = create_queue(c, QUEUE)
    leader = c.leader(QUEUE)
    assert len(c.wait_isr(QUEUE, 3)) == 3
    replicas = c.replicas(QUEUE)
    followers = [n for n in replicas if n != leader]
    state = c.state(leader)
    with _Producer(c, leader, url) as producer:
        time.sleep(0.5)
        before = producer.acked
        for follower in followers:
            for what, opening, frames in _attacks(state, follower):
                answer = _talk(_address(state, follower), opening, frames)
                # Not a frame, not an epoch, not an error: the connection just closes.
                assert answer == b"", f"{what}: the node answered {answer[:80]!r}"
                assert len(c.queue_state(QUEUE)["isr"]) == 3, f"{what}: the ISR shrank"
        # The same attacks on the leader's own port.
        for what, opening, frames in _attacks(state, leader):
            assert _talk(_address(state, leader), opening, frames) == b"", what
        deadline = time.monotonic() + 10
        while producer.acked <= before:
            assert time.monotonic() < deadline, "the producer stopped being acknowledged"
            time.sleep(0.05)
    assert producer.failures == []
    assert len(c.queue_state(QUEUE)["isr"]) == 3
    # Nothing was purged or cut: every acknowledged message is there ...
    attributes = c.sqs(leader).get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    assert int(attributes["ApproximateNumberOfMessages"]) == producer.acked
    # ... and once the nodes stop, every follower's log is the leader's, byte for byte.
    c.stop_all()
    logs = {n: read_log(c.data_dir(n), QUEUE) for n in replicas}
    for node in followers:
        assert logs[node] == logs[leader], f"{node}'s log differs from the leader's"


class _Flood(_Background):
    """Opens connections to every node's replication port, without end, that send the
    magic and then nothing; keeps the newest FLOOD_OPEN of them open."""

    OPEN = 1500

    def __init__(self, addresses: list[tuple[str, int]]) -> None:
        self.addresses = addresses
        self.opened = 0
        super().__init__()

    def _run(self) -> None:
        held: collections.deque[socket.socket] = collections.deque()
        try:
            for address in itertools.cycle(self.addresses):
                if self._stop.is_set():
                    return
                with contextlib.suppress(OSError):
                    conn = socket.create_connection(address, timeout=2)
                    conn.sendall(fr.MAGIC)
                    held.append(conn)
                    self.opened += 1
                while len(held) > self.OPEN:
                    held.popleft().close()
        finally:
            for conn in held:
                conn.close()


def test_a_node_with_another_cluster_secret_refuses_to_start(guarded: Cluster) -> None:
    """Rather than start and fail every link's handshake, one by one, far from the
    cause: the fingerprint of its key is not the one in etcd."""
    stranger = guarded.root / "stranger.secret"
    masterkey.load_or_create(str(stranger))
    with pytest.raises(RuntimeError, match="cluster secret"):
        Server(guarded.root / "stranger", extra=(
            "--cluster", guarded.etcd.url, "--node-id", "stranger", "--replication-port",
            str(free_port()), "--cluster-secret-file", str(stranger)))


def test_a_flood_of_unauthenticated_connections_keeps_no_node_out(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        url = create_queue(c, "before")
        leader = c.leader("before")
        c.wait_isr("before", 3)
        state = c.state(leader)
        with _Producer(c, leader, url) as producer, \
                _Flood([_address(state, n) for n in c.members()]) as flood:
            # The flood under way (its pace is the machine's: under load it may take a
            # few seconds to open so many).
            flooding = time.monotonic() + 30
            while flood.opened <= 1000 and time.monotonic() < flooding:
                time.sleep(0.1)
            # Handshakes that never finish, far more than a listener keeps: a queue made
            # now needs new links between the nodes, and they still form.
            during = create_queue(c, "during", node=leader)
            name = f"{ACCOUNT}/during"
            deadline = time.monotonic() + 15
            connected: list[str] = []
            while time.monotonic() < deadline and len(connected) < 2:
                with contextlib.suppress(KeyError, RuntimeError):
                    where = c.leader("during")
                    connected = c.state(where)["leading"][name]["connected"]
                time.sleep(0.1)
            assert len(connected) == 2, f"links formed to {connected} only"
            c.sqs(where).send_message(QueueUrl=during, MessageBody="through the flood")
            assert len(c.queue_state("during")["isr"]) == 3
        assert flood.opened > 1000, flood.opened
        assert producer.failures == [] and producer.acked > 0


def test_negative_control_without_peer_authentication_the_attack_succeeds(
        tmp_path: Path) -> None:
    """The same outsider, against nodes that do not authenticate their peers: the follower
    answers, and cuts its log to 0 on the attacker's SYNC."""
    with cluster(tmp_path, extra=("--unsafe-no-peer-auth",)) as c:
        url = create_queue(c, QUEUE)
        leader = c.leader(QUEUE)
        c.wait_isr(QUEUE, 3)
        c.sqs(leader).send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(i), "MessageBody": f"m{i}"} for i in range(10)])
        state = c.state(leader)
        follower = next(n for n in c.replicas(QUEUE) if n != leader)
        what, opening, frames = next(_attacks(state, follower))
        answered = _converse(_address(state, follower), opening, frames)
        uid, epoch = state["queues"][NAME]["uid"], state["queues"][NAME]["epoch"]
        assert isinstance(answered[0], fr.Position) and answered[0].next_offset > 0, what
        assert fr.Ack(uid, epoch, 0) in answered, f"{what}: {answered}"
