"""Type stubs for server.protection._shared_buckets (see the .pyx for the behaviour)."""

from typing_extensions import Buffer

SLOT_BYTES: int
PROBES: int

def now_ns() -> int: ...

class SharedBuckets:
    slots: int
    def __init__(self, buffer: Buffer) -> None: ...
    def take(self, key: int, interval_ns: int, burst_ns: int) -> int: ...
