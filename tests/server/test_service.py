"""server/service.py in process, over the real single-node deployment (engine, SQLite)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.config import ServerConfig
from server.deployment import open_single_node
from server.moves import FINISHED_KEPT_PER_QUEUE
from server.protection import authz
from server.protection.sse import Keyring
from server.sealing import Sealer
from server.service import QueueService

ACCOUNT = "000000000000"
REGION = "us-east-1"
CONCURRENT = 20


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[QueueService]:
    config = ServerConfig(data_dir=str(tmp_path), fsync="never")
    master = bytes(32)
    async with open_single_node(config, master, lambda _: None) as deployment:
        keyring = Keyring(str(tmp_path / "keys.sqlite3"), master)
        service = QueueService(deployment.backend, deployment.metadata, Sealer(keyring))
        try:
            yield service
        finally:
            await service.close()
            keyring.close()


def _labels(service: QueueService, name: str) -> set[str]:
    record = service.metadata.cached(ACCOUNT, name)
    assert record is not None
    policy = record.extra.get("Policy")
    return {s["Sid"] for s in json.loads(policy)["Statement"]} if policy else set()


async def test_concurrent_permission_changes_lose_none(service: QueueService) -> None:
    await service.create_queue(ACCOUNT, "shared", {}, {}, {})
    labels = [f"grant{i}" for i in range(CONCURRENT)]
    await asyncio.gather(*(
        service.add_permission(ACCOUNT, "shared", REGION, label, ["111111111111"],
                               ["SendMessage"]) for label in labels))
    await service.record(ACCOUNT, "shared")
    assert _labels(service, "shared") == set(labels)
    await asyncio.gather(*(service.remove_permission(ACCOUNT, "shared", label)
                           for label in labels[::2]))
    assert _labels(service, "shared") == set(labels[1::2])


async def test_the_same_changes_without_the_queue_lock_lose_some(service: QueueService) -> None:
    """The negative control: the read-modify-write the handlers did before, concurrently
    under the same load, loses grants; so the test above can fail."""
    await service.create_queue(ACCOUNT, "racy", {}, {}, {})

    async def unlocked_grant(label: str) -> None:
        record = await service.record(ACCOUNT, "racy")
        policy = authz.add_permission(record.extra.get("Policy"), REGION, ACCOUNT, "racy",
                                      label, ["111111111111"], ["SendMessage"])
        await service.set_attributes(ACCOUNT, "racy", {}, {"Policy": policy})

    await asyncio.gather(*(unlocked_grant(f"grant{i}") for i in range(CONCURRENT)))
    await service.record(ACCOUNT, "racy")
    assert len(_labels(service, "racy")) < CONCURRENT


async def test_concurrent_attribute_and_tag_changes_lose_none(service: QueueService) -> None:
    await service.create_queue(ACCOUNT, "q", {}, {}, {})
    await asyncio.gather(
        *(service.tag(ACCOUNT, "q", {f"k{i}": "v"}) for i in range(CONCURRENT)),
        service.set_attributes(ACCOUNT, "q", {}, {"ConveyorRateLimit": "10/s"}),
        service.add_permission(ACCOUNT, "q", REGION, "one", ["111111111111"], ["SendMessage"]))
    record = await service.record(ACCOUNT, "q")
    assert set(record.tags) == {f"k{i}" for i in range(CONCURRENT)}
    assert record.extra["ConveyorRateLimit"] == "10/s"
    assert record.settings.rate is not None and record.settings.rate.per_second == 10
    assert _labels(service, "q") == {"one"}


async def test_a_delete_is_not_undone_by_a_change_in_flight(service: QueueService) -> None:
    await service.create_queue(ACCOUNT, "gone", {}, {}, {})
    outcomes = await asyncio.gather(
        service.tag(ACCOUNT, "gone", {"k": "v"}), service.delete_queue(ACCOUNT, "gone"),
        *(service.tag(ACCOUNT, "gone", {f"k{i}": "v"}) for i in range(5)),
        return_exceptions=True)
    assert outcomes[1] is None
    assert await service.metadata.get(ACCOUNT, "gone") is None


async def test_finished_move_tasks_are_bounded_per_queue(service: QueueService) -> None:
    await service.create_queue(ACCOUNT, "dlq", {}, {}, {})
    await service.create_queue(ACCOUNT, "work", {"dead_letter_queue": f"{ACCOUNT}/dlq",
                                                 "max_receive_count": 3}, {}, {})
    handles = []
    for _ in range(FINISHED_KEPT_PER_QUEUE + 5):
        handles.append(await service.moves.start((ACCOUNT, "dlq"), None, None))
        for task in service.moves.list(f"{ACCOUNT}/dlq", 100):
            if task.runner is not None:
                await task.runner  # an empty dead-letter queue: done at once
    kept = service.moves.list(f"{ACCOUNT}/dlq", 100)
    assert len(kept) == FINISHED_KEPT_PER_QUEUE
    assert {t.handle for t in kept} == set(handles[-FINISHED_KEPT_PER_QUEUE:])
    assert all(t.status == "COMPLETED" for t in kept)
