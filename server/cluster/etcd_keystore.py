"""Access keys in etcd: the cluster's key store, so a key made once works on every node.

A key lives at ``{prefix}access-keys/{access key id}`` as JSON, its secret wrapped as in
the single-node store (server/protection/keystore.py: AES-256-GCM under the master key's
subkey, bound to the key id, account and principal). Every node must therefore hold the
same master key (``--master-key-file``): ``{prefix}master-key-check``, written by the
first node to start, holds a MAC of a fixed text under the master key, and a node whose
key does not match refuses to start rather than refuse every request. etcd alone reveals
no secret, and whoever can write etcd cannot move a key to another account or principal:
the record no longer opens, and the key is refused (logged) on every node.

The check also says the keys' wrap format. A cluster made by an older version has the
check of text v1 and keys of format 1 (bound to the key id only); the first node of this
version to start (``upgrade``) rewraps them in format 2, each with a log line, then
replaces the check by that of text v2, which only a holder of the master key can write.
From then on a format-1 record is refused and never rewrapped. A new cluster starts at
v2. Deleting the check does not reopen the rewrap (an absent check is written as v2); only
the old v1 check value itself could, which is why docs/OPERATIONS.md says to compact etcd's
history after the upgrade.

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
    WRAP_LEGACY,
    WRAP_VERSION,
    AccessKey,
    SecretWrap,
    check_account,
    check_principal,
    is_key_id,
    new_key,
    refuse,
    rewrapped,
)

_CHECK_TEXTS = {WRAP_LEGACY: b"conveyor master key check v1",
                WRAP_VERSION: b"conveyor master key check v2"}
# Passes over the keys while concurrent changes (a revoke, another node's rewrap) make
# rewrap transactions fail; each pass is one read of the keys.
UPGRADE_PASSES_MAX = 10
# How long a broken watch of the keys waits before it is opened again.
MIRROR_RETRY_S = 0.5
_log = logging.getLogger("conveyor.server")


def master_check(master_key: bytes, version: int = WRAP_VERSION) -> str:
    """What ``master-key-check`` holds for this master key, with the cluster's keys in
    wrap format ``version``: a MAC, not the key."""
    return hmac.new(masterkey.subkey(master_key, "cluster-check"), _CHECK_TEXTS[version],
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

    async def check_master_key(self) -> bool:
        """Record this master key's check if the cluster has none; refuse a different one.
        Whether the cluster's keys are all in format 2 (False: ``upgrade`` is due)."""
        current = master_check(self._master, WRAP_VERSION).encode()
        t = self._client.transactions
        await self._call("transaction", compare=[t.version(self._check_key) == 0],
                         success=[t.put(self._check_key, current)], failure=[])
        stored = await self._call("get", self._check_key)
        if stored is not None and hmac.compare_digest(stored.value, current):
            return True
        legacy = master_check(self._master, WRAP_LEGACY).encode()
        if stored is not None and hmac.compare_digest(stored.value, legacy):
            return False
        raise ConfigError("master key", "(its check does not match)",
                          "this node's master key is not the cluster's; start every "
                          "node with the same --master-key-file")

    async def upgrade(self) -> None:
        """Check the master key; in a cluster of format-1 keys, rewrap them in format 2
        and mark the cluster so (see the module docstring). Before serving: a node must
        not answer requests from records it is about to rewrite."""
        if await self.check_master_key():
            return
        for _ in range(UPGRADE_PASSES_MAX):
            if await self._rewrap_pass():
                break
        else:
            raise DependencyUnavailableError("key store", "access keys kept changing while "
                                             "they were rewrapped; start again")
        # Only now, with no format-1 record left that opens: a node that dies before this
        # leaves the v1 check, and the next start finishes the work.
        t = self._client.transactions
        legacy = master_check(self._master, WRAP_LEGACY).encode()
        current = master_check(self._master, WRAP_VERSION).encode()
        await self._call("transaction", compare=[t.value(self._check_key) == legacy],
                         success=[t.put(self._check_key, current)], failure=[])
        if not await self.check_master_key():  # it was just written, by us or another
            raise ConfigError("master key", "(its check)", "it changed during the rewrap")

    async def _rewrap_pass(self) -> bool:
        """Rewrap the format-1 records once; whether none was changed meanwhile.

        The master key is known right (its check matched), so a record that does not open
        is damaged or was written by someone without the key: it is left, and refused."""
        t = self._client.transactions
        settled = True
        for kv in await self._call("get_prefix", self._prefix):
            key_id = kv.key[len(self._prefix):].decode()
            try:
                value = json.loads(kv.value)
                if value.get("version", WRAP_LEGACY) != WRAP_LEGACY:
                    continue
                secret = self._wrap.open(key_id, value["account"], value["principal"],
                                         base64.b64decode(value["wrapped_secret"]),
                                         WRAP_LEGACY)
            except (ConfigError, ValueError, KeyError, TypeError, AttributeError) as exc:
                _log.error("access key %s: not rewrapped, and refused (%s)", key_id,
                           getattr(exc, "reason", repr(exc)))
                continue
            value["version"] = WRAP_VERSION
            value["wrapped_secret"] = base64.b64encode(self._wrap.seal(
                key_id, value["account"], value["principal"], secret)).decode()
            ok, _ = await self._call("transaction", compare=[t.mod(kv.key) == kv.mod_revision],
                                     success=[t.put(kv.key, json.dumps(value).encode())],
                                     failure=[])
            if ok:
                rewrapped(key_id, value["account"], value["principal"])
            settled = settled and ok
        return settled

    async def create(self, principal: str, account: str) -> AccessKey:
        principal, account = check_principal(principal), check_account(account)
        await self.check_master_key()
        key_id, secret = new_key()
        created = time.time_ns() // 1_000_000
        wrapped = self._wrap.seal(key_id, account, principal, secret)
        value = {"principal": principal, "account": account, "created_ms": created,
                 "revoked_ms": None, "version": WRAP_VERSION,
                 "wrapped_secret": base64.b64encode(wrapped).decode()}
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

    async def lookup(self, access_key_id: str) -> AccessKey | None:
        """get, for the server's KeyCache: a key that does not open is logged and
        answered as absent."""
        try:
            return await self.get(access_key_id)
        except ConfigError as exc:
            refuse(access_key_id, exc)
            return None

    async def get(self, access_key_id: str) -> AccessKey | None:
        """The key with its secret, or None if it does not exist or was revoked;
        ConfigError if its secret does not open (see SecretWrap.open_stored)."""
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
        try:
            value = json.loads(stored)
            if value["revoked_ms"] is not None:
                return None
            principal, account = value["principal"], value["account"]
            created, version = value["created_ms"], value.get("version", WRAP_LEGACY)
            wrapped = base64.b64decode(value["wrapped_secret"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Whoever can write etcd can write anything there: a record that is not one is
            # refused like one that does not open, not answered with a server error.
            raise ConfigError("access key", access_key_id,
                              f"its record in etcd is malformed ({exc!r})") from None
        return AccessKey(access_key_id, principal, account, created, None,
                         self._wrap.open_stored(access_key_id, account, principal, wrapped,
                                                version))

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
