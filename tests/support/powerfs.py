"""A FUSE file system that loses, on command, everything a power cut would lose.

A process killed with SIGKILL leaves its writes in the page cache, where the next process
finds them: a crash test passes even if nothing is ever fsync'd. On this file system a
power loss keeps only what was synced:

* a file's bytes and size as of its last fsync or fdatasync;
* a directory's entries (names and the inodes they point to) as of that directory's
  last fsync: a create, rename, link or unlink not followed by one is undone.

The backing directory holds, at every moment, exactly that durable state: each file with
the bytes of its last sync, under the names of its directories' last syncs. The current
state is held in memory and served through the mount. ``lose_power`` stops the file
system between two operations (every later one fails with EIO); unmounting and mounting
again over the same backing directory shows what survived. This is what lazyfs does for
file data, extended to directory entries.

The semantics are the strictest POSIX allows; a real file system often keeps more:

* close, rename or a directory's fsync never make a file's bytes durable;
* a rename across directories is a change in each, durable at each one's fsync: after a
  power loss the file may be under both names or under neither;
* hard links survive a power loss as separate files with the same bytes.

Not modelled: symlinks, device nodes, extended attributes, fallocate (all refused), and
writes that a real disk keeps out of order. Locks (flock, fcntl) are left to the kernel.
An open file that has been unlinked reads, writes and syncs as usual, but fstat on it
fails with ESTALE: FUSE's path-based API asks for its attributes by a path it no longer
has (the engine only fstats a segment when it opens it).

Run it as a process of its own, never inside the process that uses the mount: the kernel
holds a system call on the mount until the daemon answers it, and a daemon sharing a
Python interpreter with its caller would wait for a GIL that the caller holds through
that call (Cython code does). :class:`PowerFS` runs and drives it::

    with PowerFS(tmp_path) as fs:
        ...                 # run something on fs.mountpoint
        fs.lose_power()     # from here every operation on the mount fails with EIO
        ...                 # SIGKILL what ran on it
        fs.remount()        # only what was synced is there

As a command: ``python -m tests.support.powerfs BACKING MOUNTPOINT CONTROL_SOCKET``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

# Everything is held in memory twice (current and synced): this bounds one file. A write
# or truncate past it fails with EFBIG. Test data directories stay far below it.
FILE_BYTES_MAX = 256 << 20
# How long mount() waits for the daemon to mount, and a control request for its answer.
MOUNT_TIMEOUT_S = 30.0
CONTROL_TIMEOUT_S = 30.0
# How long unmount() lets the daemon exit on SIGTERM before it is killed.
EXIT_TIMEOUT_S = 10.0
# Directories nest at most this deep in the durable state: a cycle made by renames of
# directories across directories (each durable on its own) is cut at this depth.
DEPTH_MAX = 64

ROOT = Path(__file__).resolve().parents[2]
_log = logging.getLogger("powerfs")
_T = TypeVar("_T")


class Node:
    """An inode: its current state, and the state its last sync made durable."""

    __slots__ = ("data", "dirty_from", "durable_links", "entries", "ino", "is_dir", "mode",
                 "mtime_ns", "synced", "synced_entries", "synced_mode")

    def __init__(self, ino: int, is_dir: bool, mode: int) -> None:
        self.ino = ino
        self.is_dir = is_dir
        self.mode = mode
        self.synced_mode = mode
        self.mtime_ns = time.time_ns()
        self.data = bytearray()
        self.synced = bytearray()
        # The lowest offset changed since the last sync: a sync copies from here on.
        self.dirty_from: int | None = None
        self.entries: dict[str, Node] = {}
        self.synced_entries: dict[str, Node] = {}
        # (directory, name) for each durable entry naming this node, reachable or not.
        self.durable_links: set[tuple[Node, str]] = set()

    def touch(self) -> None:
        self.mtime_ns = time.time_ns()

    def mark_dirty(self, offset: int) -> None:
        self.dirty_from = offset if self.dirty_from is None else min(self.dirty_from, offset)


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Model:
    """The file system's state and operations, path-based as FUSE's high-level API is.

    Not thread-safe: the FUSE adapter calls it under one lock.
    """

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self.root = Node(1, True, 0o755)
        self._next_ino = 2
        self._handles: dict[int, Node] = {}
        self._next_fh = 1
        self.dead = False
        self.counts = {"writes": 0, "bytes_written": 0, "fsyncs": 0, "fsyncdirs": 0,
                       "internal_errors": 0}
        self._load(self.root, backing)

    # -- loading the durable state --------------------------------------------------------

    def _load(self, directory: Node, path: str) -> None:
        by_inode: dict[tuple[int, int], Node] = {}
        self._load_dir(directory, path, by_inode)

    def _load_dir(self, directory: Node, path: str, by_inode: dict[tuple[int, int], Node]
                  ) -> None:
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            st = os.lstat(full)
            key = (st.st_dev, st.st_ino)
            node = by_inode.get(key)
            if node is None:
                if stat.S_ISDIR(st.st_mode):
                    node = self._new_node(True, stat.S_IMODE(st.st_mode))
                    self._load_dir(node, full, by_inode)
                elif stat.S_ISREG(st.st_mode):
                    node = self._new_node(False, stat.S_IMODE(st.st_mode))
                    with open(full, "rb") as f:
                        node.data = bytearray(f.read())
                    node.synced = bytearray(node.data)
                else:
                    raise ValueError(f"{full}: only files and directories are supported")
                node.mtime_ns = st.st_mtime_ns
                by_inode[key] = node
            directory.entries[name] = node
            directory.synced_entries[name] = node
            node.durable_links.add((directory, name))

    def _new_node(self, is_dir: bool, mode: int) -> Node:
        node = Node(self._next_ino, is_dir, mode)
        self._next_ino += 1
        return node

    # -- paths and handles ----------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.dead:
            raise _fail(errno.EIO)

    def _resolve(self, path: str) -> Node:
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if not node.is_dir:
                raise _fail(errno.ENOTDIR)
            child = node.entries.get(part)
            if child is None:
                raise _fail(errno.ENOENT)
            node = child
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._resolve(head)
        if not parent.is_dir:
            raise _fail(errno.ENOTDIR)
        if not name:
            raise _fail(errno.EINVAL)
        return parent, name

    def _handle(self, fh: int) -> Node:
        node = self._handles.get(fh)
        if node is None:
            raise _fail(errno.EBADF)
        return node

    def _node(self, path: str | None, fh: int | None) -> Node:
        if fh is not None and fh in self._handles:
            return self._handles[fh]
        if path is None:
            raise _fail(errno.EBADF)
        return self._resolve(path)

    def _open_handle(self, node: Node) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = node
        return fh

    # -- metadata -------------------------------------------------------------------------

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        self._check_alive()
        node = self._node(path, fh)
        if node.is_dir:
            kind = stat.S_IFDIR
            nlink = 2 + sum(1 for c in node.entries.values() if c.is_dir)
            size = 4096
        else:
            kind = stat.S_IFREG
            nlink = max(1, self._link_count(node))
            size = len(node.data)
        return {"st_mode": kind | node.mode, "st_ino": node.ino, "st_nlink": nlink,
                "st_size": size, "st_blocks": (size + 511) // 512, "st_blksize": 4096,
                "st_uid": os.getuid(), "st_gid": os.getgid(), "st_atime": node.mtime_ns,
                "st_mtime": node.mtime_ns, "st_ctime": node.mtime_ns}

    def _link_count(self, node: Node) -> int:
        # Only the engine's tests use this file system: a walk is cheap at their size.
        return sum(1 for _, child in self._walk_current() if child is node)

    def _walk_current(self) -> Iterator[tuple[Node, Node]]:
        stack = [self.root]
        seen = {id(self.root)}
        while stack:
            directory = stack.pop()
            for child in directory.entries.values():
                yield directory, child
                if child.is_dir and id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)

    def chmod(self, path: str | None, mode: int) -> None:
        self._check_alive()
        node = self._node(path, None)
        node.mode = stat.S_IMODE(mode)
        node.touch()
        if not node.is_dir:
            node.mark_dirty(len(node.data))  # the mode is durable at the next sync

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> None:
        self._check_alive()
        if path is not None:
            node = self._resolve(path)
            node.mtime_ns = times[1] if times else time.time_ns()

    def statfs(self) -> dict[str, int]:
        self._check_alive()
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 24, "f_bfree": 1 << 23,
                "f_bavail": 1 << 23, "f_files": 1 << 20, "f_ffree": 1 << 19, "f_namemax": 255}

    # -- directories ----------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> None:
        self._check_alive()
        parent, name = self._parent(path)
        if name in parent.entries:
            raise _fail(errno.EEXIST)
        parent.entries[name] = self._new_node(True, stat.S_IMODE(mode))
        parent.touch()

    def rmdir(self, path: str) -> None:
        self._check_alive()
        parent, name = self._parent(path)
        node = parent.entries.get(name)
        if node is None:
            raise _fail(errno.ENOENT)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        if node.entries:
            raise _fail(errno.ENOTEMPTY)
        del parent.entries[name]
        parent.touch()

    def unlink(self, path: str) -> None:
        self._check_alive()
        parent, name = self._parent(path)
        node = parent.entries.get(name)
        if node is None:
            raise _fail(errno.ENOENT)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        del parent.entries[name]
        parent.touch()

    def rename(self, old: str, new: str) -> None:
        self._check_alive()
        old_parent, old_name = self._parent(old)
        node = old_parent.entries.get(old_name)
        if node is None:
            raise _fail(errno.ENOENT)
        new_parent, new_name = self._parent(new)
        target = new_parent.entries.get(new_name)
        if target is node:
            return  # POSIX: renaming a file onto itself does nothing
        if node.is_dir and (new + "/").startswith(old.rstrip("/") + "/"):
            raise _fail(errno.EINVAL)
        if target is not None:
            if node.is_dir and not target.is_dir:
                raise _fail(errno.ENOTDIR)
            if target.is_dir and not node.is_dir:
                raise _fail(errno.EISDIR)
            if target.is_dir and target.entries:
                raise _fail(errno.ENOTEMPTY)
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = node
        old_parent.touch()
        new_parent.touch()

    def link(self, new: str, existing: str) -> None:
        self._check_alive()
        node = self._resolve(existing)
        if node.is_dir:
            raise _fail(errno.EPERM)
        parent, name = self._parent(new)
        if name in parent.entries:
            raise _fail(errno.EEXIST)
        parent.entries[name] = node
        parent.touch()

    def opendir(self, path: str) -> int:
        self._check_alive()
        node = self._resolve(path)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        return self._open_handle(node)

    def readdir(self, path: str | None, fh: int | None
                ) -> list[tuple[str, dict[str, int], int]]:
        """Names with their inode numbers: under use_ino an entry without one (0) is
        skipped by readdir(3)."""
        self._check_alive()
        node = self._node(path, fh)
        listing = [(".", node), ("..", node), *node.entries.items()]
        return [(name, {"st_ino": child.ino,
                        "st_mode": stat.S_IFDIR if child.is_dir else stat.S_IFREG}, 0)
                for name, child in listing]

    def release(self, fh: int) -> None:
        # Allowed after a power loss: the kernel releases what its processes close.
        self._handles.pop(fh, None)

    # -- files ----------------------------------------------------------------------------

    def create(self, path: str, mode: int) -> int:
        self._check_alive()
        parent, name = self._parent(path)
        if name in parent.entries:
            raise _fail(errno.EEXIST)
        node = self._new_node(False, stat.S_IMODE(mode))
        parent.entries[name] = node
        parent.touch()
        return self._open_handle(node)

    def open(self, path: str, flags: int) -> int:
        self._check_alive()
        node = self._resolve(path)
        if flags & os.O_TRUNC and not node.is_dir:
            self._truncate(node, 0)
        return self._open_handle(node)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        self._check_alive()
        return bytes(self._handle(fh).data[offset:offset + size])

    def write(self, fh: int, data: bytes, offset: int) -> int:
        self._check_alive()
        node = self._handle(fh)
        if offset + len(data) > FILE_BYTES_MAX:
            raise _fail(errno.EFBIG)
        size = len(node.data)
        if offset > size:
            node.data.extend(bytes(offset - size))
        node.data[offset:offset + len(data)] = data
        node.mark_dirty(min(offset, size))
        node.touch()
        self.counts["writes"] += 1
        self.counts["bytes_written"] += len(data)
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        self._check_alive()
        node = self._node(path, fh)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        if length > FILE_BYTES_MAX:
            raise _fail(errno.EFBIG)
        self._truncate(node, length)

    def _truncate(self, node: Node, length: int) -> None:
        size = len(node.data)
        if length < size:
            del node.data[length:]
        elif length > size:
            node.data.extend(bytes(length - size))
        node.mark_dirty(min(length, size))
        node.touch()

    # -- syncs: the only way into the backing directory -----------------------------------

    def fsync(self, fh: int) -> None:
        self._check_alive()
        node = self._handle(fh)
        if node.is_dir:
            self.fsyncdir(fh)
            return
        self.counts["fsyncs"] += 1
        start = node.dirty_from
        if start is None:
            return
        node.synced[start:] = node.data[start:]
        node.synced_mode = node.mode
        node.dirty_from = None
        for path in self._durable_paths(node):
            self._mirror_file(node, path, start)

    def fsyncdir(self, fh: int) -> None:
        self._check_alive()
        directory = self._handle(fh)
        self.counts["fsyncdirs"] += 1
        old, new = directory.synced_entries, dict(directory.entries)
        removed = [(n, c) for n, c in old.items() if new.get(n) is not c]
        added = [(n, c) for n, c in new.items() if old.get(n) is not c]
        for name, child in removed:
            child.durable_links.discard((directory, name))
        for name, child in added:
            child.durable_links.add((directory, name))
        directory.synced_entries = new
        directory.synced_mode = directory.mode
        for path in self._durable_paths(directory):
            full = self.backing + path
            with contextlib.suppress(OSError):
                os.chmod(full, directory.synced_mode)
            for name, _ in removed:
                _remove(os.path.join(full, name))
            for name, child in added:
                self._materialize(child, f"{path}/{name}", (directory,))

    def _durable_paths(self, node: Node, chain: tuple[Node, ...] = ()) -> list[str]:
        """Every path under which node survives a power loss now ("" for the root)."""
        if node is self.root:
            return [""]
        if len(chain) >= DEPTH_MAX:
            return []
        paths: list[str] = []
        for directory, name in node.durable_links:
            if directory is node or directory in chain:
                continue  # a cycle that renames across directories can leave
            paths.extend(f"{p}/{name}" for p in self._durable_paths(directory,
                                                                     (*chain, node)))
        return sorted(paths)

    def _mirror_file(self, node: Node, path: str, start: int) -> None:
        fd = os.open(self.backing + path, os.O_WRONLY)
        try:
            with memoryview(node.synced) as view:
                os.pwrite(fd, view[start:], start)
            os.ftruncate(fd, len(node.synced))
            os.fchmod(fd, node.synced_mode)
        finally:
            os.close(fd)

    def _materialize(self, node: Node, path: str, ancestors: tuple[Node, ...]) -> None:
        full = self.backing + path
        _remove(full)
        if not node.is_dir:
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, node.synced_mode)
            try:
                os.write(fd, node.synced)
                os.fchmod(fd, node.synced_mode)
            finally:
                os.close(fd)
            return
        os.mkdir(full, node.synced_mode)
        if len(ancestors) >= DEPTH_MAX:
            return
        for name, child in node.synced_entries.items():
            if child is not node and child not in ancestors:
                self._materialize(child, f"{path}/{name}", (*ancestors, node))

    # -- power ----------------------------------------------------------------------------

    def lose_power(self) -> dict[str, int]:
        """Stop: every later operation fails with EIO. Returns what the loss dropped."""
        lost_files = lost_bytes = lost_entries = 0
        seen: set[int] = set()
        nodes = [child for _, child in self._walk_current()]
        nodes += [self.root, *self._handles.values()]
        for node in nodes:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.is_dir:
                current, synced = node.entries, node.synced_entries
                lost_entries += sum(1 for n in current.keys() | synced.keys()
                                    if current.get(n) is not synced.get(n))
            elif node.dirty_from is not None:
                lost_files += 1
                lost_bytes += max(len(node.data), len(node.synced)) - node.dirty_from
        self.dead = True
        return {"files_with_unsynced_data": lost_files, "unsynced_bytes": lost_bytes,
                "unsynced_entries": lost_entries}


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --- the daemon -----------------------------------------------------------------------


def _serve(model: Model, mountpoint: str, control: str) -> None:
    import mfusepy  # only the daemon needs libfuse

    lock = threading.Lock()

    def locked(fn: Callable[..., _T]) -> Callable[..., _T]:
        def call(*args: Any) -> _T:
            with lock:
                try:
                    return fn(*args)
                except OSError:
                    raise
                except Exception:
                    # A bug here would surface as EINVAL in the caller, far from its cause.
                    model.counts["internal_errors"] += 1
                    _log.exception("powerfs: %s%r failed", fn.__name__, args)
                    raise
        call.__name__ = fn.__name__
        return call

    class Operations(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        @locked
        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
            return model.getattr(path, fh)

        @locked
        def chmod(self, path: str | None, mode: int) -> int:
            model.chmod(path, mode)
            return 0

        @locked
        def chown(self, path: str | None, uid: int, gid: int) -> int:
            model._check_alive()
            return 0

        @locked
        def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
            model.utimens(path, times)
            return 0

        @locked
        def statfs(self, path: str) -> dict[str, int]:
            return model.statfs()

        @locked
        def mkdir(self, path: str, mode: int) -> int:
            model.mkdir(path, mode)
            return 0

        @locked
        def rmdir(self, path: str) -> int:
            model.rmdir(path)
            return 0

        @locked
        def unlink(self, path: str) -> int:
            model.unlink(path)
            return 0

        @locked
        def rename(self, old: str, new: str) -> int:
            model.rename(old, new)
            return 0

        @locked
        def link(self, target: str, source: str) -> int:
            model.link(target, source)
            return 0

        @locked
        def opendir(self, path: str) -> int:
            return model.opendir(path)

        @locked
        def readdir(self, path: str | None, fh: int
                    ) -> list[tuple[str, dict[str, int], int]]:
            return model.readdir(path, fh)

        @locked
        def releasedir(self, path: str | None, fh: int) -> int:
            model.release(fh)
            return 0

        @locked
        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            model.fsyncdir(fh)
            return 0

        @locked
        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return model.create(path, mode)

        @locked
        def open(self, path: str, flags: int) -> int:
            return model.open(path, flags)

        @locked
        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            return model.read(fh, size, offset)

        @locked
        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            return model.write(fh, data, offset)

        @locked
        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            model.truncate(path, length, fh)
            return 0

        @locked
        def flush(self, path: str | None, fh: int) -> int:
            model._check_alive()
            return 0

        @locked
        def release(self, path: str | None, fh: int) -> int:
            model.release(fh)
            return 0

        @locked
        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            model.fsync(fh)
            return 0

    class Fuse(mfusepy.FUSE):  # type: ignore[misc]
        # mfusepy drops the file handle of an ftruncate, which an unlinked file needs.
        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            result: int = self.operations.truncate(
                None if path is None else path.decode(self.encoding, self.errors), length, fh)
            return result

        # ...and the flags of a rename: RENAME_NOREPLACE or RENAME_EXCHANGE must not pass
        # for a plain rename.
        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            if flags:
                raise mfusepy.FuseOSError(errno.EINVAL)
            result: int = self.rename_fuse_2(old, new)
            return result

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        with lock:
            if request.get("op") == "lose-power":
                if model.dead:
                    return {"error": "the power is already lost"}
                return {"lost": model.lose_power(), **model.counts}
            if request.get("op") == "stats":
                return {"dead": model.dead, **model.counts}
        return {"error": f"unknown request {request!r}"}

    def control_loop(server: socket.socket) -> None:
        while True:
            connection, _ = server.accept()
            with connection, connection.makefile("rwb") as stream:
                line = stream.readline()
                try:
                    reply = answer(json.loads(line))
                except ValueError as exc:
                    reply = {"error": str(exc)}
                stream.write(json.dumps(reply).encode() + b"\n")
                stream.flush()

    server = socket.socket(socket.AF_UNIX)
    server.bind(control)
    server.listen()
    threading.Thread(target=control_loop, args=(server,), daemon=True).start()
    # One thread: every operation takes the lock anyway, and it keeps the order of
    # operations the order in which the kernel sent them. hard_remove: an unlinked open file
    # stays an inode with no name, instead of a hidden ".fuse_hidden" name that a directory
    # fsync would make durable.
    Fuse(Operations(), mountpoint, foreground=True, nothreads=True, fsname="powerfs",
         use_ino=True, hard_remove=True)


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if sys.platform == "linux":
        # A test killed before it could unmount must not leave the mount behind: SIGTERM
        # when the parent dies makes libfuse unmount and exit.
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    backing, mountpoint, control = argv
    _serve(Model(os.path.abspath(backing)), mountpoint, control)


# --- the test side --------------------------------------------------------------------


def sync_dir(path: os.PathLike[str] | str) -> None:
    """fsync a directory: its entries as they are now survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: os.PathLike[str] | str) -> None:
    """fsync every directory under path and path itself: what an operator's sync(1)
    would do for the entries (not for the files' bytes)."""
    for directory, _, _ in os.walk(path, topdown=False):
        sync_dir(directory)


def fuse_unavailable() -> str | None:
    """Why this machine cannot mount a PowerFS, or None if it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    return None


class PowerFS:
    """A PowerFS daemon over ``root/backing``, mounted at ``root/mnt``.

    Owned by one thread (the test's). ``mount`` and ``remount`` raise if the daemon
    fails to mount; ``unmount`` raises if the daemon hit a bug of its own meanwhile.
    """

    def __init__(self, root: Path) -> None:
        self.backing = root / "backing"
        self.mountpoint = root / "mnt"
        self.log = root / "powerfs.log"
        # A Unix socket's path is limited to 108 bytes, which pytest's tmp_path can pass.
        self._control_dir = tempfile.mkdtemp(prefix="powerfs-")
        self.control = os.path.join(self._control_dir, "control")
        self.process: subprocess.Popen[bytes] | None = None
        self.mounts = 0
        self.power_losses = 0

    def __enter__(self) -> PowerFS:
        self.mount()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.unmount(check=exc is None)
        finally:
            shutil.rmtree(self._control_dir, ignore_errors=True)

    def mount(self) -> None:
        assert self.process is None, "already mounted"
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        # mfusepy takes libfuse 2 when it finds it first; ours is 3 (Debian's fuse3).
        env.setdefault("FUSE_LIBRARY_NAME", "fuse3")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.support.powerfs", str(self.backing),
                 str(self.mountpoint), self.control],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not (os.path.ismount(self.mountpoint) and os.path.exists(self.control)):
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"powerfs exited before it mounted: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.unmount(check=False)
                raise RuntimeError(f"powerfs did not mount in time: {self._log_tail()}")
            time.sleep(0.02)
        self.mounts += 1

    def request(self, op: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(CONTROL_TIMEOUT_S)
            sock.connect(self.control)
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            with sock.makefile("rb") as stream:
                reply: dict[str, Any] = json.loads(stream.readline())
        if "error" in reply:
            raise RuntimeError(f"powerfs: {reply['error']}")
        return reply

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    def lose_power(self) -> dict[str, int]:
        """Cut the power now: what was not synced is gone, and every operation on the
        mount fails with EIO until ``remount``. Returns what was dropped."""
        reply = self.request("lose-power")
        self.power_losses += 1
        self._check(reply)
        lost: dict[str, int] = reply["lost"]
        return lost

    def unmount(self, check: bool = True) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        stats = None
        if check and process.poll() is None:
            stats = self.stats()
        # Lazy: processes may still hold files open on it (they fail from here on).
        command = (["umount", "-l"] if os.geteuid() == 0 else ["fusermount3", "-u", "-z"])
        subprocess.run([*command, str(self.mountpoint)], capture_output=True, check=False)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if stats is not None:
            self._check(stats)

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def _check(self, stats: dict[str, Any]) -> None:
        if stats["internal_errors"]:
            raise RuntimeError(f"powerfs failed {stats['internal_errors']} operations of its "
                               f"own: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return "(no log)"


if __name__ == "__main__":
    main(sys.argv[1:])
