"""A follower's install of a snapshot, run in a process of its own so that a test can have
it killed (SIGKILL, engine.install.CRASH_AT) at any step. Arguments: the replica's
directory, the snapshot file to install, its offset, where the log starts over, the epoch
history (JSON), the step to die after ("none": finish), and "1" for the unordered
negative control (engine.install.UNORDERED)."""

from __future__ import annotations

import json
import os
import sys

from engine import install
from replication import frames as fr
from replication.follower import Replica


def main() -> None:
    directory, source, offset, log_from, history, step, unordered = sys.argv[1:]
    install.CRASH_AT = None if step == "none" else step
    install.UNORDERED = unordered == "1"
    replica = Replica("q", 1, directory, "always")
    with open(source, "rb") as f:
        data = f.read()
    incoming = install.Incoming(directory, len(data))
    incoming.write(data)
    entries = tuple((int(e), int(o)) for e, o in json.loads(history))
    replica.install(incoming, fr.Install(1, 1, int(offset), int(log_from), entries))
    replica.close()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
