"""Cancel requests: the keys clients were given, and forwarding a CancelRequest to the backend it is meant for.

The pool keeps a server that a cancel is on its way to from serving anyone else (``UpstreamPool.cancel_started``
/ ``cancel_done``); a pipelined request that another client's cancel may have hit is re-sent (``ServerPipeline.split``
decides, its server connection carries it out).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from poolkit.obs.log import get_logger
from poolkit.sidecar.policy.pooling import forward_cancel
from poolkit.sidecar.wire import protocol

if TYPE_CHECKING:
    from poolkit.sidecar.conn.client import ClientConnection
    from poolkit.sidecar.conn.pool import UpstreamPool
    from poolkit.sidecar.conn.server import ServerConnection
    from poolkit.sidecar.policy.config import SidecarSettings

log = get_logger("sidecar")
_CANCEL_TIMEOUT = 10.0
# The process ids the sidecar gives clients lie above Linux's largest possible pid_max (PID_MAX_LIMIT,
# 2**22): no real backend can have one, so pg_terminate_backend(<the pid a client was told>) (a common
# pattern in tests) fails instead of killing whichever backend happens to have that pid.
_PID_FLOOR = 1 << 22
_PID_CEILING = 0x7FFFFFFF


class CancelHost(Protocol):
    """What cancel handling uses of the sidecar (app.Sidecar): its settings, its pool's name, its tasks."""

    @property
    def settings(self) -> SidecarSettings: ...
    @property
    def pool(self) -> UpstreamPool: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...


class Cancels:
    """The cancel keys of logged-in clients (``keys``: process id -> client) and the cancels being forwarded."""

    def __init__(self, host: CancelHost) -> None:
        self.host = host
        self.keys: dict[int, ClientConnection] = {}  # the process id a client was given -> it

    def forget(self, client: ClientConnection) -> None:
        """``client`` is gone: its key cancels nothing any more."""
        if self.keys.get(client.process_id) is client:
            del self.keys[client.process_id]

    def next_process_id(self) -> int:
        """A new connection's number, from its first byte (logs, SHOW CLIENTS, its BackendKeyData).

        Random, as PgBouncer's are, so one client's key says nothing about another's, and never a real pid.
        """
        keys = self.keys
        while True:
            pid = _PID_FLOOR + 1 + secrets.randbelow(_PID_CEILING - _PID_FLOOR)
            if pid not in keys:
                return pid

    def register_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        """``client``'s BackendKeyData: its process id, unique among logged-in clients, and 32 random secret bits."""
        if client.process_id in self.keys:
            # Drawn twice among the connections open since it was drawn (about 1 in 2**31 per pair).
            client.process_id = self.next_process_id()
        self.keys[client.process_id] = client
        return client.process_id, int.from_bytes(secrets.token_bytes(4), "big", signed=True)

    def cancel(self, process_id: int, secret_key: int, requester: asyncio.BaseTransport | None = None) -> None:
        """A CancelRequest: forward it to the backend now running that client's query.

        ``requester`` (the connection the request came on) is closed once forwarding is over: a
        client that waits for that close knows its cancel can no longer reach anyone's query.
        """
        client = self.keys.get(process_id)
        if client is not None and client.secret_key != secret_key:
            client = None  # a wrong secret is no cancel at all (PostgreSQL only logs it)
        server = client.server if client is not None else None
        if client is not None and server is not None and server.backend_pid:
            if server.pipeline.active and server.client is not client and client.pending > 0:
                # Pipelined behind other clients' requests: it can only be canceled once it is the one
                # running, so the cancel waits for its turn (pipeline.Turn.cancels, server._turn).
                client.pipeline.hold_cancel(requester)
                return
            if forward_cancel(serving_target=server.client is client, pending=client.pending):
                client.pipeline.cancel_asked = True
                # If its query ends before the cancel lands, the next one in the pipeline is canceled
                # instead: their answers are held and checked (pipeline.ServerPipeline.split).
                server.pipeline.hold_answers()
                # The server serves nobody else until this cancel is done (UpstreamPool.release).
                server.pool.cancel_started(server)
                # Priority: a result of many small messages keeps the loop busy relaying, and each step of
                # the cancel (accept, connect, TLS, send) would wait behind a chunk of it; the canceled
                # result can wait instead, in the socket buffers, until the cancel is out (_send_cancel).
                transport = server.transport
                if transport is not None and not transport.is_closing():
                    transport.pause_reading()
                self.host.spawn(self._send_cancel(server, requester))
                return
        elif client is not None and client.waiting:
            client.cancel_wait()
        # Nothing to cancel (no such key, an idle client, a query that already finished, a server
        # still being set up): dropping the request is what PostgreSQL does for an idle backend too.
        if requester is not None:
            requester.close()

    def forward_held_cancel(self, client: ClientConnection) -> None:
        """A client whose cancel waited in a pipeline is at the head now: forward it."""
        requesters = client.pipeline.take_cancels()
        for requester in requesters:
            self.cancel(client.process_id, client.secret_key, requester)

    async def _send_cancel(self, server: ServerConnection, requester: asyncio.BaseTransport | None) -> None:
        pool = server.pool
        try:
            await self._forward_cancel(pool, server.backend_pid, server.backend_key)
        finally:
            if pool.being_canceled.get(server) == 1:  # the last cancel on its way there
                transport, client = server.transport, server.client
                if (
                    transport is not None
                    and not transport.is_closing()
                    and not (client is not None and client.write_paused)
                ):
                    transport.resume_reading()
            pool.cancel_done(server)
            if requester is not None:
                requester.close()

    async def _forward_cancel(self, pool: UpstreamPool, backend_pid: int, backend_key: int) -> None:
        dsn, tls = pool.dsn, pool.tls
        try:
            # Bounded even with connect_timeout=0: the target server serves nobody until this ends.
            async with asyncio.timeout(self.host.settings.connect_timeout or _CANCEL_TIMEOUT):
                if dsn.is_unix_socket:
                    reader, writer = await asyncio.open_unix_connection(f"{dsn.host}/.s.PGSQL.{dsn.port}")
                else:
                    reader, writer = await asyncio.open_connection(dsn.host, dsn.port)
                if tls.context is not None:
                    writer.write(protocol.ssl_request())
                    if await reader.readexactly(1) == b"S":
                        await writer.start_tls(tls.context, server_hostname=tls.server_hostname)
                writer.write(protocol.cancel_request(backend_pid, backend_key))
                await writer.drain()
                await reader.read()  # the server closes when done
                writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.warning("cancel_failed", pool=self.host.pool.name, error=str(exc))
