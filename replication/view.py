"""A node's view of the cluster (nodes, partitions, leaders), kept current by an etcd watch.

The view is read whole once, at one revision, and from then on follows etcd's watch from
the next revision: each change arrives once, in revision order, and is applied to the
view in memory. Nothing reads the whole state again unless it must:

- the watch broke (etcd restarted, the connection reset, a member hung): it resumes from
  the revision after the last one applied, on whichever member answers, and etcd sends
  everything since;
- etcd compacted its history past that revision (HistoryCompactedError): what changed
  meanwhile is lost to the watch, so the view is read whole again, the differences from
  the old one are reported as changes, and the watch resumes from the new read.

``changed`` hears of every change applied, by name, so that the node acts on what changed
rather than scanning every partition.

Not thread-safe: the view changes on the event loop only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from replication.control import ClusterView, Control
from replication.errors import ControlUnavailableError, HistoryCompactedError

_log = logging.getLogger("conveyor.cluster")

# A watch that broke is opened again this soon (at once would spin while etcd is down).
WATCH_RETRY_S = 0.5
# etcd's event type DELETE (PUT is 0).
_DELETE = 1


@dataclasses.dataclass
class Changes:
    """What one step of the view changed: names whose key appeared, changed or went."""

    nodes: set[str] = dataclasses.field(default_factory=set)
    partitions: set[str] = dataclasses.field(default_factory=set)
    leaders: set[str] = dataclasses.field(default_factory=set)
    gone: set[str] = dataclasses.field(default_factory=set)
    """Nodes whose key went (their lease ran out, or they left)."""
    deleted: set[str] = dataclasses.field(default_factory=set)
    """Partitions whose record was seen to go (a queue deleted)."""


class ViewKeeper:
    """See the module docstring."""

    def __init__(self, control: Control, changed: Callable[[Changes], None]) -> None:
        self.control = control
        self.changed = changed
        self.view = ClusterView(0, {}, {}, {})
        self.reads = 0
        """Whole reads made (one at start, one per compaction): for tests and logs."""
        self._stale = False
        """A compaction lost changes to the watch: read the whole view before watching."""

    async def load(self) -> ClusterView:
        """Read the whole view (the first time, or after a compaction) and report what
        differs from the view held until now."""
        fresh = await self.control.view()
        self.reads += 1
        old = self.view
        changes = Changes(_differ(old.nodes, fresh.nodes), _differ(old.partitions,
                                                                   fresh.partitions),
                          _differ(old.leaders, fresh.leaders))
        changes.gone = {n for n in old.nodes if n not in fresh.nodes}
        if old.revision:
            # Deleted: in the old view, not in the new one, and not because its new value
            # does not decode.
            changes.deleted = {n for n in old.partitions
                               if n not in fresh.partitions and n not in fresh.unreadable}
        for name in fresh.unreadable:  # kept as last read
            if name in old.partitions:
                fresh.partitions[name] = old.partitions[name]
        # In place: whoever holds the view sees the new one.
        old.revision, old.nodes, old.partitions, old.leaders, old.unreadable = (
            fresh.revision, fresh.nodes, fresh.partitions, fresh.leaders, fresh.unreadable)
        self.changed(changes)
        return old

    async def run(self) -> None:
        """Follow the watch until cancelled."""
        while True:
            try:
                if self._stale:
                    await self.load()
                    self._stale = False
                await self.control.watch(self._resume_from(), self._apply)
            except HistoryCompactedError as exc:
                self._compacted(exc)
                continue
            except ControlUnavailableError as exc:
                _log.warning("cluster watch: %s; resuming from revision %d", exc,
                             self._resume_from())
            await asyncio.sleep(WATCH_RETRY_S)

    def _resume_from(self) -> int:
        """The revision a watch opened again starts at: the first not yet applied."""
        return self.view.revision + 1

    def _compacted(self, exc: HistoryCompactedError) -> None:
        _log.warning("cluster watch: %s; reading the whole state again", exc)
        self._stale = True

    def _apply(self, events: list[Any]) -> None:
        view, control = self.view, self.control
        changes = Changes()
        for event in events:
            revision = int(event.kv.mod_revision)
            if event.type == _DELETE:
                kind, name = control.delete(view, bytes(event.kv.key))
                if kind == "nodes":
                    changes.gone.add(name)
                elif kind == "partitions":
                    changes.deleted.add(name)
            else:
                kind, name = control.put(view, event.kv)
                if kind == "nodes":
                    changes.gone.discard(name)
                elif kind == "partitions":
                    changes.deleted.discard(name)
            if kind == "nodes":
                changes.nodes.add(name)
            elif kind == "partitions":
                changes.partitions.add(name)
            elif kind == "leaders":
                changes.leaders.add(name)
            view.revision = max(view.revision, revision)
        self.changed(changes)


def _differ(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """Names in one dict and not the other, or with another value."""
    return {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
