"""/v1/cluster on a node whose workers are cluster members of their own: the server's
view, merged from its workers' (server/cluster/view.py)."""

from __future__ import annotations

from typing import Any

from server.cluster.view import member_part, merge_members
from server.workers.ownership import WorkerPlace


def _view(member: str, leading: list[str]) -> dict[str, Any]:
    queues = {name: {"uid": i, "replicas": [], "isr": [], "leader": None, "epoch": None,
                     "leading_here": name in leading}
              for i, name in enumerate(["a/q0", "a/q1", "a/q2"])}
    return {"node": member, "lease_valid": True, "nodes": {member: {}}, "queues": queues,
            "leading": {name: {"queue": name} for name in leading}}


def test_the_server_leads_what_any_worker_leads() -> None:
    place = WorkerPlace(1, 2, "/nonexistent")
    mine = _view("n0/w1", ["a/q1"])
    parts = {0: member_part(_view("n0/w0", ["a/q0"])), 1: member_part(mine)}
    merged = merge_members(mine, parts, place)
    assert merged["node"] == "n0/w1"
    assert set(merged["leading"]) == {"a/q0", "a/q1"}
    assert [n for n, q in merged["queues"].items() if q["leading_here"]] == ["a/q0", "a/q1"]
    assert merged["workers"] == {"n0/w0": {"lease_valid": True, "answered": True},
                                 "n0/w1": {"lease_valid": True, "answered": True}}
    assert merged["lease_valid"] is True
    assert set(member_part(mine)) == {"node", "lease_valid", "leading"}  # not the cluster's


def test_a_worker_that_does_not_answer_is_shown_and_the_lease_not_valid() -> None:
    place = WorkerPlace(0, 3, "/nonexistent")
    mine = _view("n0/w0", ["a/q0"])
    merged = merge_members(mine, {0: member_part(mine)}, place)
    assert merged["workers"]["n0/w1"] == {"lease_valid": False, "answered": False}
    assert merged["workers"]["n0/w2"] == {"lease_valid": False, "answered": False}
    assert merged["lease_valid"] is False
    assert set(merged["leading"]) == {"a/q0"}
