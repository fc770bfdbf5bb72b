"""The C allocator's policy in a server process (server/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Threads that allocate at once, in a child process whose allocator the test may change.
# ctypes releases the interpreter lock around a foreign call, so the threads are inside
# malloc together; glibc gives each thread an arena at its first allocation, so without
# the cap there are as many arenas as threads (and the main one). malloc_stats prints one
# "Arena N:" block per arena to stderr.
_CHILD = """
import ctypes, sys, threading
from server import allocator
if sys.argv[1] == "fixed":
    assert allocator.fix_policy()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def churn():
    for _ in range(2000):
        libc.free(libc.malloc(1 << 16))
threads = [threading.Thread(target=churn) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc.malloc_stats()
"""


def _arenas(mode: str, **operator: str) -> int:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(operator)
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_threads_of_a_server_process_share_one_arena() -> None:
    # The control: the same threads without the policy get arenas of their own.
    assert _arenas("default") > 1
    assert _arenas("fixed") == 1
    # An operator's setting of another parameter leaves this one to the policy; theirs of
    # this one stands.
    assert _arenas("fixed", MALLOC_MMAP_THRESHOLD_="1048576") == 1
    assert _arenas("fixed", MALLOC_ARENA_MAX="8") > 1
    assert _arenas("fixed", GLIBC_TUNABLES="glibc.malloc.arena_max=8") > 1
