"""Server settings, and every limit the server enforces, named once.

Limits on messages and queues are the engine's (engine/limits.py, the numbers of Amazon
SQS); these are the limits of the HTTP front end itself. docs/API.md lists them all.
"""

from __future__ import annotations

import dataclasses

# Bytes of one request body. A 1 MiB message can grow in transit (JSON escapes up to six
# bytes per character), and a batch of ten carries up to 1 MiB in all; bodies over this
# are refused with 413 before they are read in full.
REQUEST_BYTES_MAX = 8 * 1024 * 1024
# Bytes of one header line, and of the request line (aiohttp's parser enforces both).
HEADER_BYTES_MAX = 16 * 1024
# Headers in one request.
HEADERS_MAX = 100
# Concurrent connections the server accepts; more wait in the listen backlog.
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
