"""What the workers of one server share through their run directory
(server/workers/shared.py), and the metadata cache that relies on it."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

from server.metadata import CachedMetadata, QueueRecord
from server.workers.shared import Generation, KeyedFileLocks


class _LateStore:
    """A store whose read of "m" is taken at once and delivered only when let go, so that
    a write can land in between (in SQLite, a read in flight on the metadata thread)."""

    def __init__(self) -> None:
        self.values = {"m": "old", "x": "x"}
        self.gate = asyncio.Event()

    async def get(self, account: str, name: str) -> QueueRecord | None:
        value = self.values[name]
        if name == "m":
            await self.gate.wait()
        return QueueRecord(account, name, 0, 0, {"v": value}, {})

    async def put(self, record: QueueRecord) -> None:
        self.values[record.name] = record.tags["v"]


def test_a_record_read_while_another_worker_wrote_is_not_kept(tmp_path: Path) -> None:
    async def run() -> str:
        store = _LateStore()
        worker_a = CachedMetadata(store, None, Generation(str(tmp_path)))  # type: ignore[arg-type]
        worker_b = CachedMetadata(store, None, Generation(str(tmp_path)))  # type: ignore[arg-type]
        reading = asyncio.create_task(worker_a.get("acct", "m"))
        await asyncio.sleep(0)
        await worker_b.put(QueueRecord("acct", "m", 0, 0, {"v": "new"}, {}))
        await worker_a.get("acct", "x")  # another request of A's sees B's bump
        store.gate.set()
        await reading  # the read from before B's write comes back
        record = await worker_a.get("acct", "m")
        assert record is not None
        return record.tags["v"]

    assert asyncio.run(run()) == "new"


def _bump(run_dir: str, times: int) -> None:
    generation = Generation(run_dir)
    for _ in range(times):
        generation.bump()
    generation.close()


def test_bumps_from_many_processes_all_count(tmp_path: Path) -> None:
    processes = [multiprocessing.get_context("spawn").Process(
        target=_bump, args=(str(tmp_path), 500)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert Generation(str(tmp_path)).value() == 2000


def test_a_queue_lock_excludes_holders_in_one_process_too(tmp_path: Path) -> None:
    async def run() -> list[str]:
        locks = KeyedFileLocks(str(tmp_path))
        events: list[str] = []

        async def hold(who: str) -> None:
            async with locks.hold(("acct", "q")):
                events.append(f"{who} in")
                await asyncio.sleep(0.05)
                events.append(f"{who} out")

        await asyncio.gather(hold("a"), hold("b"))
        return events

    events = asyncio.run(run())
    assert events in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
