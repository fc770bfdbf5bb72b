"""An SQS workload for the server crash test, run as its own process.

    python sqs_workload.py ENDPOINT QUEUE_URL [--producers N] [--consumers N] [--seed N]

Producer threads send messages (single and batched) and consumer threads receive and
delete them (single and batched), with boto3 and retries disabled, until standard input
closes. Connection errors and server errors are expected (the server is killed under the
workload) and are counted, never retried: a retried send could store a body twice and
make a redelivery look like a resurrection. Every body is unique and has no spaces.

One line on standard output per event, written only once the server's answer is in hand:

    S <body>                      the send of <body> was acknowledged
    R <body> <monotonic seconds>  <body> was received; the time the receive was *sent*
    T <body>                      a delete of <body> is about to be sent
    D <body> <monotonic seconds>  the delete of <body> was acknowledged; the time of the ack

The times let the checker tell a receive that began after an acknowledged delete (a
resurrected message) from one that merely overlapped it. A T without its D is a delete
whose answer was lost: the server may or may not have carried it out, so that message may
rightly be gone. A summary of the errors seen goes
to standard error as JSON when the workload ends.
"""

from __future__ import annotations

import collections
import json
import random
import sys
import threading
import time
from typing import Any

if __name__ == "__main__":
    import argparse

    import boto3
    from botocore.config import Config

    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("queue_url")
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="m")
    args = parser.parse_args()

    stop = threading.Event()
    out_lock = threading.Lock()
    errors: collections.Counter[str] = collections.Counter()

    def emit(lines: list[str]) -> None:
        if lines:
            with out_lock:
                sys.stdout.write("".join(line + "\n" for line in lines))
                sys.stdout.flush()

    def failed(exc: Exception) -> None:
        response = getattr(exc, "response", None) or {}
        code = response.get("Error", {}).get("Code")
        with out_lock:
            errors[f"{type(exc).__name__}:{code}" if code else type(exc).__name__] += 1
        time.sleep(0.05)  # the server is likely down; do not spin

    def client() -> Any:
        return boto3.client(
            "sqs", endpoint_url=args.endpoint, region_name="us-east-1",
            aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                          connect_timeout=2, read_timeout=10))

    def produce(number: int) -> None:
        sqs = client()
        rng = random.Random(args.seed * 1000 + number)
        sequence = 0

        def fresh() -> str:
            nonlocal sequence
            sequence += 1
            return f"{args.prefix}-p{number}-{sequence:07d}"

        while not stop.is_set():
            try:
                if rng.random() < 0.5:
                    body = fresh()
                    sqs.send_message(QueueUrl=args.queue_url, MessageBody=body)
                    emit([f"S {body}"])
                else:
                    bodies = {f"e{i}": fresh() for i in range(rng.randint(2, 10))}
                    result = sqs.send_message_batch(QueueUrl=args.queue_url, Entries=[
                        {"Id": k, "MessageBody": v} for k, v in bodies.items()])
                    emit([f"S {bodies[e['Id']]}" for e in result.get("Successful", [])])
                    if result.get("Failed"):
                        with out_lock:
                            errors["batch-entry-failed"] += len(result["Failed"])
            except Exception as exc:
                failed(exc)

    def consume(number: int) -> None:
        sqs = client()
        rng = random.Random(args.seed * 1000 + 500 + number)
        while not stop.is_set():
            try:
                started = time.monotonic()
                messages = sqs.receive_message(QueueUrl=args.queue_url,
                                               MaxNumberOfMessages=10,
                                               WaitTimeSeconds=1).get("Messages", [])
                emit([f"R {m['Body']} {started:.6f}" for m in messages])
                # Some messages are left to time out, to be delivered again.
                keep = [m for m in messages if rng.random() < 0.95]
                if not keep:
                    continue
                time.sleep(rng.random() * 0.05)  # widen the receive-to-delete window
                if rng.random() < 0.5:
                    for m in keep:
                        emit([f"T {m['Body']}"])
                        sqs.delete_message(QueueUrl=args.queue_url,
                                           ReceiptHandle=m["ReceiptHandle"])
                        emit([f"D {m['Body']} {time.monotonic():.6f}"])
                else:
                    by_id = {f"d{i}": m for i, m in enumerate(keep)}
                    emit([f"T {m['Body']}" for m in keep])
                    result = sqs.delete_message_batch(QueueUrl=args.queue_url, Entries=[
                        {"Id": k, "ReceiptHandle": m["ReceiptHandle"]}
                        for k, m in by_id.items()])
                    acked = time.monotonic()
                    emit([f"D {by_id[e['Id']]['Body']} {acked:.6f}"
                          for e in result.get("Successful", [])])
                    for entry in result.get("Failed", []):
                        with out_lock:
                            errors[f"delete-entry-failed:{entry.get('Code')}"] += 1
            except Exception as exc:
                failed(exc)

    crashed: list[str] = []

    def guarded(work: Any, number: int) -> None:
        # A thread that dies quietly would look like a server that stopped answering.
        try:
            work(number)
        except BaseException as exc:
            crashed.append(f"{work.__name__}-{number}: {exc!r}")
            raise

    threads = [threading.Thread(target=guarded, args=(produce, i), daemon=True)
               for i in range(args.producers)]
    threads += [threading.Thread(target=guarded, args=(consume, i), daemon=True)
                for i in range(args.consumers)]
    for thread in threads:
        thread.start()
    sys.stdin.read()  # the parent closes standard input to stop the workload
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    alive = sum(t.is_alive() for t in threads)
    sys.stderr.write(json.dumps({"errors": dict(errors), "threads_stuck": alive,
                                 "threads_crashed": crashed}) + "\n")
    sys.stderr.flush()
    sys.exit(1 if alive or crashed else 0)
