"""A real small filesystem that fills up: a tmpfs mounted for one test, and ballast files.

tmpfs reports a full disk as ext4 does: a write that finds some room writes what fits and
returns the shorter count, and only the next write fails with ENOSPC. That is the short
write engine/files.py and engine/_segment.pyx must carry on from or refuse.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PAGE_BYTES = 4096


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of size_bytes mounted on path for the duration; unmounted after.

    Skips the test when not root (mounting needs it); a root that cannot mount fails.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (mount -t tmpfs) that can fill up")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs",
                    str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        # A process still holding a file there (a server that failed to die) would make
        # a plain umount fail; detach it instead so the next test starts clean.
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True, capture_output=True)


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(path: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem of path with a ballast file, then leave leave_bytes free."""
    ballast = path / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    chunk = b"\0" * (256 * 1024)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave_bytes))
    finally:
        os.close(fd)
    return ballast


def ballast(path: Path, size_bytes: int) -> Path:
    """A file of size_bytes that takes real space (to be freed later)."""
    with open(path, "wb") as f:
        f.write(b"\1" * size_bytes)
    return path
