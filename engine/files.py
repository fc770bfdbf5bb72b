"""Writing the files the engine depends on: every write checked, every directory change
made durable.

Two rules, kept here once so that no caller has to remember them:

- **A write is whole or it raises.** ``os.write`` may write fewer bytes than it was given
  (a disk that fills part-way through returns the count it managed, and only the next
  call fails with ENOSPC). :func:`write_all` carries on from where it stopped, and the
  error of the call that cannot go on (ENOSPC, EDQUOT, EIO ...) is raised naming the
  file. A short file is never fsync'd and renamed into place as if it were complete.
- **A directory entry is durable only once its directory is fsync'd.** Creating,
  renaming or unlinking a file changes its directory, not the file; until the directory
  is fsync'd a power loss may bring back the old entry (a deleted snapshot that
  describes records since cut) or lose the new one (a queue's ``log/``). Every such
  change of a file the engine reads back goes through :func:`fsync_dir` before the
  caller is told it happened.

The segment files' own bytes are written in engine/_segment.pyx (``pwrite_all``, the same
rule in C); engine/log.py fsyncs their directory.
"""

from __future__ import annotations

import contextlib
import errno
import os

Buffer = bytes | bytearray | memoryview

TMP_SUFFIX = ".tmp"


def write_all(fd: int, data: Buffer, path: str) -> None:
    """Write all of data to fd, continuing after short writes; raise OSError (naming path)
    if the operating system refuses the rest."""
    view = memoryview(data).cast("B")
    while view:
        try:
            written = os.write(fd, view)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from exc
        if written <= 0:
            # Never seen from a regular file, but looping on it would spin forever.
            raise OSError(errno.EIO, "write made no progress", path)
        view = view[written:]


def fsync_dir(path: str) -> None:
    """fsync a directory, making the creates, renames and unlinks in it durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, data: Buffer, mode: int = 0o644) -> None:
    """Replace path with data, atomically and durably: write a temporary file in full,
    fsync it, rename it over path, fsync the directory.

    On any failure path is left as it was and the temporary file is removed (a partial
    one would hold on to the very space whose lack failed it).
    """
    tmp = path + TMP_SUFFIX
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            write_all(fd, data, tmp)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def make_dirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, with each directory it created made durable
    (its parent fsync'd)."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    if not missing:
        return
    os.makedirs(path, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(os.path.dirname(created))


def remove(path: str) -> bool:
    """Unlink a file and fsync its directory; False if it did not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(path))
    return True


def rename(source: str, target: str) -> None:
    """Rename a file or directory and fsync the directories of both names."""
    os.rename(source, target)
    source_dir, target_dir = os.path.dirname(source), os.path.dirname(target)
    fsync_dir(target_dir)
    if os.path.abspath(source_dir) != os.path.abspath(target_dir):
        fsync_dir(source_dir)
