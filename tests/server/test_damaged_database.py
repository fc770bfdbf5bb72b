"""A damaged SQLite database: the server refuses to start and says which and why; the
operator verifies, sets it aside and rebuilds, and every message is there again.

The damage is one flipped bit in a row's value, which SQLite's own checks pass: only the
row checks (engine/sqlite.py) find it. docs/OPERATIONS.md, "A damaged database", is the
procedure these tests follow.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from server.deployment import METADATA_FILE
from tests.support.server import Server


def _conveyor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args],
                          capture_output=True, text=True, timeout=120)


def _flip_in_value(path: Path, marker: bytes) -> bytes:
    """Flip one bit of the byte after ``marker`` in a database file; SQLite's structure
    check still passes (the flip is inside a value). The file's old bytes."""
    raw = path.read_bytes()
    at = raw.index(marker) + len(marker)
    damaged = bytearray(raw)
    damaged[at] ^= 0x01
    path.write_bytes(bytes(damaged))
    with sqlite3.connect(path) as db:
        assert [r[0] for r in db.execute("PRAGMA integrity_check")] == ["ok"]
    return raw


def _fill(server: Server) -> dict[str, str]:
    sqs = server.sqs()
    urls = {}
    for name in ("orders", "invoices"):
        urls[name] = sqs.create_queue(QueueName=name,
                                      Attributes={"VisibilityTimeout": "17"})["QueueUrl"]
        for i in range(5):
            sqs.send_message(QueueUrl=urls[name], MessageBody=f"{name}-{i}")
    return urls


def _bodies(server: Server) -> dict[str, set[str]]:
    sqs = server.sqs()
    found = {}
    for name in ("orders", "invoices"):
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
        bodies: set[str] = set()
        while got := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                         VisibilityTimeout=60).get("Messages", []):
            bodies |= {m["Body"] for m in got}
        found[name] = bodies
    return found


EXPECTED = {name: {f"{name}-{i}" for i in range(5)} for name in ("orders", "invoices")}


@pytest.mark.parametrize("file_name, marker", [
    ("catalog.sqlite3", b'"visibility_timeout": 1'),  # 17 -> 16: a silent change
    (METADATA_FILE, b"invoi"),                         # a queue's name in its record
])
def test_a_damaged_database_stops_the_server_until_it_is_rebuilt(
        tmp_path: Path, file_name: str, marker: bytes) -> None:
    data = tmp_path / "data"
    server = Server(data)
    try:
        _fill(server)
        server.stop()
        original = _flip_in_value(data / file_name, marker)

        with pytest.raises(RuntimeError, match="damaged database") as refused:
            server.start()
        assert file_name in str(refused.value) and "Traceback" not in str(refused.value)

        found = _conveyor("db", "verify", "--data-dir", str(data))
        assert found.returncode == 1, found.stdout + found.stderr
        assert f"DAMAGED: {file_name}" in found.stdout
        assert "ok: access-keys.sqlite3" in found.stdout

        aside = _conveyor("db", "set-aside", file_name, "--data-dir", str(data))
        assert aside.returncode == 0, aside.stderr
        [kept] = (data / "quarantine").glob(f"*/{file_name}")
        damaged = bytearray(original)
        damaged[original.index(marker) + len(marker)] ^= 0x01
        assert kept.read_bytes() == bytes(damaged), "the set-aside file was changed"

        if file_name == METADATA_FILE:
            # The server's start sets aside the queues no record owns.
            server.start()
            server.stop()
        adopted = _conveyor("orphans", "adopt", "--all", "--data-dir", str(data))
        assert adopted.returncode == 0, adopted.stdout + adopted.stderr
        assert adopted.stdout.count("adopted") == 2, adopted.stdout

        server.start()
        assert _bodies(server) == EXPECTED
        sqs = server.sqs()
        url = sqs.get_queue_url(QueueName="orders")["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        assert attributes["Attributes"]["VisibilityTimeout"] == "17"
    finally:
        server.kill()


def test_a_damaged_access_key_row_stops_the_server(tmp_path: Path) -> None:
    """A revocation time is one of the values a flip can hide: the key store is refused
    whole rather than served."""
    data = tmp_path / "data"
    server = Server(data)
    try:
        key = server.create_key("alice")
        revoked = _conveyor("keys", "revoke", key["access_key_id"], "--data-dir", str(data))
        assert revoked.returncode == 0, revoked.stderr
        server.stop()
        _flip_in_value(data / "access-keys.sqlite3", b"alice")
        with pytest.raises(RuntimeError, match=r"damaged database .*access-keys\.sqlite3"):
            server.start()
        found = _conveyor("db", "verify", "--data-dir", str(data), "--json")
        assert found.returncode == 1
        assert '"access-keys.sqlite3": ["a row of table access_keys' in found.stdout
    finally:
        server.kill()


def test_verify_refuses_while_the_server_runs(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")
    try:
        found = _conveyor("db", "verify", "--data-dir", str(tmp_path / "data"))
        assert found.returncode == 2 and "stop the server first" in found.stderr
        aside = _conveyor("db", "set-aside", "catalog.sqlite3", "--data-dir",
                          str(tmp_path / "data"))
        assert aside.returncode == 1 and "stop the server first" in aside.stderr
        assert (tmp_path / "data" / "catalog.sqlite3").exists()
    finally:
        server.kill()
