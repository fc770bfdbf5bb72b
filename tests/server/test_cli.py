"""The `conveyor` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine import Log, format


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


def test_log_verify_passes_then_names_the_damage(tmp_path: Path) -> None:
    make_log(tmp_path)
    done = conveyor("log", "verify", str(tmp_path))
    assert (done.returncode, done.stdout.strip()) == (0, "ok: 200 records verified")
    first = tmp_path / format.segment_file_name(0)
    data = bytearray(first.read_bytes())
    data[100] ^= 0x10
    first.write_bytes(bytes(data))
    damaged = conveyor("log", "verify", str(tmp_path))
    assert damaged.returncode == 1
    assert "corrupt segment" in damaged.stderr and str(first) in damaged.stderr


def test_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    done = conveyor("log", "info", os.path.join(tmp_path, "absent"))
    assert done.returncode == 2
    assert "is not a directory" in done.stderr
