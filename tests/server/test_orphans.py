"""A server whose catalog.sqlite3 or metadata.sqlite3 is lost keeps every queue: its
directory is set aside in orphaned/ at start, and `conveyor orphans adopt` (run with the
server stopped) brings it back, messages and all. Real server, real boto3, real CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.server.test_cli import conveyor
from tests.support.server import Server

MESSAGES = 20


def fill_queue(server: Server) -> str:
    sqs = server.sqs()
    url: str = sqs.create_queue(QueueName="jobs", Attributes={"VisibilityTimeout": "45"},
                                tags={"team": "blue"})["QueueUrl"]
    for i in range(MESSAGES):
        sqs.send_message(QueueUrl=url, MessageBody=f"job {i}")
    return url


def drain(sqs: Any, url: str) -> list[str]:
    got: list[str] = []
    while messages := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                          VisibilityTimeout=600).get("Messages", []):
        got += [m["Body"] for m in messages]
    return sorted(got)


def remove(data: Path, database: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        (data / f"{database}{suffix}").unlink(missing_ok=True)


def orphans_list(data: Path) -> list[dict[str, Any]]:
    done = conveyor("orphans", "list", "--json", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    listed: list[dict[str, Any]] = json.loads(done.stdout)
    return listed


def test_a_lost_catalog_is_set_aside_and_adopted_back(server: Server) -> None:
    url = fill_queue(server)
    server.stop()
    remove(server.data_dir, "catalog.sqlite3")
    server.start()
    assert list((server.data_dir / "queues").iterdir()) == []
    assert "moved to orphaned/" in server.log.read_text()
    done = conveyor("orphans", "adopt", "anything", "--data-dir", str(server.data_dir))
    assert done.returncode == 1 and "stop the server first" in done.stderr, done
    server.stop()

    [orphan] = orphans_list(server.data_dir)
    assert orphan["name"] == "000000000000/jobs" and orphan["has_log"]
    done = conveyor("orphans", "adopt", orphan["directory"], "--data-dir",
                    str(server.data_dir))
    assert done.returncode == 0, done.stderr
    assert "adopted" in done.stdout and "server record" not in done.stdout
    assert orphans_list(server.data_dir) == []

    server.start()
    sqs = server.sqs()
    assert drain(sqs, url) == sorted(f"job {i}" for i in range(MESSAGES))
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["VisibilityTimeout"] == "45"
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "blue"}


def test_a_lost_metadata_store_is_set_aside_and_adopted_back(server: Server) -> None:
    url = fill_queue(server)
    server.stop()
    remove(server.data_dir, "metadata.sqlite3")
    server.start()
    assert server.sqs().list_queues().get("QueueUrls", []) == []
    assert "no queue record owns it" in server.log.read_text()
    server.stop()

    [orphan] = orphans_list(server.data_dir)
    done = conveyor("orphans", "adopt", orphan["directory"], "--data-dir",
                    str(server.data_dir))
    assert done.returncode == 0, done.stderr
    assert "made its server record again" in done.stdout

    server.start()
    sqs = server.sqs()
    assert sqs.list_queues()["QueueUrls"] == [url]
    assert drain(sqs, url) == sorted(f"job {i}" for i in range(MESSAGES))
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["VisibilityTimeout"] == "45"  # from the queue's own log


def test_discard_deletes_only_on_the_operators_word(server: Server) -> None:
    fill_queue(server)
    server.stop()
    remove(server.data_dir, "catalog.sqlite3")
    server.start()
    server.stop()
    [orphan] = orphans_list(server.data_dir)
    done = conveyor("orphans", "discard", orphan["directory"], "--data-dir",
                    str(server.data_dir), "--yes")
    assert done.returncode == 0, done.stderr
    assert orphans_list(server.data_dir) == []
