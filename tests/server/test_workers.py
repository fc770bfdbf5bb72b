"""`conveyor serve --workers N`: worker processes sharing the port and the data directory,
each owning a share of every queue's partitions (server/workers/).

Clients here open a fresh connection for each request where a test needs both workers
reached: the kernel spreads connections over the workers' sockets (SO_REUSEPORT), so
twenty of them reach only one worker of two once in half a million runs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from engine.receipts import handle_queue_uid
from server.workers.ownership import owner
from tests.server.sqs.test_sqs_actions import ACCOUNT, arn, attrs, counts, redrive
from tests.support.server import Server, module_server, restarted_if_dead

WORKERS = 2


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with module_server(tmp_path_factory, "workers", workers=WORKERS) as running:
        yield running


@pytest.fixture
def server(shared: Server) -> Server:
    return restarted_if_dead(shared)


def fresh(server: Server) -> Any:
    """A client whose every request opens a new connection (so reaches either worker)."""
    return boto3.client("sqs", endpoint_url=server.url, region_name="us-east-1",
                        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                        config=Config(retries={"total_max_attempts": 1},
                                      max_pool_connections=1, tcp_keepalive=False,
                                      connect_timeout=5, read_timeout=30))


def _fresh_call(server: Server, method: str, **kwargs: Any) -> Any:
    client = fresh(server)
    try:
        return getattr(client, method)(**kwargs)
    finally:
        client.close()


def _workers(server: Server) -> list[int]:
    """The pids of the server's workers (children of its supervisor)."""
    assert server.process is not None
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def _wait_ready(server: Server, workers: int = WORKERS, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_workers(server)) == workers:
            try:
                with urllib.request.urlopen(server.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError("the workers did not come back")


def test_a_standard_queue_gets_a_partition_per_worker_and_serves_from_any(
        server: Server) -> None:
    url = _fresh_call(server, "create_queue", QueueName="spread")["QueueUrl"]
    assert attrs(server.sqs(), url, "ConveyorPartitions") == {
        "ConveyorPartitions": str(WORKERS)}
    bodies = {f"m{i}" for i in range(40)}
    for body in sorted(bodies):
        _fresh_call(server, "send_message", QueueUrl=url, MessageBody=body)
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(got) < len(bodies) and time.monotonic() < deadline:
        got += _fresh_call(server, "receive_message", QueueUrl=url, MaxNumberOfMessages=10,
                           WaitTimeSeconds=1, VisibilityTimeout=60).get("Messages", [])
    assert {m["Body"] for m in got} == bodies and len(got) == len(bodies)
    # Sends arriving at each worker were taken by its own partition: both hold some.
    assert len({handle_queue_uid(m["ReceiptHandle"]) for m in got}) == WORKERS
    # Each receipt reaches its partition from whichever worker gets the delete.
    for m in got:
        _fresh_call(server, "delete_message", QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    assert counts(server.sqs(), url) == (0, 0, 0)


def test_a_change_made_through_one_worker_is_seen_by_every_worker(server: Server) -> None:
    url = _fresh_call(server, "create_queue", QueueName="seen")["QueueUrl"]
    for value in ("5", "17", "3"):
        _fresh_call(server, "set_queue_attributes", QueueUrl=url,
                    Attributes={"VisibilityTimeout": value, "Policy": ""})
        _fresh_call(server, "tag_queue", QueueUrl=url, Tags={"v": value})
        for _ in range(10):
            got = _fresh_call(server, "get_queue_attributes", QueueUrl=url,
                              AttributeNames=["VisibilityTimeout"])["Attributes"]
            assert got == {"VisibilityTimeout": value}
            assert _fresh_call(server, "list_queue_tags", QueueUrl=url)["Tags"] == {"v": value}
    # Deleted through one worker, gone for all; made again, it is the new queue everywhere.
    _fresh_call(server, "send_message", QueueUrl=url, MessageBody="old")
    _fresh_call(server, "delete_queue", QueueUrl=url)
    for _ in range(10):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            _fresh_call(server, "send_message", QueueUrl=url, MessageBody="lost")
        assert caught.value.response["Error"]["Code"] in (
            "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
    _fresh_call(server, "create_queue", QueueName="seen",
                Attributes={"VisibilityTimeout": "9"})
    for _ in range(10):
        got = _fresh_call(server, "get_queue_attributes", QueueUrl=url,
                          AttributeNames=["All"])["Attributes"]
        assert got["VisibilityTimeout"] == "9" and got["ApproximateNumberOfMessages"] == "0"


def test_creates_of_one_name_through_both_workers_make_one_queue(server: Server) -> None:
    """The queue's lock holds across the workers: concurrent creates of a name agree on
    one queue, and none sets another's partitions aside as strays."""
    for round_ in range(5):
        name = f"race-{round_}"
        results: list[Any] = []

        def create(out: list[Any] = results, queue: str = name) -> None:
            try:
                out.append(_fresh_call(server, "create_queue", QueueName=queue))
            except botocore.exceptions.ClientError as exc:
                out.append(exc)

        threads = [threading.Thread(target=create) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(isinstance(r, dict) for r in results), results
        url = results[0]["QueueUrl"]
        _fresh_call(server, "send_message", QueueUrl=url, MessageBody="kept")
        assert counts(server.sqs(), url)[0] == 1
    assert "replaced by a new queue" not in server.log.read_text()


def test_fifo_groups_keep_their_order_across_workers(server: Server) -> None:
    url = _fresh_call(server, "create_queue", QueueName="order.fifo", Attributes={
        "FifoQueue": "true", "ContentBasedDeduplication": "true",
        "ConveyorPartitions": str(WORKERS)})["QueueUrl"]
    groups = [f"g{i}" for i in range(6)]
    for i in range(8):
        _fresh_call(server, "send_message_batch", QueueUrl=url, Entries=[
            {"Id": g, "MessageBody": f"{g}-{i}", "MessageGroupId": g} for g in groups])
    got: dict[str, list[int]] = {g: [] for g in groups}
    deadline = time.monotonic() + 60
    while sum(map(len, got.values())) < 48 and time.monotonic() < deadline:
        messages = _fresh_call(server, "receive_message", QueueUrl=url,
                               MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        for m in messages:
            group, n = m["Body"].split("-")
            got[group].append(int(n))
        for m in messages:
            _fresh_call(server, "delete_message", QueueUrl=url,
                        ReceiptHandle=m["ReceiptHandle"])
    assert got == {g: list(range(8)) for g in groups}


def test_dead_letters_cross_workers_and_are_redriven(server: Server) -> None:
    sqs = server.sqs()
    # A dead-letter queue of one partition, owned by one worker; the source has one
    # partition on each, so some of its dead letters move to the other worker's.
    dlq_url = _fresh_call(server, "create_queue", QueueName="cross-dlq",
                          Attributes={"ConveyorPartitions": "1"})["QueueUrl"]
    url = _fresh_call(server, "create_queue", QueueName="cross-src",
                      Attributes={"RedrivePolicy": redrive("cross-dlq", 1)})["QueueUrl"]
    sources = {owner(f"{ACCOUNT}/cross-src", WORKERS),
               owner(f"{ACCOUNT}-p1/cross-src", WORKERS)}
    assert sources == set(range(WORKERS))
    bodies = {f"d{i}" for i in range(20)}
    for body in sorted(bodies):
        _fresh_call(server, "send_message", QueueUrl=url, MessageBody=body)
    deadline = time.monotonic() + 60
    while counts(sqs, url) != (0, 0, 0) and time.monotonic() < deadline:
        _fresh_call(server, "receive_message", QueueUrl=url, MaxNumberOfMessages=10,
                    VisibilityTimeout=0)
    assert counts(sqs, url) == (0, 0, 0)
    assert counts(sqs, dlq_url)[0] == len(bodies)
    moved = []
    while len(moved) < len(bodies):
        batch = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10,
                                    VisibilityTimeout=0, WaitTimeSeconds=1,
                                    MessageSystemAttributeNames=["All"]).get("Messages", [])
        assert batch
        moved += batch
    assert {m["Attributes"]["DeadLetterQueueSourceArn"] for m in moved} == {arn("cross-src")}
    assert _fresh_call(server, "list_dead_letter_source_queues",
                       QueueUrl=dlq_url)["queueUrls"] == [url]
    sqs.start_message_move_task(SourceArn=arn("cross-dlq"))
    deadline = time.monotonic() + 30
    while counts(sqs, url)[0] < len(bodies) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counts(sqs, url)[0] == len(bodies) and counts(sqs, dlq_url)[0] == 0


def test_a_long_poll_wakes_for_a_send_through_the_other_worker(server: Server) -> None:
    url = _fresh_call(server, "create_queue", QueueName="wake")["QueueUrl"]
    for round_ in range(6):
        got: list[Any] = []
        receiver = threading.Thread(target=lambda out=got: out.append(_fresh_call(
            server, "receive_message", QueueUrl=url, WaitTimeSeconds=15)))
        receiver.start()
        time.sleep(0.5)
        sent = time.monotonic()
        _fresh_call(server, "send_message", QueueUrl=url, MessageBody=f"wake-{round_}")
        receiver.join(20)
        waited = time.monotonic() - sent
        assert got and got[0]["Messages"][0]["Body"] == f"wake-{round_}"
        assert waited < 1.5, f"the long poll took {waited:.2f} s to see the message"
        _fresh_call(server, "delete_message", QueueUrl=url,
                    ReceiptHandle=got[0]["Messages"][0]["ReceiptHandle"])


def test_a_killed_worker_is_restarted_and_loses_nothing(server: Server) -> None:
    url = _fresh_call(server, "create_queue", QueueName="restart")["QueueUrl"]
    bodies = {f"r{i}" for i in range(30)}
    for body in sorted(bodies):
        _fresh_call(server, "send_message", QueueUrl=url, MessageBody=body)
    victim = _workers(server)[0]
    os.kill(victim, signal.SIGKILL)
    # The other worker serves its own partition meanwhile, or refuses with a retryable
    # error: never a wrong answer. (A connection the killed worker held is reset: that
    # send is in doubt, and may or may not be there.)
    served = 0
    for _ in range(20):
        try:
            _fresh_call(server, "send_message", QueueUrl=url, MessageBody="during")
            served += 1
        except botocore.exceptions.ClientError as exc:
            assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 503, exc
        except botocore.exceptions.BotoCoreError:
            pass
    assert served > 0, "the surviving worker served nothing while the other was down"
    _wait_ready(server)
    assert victim not in _workers(server)
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        batch = _fresh_call(server, "receive_message", QueueUrl=url, MaxNumberOfMessages=10,
                            WaitTimeSeconds=1, VisibilityTimeout=60).get("Messages", [])
        if not batch and len(got) >= len(bodies) + served:
            break
        got += batch
    before = [m["Body"] for m in got if m["Body"] != "during"]
    assert sorted(before) == sorted(bodies)  # every one, once
    assert sum(m["Body"] == "during" for m in got) >= served
    assert "restarting it" in server.log.read_text()


def test_restarts_with_other_worker_counts_keep_every_message(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = Server(data, workers=2)
    try:
        url = _fresh_call(running, "create_queue", QueueName="kept")["QueueUrl"]
        fifo = _fresh_call(running, "create_queue", QueueName="kept.fifo", Attributes={
            "FifoQueue": "true", "ContentBasedDeduplication": "true"})["QueueUrl"]
        expected: set[str] = set()
        for workers in (1, 3, 2):
            for i in range(12):
                body = f"{workers}-{i}"
                _fresh_call(running, "send_message", QueueUrl=url, MessageBody=body)
                _fresh_call(running, "send_message", QueueUrl=fifo, MessageBody=body,
                            MessageGroupId=f"g{i % 3}")
                expected.add(body)
            assert running.stop() == 0
            running.workers = workers
            running.start()
            assert counts(running.sqs(), url)[0] == len(expected)
            assert counts(running.sqs(), fifo)[0] == len(expected)
        got = []
        deadline = time.monotonic() + 30
        while len(got) < len(expected) and time.monotonic() < deadline:
            got += _fresh_call(running, "receive_message", QueueUrl=url,
                               MaxNumberOfMessages=10, VisibilityTimeout=60).get("Messages", [])
        assert sorted(m["Body"] for m in got) == sorted(expected)
    finally:
        running.kill()


def test_sigterm_stops_every_worker_gracefully(tmp_path: Path) -> None:
    running = Server(tmp_path / "data", workers=2)
    try:
        url = _fresh_call(running, "create_queue", QueueName="graceful")["QueueUrl"]
        for i in range(10):
            _fresh_call(running, "send_message", QueueUrl=url, MessageBody=f"g{i}")
        workers = _workers(running)
        assert len(workers) == 2
        assert running.stop() == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists()
        running.start()
        assert counts(running.sqs(), url)[0] == 10
    finally:
        running.kill()


def test_workers_keep_the_directory_locked_after_the_supervisor_dies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = Server(data, workers=2)
    try:
        url = _fresh_call(running, "create_queue", QueueName="held")["QueueUrl"]
        # Long polls in flight keep the workers' graceful stops going for a while.
        answers: list[Any] = []
        polls = [threading.Thread(target=_poll, args=(running, url, answers))
                 for _ in range(4)]
        for poll in polls:
            poll.start()
        time.sleep(2)
        workers = _workers(running)
        assert running.process is not None
        os.kill(running.process.pid, signal.SIGKILL)  # the supervisor alone
        running.process.wait(10)
        second = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--data-dir",
                                   str(data), "--port", "0", "--workers", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, errors = second.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait()
            raise AssertionError("a second server opened the data directory") from None
        assert any(Path(f"/proc/{pid}").exists() for pid in workers), \
            "the workers stopped before the check: it proved nothing"
        assert second.returncode != 0 and "in use by another process" in errors, errors
        # The workers stop by themselves, once their requests in flight are answered.
        deadline = time.monotonic() + 40
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, "the workers outlived their supervisor"
            time.sleep(0.1)
        for poll in polls:
            poll.join(30)
        # Each long poll was answered (empty) in the graceful stop, not cut off.
        assert answers == [[]] * len(polls), answers
    finally:
        running.kill()


def _poll(server: Server, url: str, answers: list[Any]) -> None:
    try:
        answers.append(_fresh_call(server, "receive_message", QueueUrl=url,
                                   WaitTimeSeconds=10).get("Messages", []))
    except botocore.exceptions.BotoCoreError as exc:
        answers.append(exc)


def test_port_zero_is_chosen_once_for_every_worker(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path / "data"),
         "--port", "0", "--workers", "2", "--no-access-log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        assert process.stderr is not None
        # Each worker says where it serves, then the supervisor, once all of them do.
        lines = [process.stderr.readline() for _ in range(3)]
        match = re.search(r"http://127\.0\.0\.1:(\d+) with 2 workers", lines[2])
        assert match, lines
        port = int(match.group(1))
        assert port != 0
        assert all(f":{port}" in line for line in lines[:2]), lines
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",
                                            timeout=2) as response:
                    assert json.load(response) == {"status": "ready"}
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_a_call_socket_is_out_of_reach_of_other_users(server: Server) -> None:
    run_dir = server.data_dir / "run"
    assert (run_dir.stat().st_mode & 0o777) == 0o700
    sockets = sorted(run_dir.glob("w*.sock"))
    assert len(sockets) == WORKERS
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
             "    print(type(e).__name__); sys.exit(0)\n"
             "print('connected')\n")
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, "-c", probe, str(sockets[0])],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "PermissionError", result
    # The same user reaches it (a sibling worker, or an operator's tool).
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(sockets[0]))


RATE, BURST = 20, 10


def test_rate_limits_hold_for_the_whole_server(tmp_path: Path) -> None:
    """Ten times a queue's limit, through many connections spread over both workers: the
    server as a whole admits no more than the limit (rate * t + burst)."""
    running = Server(tmp_path / "data", fsync="never", workers=2,
                     extra=("--rate-limit-queue", f"{RATE}/s:{BURST}"))
    try:
        url = _fresh_call(running, "create_queue", QueueName="limited")["QueueUrl"]
        accepted: list[float] = []
        refused: list[float] = []
        stop = time.monotonic() + 3.0

        def drive() -> None:
            while time.monotonic() < stop:
                started = time.monotonic()
                try:
                    _fresh_call(running, "send_message", QueueUrl=url, MessageBody="x")
                    accepted.append(started)
                except botocore.exceptions.ClientError as exc:
                    assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 429
                    refused.append(started)
                # Ten times the rate over the threads: 200/s from 8 threads.
                time.sleep(max(0.0, 8 / (10 * RATE) - (time.monotonic() - started)))

        threads = [threading.Thread(target=drive) for _ in range(8)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        total = len(accepted) + len(refused)
        print(f"{total} requests in {elapsed:.2f} s: {len(accepted)} accepted, bound "
              f"{RATE * elapsed + BURST:.1f}")
        assert total > 5 * RATE * elapsed, "the load was not several times the rate"
        assert len(accepted) <= RATE * elapsed + BURST
        assert len(accepted) >= 0.5 * RATE * elapsed
        time.sleep(1.1)
        assert counts(running.sqs(), url)[0] == len(accepted)
    finally:
        running.kill()


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert match, line
        labels = dict(re.findall(r'([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        out.append((match.group(1), labels, float(match.group(3))))
    return out


def test_metrics_and_usage_are_the_whole_servers(server: Server) -> None:
    url = _fresh_call(server, "create_queue", QueueName="counted")["QueueUrl"]
    for i in range(30):
        _fresh_call(server, "send_message", QueueUrl=url, MessageBody=f"c{i}")
    for _ in range(5):  # whichever worker gets it
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples = _samples(text)
        assert all("worker" in labels for _, labels, _ in samples)
        assert {labels["worker"] for _, labels, _ in samples} == {"0", "1"}
        # Each family's samples together, under one HELP and one TYPE.
        families = [line.split(" ")[2] for line in text.splitlines()
                    if line.startswith("# TYPE ")]
        assert len(families) == len(set(families))
        sent = sum(value for name, labels, value in samples
                   if name == "conveyor_queue_operations_total"
                   and labels.get("queue") == f"{ACCOUNT}/counted"
                   and labels.get("operation") == "sent")
        assert sent == 30
        with urllib.request.urlopen(f"{server.url}/v1/usage", timeout=10) as response:
            usage = json.load(response)
        assert usage["queues"]["counted"]["messages"] == 30, usage["queues"]["counted"]


def test_per_queue_state_is_the_same_from_every_worker(server: Server) -> None:
    """Receive attempts, purges and move tasks are kept at the queue's home, whichever
    worker a request reaches."""
    fifo = _fresh_call(server, "create_queue", QueueName="attempts.fifo", Attributes={
        "FifoQueue": "true", "ContentBasedDeduplication": "true"})["QueueUrl"]
    for i in range(5):
        _fresh_call(server, "send_message", QueueUrl=fifo, MessageBody=f"a{i}",
                    MessageGroupId="g")
    first = _fresh_call(server, "receive_message", QueueUrl=fifo, MaxNumberOfMessages=3,
                        ReceiveRequestAttemptId="attempt-1")["Messages"]
    for _ in range(10):  # a retry, through either worker, gets the same answer
        again = _fresh_call(server, "receive_message", QueueUrl=fifo, MaxNumberOfMessages=3,
                            ReceiveRequestAttemptId="attempt-1")["Messages"]
        assert [(m["Body"], m["ReceiptHandle"]) for m in again] == [
            (m["Body"], m["ReceiptHandle"]) for m in first]

    url = _fresh_call(server, "create_queue", QueueName="purged")["QueueUrl"]
    _fresh_call(server, "purge_queue", QueueUrl=url)
    for _ in range(10):
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            _fresh_call(server, "purge_queue", QueueUrl=url)
        assert caught.value.response["Error"]["Code"] in (
            "AWS.SimpleQueueService.PurgeQueueInProgress", "PurgeQueueInProgress")

    dlq = _fresh_call(server, "create_queue", QueueName="tasks-dlq")["QueueUrl"]
    _fresh_call(server, "create_queue", QueueName="tasks-src",
                Attributes={"RedrivePolicy": redrive("tasks-dlq", 1)})
    for i in range(20):
        _fresh_call(server, "send_message", QueueUrl=dlq, MessageBody=f"t{i}")
    handle = _fresh_call(server, "start_message_move_task", SourceArn=arn("tasks-dlq"),
                         DestinationArn=arn("tasks-src"),
                         MaxNumberOfMessagesPerSecond=1)["TaskHandle"]
    for _ in range(10):
        results = _fresh_call(server, "list_message_move_tasks",
                              SourceArn=arn("tasks-dlq"))["Results"]
        assert [r.get("TaskHandle") for r in results] == [handle]
        assert results[0]["Status"] == "RUNNING"
    moved = _fresh_call(server, "cancel_message_move_task", TaskHandle=handle)
    assert moved["ApproximateNumberOfMessagesMoved"] >= 0
    for _ in range(5):
        results = _fresh_call(server, "list_message_move_tasks",
                              SourceArn=arn("tasks-dlq"))["Results"]
        assert results[0]["Status"] == "CANCELLED"


def _name_owned_by(prefix: str, worker: int) -> str:
    i = 0
    while owner(f"{ACCOUNT}/{prefix}{i}", WORKERS) != worker:
        i += 1
    return f"{prefix}{i}"


def test_workers_moving_dead_letters_into_each_other_do_not_stall(server: Server) -> None:
    """Each worker moves dead letters into a dead-letter queue the other owns, from many
    receives at once: every receive is answered promptly, and every message moves."""
    import asyncio

    import aiohttp

    sqs = server.sqs()
    dlqs = [_name_owned_by("crossed-dlq", worker) for worker in range(WORKERS)]
    urls = {d: sqs.create_queue(QueueName=d)["QueueUrl"] for d in dlqs}
    sources = {f"crossed-{w}": dlqs[1 - w] for w in range(WORKERS)}
    for source, dlq in sources.items():
        urls[source] = sqs.create_queue(QueueName=source, Attributes={
            "RedrivePolicy": redrive(dlq, 1)})["QueueUrl"]
    per_queue = 1000
    headers = {"Content-Type": "application/x-amz-json-1.0"}

    async def call(session: aiohttp.ClientSession, action: str, body: dict[str, Any]
                   ) -> tuple[int, float]:
        started = time.monotonic()
        async with session.post(server.url + "/", data=json.dumps(body), headers={
                **headers, "X-Amz-Target": f"AmazonSQS.{action}"}) as response:
            await response.read()
            return response.status, time.monotonic() - started

    async def run() -> list[tuple[int, float]]:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(
                call(session, "SendMessageBatch", {"QueueUrl": urls[source], "Entries": [
                    {"Id": str(j), "MessageBody": f"{source}-{i}-{j}"} for j in range(10)]})
                for source in sources for i in range(per_queue // 10)))

            async def receiver(source: str) -> list[tuple[int, float]]:
                return [await call(session, "ReceiveMessage", {
                    "QueueUrl": urls[source], "MaxNumberOfMessages": 10,
                    "VisibilityTimeout": 0}) for _ in range(20)]

            answers = await asyncio.gather(*(receiver(source) for source in sources
                                             for _ in range(60)))
        return [a for each in answers for a in each]

    answers = asyncio.run(run())
    assert {status for status, _ in answers} == {200}
    slowest = max(seconds for _, seconds in answers)
    assert slowest < 20, f"a receive took {slowest:.1f} s"
    deadline = time.monotonic() + 60
    while any(counts(sqs, urls[s])[0] for s in sources) and time.monotonic() < deadline:
        for source in sources:
            sqs.receive_message(QueueUrl=urls[source], MaxNumberOfMessages=10,
                                VisibilityTimeout=0)
    for source, dlq in sources.items():
        assert counts(sqs, urls[source]) == (0, 0, 0)
        assert counts(sqs, urls[dlq])[0] == per_queue


def test_receipts_of_a_queue_made_again_reach_it_from_every_worker(tmp_path: Path) -> None:
    """Three workers, a queue of two partitions: one worker owns none of them, and its
    view of their catalog rows dates from before the queue was deleted and made again.
    Receipts of the new queue still reach their partitions through it."""
    running = Server(tmp_path / "data", workers=3)
    try:
        attributes = {"ConveyorPartitions": "2", "VisibilityTimeout": "60"}
        for round_ in range(2):
            url = _fresh_call(running, "create_queue", QueueName="again",
                              Attributes=attributes)["QueueUrl"]
            for i in range(30):
                _fresh_call(running, "send_message", QueueUrl=url, MessageBody=f"{round_}-{i}")
            deleted = 0
            deadline = time.monotonic() + 30
            while deleted < 30 and time.monotonic() < deadline:
                for m in _fresh_call(running, "receive_message", QueueUrl=url,
                                     MaxNumberOfMessages=10).get("Messages", []):
                    _fresh_call(running, "delete_message", QueueUrl=url,
                                ReceiptHandle=m["ReceiptHandle"])
                    deleted += 1
            assert deleted == 30
            assert counts(running.sqs(), url) == (0, 0, 0)
            if round_ == 0:
                _fresh_call(running, "delete_queue", QueueUrl=url)
    finally:
        running.kill()


@pytest.mark.parametrize("second_workers", [2, 1])
def test_a_second_server_on_the_port_is_refused(tmp_path: Path, second_workers: int) -> None:
    """SO_REUSEPORT lets the workers share the port; it must not let another server in
    beside them, which would split the clients between two sets of queues."""
    first = Server(tmp_path / "first", workers=2)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path / "second"),
             "--port", str(first.port), "--workers", str(second_workers),
             "--no-access-log"], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "in use" in second.stderr.lower(), second.stderr[-2000:]
        assert not (tmp_path / "second" / "queues").exists() or not any(
            (tmp_path / "second" / "queues").iterdir())
        url = _fresh_call(first, "create_queue", QueueName="still")["QueueUrl"]
        assert url.endswith("/still")
        # Nor while none of its workers listens: both killed, the supervisor restarting
        # them. (The port alone would let a second server's socket in then.)
        for pid in _workers(first):
            os.kill(pid, signal.SIGKILL)
        second = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path / "third"),
             "--port", str(first.port), "--workers", str(second_workers),
             "--no-access-log"], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "in use" in second.stderr.lower() or "holds" in second.stderr, \
            second.stderr[-2000:]
        _wait_ready(first)
    finally:
        first.kill()
