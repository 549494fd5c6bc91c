"""Background work as small named tasks: reap idle/old servers, end idle-in-transaction and timed-out clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from poolkit.obs.log import get_logger
from poolkit.sidecar.policy.pooling import query_timed_out
from poolkit.sidecar.wire.protocol import IDLE

if TYPE_CHECKING:
    from poolkit.sidecar.conn.pool import UpstreamPool

log = get_logger("sidecar")


class MaintenanceTask:
    """One periodic job: ``tick(now)`` runs every ``interval`` seconds on the event loop."""

    name = "maintenance"

    def __init__(self, pool: UpstreamPool, interval: float = 1.0) -> None:
        self.pool = pool
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def tick(self, now: float) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"poolkit-sidecar-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick(time.monotonic())
            except Exception as exc:  # a bug in one tick must not stop future ones
                log.warning("maintenance_failed", task=self.name, error=repr(exc))


class ServerReaper(MaintenanceTask):
    """Closes idle server connections past ``server_idle_timeout`` or ``server_lifetime``."""

    name = "server-reaper"

    def tick(self, now: float) -> None:
        closed = self.pool.close_expired(now)
        if closed:
            log.info("servers_reaped", pool=self.pool.name, closed=closed)


class IdleTransactionReaper(MaintenanceTask):
    """Disconnects clients idle inside a transaction for ``idle_transaction_timeout``.

    Such a client pins one of only ``max_size`` server connections; its transaction is rolled
    back when it goes (see :func:`poolkit.sidecar.policy.pooling.on_client_gone`).
    """

    name = "idle-transaction-reaper"

    def tick(self, now: float) -> None:
        timeout = self.pool.settings.idle_transaction_timeout
        if timeout <= 0:
            return
        for server in list(self.pool.servers):
            client = server.client
            if (
                client is not None
                and server.relay
                and server.scanner.status != IDLE
                and client.pending <= 0
                and now - server.last_ready >= timeout
            ):
                log.warning("idle_transaction_timeout", pool=self.pool.name, client=client.describe(), seconds=timeout)
                client.fatal(
                    "25P03",
                    f"terminating connection due to idle-in-transaction timeout ({timeout:g}s, "
                    "idle_transaction_timeout): the transaction was rolled back",
                )


class QueryTimeoutReaper(MaintenanceTask):
    """Ends a query that ran past ``query_timeout``: its server is closed, its client gets FATAL 57014.

    The server is closed rather than cancelled: the usual cause is an upstream that stopped answering,
    and a CancelRequest would need a new connection to that same unresponsive upstream.
    """

    name = "query-timeout-reaper"

    def tick(self, now: float) -> None:
        timeout = self.pool.settings.query_timeout
        if timeout <= 0:
            return
        for server in list(self.pool.servers):
            client = server.client
            if client is None or not server.relay:
                continue
            started, pending = server.query_started, client.pending
            if not query_timed_out(now=now, query_started=started, pending=pending, timeout=timeout):
                continue
            log.warning(
                "query_timeout",
                pool=self.pool.name,
                client=client.describe(),
                server=server.describe(),
                seconds=round(now - server.query_started, 3),
            )
            self.pool.stats.upstream_errors["timeout"] += 1
            self.pool.close_busy(server, "query timeout")
            client.fatal(
                "57014",
                f"canceling query due to query_timeout ({timeout:g}s): the upstream of pool "
                f"{self.pool.label!r} did not finish it in time and its server connection was closed",
                hint="Raise query_timeout (POOLKIT_SIDECAR_QUERY_TIMEOUT; 0 disables it) if queries may run "
                "this long, or look for a stalled network or an overloaded upstream.",
            )
