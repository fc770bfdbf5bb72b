"""The C allocator's policy in a server process: large buffers are given back when freed.

glibc serves a request of at least its mmap threshold from a mapping of its own, which
goes back to the kernel when freed; smaller ones come from the heap, whose free top is
returned only past the trim threshold. Both thresholds start at 128 KiB, but glibc raises
them whenever a mapped block is freed: the mmap threshold to that block's size (up to 32
MiB), the trim threshold to twice it. A server passes large transient buffers all the
time (a request body, its parsed text, the JSON of an answer of ten 1 MiB messages), so
after the first such answer every buffer below 10 MiB comes from the heap, and up to 20
MiB of its freed top is kept. Measured with remembered FIFO receive answers of 10 MiB
(tests/server/web/test_client_memory.py), the process kept 20-30 MiB of freed buffers
over the answers it held.

Fixed thresholds stop the raising: buffers of MMAP_THRESHOLD and more are mapped, and
given back when freed; the heap is trimmed once TRIM_THRESHOLD of its top is free. Not
lower: with a 256 KiB mmap threshold each 256 KiB SendMessage paid the page faults of a
fresh mapping for its body, and its server CPU doubled.

One arena. glibc gives each thread an arena of its own at its first allocation (up to
eight per core), and a buffer freed in one arena is reused only by the threads of that
arena. The server's threads pass large buffers too (a snapshot in the thread that takes
it, a log batch in the writer's): with sixteen connections sending 1 MiB bodies for 180 s,
twelve arenas besides the main heap held 49 MiB between them and the process grew from
128 to 171 MiB, against 120-135 MiB with one arena (docs/PERFORMANCE.md). Python
allocates under its interpreter lock, so the threads rarely contend for the one arena's
lock.

Only the server's process sets this (``server.web.listener``); the engine, a library,
leaves the allocator of the program it is in alone.
"""

from __future__ import annotations

import ctypes
import logging
import os

_log = logging.getLogger("conveyor.server")

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 8 * 1024 * 1024
ARENAS_MAX = 1
# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# What the server sets, each unless the operator's environment sets it already (theirs
# stands, the others still apply): mallopt's parameter, the value, and the environment
# variable and GLIBC_TUNABLES name of the same setting.
_POLICY = (
    (_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    (_M_ARENA_MAX, ARENAS_MAX, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
)


def fix_policy() -> bool:
    """Fix glibc's thresholds and arena count, each unless the environment sets it; False
    on another C library (nothing changed), or if glibc refused a setting."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: its own policy stands
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    done = True
    for parameter, value, variable, tunable in _POLICY:
        if variable in os.environ or tunable in tunables:
            continue
        done = mallopt(parameter, value) == 1 and done
    if not done:
        _log.warning("the C allocator refused a fixed threshold or one arena; large freed "
                     "buffers may stay in the process")
    return done
