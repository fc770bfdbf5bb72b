"""Every acknowledged send follows a sync of the file that holds it.

A crash test with SIGKILL cannot see a missing fsync (the page cache survives the kill),
and the power-loss tests (test_power_loss.py) need FUSE. This one needs neither: a spy
wraps os.fdatasync and os.fsync, and records, when each call returns, how many bytes of
which file (device, inode) it has made durable. Threads send with fsync="always"; the
moment a send returns, the spy's record is copied, and the body's bytes are then looked
up in the queue's segment file: they must lie within what a sync had covered before the
acknowledgement.

The negative control runs the same check with fsync="never" and must find acknowledgements
that no sync covered.

The Cython segment syncs with its own fdatasync (on a roll, on recovery, on close), which
no Python spy sees: the segments here are big enough never to roll, so every sync that can
release a waiter is the group commit's os.fdatasync.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import Broker, SendEntry

THREADS = 3
SENDS_PER_THREAD = 60
SEGMENT_BYTES = 8 << 20  # never reached: no roll, so no sync the spy cannot see


class SyncSpy:
    """Wraps os.fdatasync and os.fsync; ``durable()`` is what they had covered so far."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._lock = threading.Lock()
        self._covered: dict[tuple[int, int], int] = {}
        self.calls = 0
        for name in ("fdatasync", "fsync"):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real: Callable[[int], None]) -> Callable[[int], None]:
        def spy(fd: int) -> None:
            st = os.fstat(fd)
            # Bytes written before this point are covered once the call returns; bytes
            # written while it runs may or may not be, so they are not counted.
            size = st.st_size
            real(fd)
            with self._lock:
                key = (st.st_dev, st.st_ino)
                self._covered[key] = max(self._covered.get(key, 0), size)
                self.calls += 1
        return spy

    def durable(self) -> dict[tuple[int, int], int]:
        with self._lock:
            return dict(self._covered)


def _locate(log_dir: Path, body: bytes) -> tuple[tuple[int, int], int] | None:
    """The file (device, inode) holding body, and the offset just past it; None if no
    segment file holds it yet (it is still in the segment's buffer)."""
    for path in sorted(log_dir.glob("*.log")):
        data = path.read_bytes()
        at = data.find(body)
        if at >= 0:
            st = path.stat()
            return (st.st_dev, st.st_ino), at + len(body)
    return None


def _unsynced_acknowledgements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               fsync: str) -> tuple[list[str], int, SyncSpy]:
    spy = SyncSpy(monkeypatch)
    violations: list[str] = []
    acks = 0
    lock = threading.Lock()
    with Broker(tmp_path / "data", fsync=fsync, segment_bytes_max=SEGMENT_BYTES) as broker:
        queue = broker.create_queue("spied")
        log_dir = Path(broker.queue_dir("spied")) / "log"

        def send(thread: int) -> None:
            nonlocal acks
            for n in range(SENDS_PER_THREAD):
                # Unique, so that find() cannot stop at another message's bytes.
                bodies = [b"spy-%d-%04d-%d|" % (thread, n, i) for i in range(n % 3 + 1)]
                if len(bodies) == 1:
                    queue.send(bodies[0])
                else:
                    queue.send_batch([SendEntry(b) for b in bodies])
                durable = spy.durable()  # as of the acknowledgement
                for body in bodies:
                    found = _locate(log_dir, body)
                    if found is None:
                        problem = f"{body.decode()} was not even written at its acknowledgement"
                    elif durable.get(found[0], 0) < found[1]:
                        problem = (f"{body.decode()} ends at byte {found[1]} of its segment, "
                                   f"synced to {durable.get(found[0], 0)} at its "
                                   f"acknowledgement")
                    else:
                        continue
                    with lock:
                        violations.append(problem)
                with lock:
                    acks += len(bodies)

        threads = [threading.Thread(target=send, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        rolled = len(list(log_dir.glob("*.log"))) > 1
        assert not rolled, "a segment rolled: the spy cannot see the sync of a roll"
    return violations, acks, spy


@pytest.fixture
def spied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Callable[[str], tuple[list[str], int, SyncSpy]]]:
    yield lambda fsync: _unsynced_acknowledgements(tmp_path, monkeypatch, fsync)


def test_every_acknowledged_send_follows_a_sync_of_its_file(
        spied: Callable[[str], tuple[list[str], int, SyncSpy]]) -> None:
    violations, acks, spy = spied("always")
    assert acks == THREADS * sum(n % 3 + 1 for n in range(SENDS_PER_THREAD))
    assert not violations, f"{len(violations)} of {acks} acknowledgements came before a " \
                           f"sync of their bytes, e.g. {violations[:5]}"
    # Group commit: one sync may cover several threads' sends, but there must be syncs.
    assert spy.calls >= 10, spy.calls


def test_the_spy_catches_acknowledgements_without_a_sync(
        spied: Callable[[str], tuple[list[str], int, SyncSpy]]) -> None:
    violations, acks, _ = spied("never")
    print(f"fsync=never: {len(violations)} of {acks} acknowledgements unsynced, e.g. "
          f"{violations[:2]}")
    assert len(violations) > acks // 2
