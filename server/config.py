"""Server settings, and every limit the server enforces, named once.

Limits on messages and queues are the engine's (engine/limits.py, the numbers of Amazon
SQS); these are the limits of the HTTP front end itself. docs/API.md lists them all.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replication.node import ClusterConfig
    from server.workers.ownership import WorkerPlace

# Bytes of one request body. A 1 MiB message can grow in transit (JSON escapes up to six
# bytes per character), and a batch of ten carries up to 1 MiB in all; bodies over this
# are refused with 413 before they are read in full.
REQUEST_BYTES_MAX = 8 * 1024 * 1024
# Bytes of one header line, and of the request line (aiohttp's parser enforces both).
HEADER_BYTES_MAX = 16 * 1024
# Headers in one request.
HEADERS_MAX = 100
# Nesting of a JSON document a client sends (a request body, a Policy, a RedrivePolicy):
# no SQS or native request needs more than six levels. Deeper documents are refused with
# 400 before any code walks them, so nothing recursive ever meets client nesting.
JSON_DEPTH_MAX = 32
# Bytes of one queue attribute the server keeps as given (RedriveAllowPolicy,
# KmsMasterKeyId, DeduplicationScope ...): kept in every cached queue record, so it is
# bounded as SQS's largest attribute, the 8 KiB Policy (server/protection/authz.py), is.
STORED_ATTRIBUTE_BYTES_MAX = 8 * 1024
# Concurrent connections the server serves; a connection beyond it is closed at once
# (the client sees a reset and retries), so a flood cannot exhaust descriptors or memory.
CONNECTIONS_MAX = 4096
# One PurgeQueue per queue in this many seconds, as SQS allows.
PURGE_INTERVAL_S = 60
# Queues one ListQueues (or native list) page returns at most.
LIST_PAGE_MAX = 1000
# Tags per queue; tag key and value lengths.
TAGS_MAX = 50
TAG_KEY_CHARS_MAX = 128
TAG_VALUE_CHARS_MAX = 256
# The longest request the server waits for before giving up on a slow client.
REQUEST_TIMEOUT_S = 60
# How long a graceful shutdown waits for requests in flight (long polls end sooner).
SHUTDOWN_GRACE_S = 25

# Dispatch isolation (server/protection/breaker.py). The metadata store: calls in flight, how long a
# call waits for a slot, how long a call may take; the engine: calls in flight (long polls
# hold one each, so it is as large as the connection limit) and no time limit (a long
# poll is slow on purpose). Either circuit opens after BREAKER_FAILURES failures in a row
# and tries again after BREAKER_RESET_S.
METADATA_CALLS_MAX = 64
METADATA_QUEUE_S = 1.0
METADATA_CALL_S = 2.0
# How long the metadata store's one thread waits for a lock another process holds on its
# file before the call fails (503). Under METADATA_CALL_S: a call the caller gave up on
# must not keep the thread, and every call queued behind it, waiting after.
METADATA_LOCK_WAIT_S = 1.0
BACKEND_CALLS_MAX = CONNECTIONS_MAX
BREAKER_FAILURES = 5
BREAKER_RESET_S = 5.0

# The server's memory bound (--memory-max), as a share of the memory it may have (the
# machine's, or its cgroup's limit if lower) unless given: the rest is for the page cache
# that reads bodies, and the rest of the host. At the bound sends are refused (503
# MemoryFull, Retry-After MEMORY_RETRY_AFTER_S) until consumers drain; see
# docs/OPERATIONS.md, "Memory and backlogs".
MEMORY_MAX_DEFAULT = "50%"
# Of the bound, kept out of the messages' share for the server's working memory above
# what it holds at start: modules and caches loaded by the first requests, request
# buffers, the allocator's slack. Measured: a server's first 30,000 SQS sends grew it
# 3-5 MiB beyond its messages' state.
MEMORY_RESERVE_BYTES = 32 * 1024 * 1024
# Under this the server would refuse sends from the start: a bound must leave room for
# messages above what the process holds when it starts and the reserve.
MEMORY_HEADROOM_MIN = 16 * 1024 * 1024

# Replicas of one queue in a cluster (ConveyorReplicationFactor, --replication-factor).
REPLICATION_FACTOR_MAX = 7
# Partitions of one queue in a cluster (ConveyorPartitions), each led on its own node.
PARTITIONS_MAX = 16
WORKERS_MAX = PARTITIONS_MAX
"""Workers of one server (--workers) at most, so that a queue can have a partition on each."""

DEFAULT_ACCOUNT = "000000000000"
DEFAULT_REGION = "us-east-1"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    data_dir: str = "./conveyor-data"
    host: str = "127.0.0.1"
    port: int = 9324
    fsync: str = "always"
    region: str = DEFAULT_REGION
    account_id: str = DEFAULT_ACCOUNT
    access_log: bool = True
    """One JSON line per request on stdout (server/web/audit.py)."""
    open_queues_max: int = 512
    auth: str = "none"
    """"required": every request proves an access key; "none": all act as account_id."""
    master_key_file: str | None = None
    """None: master.key in the data directory."""
    tls_cert: str | None = None
    tls_key: str | None = None
    principal_rate: str = ""
    """Default rate limit per principal ("100/s:200"); "" for none."""
    queue_rate: str = ""
    """Default rate limit per queue, unless the queue's ConveyorRateLimit overrides it."""
    connections_max: int = CONNECTIONS_MAX
    sse_rotation_s: float = 30 * 24 * 60 * 60
    """Age at which a queue's data key is replaced (0: only by use count)."""
    metrics_token_file: str | None = None
    """The bearer token /metrics requires (server/protection/operator.py); None: /metrics
    is open under --auth none and refused under --auth required."""
    cluster: ClusterConfig | None = None
    """None: a single node. Else this node's place in a cluster coordinated by etcd."""
    memory_max: int | None = None
    """Bytes of resident memory the server may reach by holding queued messages (what it
    holds at start, plus their state); None: no bound (tests, the library)."""
    memory_max_given: bool = True
    """False when memory_max is the default share, which gives way on a small host."""
    workers: int = 1
    """Processes serving the port, each owning some of every queue's partitions
    (server/workers/); 1: one process does all."""
    worker: WorkerPlace | None = None
    """This process's place among the workers; None for the supervisor, or a server of
    one process. A worker's memory_max is its share of the server's."""

    @property
    def master_key_path(self) -> str:
        return self.master_key_file or os.path.join(self.data_dir, "master.key")


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def memory_available() -> int:
    """Bytes of memory this process may have: the machine's, or the lowest limit of the
    cgroups it runs in (a container's, a systemd unit's MemoryMax) if lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in _cgroup_limit_files():
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _cgroup_limit_files() -> list[str]:
    """The memory limit files of this process's cgroup and its ancestors (cgroup v2),
    and of its memory cgroup (v1)."""
    files = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: every level may set memory.max
            parts = [p for p in path.split("/") if p]
            files += [os.path.join("/sys/fs/cgroup", *parts[:n], "memory.max")
                      for n in range(len(parts) + 1)]
        elif "memory" in controllers.split(","):
            files.append(os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"),
                                      "memory.limit_in_bytes"))
    return files or ["/sys/fs/cgroup/memory.max"]


def parse_memory(text: str) -> int:
    """Bytes of a size ("512MiB", "4G", "2147483648") or a share of memory_available()
    ("50%"). Raises ValueError, saying why."""
    value = text.strip().lower()
    if value.endswith("%"):
        number = value[:-1].strip()
        try:
            share = float(number)
        except ValueError:
            raise ValueError(f"{text!r} is not a percentage") from None
        if not 0 < share <= 100:
            raise ValueError(f"{text!r}: a share of memory is over 0% and at most 100%")
        return int(memory_available() * share / 100)
    digits = value.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = value[len(digits):].strip()
    if unit not in _UNITS or not digits:
        raise ValueError(f"{text!r} is not a size (say 512MiB, 4GiB or 50%)")
    try:
        amount = float(digits)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (say 512MiB, 4GiB or 50%)") from None
    if not 0 < amount < 1 << 62:  # also refuses nan and inf
        raise ValueError(f"{text!r}: a size is positive and finite")
    return int(amount * _UNITS[unit])


def resident_bytes() -> int:
    """This process's resident memory now (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def messages_memory_max(memory_max: int, given: bool = True) -> int:
    """What the engine's queued messages may hold (engine/memory.py) under a bound on the
    whole process: the bound less what the process holds now, at start, and less
    MEMORY_RESERVE_BYTES. If that leaves less than MEMORY_HEADROOM_MIN, a bound the
    operator gave is refused (ValueError), and the default (a share of a small host's
    memory) gives way to MEMORY_HEADROOM_MIN."""
    held = resident_bytes()
    room = memory_max - held - MEMORY_RESERVE_BYTES
    if room < MEMORY_HEADROOM_MIN and not given:
        return MEMORY_HEADROOM_MIN
    if room < MEMORY_HEADROOM_MIN:
        raise ValueError(
            f"it leaves {max(room, 0)} bytes for messages above the {held} the server "
            f"holds at start and a reserve of {MEMORY_RESERVE_BYTES}; at least "
            f"{MEMORY_HEADROOM_MIN} are needed")
    return room
