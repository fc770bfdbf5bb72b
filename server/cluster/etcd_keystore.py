"""Access keys in etcd: the cluster's key store, so a key made once works on every node.

A key lives at ``{prefix}access-keys/{access key id}`` as JSON, its secret wrapped as in
the single-node store (server/protection/keystore.py: AES-256-GCM under the master key's subkey,
bound to the key id). Every node must therefore hold the same master key
(``--master-key-file``): ``{prefix}master-key-check``, written by the first node to start,
holds a MAC of a fixed text under the master key, and a node whose key does not match
refuses to start rather than refuse every request. etcd alone reveals no secret.

A server keeps a copy of the keys in memory (``mirror``: one read, then a watch), so that
checking a request's key reads nothing from etcd: a flood of made-up key ids must not load
the store that every node's lease depends on. A revocation reaches the copy as soon as
etcd says so. While the watch is broken, lookups read etcd as the command line does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

from engine.errors import ConfigError
from server.cluster.etcd_metadata import etcd_call
from server.errors import DependencyUnavailableError
from server.protection import masterkey
from server.protection.keystore import (
    AccessKey,
    SecretWrap,
    check_account,
    check_principal,
    is_key_id,
    new_key,
)

_CHECK_TEXT = b"conveyor master key check v1"
# How long a broken watch of the keys waits before it is opened again.
MIRROR_RETRY_S = 0.5
_log = logging.getLogger("conveyor.server")


def master_check(master_key: bytes) -> str:
    """What ``master-key-check`` holds for this master key: a MAC, not the key."""
    return hmac.new(masterkey.subkey(master_key, "cluster-check"), _CHECK_TEXT,
                    hashlib.sha256).hexdigest()


class EtcdKeyStore:
    """The access keys of a cluster. Coroutines: etcd is reached over the network."""

    def __init__(self, client: Any, master_key: bytes, prefix: bytes = b"/conveyor/") -> None:
        self._client = client
        self._master = master_key
        self._wrap = SecretWrap(master_key)
        self._prefix = prefix + b"access-keys/"
        self._check_key = prefix + b"master-key-check"
        self._copy: dict[str, bytes] | None = None
        """Key id -> stored value, while the mirror's watch runs; else None."""

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await etcd_call(self._client, "key store", method, *args, **kwargs)

    async def check_master_key(self) -> None:
        """Record this master key's check if the cluster has none; refuse a different one."""
        mine = master_check(self._master).encode()
        t = self._client.transactions
        await self._call("transaction", compare=[t.version(self._check_key) == 0],
                         success=[t.put(self._check_key, mine)], failure=[])
        stored = await self._call("get", self._check_key)
        if stored is None or not hmac.compare_digest(stored.value, mine):
            raise ConfigError("master key", "(its check does not match)",
                              "this node's master key is not the cluster's; start every "
                              "node with the same --master-key-file")

    async def create(self, principal: str, account: str) -> AccessKey:
        principal, account = check_principal(principal), check_account(account)
        await self.check_master_key()
        key_id, secret = new_key()
        created = time.time_ns() // 1_000_000
        value = {"principal": principal, "account": account, "created_ms": created,
                 "revoked_ms": None,
                 "wrapped_secret": base64.b64encode(self._wrap.seal(key_id, secret)).decode()}
        key = self._prefix + key_id.encode()
        t = self._client.transactions
        ok, _ = await self._call("transaction", compare=[t.version(key) == 0],
                                 success=[t.put(key, json.dumps(value).encode())], failure=[])
        if not ok:  # 88 random bits met an existing id: vanishingly rare, never silent
            raise ConfigError("access key id", key_id, "already exists; create again")
        return AccessKey(key_id, principal, account, created, None, secret)

    async def mirror(self) -> None:
        """Keep the in-memory copy of the keys current, until cancelled."""
        while True:
            try:
                found = await self._client.get_prefix(self._prefix)
                copy = {kv.key[len(self._prefix):].decode(): kv.value for kv in found}
                events = await self._client.watch_prefix(
                    self._prefix, start_revision=found.header.revision + 1)
                self._copy = copy
                async for event in events:
                    key_id = event.kv.key[len(self._prefix):].decode()
                    if event.kind == "DELETE":
                        copy.pop(key_id, None)
                    else:
                        copy[key_id] = event.kv.value
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # aetcd and grpc errors share no base class
                _log.warning("access key watch broke (%s); reopening", exc)
            self._copy = None
            await asyncio.sleep(MIRROR_RETRY_S)

    async def get(self, access_key_id: str) -> AccessKey | None:
        """The key with its secret, or None if it does not exist or was revoked."""
        if not is_key_id(access_key_id):
            return None
        copy = self._copy
        if copy is not None:
            stored = copy.get(access_key_id)
        else:
            kv = await self._call("get", self._prefix + access_key_id.encode())
            stored = None if kv is None else kv.value
        if stored is None:
            return None
        value = json.loads(stored)
        if value["revoked_ms"] is not None:
            return None
        return AccessKey(access_key_id, value["principal"], value["account"],
                         value["created_ms"], None,
                         self._wrap.open(access_key_id,
                                         base64.b64decode(value["wrapped_secret"])))

    async def list(self) -> list[AccessKey]:
        listed = []
        for kv in await self._call("get_prefix", self._prefix):
            value = json.loads(kv.value)
            listed.append(AccessKey(kv.key[len(self._prefix):].decode(), value["principal"],
                                    value["account"], value["created_ms"],
                                    value["revoked_ms"]))
        return sorted(listed, key=lambda k: (k.created_ms, k.access_key_id))

    async def revoke(self, access_key_id: str) -> bool:
        """Revoke a key; False if there is no such key or it was already revoked."""
        key = self._prefix + access_key_id.encode()
        for _ in range(10):  # a concurrent revoke makes the compare fail: read again
            kv = await self._call("get", key)
            if kv is None:
                return False
            value = json.loads(kv.value)
            if value["revoked_ms"] is not None:
                return False
            value["revoked_ms"] = time.time_ns() // 1_000_000
            t = self._client.transactions
            ok, _ = await self._call("transaction", compare=[t.mod(key) == kv.mod_revision],
                                     success=[t.put(key, json.dumps(value).encode())],
                                     failure=[])
            if ok:
                return True
        raise DependencyUnavailableError("key store", f"key {access_key_id} kept changing")
