"""Message move tasks: redrives of messages out of a dead-letter queue (SQS
StartMessageMoveTask, ListMessageMoveTasks, CancelMessageMoveTask).

A task is a coroutine of this process. It receives from the dead-letter queue, sends each
message to its destination (the given queue, or the queue it came from) and only then
deletes it from the dead-letter queue, so a message is never lost on the way; a crash
can send one twice, which at-least-once delivery allows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

from engine.errors import (
    EngineError,
    InvalidParameterError,
    MemoryFullError,
    QueueNotFoundError,
)
from engine.results import SendEntry
from server.errors import TaskNotFoundError

if TYPE_CHECKING:
    from server.metadata import QueueRecord
    from server.service import QueueService

_log = logging.getLogger("conveyor.service")

# A redrive moves at most this many messages per second unless the caller says fewer.
MOVE_RATE_MAX = 500
MOVE_VISIBILITY_S = 30
# Finished tasks remembered per dead-letter queue: ListMessageMoveTasks shows at most 10,
# and without a bound every StartMessageMoveTask would be kept for the process's life.
FINISHED_KEPT_PER_QUEUE = 10


@dataclasses.dataclass
class MoveTask:
    handle: str
    source: str  # engine name of the dead-letter queue
    destination: str | None  # engine name, or None for each message's original queue
    rate: int
    started_ms: int
    status: str = "RUNNING"
    moved: int = 0
    to_move: int = 0
    failure: str | None = None
    runner: asyncio.Task[None] | None = None


class MoveTasks:
    def __init__(self, service: QueueService) -> None:
        self._service = service
        self._tasks: dict[str, MoveTask] = {}

    async def start(self, source: tuple[str, str], destination: tuple[str, str] | None,
                    rate: int | None) -> str:
        service = self._service
        source_record = await service.record(*source)
        if not await service.dead_letter_sources(*source):
            raise InvalidParameterError("SourceArn", source[1],
                                        "is not a dead-letter queue of any queue")
        for task in self._tasks.values():
            if task.source == source_record.engine_name and task.status == "RUNNING":
                raise InvalidParameterError("SourceArn", source[1],
                                            "already has a message move task running")
        destination_name = None
        if destination is not None:
            destination_name = (await service.record(*destination)).engine_name
        if rate is not None and not 1 <= rate <= MOVE_RATE_MAX:
            raise InvalidParameterError("MaxNumberOfMessagesPerSecond", rate,
                                        f"must be 1..{MOVE_RATE_MAX}")
        handle = base64.urlsafe_b64encode(json.dumps(
            {"task": uuid.uuid4().hex, "source": source_record.engine_name}).encode()).decode()
        stats = await service.backend.queue(source_record).stats()
        task = MoveTask(handle, source_record.engine_name, destination_name,
                        rate or MOVE_RATE_MAX, _now_ms(), to_move=stats.visible)
        self._forget_finished(source_record.engine_name)
        task.runner = asyncio.create_task(self._run(task, source_record))
        self._tasks[handle] = task
        return handle

    async def _run(self, task: MoveTask, source_record: QueueRecord) -> None:
        service = self._service
        source = service.backend.queue(source_record)
        try:
            while task.status == "RUNNING":
                started = time.monotonic()
                batch = service.sealer.open(task.source,
                                            await source.receive(10, 0, MOVE_VISIBILITY_S))
                if not batch:
                    task.status = "COMPLETED"
                    return
                for k, message in enumerate(batch):
                    target = task.destination or message.dead_letter_source
                    if not isinstance(target, str):
                        raise QueueNotFoundError("original source queue")
                    # A fresh deduplication id: the original one may still be inside the
                    # destination's window, which would drop the message as a duplicate.
                    dedup = (f"redrive-{message.message_id}"
                             if message.group_id is not None else None)
                    owner, _, target_name = target.partition("/")
                    destination = await service.record(owner, target_name)
                    try:
                        [result] = await service.send_to(destination, [
                            SendEntry(message.body, attributes=message.attributes or None,
                                      group_id=message.group_id, dedup_id=dedup,
                                      sender=message.sender,
                                      system_attributes=message.system_attributes or None,
                                      body_md5=message.body_md5)])
                    except MemoryFullError as exc:
                        # The server is at its memory bound: the task waits, as any
                        # producer does, with the rest of the batch back in place.
                        _check(await source.change_visibility_batch(
                            [(m.receipt, 0) for m in batch[k:]]))
                        await asyncio.sleep(exc.retry_after_s)
                        break
                    if isinstance(result, EngineError):
                        # The destination refused it: it stays in the dead-letter queue.
                        _check(await source.change_visibility_batch([(message.receipt, 0)]))
                        raise result
                    _check(await source.delete_batch([message.receipt]))
                    task.moved += 1
                # Stay under the requested rate.
                await asyncio.sleep(max(0.0, len(batch) / task.rate
                                        - (time.monotonic() - started)))
            task.status = "CANCELLED"
        except asyncio.CancelledError:
            task.status = "CANCELLED"
            raise
        except EngineError as exc:
            task.status = "FAILED"
            task.failure = str(exc)
            _log.warning("message move task from %s failed: %s", task.source, exc)

    def list(self, source_engine_name: str, limit: int) -> list[MoveTask]:
        """The source's tasks, newest first: in reverse order of start (their start times
        are milliseconds, which two tasks can share)."""
        tasks = [t for t in reversed(self._tasks.values()) if t.source == source_engine_name]
        return tasks[:limit]

    async def cancel(self, handle: str, account: str) -> MoveTask:
        task = self._tasks.get(handle)
        if task is None or not task.source.startswith(f"{account}/"):
            raise TaskNotFoundError("the message move task")
        if task.status != "RUNNING":
            raise InvalidParameterError("TaskHandle", handle, f"the task is {task.status}")
        task.status = "CANCELLING"
        if task.runner is not None:
            task.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task.runner
        task.status = "CANCELLED"
        return task

    def close(self) -> None:
        for task in self._tasks.values():
            if task.runner is not None:
                task.runner.cancel()

    def _forget_finished(self, source: str) -> None:
        """Keep the newest FINISHED_KEPT_PER_QUEUE - 1 finished tasks of source, making room
        for the one about to start."""
        finished = [t for t in self.list(source, len(self._tasks)) if t.status != "RUNNING"]
        for task in finished[FINISHED_KEPT_PER_QUEUE - 1:]:
            del self._tasks[task.handle]


def task_source(handle: str) -> str | None:
    """The engine name of the dead-letter queue a task handle names, or None if the handle
    is not one this server made (what it says is checked against the task itself)."""
    try:
        source = json.loads(base64.urlsafe_b64decode(handle.encode()))["source"]
    except (ValueError, TypeError, KeyError, UnicodeError):
        return None
    return source if isinstance(source, str) and "/" in source else None


def _check(results: list[EngineError | None]) -> None:
    """Raise the refusal of a one-entry batch call, if it was refused."""
    [error] = results
    if error is not None:
        raise error


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
