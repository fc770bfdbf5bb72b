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
from typing import TYPE_CHECKING, Any

from replication.members import MEMBER_SEPARATOR, host_of
from server.partitioned import partition_account

if TYPE_CHECKING:
    from server.workers.ownership import WorkerPlace

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


def member_part(whole: View) -> View:
    """What a worker gives its siblings for the server's view: its own, not the cluster's
    (nodes and queues, which the worker that answers has as well)."""
    return {"node": whole["node"], "lease_valid": whole["lease_valid"],
            "leading": whole["leading"]}


def merge_members(mine: View, parts: dict[int, View], place: WorkerPlace) -> View:
    """The server's view, on a node whose workers are members of their own
    (server/workers/supervisor.py, "In a cluster"): mine, the view of the worker that
    answers (at place), with the parts (member_part) of those of its siblings that
    answered, by index. ``node`` is the worker that answers; ``workers`` lists every
    worker, a silent one (restarting) as not answering and its lease as not valid; what
    the server leads is what any of them leads."""
    server = host_of(mine["node"])
    leading: View = {}
    workers: View = {}
    for index in range(place.count):
        part = parts.get(index)
        if part is None:
            workers[f"{server}{MEMBER_SEPARATOR}w{index}"] = {"lease_valid": False,
                                                               "answered": False}
            continue
        workers[part["node"]] = {"lease_valid": part["lease_valid"], "answered": True}
        leading |= part["leading"]
    return {
        "node": mine["node"],
        "lease_valid": all(w["lease_valid"] for w in workers.values()),
        "workers": workers,
        "nodes": mine["nodes"],
        "queues": {name: q | {"leading_here": name in leading}
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
