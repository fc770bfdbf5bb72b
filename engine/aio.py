"""The asyncio twin of the library: :class:`AsyncBroker` and :class:`AsyncQueue`.

Nothing here blocks the event loop on the disk. Queue operations run on the loop (they
take the queue's lock only for in-memory work and a write to the page cache) and await
their fsync through a future that the log's group commit completes from its own thread.
Work that may block for long (opening a queue replays its log; creating or deleting one
fsyncs files; completing dead-letter moves) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from engine.broker import Broker
from engine.errors import EngineError, QueueUnavailableError
from engine.limits import QueueAttributes
from engine.queue import QueueCore, check_batch, check_receive, send_entries
from engine.records import MessageAttribute
from engine.results import Message, QueueStats, SendEntry, SendResult


class AsyncBroker:
    """A :class:`~engine.Broker` for asyncio code. Create it with ``await open(...)``
    or directly (opening only reads the catalog)."""

    def __init__(self, path: str, fsync: str = "always", **options: Any) -> None:
        self.broker = Broker(path, fsync, **options)

    async def create_queue(self, name: str, **attributes: Any) -> AsyncQueue:
        await asyncio.to_thread(self.broker.create_queue, name, **attributes)
        return AsyncQueue(self.broker, name)

    async def get_queue(self, name: str) -> AsyncQueue:
        await asyncio.to_thread(self.broker.get_queue, name)
        return AsyncQueue(self.broker, name)

    async def list_queues(self, prefix: str = "") -> list[str]:
        return self.broker.list_queues(prefix)

    async def delete_queue(self, name: str) -> None:
        await asyncio.to_thread(self.broker.delete_queue, name)

    async def set_queue_attributes(self, name: str, **changes: Any) -> QueueAttributes:
        return await asyncio.to_thread(self.broker.set_queue_attributes, name, **changes)

    async def close(self) -> None:
        await asyncio.to_thread(self.broker.close)

    async def __aenter__(self) -> AsyncBroker:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


async def _changed(core: QueueCore, version: int, seconds: float) -> None:
    """Until a message may have become receivable since version (a send, or a timer of a
    delayed or leased message), or seconds pass."""
    waiter = core.waiter(version)
    try:
        async with asyncio.timeout(min(seconds, core.seconds_to_next_timer())):
            await waiter
    except TimeoutError:
        pass
    finally:
        waiter.cancel()


class AsyncQueue:
    """One queue, for asyncio. Same semantics as :class:`~engine.queue.Queue`."""

    def __init__(self, broker: Broker, name: str) -> None:
        self._broker = broker
        self.name = name

    async def _core(self) -> QueueCore:
        core = self._broker.open_core(self.name)
        if core is None:
            core = await asyncio.to_thread(self._broker._core_of, self.name)
        return core

    async def attributes(self) -> QueueAttributes:
        return (await self._core()).attributes

    async def set_attributes(self, **changes: Any) -> QueueAttributes:
        return await asyncio.to_thread(self._broker.set_queue_attributes, self.name, **changes)

    async def send(self, body: bytes, delay_seconds: int | None = None,
                   attributes: Mapping[str, MessageAttribute] | None = None,
                   group_id: str | None = None, dedup_id: str | None = None,
                   sender: str | None = None,
                   system_attributes: Mapping[str, MessageAttribute] | None = None
                   ) -> SendResult:
        result = (await self.send_batch([SendEntry(body, delay_seconds, attributes, group_id,
                                                   dedup_id, sender, system_attributes)]))[0]
        if isinstance(result, EngineError):
            raise result
        return result

    async def send_batch(self, entries: Sequence[SendEntry | bytes]
                         ) -> list[SendResult | EngineError]:
        """Send several messages in one log write; each entry succeeds or fails alone.

        An entry is a :class:`SendEntry`, or the body alone as bytes."""
        sends = send_entries(entries)
        core = await self._core()
        results, durable_at = core.send(sends)
        await core.wait_durable_async(durable_at)
        await self._maybe_snapshot(core)
        return results

    async def receive(self, max_messages: int = 1, wait_seconds: int | None = None,
                      visibility_timeout: int | None = None) -> list[Message]:
        core = await self._core()
        wait = check_receive(max_messages, wait_seconds, visibility_timeout, core.attributes)
        deadline = time.monotonic() + wait
        while True:
            core = await self._core()
            messages, plan, version = core.receive(max_messages, visibility_timeout)
            if plan is not None:
                await asyncio.to_thread(self._broker._complete_moves, core, plan)
            if messages:
                return messages
            if plan is not None:
                # Only messages to move came up, and they are gone now: look again at
                # once. Bounded: a pass either moves messages out of the queue or finds
                # the dead-letter queue gone, after which messages are delivered.
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return messages
            await _changed(core, version, remaining)

    async def wait_receivable(self, seconds: float) -> bool:
        """Wait up to seconds until a message is receivable, leasing nothing; whether one
        is. For a caller that long-polls several queues at once and receives from the
        first that has messages: cancelling this wait changes no state."""
        deadline = time.monotonic() + seconds
        while True:
            core = await self._core()
            # The version first: a send after the check below still completes the waiter.
            version = core.version()
            if core.receivable():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await _changed(core, version, remaining)

    async def delete(self, receipt: str) -> None:
        error = (await self.delete_batch([receipt]))[0]
        if error is not None:
            raise error

    async def delete_batch(self, receipts: Sequence[str]) -> list[EngineError | None]:
        check_batch(receipts)
        core = await self._core()
        results, durable_at = core.delete(receipts)
        await core.wait_durable_async(durable_at)
        await self._maybe_snapshot(core)
        return results

    async def change_visibility(self, receipt: str, seconds: int) -> None:
        error = (await self.change_visibility_batch([(receipt, seconds)]))[0]
        if error is not None:
            raise error

    async def change_visibility_batch(self, entries: Sequence[tuple[str, int]]
                                      ) -> list[EngineError | None]:
        check_batch(entries)
        return (await self._core()).change_visibility(entries)[0]

    async def purge(self) -> None:
        core = await self._core()
        await core.wait_durable_async(core.purge())

    async def stats(self) -> QueueStats:
        return (await self._core()).stats()

    async def digest(self) -> str:
        return (await self._core()).digest()

    async def _maybe_snapshot(self, core: QueueCore) -> None:
        # A snapshot fsyncs: never on the loop. The write before it is durable and is
        # answered as such; a snapshot that fails (a full disk) stops the queue for the
        # calls after it.
        if core.snapshot_due():
            with contextlib.suppress(QueueUnavailableError):
                await asyncio.to_thread(core.maybe_snapshot)
