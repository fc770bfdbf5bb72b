"""Queue directories that no catalog entry names: set aside, listed, never deleted on a guess.

A broker finds its queues through the catalog (``catalog.sqlite3``). A directory under
``queues/`` that the catalog does not name may be the remains of an interrupted create, or
a whole queue whose catalog entry was lost: a catalog deleted or replaced by an older
copy, or restored without its ``-wal``. Nothing at start can tell the two apart, so such a
directory is moved, untouched, to ``orphaned/`` and the move is logged. ``conveyor orphans``
lists what is there and adopts a directory back (engine/broker.py ``adopt_orphan``), or
discards it on the operator's word.

To adopt a directory the catalog needs the queue's name, uid and attributes. The
attributes are in the queue's own log (its configuration records; the log is their
authority). The uid names the directory. The name is in ``queue.json``, written when the
queue is made (its layout is in docs/FORMAT.md); a queue made before that file existed
needs its name from the operator.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

from engine.errors import EngineError
from engine.files import make_dirs, rename, write_file

_log = logging.getLogger("conveyor.broker")

ORPHANED_DIR = "orphaned"
IDENTITY_FILE = "queue.json"
# A directory a delete renamed after removing its catalog entry: an explicit delete that
# a crash interrupted, finished (removed) when the broker next opens.
DELETED_SUFFIX = ".deleted"
# queue.json is a few dozen bytes; a larger one is not ours.
IDENTITY_BYTES_MAX = 4096
_UID_NAME = re.compile(r"^([0-9a-f]{16})(?:\.\d+)?$")


class OrphanError(EngineError):
    """An orphaned directory cannot be adopted (or found) as asked; nothing was changed."""

    def __init__(self, directory: str, reason: str) -> None:
        super().__init__(f"orphaned directory {directory!r}: {reason}")
        self.directory = directory
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Orphan:
    """One directory under ``orphaned/``."""

    directory: str
    """Its name under orphaned/ (what ``adopt`` and ``discard`` take)."""
    path: str
    uid: int | None
    """The queue's uid, from queue.json or the directory's name; None if neither says."""
    name: str | None
    """The queue's name, from queue.json; None for a queue made before the file existed."""
    size_bytes: int
    has_log: bool


def write_identity(directory: str, name: str, uid: int) -> None:
    """Write queue.json (durably) into a queue's directory."""
    data = json.dumps({"name": name, "uid": uid}, sort_keys=True).encode()
    write_file(os.path.join(directory, IDENTITY_FILE), data)


def read_identity(directory: str) -> tuple[str, int] | None:
    """(name, uid) from a queue directory's queue.json; None if it has none or it is not
    one this module wrote."""
    try:
        with open(os.path.join(directory, IDENTITY_FILE), "rb") as f:
            data = f.read(IDENTITY_BYTES_MAX + 1)
        parsed = json.loads(data)
    except (OSError, ValueError):
        return None
    if (len(data) > IDENTITY_BYTES_MAX or not isinstance(parsed, dict)
            or not isinstance(parsed.get("name"), str)
            or type(parsed.get("uid")) is not int):
        return None
    return parsed["name"], parsed["uid"]


def set_aside(data_dir: str, directory: str, reason: str) -> str:
    """Move a queue directory to orphaned/ (durably); return its name there."""
    root = os.path.join(data_dir, ORPHANED_DIR)
    make_dirs(root)
    base = os.path.basename(directory)
    target, n = base, 0
    while os.path.lexists(os.path.join(root, target)):
        n += 1
        target = f"{base}.{n}"
    rename(directory, os.path.join(root, target))
    _log.warning("queue directory %s moved to %s/%s: %s (`conveyor orphans list` shows it, "
                 "`conveyor orphans adopt` brings it back)", directory, ORPHANED_DIR, target,
                 reason)
    return target


def listing(data_dir: str) -> list[Orphan]:
    """Every directory under orphaned/, by name."""
    root = os.path.join(data_dir, ORPHANED_DIR)
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    return [_describe(root, name) for name in names
            if os.path.isdir(os.path.join(root, name))]


def find(data_dir: str, directory: str) -> Orphan:
    """The orphan named ``directory`` (a plain name under orphaned/)."""
    if (not directory or directory in (".", "..") or os.sep in directory
            or (os.altsep and os.altsep in directory)):
        raise OrphanError(directory, "not a directory name under orphaned/")
    root = os.path.join(data_dir, ORPHANED_DIR)
    if not os.path.isdir(os.path.join(root, directory)):
        raise OrphanError(directory, f"no such directory under {root}")
    return _describe(root, directory)


def _describe(root: str, name: str) -> Orphan:
    path = os.path.join(root, name)
    identity = read_identity(path)
    match = _UID_NAME.match(name)
    uid = identity[1] if identity else int(match.group(1), 16) if match else None
    return Orphan(name, path, uid, identity[0] if identity else None, _size(path),
                  os.path.isdir(os.path.join(path, "log")))


def _size(path: str) -> int:
    total = 0
    for parent, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                continue
    return total
