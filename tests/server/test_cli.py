"""The `conveyor` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import Broker, Log, ManualClock, format


def conveyor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args],
                          capture_output=True, text=True, timeout=60)


def make_log(path: Path) -> None:
    with Log(path, fsync="never", segment_bytes_max=4096) as log:
        for i in range(100):
            log.append_batch([b"%d" % i, b"." * 50])


def test_version() -> None:
    done = conveyor("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("conveyor, version ")


def test_log_info_as_json(tmp_path: Path) -> None:
    make_log(tmp_path)
    done = conveyor("log", "info", "--json", str(tmp_path))
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert (info["first_offset"], info["next_offset"], info["records"]) == (0, 200, 200)
    assert info["segments"] > 1


def _flip(path: Path, position: int) -> bytes:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))
    return bytes(data)


def test_log_verify_passes_then_names_the_damage(tmp_path: Path) -> None:
    make_log(tmp_path)
    done = conveyor("log", "verify", "-q", str(tmp_path))
    assert (done.returncode, done.stdout.strip()) == (
        0, f"ok: {tmp_path}: 200 records verified")
    first = tmp_path / format.segment_file_name(0)
    damaged_bytes = _flip(first, 100)
    damaged = conveyor("log", "verify", "-q", str(tmp_path))
    assert damaged.returncode == 1
    assert "corrupt segment" in damaged.stderr and str(first) in damaged.stderr
    assert "bytes 0..107 (records 0..1 lost): checksum mismatch" in damaged.stderr
    report = json.loads(conveyor("log", "verify", "--json", str(tmp_path)).stdout)
    [found] = report["logs"][0]["damage"]
    assert (found["path"], found["start"], found["first_offset"]) == (str(first), 0, 0)
    assert first.read_bytes() == damaged_bytes  # verifying changes nothing


def test_log_salvage_keeps_every_valid_record_and_the_original(tmp_path: Path) -> None:
    make_log(tmp_path)
    with Log(tmp_path, fsync="never") as log:
        before = log.read(0, 1000).tolist()
    middle = sorted(tmp_path.glob(f"*{format.LOG_SUFFIX}"))[1]
    damaged_bytes = _flip(middle, 60)
    done = conveyor("log", "salvage", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "hole: offsets" in done.stdout and "originals kept in" in done.stdout
    [quarantine] = (tmp_path / "quarantine").iterdir()
    assert (quarantine / middle.name).read_bytes() == damaged_bytes
    report = json.loads((quarantine / "report.json").read_text())
    [(first, end)] = report["holes"]
    with Log(tmp_path, fsync="never") as log:
        after = log.read(0, 1000).tolist()
    assert [o for o, _ in after] == [o for o, _ in before]
    assert all(r == (b"" if first <= o < end else before[o][1]) for o, r in after)
    assert conveyor("log", "verify", "-q", str(tmp_path)).returncode == 0
    again = conveyor("log", "salvage", str(tmp_path))
    assert (again.returncode, again.stdout.startswith("nothing to salvage")) == (0, True)


def test_salvage_and_verify_refuse_a_log_held_open(tmp_path: Path) -> None:
    make_log(tmp_path)
    damaged_bytes = _flip(tmp_path / format.segment_file_name(0), 2000)
    # The damage is in a sealed segment whose index is intact: the log opens.
    with Log(tmp_path, fsync="never", segment_bytes_max=4096):
        for command in ("salvage", "verify"):
            done = conveyor("log", command, str(tmp_path))
            assert done.returncode == 2, (command, done.stderr)
            assert "in use" in done.stderr
    assert (tmp_path / format.segment_file_name(0)).read_bytes() == damaged_bytes
    assert not (tmp_path / "quarantine").exists()


def test_salvage_a_data_directory(tmp_path: Path) -> None:
    clock = ManualClock()
    data = tmp_path / "data"
    with Broker(data, fsync="never", clock=clock, segment_bytes_max=1024) as broker:
        damaged_queue = broker.create_queue("damaged")
        for i in range(40):
            damaged_queue.send(b"message %d" % i)
        broker.create_queue("fine").send(b"untouched")
        uid = broker.catalog.get("damaged").uid
    queue_dir = data / "queues" / f"{uid:016x}"
    segment = sorted((queue_dir / "log").glob(f"*{format.LOG_SUFFIX}"))[1]
    _flip(segment, 200)

    found = conveyor("log", "verify", "-q", str(data))
    assert found.returncode == 1
    assert "DAMAGED: queue 'damaged'" in found.stdout and "ok: queue 'fine'" in found.stdout
    with Broker(data, fsync="never", clock=clock):
        held = conveyor("log", "salvage", str(data))
        assert held.returncode == 2 and "in use" in held.stderr
    done = conveyor("log", "salvage", str(queue_dir))
    assert done.returncode == 0, done.stderr
    assert "expired 1 messages" in done.stdout
    assert (queue_dir / "quarantine").is_dir()
    with Broker(data, fsync="never", clock=clock) as broker:
        bodies = [m.body for m in broker.get_queue("damaged").receive(max_messages=10)]
        while batch := broker.get_queue("damaged").receive(max_messages=10):
            bodies += [m.body for m in batch]
        assert len(bodies) == 39 and len(set(bodies)) == 39
        assert set(bodies) < {b"message %d" % i for i in range(40)}
        assert [m.body for m in broker.get_queue("fine").receive()] == [b"untouched"]


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    done = conveyor("log", "info", os.path.join(tmp_path, "absent"))
    assert done.returncode == 2
    assert "is not a directory" in done.stderr


def test_serve_raises_its_open_files_limit_to_the_hard_limit(tmp_path: Path) -> None:
    """A server started with a low soft limit of open files (the usual 1,024, here 256)
    runs with its hard limit: every open queue log and connection holds a descriptor."""
    import resource

    from tests.support.server import Server

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit here is {hard}: nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the child inherits it
    try:
        server = Server(tmp_path / "data")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert server.process is not None
        with open(f"/proc/{server.process.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
        limit_soft, limit_hard = line.split()[3:5]
        assert limit_soft == limit_hard and int(limit_soft) > 256, line
    finally:
        server.stop()


@pytest.mark.parametrize(("value", "says"), [
    ("12XB", "is not a size"), ("0", "a size is positive"), ("150%", "at most 100%"),
    ("-5MiB", "a size is positive"), ("1e400MiB", "finite"), ("nan%", "over 0%"),
    ("abc%", "is not a percentage"),
])
def test_serve_refuses_a_memory_bound_it_cannot_read(tmp_path: Path, value: str,
                                                     says: str) -> None:
    result = conveyor("serve", "--data-dir", str(tmp_path / "data"), "--port", "0",
                      "--memory-max", value)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()


def test_serve_refuses_a_memory_bound_below_what_it_needs(tmp_path: Path) -> None:
    """A bound under what the server holds at start (and its reserve) would refuse every
    send: the server says so and does not start."""
    result = conveyor("serve", "--data-dir", str(tmp_path / "data"), "--port", "0",
                      "--memory-max", "40MiB")
    assert result.returncode == 1, result.stderr
    assert "--memory-max" in result.stderr and "at least" in result.stderr, result.stderr
