"""Where a follower's log stops agreeing with its leader's, from the epoch histories."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.log import Log
from replication.history import EpochHistory, batch_end, divergence


@pytest.mark.parametrize("leader,leader_end,follower,follower_end,expected", [
    # Same epochs: the shorter log is a prefix.
    ([(5, 0)], 10, [(5, 0)], 7, 7),
    ([(5, 0)], 7, [(5, 0)], 10, 7),
    # The follower holds an old leader's uncommitted tail (epoch 5 past offset 5).
    ([(5, 0), (9, 5)], 12, [(5, 0)], 10, 5),
    # Two leaders the follower never heard of since epoch 5.
    ([(5, 0), (9, 5), (12, 8)], 20, [(5, 0)], 10, 5),
    # The follower was itself a leader (epoch 7) whose writes nobody else has.
    ([(5, 0), (9, 6)], 12, [(5, 0), (7, 6)], 9, 6),
    # Nothing in common: start over.
    ([(9, 0)], 4, [(7, 0)], 3, 0),
    ([(9, 0)], 4, [], 0, 0),
])
def test_divergence(leader: list[tuple[int, int]], leader_end: int,
                    follower: list[tuple[int, int]], follower_end: int, expected: int) -> None:
    assert divergence(leader, leader_end, follower, follower_end) == expected


def test_history_is_read_off_the_batch_headers(tmp_path: Path) -> None:
    with Log(tmp_path / "log", fsync="never") as log:
        for epoch, records in ((3, 2), (3, 1), (8, 4), (11, 1)):
            log.epoch = epoch
            log.append_batch([b"x"] * records, wait=False)
        history = EpochHistory()
        assert history.update(log) == [(3, 0), (8, 3), (11, 7)]
        log.epoch = 11
        log.append_batch([b"y"], wait=False)
        assert history.update(log) == [(3, 0), (8, 3), (11, 7)]
        log.epoch = 12
        log.append_batch([b"z"], wait=False)
        assert history.update(log)[-1] == (12, 9)
        assert batch_end(log.read_raw(0, 1 << 20)) == 10
        # A cut log forgets the epochs past the cut.
        end = log.truncate_after(3)
        history.truncate(end)
        assert history.update(log) == [(3, 0)]
        assert end == 3
