"""The etcd metadata store against a real etcd: the same answers as the SQLite store,
watches that reach another node's cache, and 503s (not hangs) while etcd is down."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import aetcd  # type: ignore[import-untyped]
import pytest

from server.cluster.etcd_metadata import EtcdMetadataStore
from server.errors import DependencyUnavailableError
from server.metadata import QueueRecord, SQLiteMetadataStore
from tests.support.etcd import EtcdServer


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as server:
        yield server


async def _client(etcd: EtcdServer) -> aetcd.Client:
    host, port = etcd.endpoint.split(":")
    client = aetcd.Client(host=host, port=int(port), timeout=2)
    await client.connect()
    return client


async def test_same_answers_as_sqlite(etcd: EtcdServer, tmp_path: Path) -> None:
    client = await _client(etcd)
    store = EtcdMetadataStore(client, b"/same/")
    sqlite = SQLiteMetadataStore(str(tmp_path / "m.sqlite3"))
    rng = random.Random(7)
    names = [f"{p}{i}" for p in ("a", "ab", "b", "B", "a-") for i in range(6)]
    try:
        for step in range(150):
            account = rng.choice(["000000000001", "000000000002"])
            name = rng.choice(names)
            if rng.random() < 0.7:
                record = QueueRecord(account, name, step, step + 1, {"t": str(step)},
                                     {"Policy": "{}"})
                await store.put(record)
                await sqlite.put(record)
            else:
                await store.delete(account, name)
                await sqlite.delete(account, name)
            assert await store.get(account, name) == await sqlite.get(account, name)
        for account in ("000000000001", "000000000002"):
            for prefix in ("", "a", "ab", "B", "z"):
                for after in ("", "a3", "ab5"):
                    assert await store.names(account, prefix, after, 4) == \
                        await sqlite.names(account, prefix, after, 4)
        assert sorted(map(repr, await store.all_records())) == \
            sorted(map(repr, await sqlite.all_records()))
    finally:
        await sqlite.close()
        await client.close()


async def _watching(writer: EtcdMetadataStore, seen: list[tuple[str, str]]) -> None:
    """Return once the watch is open, with ``seen`` empty again.

    A watch sees changes from the revision it opens at, so changes made before then are
    never seen: probes are written until one is, then a last one, whose arrival means
    every earlier event has arrived too (a watch delivers in order).
    """
    deadline = asyncio.get_running_loop().time() + 10
    probes = 0
    while not seen:
        assert asyncio.get_running_loop().time() < deadline, "the watch never opened"
        await writer.put(QueueRecord("000000000001", f"probe{probes}", 1, 1))
        probes += 1
        await asyncio.sleep(0.05)
    await writer.put(QueueRecord("000000000001", "last-probe", 1, 1))
    while seen[-1] != ("000000000001", "last-probe"):
        assert asyncio.get_running_loop().time() < deadline, "the last probe never came"
        await asyncio.sleep(0.02)
    seen.clear()


async def test_a_watch_sees_another_clients_changes(etcd: EtcdServer) -> None:
    writer_client, watcher_client = await _client(etcd), await _client(etcd)
    writer = EtcdMetadataStore(writer_client, b"/watch/")
    watcher = EtcdMetadataStore(watcher_client, b"/watch/")
    seen: list[tuple[str, str]] = []
    task = asyncio.create_task(watcher.watch(lambda a, n: seen.append((a, n)), lambda: None))
    try:
        await _watching(writer, seen)
        await writer.put(QueueRecord("000000000001", "w", 1, 1))
        await writer.delete("000000000001", "w")
        for _ in range(200):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.05)
        assert seen == [("000000000001", "w")] * 2
    finally:
        task.cancel()
        await writer_client.close()
        await watcher_client.close()


async def test_etcd_down_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd") as etcd:
        client = await _client(etcd)
        store = EtcdMetadataStore(client)
        await store.put(QueueRecord("000000000001", "d", 1, 1))
        etcd.stop()
        with pytest.raises(DependencyUnavailableError):
            await asyncio.wait_for(store.get("000000000001", "d"), 10)
        etcd.start()
        # The client reconnects on its own, after a backoff: answers come back.
        for _ in range(100):
            try:
                assert (await store.get("000000000001", "d")) is not None
                break
            except DependencyUnavailableError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the store never answered again after etcd came back")
        await client.close()
