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

# Replicas of one queue in a cluster (ConveyorReplicationFactor, --replication-factor).
REPLICATION_FACTOR_MAX = 7
# Partitions of one queue in a cluster (ConveyorPartitions), each led on its own node.
PARTITIONS_MAX = 16

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
    """One JSON line per request on the "conveyor.audit" logger."""
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

    @property
    def master_key_path(self) -> str:
        return self.master_key_file or os.path.join(self.data_dir, "master.key")
