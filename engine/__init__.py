"""Conveyor's engine: a durable log, a hash ring and (built on them) SQS-style queues.

``import engine`` gives a durable queue inside any Python process, as sqlite3 gives a
database. Errors come from one hierarchy rooted in :class:`engine.errors.EngineError`.
"""

from engine._ring import HashRing
from engine._segment import Records
from engine.errors import EngineError
from engine.log import FsyncPolicy, Log

__all__ = ["EngineError", "FsyncPolicy", "HashRing", "Log", "Records"]
