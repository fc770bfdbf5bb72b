"""What GET /v1/cluster shows a caller.

An admin (server/protection/operator.py) sees this node's whole view, as
replication/node.py describes it: every node's addresses, every queue's partitions with
their uids, replicas, ISR, leader and epoch. Anyone else sees only its own account's
partitions, and each node by an alias: unless ``--node-id`` names it, a node's id is its
address (ADVERTISE:PORT), as telling as the addresses an admin sees. The alias is
a MAC of the id under a key every node derives from the cluster's secret, so it is the
same on every node and cannot be turned back into the id.

On a node whose workers are members of their own, the view is the server's: theirs,
merged (``merge_members``).

Fields are copied by name, never passed through: a field that the replication layer adds
to its description later reaches admins only, until someone decides a tenant may see it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from server.partitioned import partition_account

# Hex digits of an alias: 48 bits, so that two nodes of one cluster never share one.
_ALIAS_HEX = 12

View = dict[str, Any]


def cluster_view(describe: Callable[[], Awaitable[View]], alias_key: bytes
                 ) -> Callable[[str | None], Awaitable[View]]:
    """/v1/cluster's data: ``describe()`` whole for None (an admin), else for an account."""

    def alias(node_id: str) -> str:
        mac = hmac.new(alias_key, node_id.encode(), hashlib.sha256).hexdigest()
        return f"node-{mac[:_ALIAS_HEX]}"

    async def view(account: str | None) -> View:
        whole = await describe()
        return whole if account is None else account_view(whole, account, alias)

    return view


def merge_members(described: dict[int, View], here: int) -> View:
    """The views of a server's workers, each a member of the cluster, as the server's
    (server/workers/supervisor.py, "In a cluster"); here: the index of the worker that
    answers. ``node`` is that worker's member id, ``workers`` every one's with its lease;
    what the server leads is what any of them leads. The rest (nodes, queues) is the
    cluster's, as the worker that answers sees it."""
    mine = described[here]
    leading: View = {}
    led: set[str] = set()
    for view in described.values():
        leading |= view["leading"]
        led |= {name for name, q in view["queues"].items() if q["leading_here"]}
    return {
        "node": mine["node"],
        "lease_valid": all(v["lease_valid"] for v in described.values()),
        "workers": {v["node"]: {"lease_valid": v["lease_valid"]}
                    for _, v in sorted(described.items())},
        "nodes": mine["nodes"],
        "queues": {name: q | {"leading_here": name in led}
                   for name, q in mine["queues"].items()},
        "leading": leading,
    }


def account_view(whole: View, account: str, alias: Callable[[str], str]) -> View:
    """The part of ``whole`` an account may see: its own partitions, nodes by alias."""

    def aliases(node_ids: list[str]) -> list[str]:
        return [alias(n) for n in node_ids]

    def maybe(node_id: str | None) -> str | None:
        return None if node_id is None else alias(node_id)

    queues = {
        name: {"uid": q["uid"], "replicas": aliases(q["replicas"]), "isr": aliases(q["isr"]),
               "leader": maybe(q["leader"]), "epoch": q["epoch"],
               "leading_here": q["leading_here"]}
        for name, q in whole["queues"].items() if partition_account(name) == account}
    leading = {
        name: {"queue": r["queue"], "epoch": r["epoch"], "replicas": aliases(r["replicas"]),
               "isr": aliases(r["isr"]), "commit_offset": r["commit_offset"],
               "min_insync": r["min_insync"], "under_replicated": r["under_replicated"],
               "acked": {alias(n): offset for n, offset in r["acked"].items()},
               "connected": aliases(r["connected"])}
        for name, r in whole["leading"].items() if partition_account(name) == account}
    return {"node": alias(whole["node"]), "lease_valid": whole["lease_valid"],
            "nodes": {alias(n): {} for n in whole["nodes"]}, "queues": queues,
            "leading": leading}
