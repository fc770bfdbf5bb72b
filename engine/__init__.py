"""Conveyor's engine: a durable log, a hash ring and (built on them) SQS-style queues.

``import engine`` gives a durable queue inside any Python process, as sqlite3 gives a
database. Errors come from one hierarchy rooted in :class:`engine.errors.EngineError`.
"""

from typing import TYPE_CHECKING, Any

from engine._segment import Records
from engine.aio import AsyncBroker, AsyncQueue
from engine.broker import Broker
from engine.clock import ManualClock, SystemClock
from engine.errors import EngineError
from engine.limits import QueueAttributes
from engine.log import FsyncPolicy, Log
from engine.queue import Queue
from engine.records import MessageAttribute
from engine.results import Message, QueueStats, SendEntry, SendResult

if TYPE_CHECKING:
    from engine._ring import HashRing


def __getattr__(name: str) -> Any:
    # The ring needs numpy, whose import starts OpenBLAS worker threads that spin on a
    # small machine; queue users never touch the ring, so it loads only when asked for.
    if name == "HashRing":
        from engine._ring import HashRing

        return HashRing
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = [
    "AsyncBroker",
    "AsyncQueue",
    "Broker",
    "EngineError",
    "FsyncPolicy",
    "HashRing",
    "Log",
    "ManualClock",
    "Message",
    "MessageAttribute",
    "Queue",
    "QueueAttributes",
    "QueueStats",
    "Records",
    "SendEntry",
    "SendResult",
    "SystemClock",
]
