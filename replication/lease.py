"""A node's etcd lease, kept alive by a thread of its own.

The lease is the node's life in the cluster: its node key and every leader key it holds
are attached to it, and etcd deletes them all when it runs out. So its refresh must never
wait behind the node's other work. On the node's event loop it would: thousands of
partitions' links and monitors, a burst of elections or queue creations, a long reconcile
can each hold the loop past the lease's deadline, and the node would then lose every
leadership at once for no fault of its own.

So the keeper runs on its own thread, with its own event loop and its own etcd client
(replication.control.Control, with the same failover between etcd members): nothing on
the node's loop can delay a refresh. Python threads share the interpreter lock, but a
thread waiting for it gets it within the switch interval (5 ms) even from a busy thread,
and the node's blocking work (disk, SQLite, fsync) releases it; only a single call holding
the lock for seconds could starve the keeper, and the engine makes none.

Safety is unchanged: ``valid()`` is true only until LEASE_MARGIN_S before etcd would
expire the lease as of the last refresh that succeeded (measured from before it was
sent), and every acknowledgement checks it. When a refresh finds the lease gone, the
keeper has the node step down everywhere (``lost``, run on the node's loop, awaited) and
only then grants a new lease and registers the node again (``rejoined``): no leadership of
the old lease outlives it on this node, and none is taken under the new one before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from replication.control import Control, NodeInfo
from replication.errors import ControlUnavailableError
from replication.etcd_access import EtcdAccess

_log = logging.getLogger("conveyor.cluster")

# A lease counts as alive until this long before etcd would expire it: the margin covers
# the time a refresh spends in flight.
LEASE_MARGIN_S = 0.5
# After a failed lease refresh, the next try comes this soon.
LEASE_RETRY_S = 0.2
# How long stop() waits for the keeper's thread to revoke the lease and end.
STOP_WAIT_S = 10.0


class LeaseKeeper:
    """See the module docstring. ``start`` and ``stop`` are called on the node's loop;
    ``valid`` and ``lease_id`` may be read from any thread."""

    def __init__(self, access: EtcdAccess, prefix: str, node: NodeInfo, ttl_s: int,
                 lost: Callable[[], Coroutine[Any, Any, None]],
                 rejoined: Callable[[], None]) -> None:
        self._access = access
        self._prefix = prefix
        self._node = node
        self._ttl_s = ttl_s
        self._lost = lost
        self._rejoined = rejoined
        self.deadline = 0.0
        """time.monotonic() until which the lease is alive as far as this node knows."""
        self.lease_id: int | None = None
        self.losses = 0
        """Leases lost so far (for /v1/cluster and tests)."""
        self._lease: Any = None
        self._node_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def valid(self) -> bool:
        return time.monotonic() < self.deadline

    async def start(self) -> None:
        """Grant the lease and register the node (on the keeper's thread), then keep the
        lease alive there until ``stop``. Raises what failed."""
        self._node_loop = asyncio.get_running_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(ready)),
                                        name=f"lease-{self._node.node_id}", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)

    async def stop(self) -> None:
        """Revoke the lease (leadership passes at once, not when it runs out) and end."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop ended already
            loop.call_soon_threadsafe(stopping.set)
        await asyncio.to_thread(thread.join, STOP_WAIT_S)

    # -- on the keeper's thread ---------------------------------------------------------------

    async def _run(self, ready: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        control = Control(self._access, self._prefix)
        try:
            await control.connect()
            await self._join(control)
        except BaseException as exc:
            ready.set_exception(exc)
            await control.close()
            return
        ready.set_result(None)
        try:
            await self._keep(control)
        finally:
            self.deadline = 0.0
            if self._lease is not None:
                with contextlib.suppress(ControlUnavailableError):
                    await control.revoke(self._lease)
            await control.close()

    async def _join(self, control: Control) -> None:
        granted = time.monotonic()  # before the grant: etcd's clock starts no earlier
        lease = await control.grant(self._ttl_s)
        await control.register(self._node, lease)
        self._lease, self.lease_id = lease, int(lease.id)
        self.deadline = granted + self._ttl_s - LEASE_MARGIN_S

    async def _keep(self, control: Control) -> None:
        assert self._stopping is not None
        interval = self._ttl_s / 3
        wait = interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stopping.wait()
                return
            sent = time.monotonic()
            try:
                left = await control.refresh(self._lease)
            except ControlUnavailableError as exc:
                # Again soon, not after a whole interval: the failure may have moved the
                # client to another etcd member, and the lease is running out meanwhile.
                _log.warning("lease refresh failed: %s", exc)
                wait = LEASE_RETRY_S
                continue
            wait = interval
            if left > 0 and time.monotonic() < self.deadline + LEASE_MARGIN_S:
                self.deadline = sent + left - LEASE_MARGIN_S
                continue
            # The lease expired (this process was paused, or etcd unreachable too long):
            # everything it held is another node's now. Start over with a new lease.
            _log.warning("node lease lost; stepping down everywhere and rejoining")
            self.deadline = 0.0
            self.losses += 1
            await self._hand_over()
            try:
                await self._join(control)
            except ControlUnavailableError as exc:
                _log.warning("cannot rejoin the cluster yet: %s", exc)
                wait = LEASE_RETRY_S
                continue
            self._call_node(self._rejoined)

    async def _hand_over(self) -> None:
        """Have the node step down everywhere, on its own loop, and wait until it has."""
        assert self._node_loop is not None
        try:
            done = asyncio.run_coroutine_threadsafe(self._lost(), self._node_loop)
        except RuntimeError:  # the node's loop is closed: nothing is led any more
            return
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(done)

    def _call_node(self, callback: Callable[[], None]) -> None:
        assert self._node_loop is not None
        with contextlib.suppress(RuntimeError):
            self._node_loop.call_soon_threadsafe(callback)
