"""Wiring: listeners, the pool, ops HTTP, background tasks, signals (SIGTERM drain, SIGHUP reload)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import signal
import ssl
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poolkit.detect import Mode, detect_mode
from poolkit.errors import ConfigError, SidecarError
from poolkit.log import get_logger
from poolkit.sidecar import admin, protocol
from poolkit.sidecar.auth import UserStore, client_tls_context, read_auth_file
from poolkit.sidecar.client import ClientConnection
from poolkit.sidecar.config import RELOADABLE, SidecarSettings, load_sidecar_settings
from poolkit.sidecar.http import OpsHttpServer
from poolkit.sidecar.maintenance import (
    IdleTransactionReaper,
    MaintenanceTask,
    QueryTimeoutReaper,
    ServerReaper,
)
from poolkit.sidecar.metrics import make_registry
from poolkit.sidecar.pool import UpstreamPool
from poolkit.sidecar.pooling import forward_cancel
from poolkit.sidecar.protocol import IDLE
from poolkit.sidecar.startup import StartupChecks

if TYPE_CHECKING:
    from poolkit.sidecar.server import ServerConnection

log = get_logger("sidecar")
_WELCOME_CACHE_SIZE = 256
_CANCEL_TIMEOUT = 10.0
# The process ids the sidecar gives clients lie above Linux's largest possible pid_max (PID_MAX_LIMIT,
# 2**22): no real backend can have one, so pg_terminate_backend(<the pid a client was told>) (a common
# pattern in tests) fails instead of killing whichever backend happens to have that pid.
_PID_FLOOR = 1 << 22
_PID_CEILING = 0x7FFFFFFF


def _users_from(settings: SidecarSettings) -> UserStore:
    users = {name: secret.get_secret_value() for name, secret in settings.users.items()}
    if settings.auth_file is not None:
        users = {**read_auth_file(settings.auth_file), **users}
    return UserStore(users)


class Sidecar:
    """The running sidecar: ``await start()``, then ``await wait_stopped()``; ``shutdown()`` drains.

    ``config_file``/``overrides`` are remembered so SIGHUP (:meth:`reload`) re-reads the same sources.
    """

    def __init__(
        self,
        settings: SidecarSettings,
        *,
        config_file: Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.config_file = config_file
        self.overrides = dict(overrides or {})
        self.pool = UpstreamPool(settings)
        if settings.direct_route_enabled:
            self.pool.direct = UpstreamPool(settings, self.pool.stats, direct=True)
        self.users = _users_from(settings)
        self.client_tls_context: ssl.SSLContext | None = None
        if settings.effective_client_tls != "disable" and settings.tls_cert_file and settings.tls_key_file:
            self.client_tls_context = client_tls_context(settings.tls_cert_file, settings.tls_key_file)
        self.connections: set[ClientConnection] = set()
        self.cancel_keys: dict[int, ClientConnection] = {}  # the process id a client was given -> it
        self.registry = make_registry(lambda: [self.pool])
        self.http = OpsHttpServer(self.registry, self.readiness)
        self.port = 0
        self.http_port = 0
        self.unix_socket_path: str | None = None
        self.started_at = time.monotonic()
        self.draining = False
        self._listeners: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._maintenance: list[MaintenanceTask] = []
        self._direct_maintenance: list[MaintenanceTask] = []
        self._stopped: asyncio.Event | None = None
        self._welcome_cache: dict[tuple[int, tuple[tuple[str, str], ...]], bytes] = {}
        self.startup_checks = StartupChecks()  # what the upstream made of clients' startup parameters

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind the listeners and the HTTP port; raise SidecarError naming the setting on failure."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        s = self.settings
        try:
            server = await loop.create_server(
                lambda: ClientConnection(self), s.listen_host, s.listen_port, backlog=4096, reuse_address=True
            )
        except OSError as exc:
            raise SidecarError(
                f"cannot listen on {s.listen_host}:{s.listen_port} (listen_host/listen_port, "
                f"env POOLKIT_SIDECAR_LISTEN_PORT): {exc.strerror or exc}"
            ) from None
        self._listeners.append(server)
        self.port = int(server.sockets[0].getsockname()[1])
        if s.unix_socket_dir is not None:
            path = str(s.unix_socket_dir / f".s.PGSQL.{self.port}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            try:
                userver = await loop.create_unix_server(lambda: ClientConnection(self, unix=True), path, backlog=4096)
            except OSError as exc:
                await self.close()
                raise SidecarError(
                    f"cannot listen on Unix socket {path} (unix_socket_dir): {exc.strerror or exc}"
                ) from None
            self._listeners.append(userver)
            self.unix_socket_path = path
        if s.http_enabled:
            try:
                self.http_port = await self.http.start(s.http_host, s.http_port)
            except OSError as exc:
                await self.close()
                raise SidecarError(
                    f"cannot serve /metrics on {s.http_host}:{s.http_port} (http_host/http_port, "
                    f"env POOLKIT_SIDECAR_HTTP_PORT): {exc.strerror or exc}"
                ) from None
        self._maintenance = [ServerReaper(self.pool), IdleTransactionReaper(self.pool), QueryTimeoutReaper(self.pool)]
        for job in self._maintenance:
            job.start()
        self._start_direct_maintenance()
        self.started_at = time.monotonic()
        direct = self.pool.direct
        log.info(
            "sidecar_started",
            listen=f"{s.listen_host}:{self.port}",
            unix_socket=self.unix_socket_path,
            metrics=f"http://{s.http_host}:{self.http_port}/metrics" if s.http_enabled else None,
            upstream=self.pool.dsn.redacted(),
            pool=self.pool.name,
            max_size=self.pool.max_size,
            direct=direct.dsn.redacted() if direct is not None else None,
            direct_max_size=direct.max_size if direct is not None else None,
            max_pinned_clients=self.pool.pin_limit,
            auth=s.effective_auth_type,
        )
        self._warn_unpinnable()

    def _start_direct_maintenance(self) -> None:
        direct = self.pool.direct
        if direct is not None and not self._direct_maintenance:
            self._direct_maintenance = [ServerReaper(direct), IdleTransactionReaper(direct), QueryTimeoutReaper(direct)]
            for job in self._direct_maintenance:
                job.start()

    def _warn_unpinnable(self) -> None:
        # A transaction pooler upstream hands its backend to others after each transaction: pinning
        # a connection to it keeps no session state. Only a direct upstream can hold a pin.
        pool = self.pool
        if pool.direct is None and pool.route == "pooled" and detect_mode(pool.dsn).mode is Mode.TRANSACTION:
            log.warning(
                "sidecar_pins_need_direct_url",
                pool=pool.name,
                detail="the upstream is a transaction pooler and direct_url is not set: clients using "
                "session features (SET, LISTEN, advisory locks, ...) are pinned to a pooler connection, "
                "which does not keep session state; set POOLKIT_DIRECT_URL",
            )

    async def wait_stopped(self) -> None:
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight transactions finish (up to ``shutdown_timeout``), then close."""
        if self.draining:
            return
        self.draining = True
        self.pool.draining = True
        if self.pool.direct is not None:
            self.pool.direct.draining = True
        timeout = self.settings.shutdown_timeout if grace is None else grace
        for listener in self._listeners:
            listener.close()
        busy = 0
        for client in list(self.connections):
            if _busy(client):
                client.close_after_release = True
                busy += 1
            else:
                client.shutdown_close()
        log.info("sidecar_draining", busy_clients=busy, timeout=timeout)
        deadline = time.monotonic() + timeout
        # Polling is fine here: it runs once per process lifetime, for at most shutdown_timeout.
        while time.monotonic() < deadline and any(_busy(c) for c in self.connections):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        """Close everything now (clients still in a transaction get FATAL; PostgreSQL rolls back)."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for client in list(self.connections):
            client.shutdown_close()
        for job in self._maintenance + self._direct_maintenance:
            await job.stop()
        self._maintenance.clear()
        self._direct_maintenance.clear()
        await self.http.close()
        self.pool.close_all("shutdown")
        if self.pool.direct is not None:
            self.pool.direct.close_all("shutdown")
        if self.unix_socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_socket_path)
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:  # shutdown() itself runs as one of them
                task.cancel()
        await asyncio.sleep(0)  # let transports flush their close
        log.info("sidecar_stopped", transactions=self.pool.stats.transactions)
        if self._stopped is not None:
            self._stopped.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT drain and exit; SIGHUP reloads the settings."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: self.spawn(self.shutdown()))
        loop.add_signal_handler(signal.SIGINT, lambda: self.spawn(self.shutdown()))
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def reload(self, settings: SidecarSettings | None = None) -> bool:
        """Re-read settings (or apply ``settings``) without dropping clients; False if they are invalid."""
        if settings is None:
            try:
                settings = load_sidecar_settings(self.config_file, **self.overrides)
            except ConfigError as exc:
                log.warning("reload_failed", error=str(exc))
                return False
        old = self.settings.model_dump()
        new = settings.model_dump()
        changed = sorted(k for k in new if new[k] != old[k])
        restart = [k for k in changed if k not in RELOADABLE]
        if restart:
            log.warning("reload_needs_restart", settings=restart)
        try:
            users = _users_from(settings)
            self.pool.configure(settings)
            self._configure_direct(settings)
        except ConfigError as exc:
            log.warning("reload_failed", error=str(exc))
            return False
        self.users = users
        self.settings = settings
        self._welcome_cache.clear()
        log.info("sidecar_reloaded", changed=[k for k in changed if k in RELOADABLE])
        return True

    def _configure_direct(self, settings: SidecarSettings) -> None:
        """Create, reconfigure or retire the direct pool after a reload."""
        direct = self.pool.direct
        if settings.direct_route_enabled:
            if direct is None:
                self.pool.direct = UpstreamPool(settings, self.pool.stats, direct=True)
                if self._listeners:
                    self._start_direct_maintenance()
            else:
                direct.configure(settings)
        elif direct is not None:
            # Pinned clients keep their servers; those close when they are given back.
            self.pool.direct = None
            direct.retire()
            for job in self._direct_maintenance:
                self.spawn(job.stop())
            self._direct_maintenance = []

    # ------------------------------------------------------------- services for connections

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def client_opened(self, client: ClientConnection) -> None:
        self.connections.add(client)

    def client_closed(self, client: ClientConnection) -> None:
        self.connections.discard(client)
        self.pool.clients.discard(client)
        if self.cancel_keys.get(client.process_id) is client:
            del self.cancel_keys[client.process_id]

    def register_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        """A (process id, secret key) for ``client``'s BackendKeyData: random, the pid unique and never a real pid.

        As PgBouncer does, both are random rather than counted, so one client's key says nothing about
        another's; the secret is all 32 bits, from :mod:`secrets`.
        """
        keys = self.cancel_keys
        while True:
            pid = _PID_FLOOR + 1 + secrets.randbelow(_PID_CEILING - _PID_FLOOR)
            if pid not in keys:
                break
        keys[pid] = client
        return pid, int.from_bytes(secrets.token_bytes(4), "big", signed=True)

    def cancel(self, process_id: int, secret_key: int, requester: asyncio.BaseTransport | None = None) -> None:
        """A CancelRequest: forward it to the backend now running that client's query.

        ``requester`` (the connection the request came on) is closed once forwarding is over: a
        client that waits for that close knows its cancel can no longer reach anyone's query.
        """
        client = self.cancel_keys.get(process_id)
        if client is not None and client.secret_key != secret_key:
            client = None  # a wrong secret is no cancel at all (PostgreSQL only logs it)
        server = client.server if client is not None else None
        if client is not None and server is not None and server.backend_pid:
            if server.shared and server.client is not client and client.pending > 0:
                # Queued behind other clients' requests (pipelining): it can only be canceled once it
                # is the one running, so the cancel waits for its turn (server._next_turn).
                client.cancel_held = [*(client.cancel_held or []), requester]
                return
            if forward_cancel(serving_target=server.client is client, pending=client.pending):
                client.cancel_asked = True
                for follower in server.followers:
                    # If its query ends before the cancel lands, the next one in line is canceled
                    # instead: their answers are held and checked (server._retried).
                    if follower is not None and follower.held_answer is None:
                        follower.held_answer = []
                # The server serves nobody else until this cancel is done (UpstreamPool.release).
                server.pool.cancel_started(server)
                # Priority: a result of many small messages keeps the loop busy relaying, and each step of
                # the cancel (accept, connect, TLS, send) would wait behind a chunk of it; the canceled
                # result can wait instead, in the socket buffers, until the cancel is out (_send_cancel).
                transport = server.transport
                if transport is not None and not transport.is_closing():
                    transport.pause_reading()
                self.spawn(self._send_cancel(server, requester))
                return
        elif client is not None and client.waiting:
            client.cancel_wait()
        # Nothing to cancel (no such key, an idle client, a query that already finished, a server
        # still being set up): dropping the request is what PostgreSQL does for an idle backend too.
        if requester is not None:
            requester.close()

    def forward_held_cancel(self, client: ClientConnection) -> None:
        """A client whose cancel waited in a pipeline is at the head now: forward it."""
        requesters, client.cancel_held = client.cancel_held or [], None
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
            async with asyncio.timeout(self.settings.connect_timeout or _CANCEL_TIMEOUT):
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
            log.warning("cancel_failed", pool=self.pool.name, error=str(exc))

    @staticmethod
    def is_loopback(host: str) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def welcome_bytes(self, params: list[tuple[str, str]], overrides: tuple[tuple[str, str], ...]) -> bytes:
        """The ParameterStatus block a new client gets, with its own tracked settings substituted."""
        key = (id(params), overrides)
        cached = self._welcome_cache.get(key)
        if cached is not None:
            return cached
        wanted = dict(overrides)
        body = b"".join(protocol.parameter_status(name, wanted.get(name.lower(), value)) for name, value in params)
        known = {name.lower() for name, _ in params}
        body += b"".join(protocol.parameter_status(name, value) for name, value in overrides if name not in known)
        if len(self._welcome_cache) >= _WELCOME_CACHE_SIZE:
            self._welcome_cache.clear()
        self._welcome_cache[key] = body
        return body

    def admin_query(self, sql: str) -> bytes:
        return admin.execute(self, sql)

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: shutting down"
        if not self._listeners:
            return False, "not listening"
        if self.pool.last_error and not self.pool.servers:
            return False, f"upstream unreachable: {self.pool.last_error}"
        return True, "ready"


def _busy(client: ClientConnection) -> bool:
    """Does draining wait for ``client``? Not for a pinned client idle between transactions."""
    server = client.server
    if client.linking is not None or client.waiting:
        return True
    if server is None:
        return False
    return not (client.pin_reason and client.pending <= 0 and server.scanner.status == IDLE)


async def serve(
    settings: SidecarSettings, *, config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> int:
    """Run a sidecar until SIGTERM/SIGINT; return the process exit code."""
    app = Sidecar(settings, config_file=config_file, overrides=overrides)
    try:
        await app.start()
    except SidecarError as exc:
        log.warning("sidecar_failed", error=str(exc))
        raise
    app.install_signal_handlers()
    await app.wait_stopped()
    return 0


def run_sidecar(
    settings: SidecarSettings, *, config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> int:
    """Blocking entry point: an event loop (uvloop when installed) running :func:`serve`."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(settings, config_file=config_file, overrides=overrides))
