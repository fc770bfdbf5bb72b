"""Queue records in etcd: the cluster's MetadataStore.

Every node reads and writes the same records, at ``{prefix}queues/{account}/{name}`` as
JSON, and keeps its own cache (server.metadata.CachedMetadata) in step through a watch
on that prefix: a change made through any node invalidates the record everywhere. The
etcd client belongs to the cluster node (replication.control); its calls carry that
client's time limit, and any failure of etcd becomes DependencyUnavailableError (503).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from server.errors import DependencyUnavailableError
from server.metadata import QueueRecord

_log = logging.getLogger("conveyor.metadata")

# How long a broken watch waits before it is opened again.
WATCH_RETRY_S = 0.5


async def etcd_call(client: Any, dependency: str, method: str, *args: Any,
                    **kwargs: Any) -> Any:
    """``client.<method>(...)``, any failure of etcd raised as the dependency being
    unavailable (503) for the server's stores."""
    try:
        return await getattr(client, method)(*args, **kwargs)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # aetcd and grpc errors share no base class
        raise DependencyUnavailableError(dependency, f"etcd {method}: {exc}") from exc


class EtcdMetadataStore:
    def __init__(self, client: Any, prefix: bytes = b"/conveyor/") -> None:
        self._client = client
        self._prefix = prefix + b"queues/"

    def _key(self, account: str, name: str) -> bytes:
        return self._prefix + f"{account}/{name}".encode()

    async def _call(self, method: str, *args: Any) -> Any:
        return await etcd_call(self._client, "metadata store", method, *args)

    async def get(self, account: str, name: str) -> QueueRecord | None:
        kv = await self._call("get", self._key(account, name))
        return None if kv is None else _record(kv.value)

    async def put(self, record: QueueRecord) -> None:
        value = json.dumps({"account": record.account, "name": record.name,
                            "created_ms": record.created_ms, "modified_ms": record.modified_ms,
                            "tags": record.tags, "extra": record.extra}, sort_keys=True)
        await self._call("put", self._key(record.account, record.name), value.encode())

    async def delete(self, account: str, name: str) -> None:
        await self._call("delete", self._key(account, name))

    async def names(self, account: str, prefix: str, after: str, limit: int) -> list[str]:
        # A literal, case-sensitive prefix, in name order after a page's last name: etcd
        # returns keys in byte order, which is name order for ASCII names.
        result = await self._call("get_prefix", self._prefix + f"{account}/{prefix}".encode())
        start = len(self._prefix) + len(account) + 1
        names = [kv.key[start:].decode() for kv in result]
        return [n for n in names if n > after][:limit]

    async def all_records(self) -> list[QueueRecord]:
        return [_record(kv.value) for kv in await self._call("get_prefix", self._prefix)]

    async def ping(self) -> None:
        await self._call("status")

    async def close(self) -> None:
        """Nothing to release: the client is the cluster node's."""

    async def watch(self, on_change: Callable[[str, str], None],
                    on_reset: Callable[[], None]) -> None:
        """Call on_change(account, name) for every change, until cancelled.

        A watch that breaks (etcd restarting, say) may have missed changes: once it is
        open again, on_reset is called so that the caller drops its whole cache.
        """
        while True:
            try:
                async for event in await self._client.watch_prefix(self._prefix):
                    account, _, name = event.kv.key[len(self._prefix):].decode().partition("/")
                    on_change(account, name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("metadata watch broke (%s); reopening", exc)
            await asyncio.sleep(WATCH_RETRY_S)
            on_reset()


def _record(value: bytes) -> QueueRecord:
    fields = json.loads(value)
    return QueueRecord(fields["account"], fields["name"], fields["created_ms"],
                       fields["modified_ms"], fields["tags"], fields["extra"])
