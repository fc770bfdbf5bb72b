"""Batched transactions of replication/control.py, against a real etcd (its default
--max-txn-ops of 128): changes made together share a few transactions, each keeping its
own compare. Negative control: past etcd's limit, a batch is refused whole."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from replication import control as control_module
from replication.control import Control, Leader, Partition
from replication.errors import ControlUnavailableError
from tests.support.etcd import EtcdServer

PREFIX = "/conveyor/"
CHANGES = 300


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    with EtcdServer(tmp_path / "etcd") as etcd:
        made = Control(etcd.access(), PREFIX)
        await made.connect()
        try:
            yield made
        finally:
            await made.close()


async def _revision(control: Control) -> int:
    return (await control.view()).revision


def _names() -> list[str]:
    return [f"q{i:03d}" for i in range(CHANGES)]


async def test_changes_made_together_share_transactions_each_with_its_own_compare(
        control: Control) -> None:
    start = await _revision(control)
    made = await asyncio.gather(*(control.create_partition(name, i + 1, {}, ["a", "b"], 2)
                                  for i, name in enumerate(_names())))
    assert all(made)
    # A transaction per revision: at most 126 changes each (128 less the widest change's
    # two operations), so 3, and not 300.
    assert 3 <= await _revision(control) - start <= 10
    view = await control.view()
    assert sorted(view.partitions) == _names()

    # Made again, each fails its own compare, and nothing is written.
    start = await _revision(control)
    again = await asyncio.gather(*(control.create_partition(name, 7, {}, ["a"], 1)
                                   for name in _names()))
    assert not any(again) and await _revision(control) == start

    # A third have a leader already: those elections fail, the others succeed, together;
    # each leader's epoch is its key's create revision.
    lease = await control.grant(30)
    led = _names()[::3]
    assert all(await asyncio.gather(*(control.elect(view.partitions[name], "a", lease.id)
                                      for name in led)))
    leaders = await asyncio.gather(*(control.elect(view.partitions[name], "b", lease.id)
                                     for name in _names()))
    assert [name for name, leader in zip(_names(), leaders, strict=True)
            if leader is not None] == [name for name in _names() if name not in led]
    for name, leader in zip(_names()[:20], leaders[:20], strict=True):
        stored = await control.leader(name)
        assert stored is not None
        assert stored.node_id == ("a" if name in led else "b")
        if leader is not None:
            assert stored.epoch == leader.epoch

    # Two changes of one key never share a transaction (etcd would refuse it, and both
    # compares would hold in it): from one reading, the second fails its compare.
    partition = (await control.view()).partitions["q001"]
    epoch = (await control.leader("q001")).epoch  # type: ignore[union-attr]
    first, second = await asyncio.gather(
        control.set_members(partition, epoch, ("a", "b"), ("a",)),
        control.set_members(partition, epoch, ("a", "b"), ("b",)))
    assert first is not None and second is None
    assert (await control.partition("q001")) == first


async def test_negative_control_past_etcds_limit_a_batch_is_refused(
        control: Control, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_module, "TXN_OPS_MAX", 2 * control_module.TXN_OPS_MAX)
    with pytest.raises(ControlUnavailableError, match="too many operations"):
        await asyncio.gather(*(control.create_partition(name, i + 1, {}, ["a"], 1)
                               for i, name in enumerate(_names())))


async def _background_and_elections(control: Control, background: list[str],
                                    elected: list[str]) -> tuple[list[int], list[int]]:
    """Each name of background gets a leader, then its ISR changed in the background, made
    before elections for the names of elected, all together: (the revisions the ISR
    changes were applied at, those of the elections)."""
    await asyncio.gather(*(control.create_partition(name, i + 1, {}, ["a", "b"], 2)
                           for i, name in enumerate(background + elected)))
    view = await control.view()
    lease = await control.grant(30)
    leaders = await asyncio.gather(*(control.elect(view.partitions[name], "a", lease.id)
                                     for name in background))
    view = await control.view()
    changes = [control.set_members(view.partitions[name], leader.epoch, ("a", "b"), ("a",),
                                   background=True)
               for name, leader in zip(background, leaders, strict=True) if leader]
    elections = [control.elect(view.partitions[name], "a", lease.id) for name in elected]
    done = await asyncio.gather(*changes, *elections)
    changed = [p.revision for p in done[:len(background)] if isinstance(p, Partition)]
    won = [leader.epoch for leader in done[len(background):] if isinstance(leader, Leader)]
    assert len(changed) == len(background) and len(won) == len(elected)
    return changed, won


@pytest.mark.parametrize("fifo", [False, True], ids=["background", "negative-control-fifo"])
async def test_elections_go_before_background_changes_made_earlier(
        control: Control, monkeypatch: pytest.MonkeyPatch, fifo: bool) -> None:
    """A node lost: the others change the ISR of every partition they lead, thousands at
    once, while they elect leaders for what it led. The elections go first."""
    if fifo:  # the old rule: every change in the order made
        submit = control_module._Batcher.submit

        async def in_order(self: Any, compares: list[Any], ops: list[Any], *,
                           background: bool = False) -> tuple[bool, int]:
            return await submit(self, compares, ops)

        monkeypatch.setattr(control_module._Batcher, "submit", in_order)
    names = _names()
    changed, won = await _background_and_elections(control, names[:200], names[200:260])
    first = min(changed + won)
    if fifo:
        assert min(won) > first  # behind the first batch of ISR changes
    else:
        assert set(won) == {first}  # all in the first batch
        assert max(changed) > first  # the ISR changes went on after them


async def test_background_changes_are_not_starved(control: Control) -> None:
    """However many other changes wait, each batch keeps room for background ones."""
    names = _names()
    changed, won = await _background_and_elections(control, names[:10], names[10:])
    first = min(changed + won)
    assert set(changed) == {first}
    assert max(won) > first  # 290 elections take more than one batch


def test_partition_records_share_one_copy_of_equal_attributes() -> None:
    """A node's view holds every partition's record: equal attribute sets are one dict,
    and node ids one string each, so the view costs little per queue."""
    def record(uid: int, attributes: dict[str, object], replicas: list[str]) -> bytes:
        return json.dumps({"uid": uid, "attributes": attributes, "rf": 3,
                           "replicas": replicas, "isr": replicas}).encode()

    plain = {"visibility_timeout": 30, "fifo": False}
    a = control_module._partition("a", record(1, plain, ["n0", "n1", "n2"]), 5)
    b = control_module._partition("b", record(2, dict(reversed(plain.items())),
                                              ["".join(["n", "0"]), "n1", "n2"]), 6)
    c = control_module._partition("c", record(3, {**plain, "fifo": True}, ["n0"]), 7)
    assert a.attributes is b.attributes and a.attributes == plain
    assert c.attributes is not a.attributes and c.attributes["fifo"] is True
    assert a.replicas[0] is b.replicas[0] is b.isr[0]
