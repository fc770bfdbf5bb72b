"""What the workers do for one another beyond partition calls, over the call sockets.

A queue's per-queue state that is not in its partitions lives at its home, the worker
that owns its partition 0: the FIFO receive attempts remembered, and its message move
tasks (each task runs there). A worker that gets such a request for a queue whose home is
another makes the call there.

Any worker shows the whole server:

- /metrics is every worker's registry, each sample labelled ``worker="i"``: a sum over
  that label is the server's (a counter of a worker restarted since starts again at 0,
  as any process's does). Families are kept whole, as the text format requires.
- /v1/usage is summed over the workers;
- on a cluster node, /v1/cluster is every worker's (server/cluster/view.py,
  merge_members).

A worker that does not answer (restarting) is left out, and the answer says which.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from server.calls.codec import RESULTS
from server.errors import DependencyUnavailableError
from server.workers.mesh import Mesh
from server.workers.ownership import WorkerPlace

_log = logging.getLogger("conveyor.server")

Provider = Callable[[str, Sequence[Any]], Awaitable[Any]]
"""(the queue's engine name, or "" for the whole server; the arguments) -> the answer."""
SIBLING_OPS = ("metrics_text", "usage", "describe", "sqs_action", "attempt_get",
               "attempt_put")


class Siblings:
    def __init__(self, place: WorkerPlace, mesh: Mesh) -> None:
        self.place = place
        self.mesh = mesh
        self._providers: dict[str, Provider] = {}

    def provide(self, op: str, provider: Provider) -> None:
        """What this worker answers to op (set by the FrontEnd once it is built)."""
        self._providers[op] = provider

    async def local(self, op: str, queue: str, args: Sequence[Any]) -> Any:
        provider = self._providers.get(op)
        if provider is None:
            raise DependencyUnavailableError(f"worker {self.place.index}",
                                             "it is starting; retry")
        return await provider(queue, args)

    def is_home(self, engine_name: str) -> bool:
        """Whether this worker is the queue's home."""
        return self.place.owns(engine_name)

    async def at_home(self, engine_name: str, op: str, *args: Any) -> Any:
        """op made at the queue's home (another worker)."""
        link = await self.mesh.link(self.place.owner(engine_name))
        return RESULTS[op](await link.call(op, engine_name, args))

    async def gather(self, op: str, *args: Any) -> dict[int, Any]:
        """Each worker's answer, by index; those that did not answer are left out."""
        answers = {self.place.index: await self.local(op, "", args)}
        for index in range(self.place.count):
            if index == self.place.index:
                continue
            try:
                link = await self.mesh.link(index)
                answers[index] = RESULTS[op](await link.call(op, "", args))
            except DependencyUnavailableError as exc:
                _log.info("worker %d left out of %s: %s", index, op, exc)
        return answers


def merge_metrics(texts: dict[int, bytes]) -> bytes:
    """The Prometheus texts of the workers as one, each sample labelled with its worker."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for index, text in sorted(texts.items()):
        family = ""
        for line in text.decode().splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in families:
                        families[family] = []
                        headers[family] = []
                    if len(headers[family]) < 2 and line not in headers[family]:
                        headers[family].append(line)
                continue
            families.setdefault(family, []).append(_labelled(line, index))
    out = []
    for family, samples in families.items():
        out += headers.get(family, [])
        out += samples
    return ("\n".join(out) + "\n").encode()


def _labelled(sample: str, index: int) -> str:
    label = f'worker="{index}"'
    brace = sample.find("{")
    space = sample.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1:]
        return f"{sample[:brace]}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    return f"{sample[:space]}{{{label}}}{sample[space:]}"


def merge_usage(documents: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The usage documents of the workers (server/protection/usage.py) summed."""
    merged: dict[str, Any] = {}
    for _, document in sorted(documents.items()):
        if not merged:
            merged = {"account": document["account"], "principals": {}, "queues": {}}
        for table in ("principals", "queues"):
            for key, counts in document[table].items():
                kept = merged[table].setdefault(key, dict.fromkeys(counts, 0))
                for field, value in counts.items():
                    kept[field] = kept.get(field, 0) + value
    for table in ("principals", "queues"):
        merged[table] = dict(sorted(merged[table].items()))
    return merged
