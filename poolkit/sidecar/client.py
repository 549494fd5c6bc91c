"""One client connection: TLS, startup and auth, then the relay's client side (queue, attach, release)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from poolkit.errors import AuthenticationFailed, ConnectError, ProtocolError
from poolkit.log import get_logger
from poolkit.sidecar import protocol
from poolkit.sidecar.auth import SCRAM, ScramServerExchange
from poolkit.sidecar.pooling import (
    NOT_SETTINGS,
    POOL_EXHAUSTED_HINT,
    ClientGone,
    on_client_gone,
    parameter_changes,
    set_statements,
    valid_setting_name,
)
from poolkit.sidecar.protocol import FrontendScanner, MessageReader, StartupReader
from poolkit.sidecar.server import TRACKED_PARAMETERS

if TYPE_CHECKING:
    from poolkit.sidecar.app import Sidecar
    from poolkit.sidecar.server import ServerConnection

log = get_logger("sidecar")

STARTUP, AUTH, WELCOME, READY, ADMIN, CLOSED = range(6)
# Client bytes buffered while waiting for a server before reading from that client pauses.
_QUEUE_LIMIT = 256 * 1024
_INTERNAL_QUERY_TIMEOUT = 10.0


class ClientConnection(asyncio.Protocol):
    """A client of the sidecar. While it holds ``server``, bytes flow both ways untouched."""

    # Slots: thousands of idle clients each cost one of these objects.
    __slots__ = (
        "_early",
        "_exchange",
        "_login_timer",
        "_reader",
        "_sasl_started",
        "_startup",
        "_wanted_key",
        "admin",
        "app",
        "buffer",
        "buffered",
        "close_after_release",
        "closed",
        "connect_time",
        "database",
        "dirty",
        "input_paused",
        "linking",
        "loopback",
        "peer",
        "pending",
        "pool",
        "process_id",
        "request_time",
        "scanner",
        "secret_key",
        "server",
        "state",
        "tls",
        "transport",
        "unix",
        "user",
        "wait_started",
        "waiting",
        "wanted",
        "write_paused",
    )

    def __init__(self, app: Sidecar, *, unix: bool = False) -> None:
        self.app = app
        self.pool = app.pool
        self.unix = unix
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.state = STARTUP
        self.server: ServerConnection | None = None
        self.linking: ServerConnection | None = None
        self.scanner = FrontendScanner(app.settings.max_message_size)
        self.pending = 0
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.waiting = False
        self.wait_started = 0.0
        self.closed = False
        self.dirty = False  # part of a message reached the server that the rest never will
        self.close_after_release = False
        self.input_paused = False
        self.write_paused = False
        self.tls = False
        self.loopback = unix
        self.peer = "unix" if unix else "?"
        self.user = ""
        self.database = ""
        self.wanted: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = 0
        self.connect_time = time.time()
        self.request_time = self.connect_time
        self.admin = False
        self._startup = StartupReader()
        self._reader: MessageReader | None = None
        self._exchange: ScramServerExchange | None = None
        self._sasl_started = False
        self._wanted_key: tuple[tuple[str, str], ...] | None = None
        self._early = b""
        self._login_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        app = self.app
        if not self.unix:
            peer = transport.get_extra_info("peername")
            if peer:
                self.peer = f"{peer[0]}:{peer[1]}"
                self.loopback = app.is_loopback(peer[0])
        app.client_opened(self)
        if len(app.connections) > app.settings.max_client_conn:
            self.fatal("53300", f"too many clients: max_client_conn={app.settings.max_client_conn} reached")
            return
        if app.settings.client_login_timeout > 0:
            self._login_timer = asyncio.get_running_loop().call_later(
                app.settings.client_login_timeout, self._login_timed_out
            )

    def data_received(self, data: bytes) -> None:
        if self.state != READY:
            self._slow_data(data)
            return
        pool = self.pool
        pool.stats.received_bytes += len(data)
        scanner = self.scanner
        try:
            syncs = scanner.feed(data)
        except ProtocolError as exc:
            self.protocol_violation(str(exc))
            return
        if scanner.terminate_at != -1:
            self._terminate(data)
            return
        server = self.server
        if server is not None:
            if syncs:
                if self.pending <= 0:
                    server.query_started = time.monotonic()
                self.pending += syncs
            server.transport.write(data)  # type: ignore[union-attr]
            return
        self.pending += syncs
        self._queue(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.state = CLOSED
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self.app.client_closed(self)
        if self.waiting:
            self.waiting = False
            self.pool.forget_waiter(self)
        server = self.server
        if server is not None:
            self.server = None
            server.client = None
            self._server_after_client(server)

    def pause_writing(self) -> None:
        self.write_paused = True
        server = self.server
        if server is not None and server.transport is not None:
            server.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        server = self.server
        if server is not None and server.transport is not None and not server.transport.is_closing():
            server.transport.resume_reading()

    def pause_input(self) -> None:
        if not self.input_paused and not self.transport.is_closing():
            self.input_paused = True
            self.transport.pause_reading()

    def resume_input(self) -> None:
        if self.input_paused:
            self.input_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    # ------------------------------------------------------------- relay: queue, attach, release

    def _queue(self, data: bytes) -> None:
        self.buffer.append(data)
        self.buffered += len(data)
        if self.waiting or self.linking is not None:
            if self.buffered > _QUEUE_LIMIT:
                self.pause_input()
            return
        if self.pool.draining:
            self.shutdown_close()
            return
        self.request_time = time.time()
        now = time.monotonic()
        server = self.pool.acquire(self, now)
        if server is not None:
            self.attach(server, now)
        else:
            self.waiting = True
            if self.buffered > _QUEUE_LIMIT:
                self.pause_input()

    def attach(self, server: ServerConnection, now: float) -> None:
        """The pool hands ``server`` to this client (now, or when it was waiting)."""
        stats = self.pool.stats
        if self.waiting:
            self.waiting = False
            waited = now - self.wait_started
            stats.client_wait.observe(waited)
            stats.wait_time_total += waited
        else:
            stats.client_wait.observe(0.0)
        server.client = self
        server.assigned_at = now
        server.query_started = now
        key = self.wanted_key()
        if server.session_key != key:
            changes = parameter_changes(self.wanted, server.current, server.defaults)
            if changes:
                self.linking = server
                self.app.spawn(self._sync_then_link(server, changes))
                return
            server.session_key = key
        self._link(server)

    def wanted_key(self) -> tuple[tuple[str, str], ...]:
        """A hashable snapshot of ``wanted`` (call :meth:`set_wanted` to change a setting)."""
        if self._wanted_key is None:
            self._wanted_key = tuple(sorted(self.wanted.items()))
        return self._wanted_key

    def set_wanted(self, name: str, value: str) -> None:
        self.wanted[name] = value
        self._wanted_key = None

    def _link(self, server: ServerConnection) -> None:
        self.server = server
        if self.write_paused and server.transport is not None:
            server.transport.pause_reading()
        if server.write_paused:
            self.pause_input()
        else:
            self.resume_input()
        buffer = self.buffer
        if buffer:
            data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
            self.buffer = []
            self.buffered = 0
            server.write(data)

    async def _sync_then_link(self, server: ServerConnection, changes: list[tuple[str, str | None]]) -> None:
        # The server's session settings differ from what this client set up: align them first, in
        # a query the client never sees (PgBouncer does the same with its variable cache).
        for name, value in changes:
            if value is None:
                if name in server.defaults:
                    server.current[name] = server.defaults[name]
                else:
                    server.current.pop(name, None)
            else:
                server.current[name] = value
        try:
            async with asyncio.timeout(_INTERNAL_QUERY_TIMEOUT):
                error = await server.run_internal(set_statements(changes))
        except (Exception, asyncio.CancelledError) as exc:
            self.linking = None
            self.pool.server_broken(server, f"session parameter sync failed: {exc!r}")
            if not self.closed:
                self.fatal("08006", f"the server connection of pool {self.pool.name!r} failed while being set up")
            return
        self.linking = None
        server.session_key = self.wanted_key()
        if self.closed:
            server.client = None
            self.pool.release(server, time.monotonic())
            return
        if error is not None:
            server.client = None
            self.pool.release(server, time.monotonic())
            self.fatal(
                error.get("C", "22023"),
                f"startup parameter rejected by the server: {error.get('M', 'invalid value')}",
            )
            return
        self._link(server)

    def release_server(self, now: float) -> None:
        """ReadyForQuery(I) with nothing owed: the transaction is over, hand the server back."""
        server = self.server
        if server is None:
            return
        self.server = None
        stats = self.pool.stats
        elapsed = now - server.assigned_at
        stats.transactions += 1
        stats.transaction_duration.observe(elapsed)
        stats.xact_time_total += elapsed
        self.scanner.sql_chunk = b""  # do not keep the last chunk alive while idle
        if self.write_paused and server.transport is not None:
            server.transport.resume_reading()
        if server.write_paused:
            self.resume_input()
        self.pool.release(server, now)
        if self.close_after_release:
            self.shutdown_close()

    def _server_after_client(self, server: ServerConnection) -> None:
        """Clean up a server whose client vanished while holding it."""
        if server.state == "closed":
            return
        if self.write_paused and server.transport is not None and not server.transport.is_closing():
            server.transport.resume_reading()
        action = on_client_gone(
            status=server.scanner.status,
            pending=self.pending,
            unsynced=self.scanner.unsynced,
            client_at_boundary=self.scanner.at_boundary and not self.dirty,
            server_at_boundary=server.scanner.at_boundary,
        )
        if action is ClientGone.RELEASE:
            self.pool.release(server, time.monotonic())
        elif action is ClientGone.ROLLBACK:
            self.app.spawn(self._rollback(server))
        else:
            log.info("server_closed", pool=self.pool.name, server=server.describe(), reason="client left mid-query")
            server.state = "closed"
            self.pool.servers.discard(server)
            server.close("client gone")
            self.pool.release(server, time.monotonic())  # no-op for a closed server; refills the pool

    async def _rollback(self, server: ServerConnection) -> None:
        pool = self.pool
        try:
            async with asyncio.timeout(_INTERNAL_QUERY_TIMEOUT):
                error = await server.run_internal("ROLLBACK")
                if error is None and pool.reset_query:
                    error = await server.run_internal(pool.reset_query)
                    if error is None and pool.reset_query.upper().endswith("ALL"):
                        server.current = dict(server.defaults)
                        server.session_key = None
        except (Exception, asyncio.CancelledError) as exc:
            error = {"M": repr(exc)}
        if error is not None:
            log.warning("server_reset_failed", pool=pool.name, server=server.describe(), error=error.get("M"))
            server.state = "closed"
            pool.servers.discard(server)
            server.close("reset failed")
        pool.release(server, time.monotonic())

    # ------------------------------------------------------------- failures the client must hear about

    def _fail_queued(self, code: str, text: str, hint: str | None) -> None:
        """Answer every queued request with an error, keeping the session usable if the protocol allows."""
        self.waiting = False
        if self.pending >= 1 and not self.scanner.unsynced and self.scanner.at_boundary:
            answer = protocol.error_response(code, text, hint=hint) + protocol.ready_for_query()
            self.transport.write(answer * self.pending)
            self.pending = 0
            self.buffer = []
            self.buffered = 0
            self.resume_input()
        else:
            self.fatal(code, text, hint=hint)

    def wait_timed_out(self, text: str) -> None:
        """query_wait_timeout: no server connection freed up in time."""
        self._fail_queued("57014", text, POOL_EXHAUSTED_HINT)

    def upstream_failed(self, text: str) -> None:
        """The pool could not open any server connection for this client."""
        self._fail_queued("08006", f"pool {self.pool.name!r} cannot reach its upstream: {text}", None)

    def cancel_wait(self) -> None:
        """A CancelRequest arrived while this client was still waiting for a server."""
        if self.waiting:
            self.pool.forget_waiter(self)
            self._fail_queued("57014", "canceling statement due to user request", None)

    def server_lost(self, text: str) -> None:
        self.server = None
        self.fatal("08006", text)

    def protocol_violation(self, text: str) -> None:
        self.dirty = True
        log.warning("client_protocol_error", client=self.describe(), error=text)
        self.fatal("08P01", text)

    def shutdown_close(self) -> None:
        self.fatal("57P01", "the poolkit sidecar is shutting down; reconnect to another instance")

    def fatal(self, code: str, text: str, *, hint: str | None = None) -> None:
        """Send a FATAL ErrorResponse and close."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(protocol.error_response(code, text, severity="FATAL", hint=hint))
            transport.close()

    def _terminate(self, data: bytes) -> None:
        at = self.scanner.terminate_at
        if at == -2:
            self.dirty = True
        elif at > 0 and self.server is not None:
            self.server.write(data[:at])
        self.transport.close()

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.state in (STARTUP, AUTH, WELCOME):
            self.pool.stats.client_logins["error"] += 1
            self.fatal("08006", f"client_login_timeout ({self.app.settings.client_login_timeout:g}s) expired")

    # ------------------------------------------------------------- login (slow path)

    def _slow_data(self, data: bytes) -> None:
        try:
            if self.state == STARTUP:
                packet = self._startup.feed(data)
                if packet is not None:
                    self._on_startup_packet(packet)
            elif self.state == AUTH:
                assert self._reader is not None
                for kind, body in self._reader.feed(data):
                    self._on_auth_message(kind, body)
                    if self.state != AUTH:
                        break
            elif self.state == WELCOME:
                self._early += data
            elif self.state == ADMIN:
                assert self._reader is not None
                for kind, body in self._reader.feed(data):
                    self._on_admin_message(kind, body)
        except ProtocolError as exc:
            self.pool.stats.client_logins["error"] += self.state != ADMIN
            self.protocol_violation(str(exc))

    def _on_startup_packet(self, packet: protocol.StartupPacket) -> None:
        if isinstance(packet, protocol.SSLRequest):
            if self._startup.take_rest():
                raise ProtocolError("data after SSLRequest before the TLS handshake")
            if self.app.client_tls_context is not None and not self.tls:
                self.transport.write(b"S")
                # Stop reading now: the ClientHello must reach the TLS layer, not this protocol.
                self.transport.pause_reading()
                self.app.spawn(self._start_tls())
            else:
                self.transport.write(b"N")
            return
        if isinstance(packet, protocol.GSSENCRequest):
            self.transport.write(b"N")
            return
        if isinstance(packet, protocol.CancelRequest):
            self.app.cancel(packet.process_id, packet.secret_key)
            self.transport.close()
            return
        self._on_startup_message(packet)

    async def _start_tls(self) -> None:
        assert self.app.client_tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, self.app.client_tls_context, server_side=True)
        except (OSError, ValueError, ConnectionError) as exc:
            log.info("client_tls_failed", client=self.describe(), error=str(exc))
            self.transport.abort()
            return
        if transport is None:
            return
        self.transport = transport
        self.tls = True

    def _on_startup_message(self, packet: protocol.StartupMessage) -> None:
        app = self.app
        settings = app.settings
        params = packet.params
        self._early = self._startup.take_rest()
        unsupported = [k for k in params if k.startswith("_pq_.")]
        if packet.minor > 0 or unsupported:
            self.transport.write(protocol.negotiate_protocol_version(0, unsupported))
        user = params.get("user", "")
        if not user:
            self._login_failed("28000", "no PostgreSQL user name specified in startup packet")
            return
        self.user = user
        self.database = params.get("database") or user
        if app.settings.effective_client_tls == "require" and not self.tls and not self.unix:
            self._login_failed("28000", "the sidecar requires TLS (client_tls=require): connect with sslmode=require")
            return
        if params.get("options", "").strip():
            self._login_failed(
                "08P01",
                "startup parameter 'options' is not supported by a transaction pooler: use SET inside "
                "transactions or ALTER ROLE ... SET",
            )
            return
        self.admin = self.database == settings.admin_database
        if not self.admin and self.database != self.pool.dsn.database:
            self._login_failed(
                "3D000",
                f'database "{self.database}" does not exist on this sidecar: it serves '
                f'"{self.pool.dsn.database}" (and the admin console "{settings.admin_database}")',
            )
            return
        wanted: dict[str, str] = {}
        for name, value in params.items():
            if name in NOT_SETTINGS or name.startswith("_pq_."):
                continue
            if not valid_setting_name(name) or "\x00" in value:
                self._login_failed("42704", f"invalid startup parameter name {name!r}")
                return
            wanted[name.lower()] = value
        self.wanted = wanted
        self._wanted_key = None
        if settings.effective_auth_type == "trust":
            if not self.loopback:
                self._login_failed(
                    "28000",
                    f"trust authentication only admits loopback and Unix-socket clients, not {self.peer}: "
                    "configure users (POOLKIT_SIDECAR_USERS) for remote clients",
                )
                return
            self._logged_in(protocol.auth_ok())
            return
        self._exchange = ScramServerExchange(app.users, user)
        self._reader = MessageReader(side="client", max_message_size=protocol.MAX_STARTUP_SIZE)
        self.state = AUTH
        self.transport.write(protocol.auth_sasl([SCRAM]))

    def _on_auth_message(self, kind: bytes, body: bytes) -> None:
        exchange = self._exchange
        if kind != b"p" or exchange is None:
            raise ProtocolError(f"expected a SASL response during authentication, got message {kind!r}")
        try:
            if not self._sasl_started:
                mechanism, data = protocol.parse_sasl_initial_response(body)
                if mechanism != SCRAM:
                    self._login_failed("28000", f"SASL mechanism {mechanism} is not offered; use {SCRAM}")
                    return
                self._sasl_started = True
                self.transport.write(protocol.auth_sasl_continue(exchange.first(data)))
                return
            final = exchange.final(body)
        except AuthenticationFailed:
            self.pool.stats.client_logins["auth_failed"] += 1
            log.info("client_auth_failed", client=self.describe())
            self.fatal("28P01", f'password authentication failed for user "{self.user}"')
            self.state = CLOSED
            return
        self._exchange = None
        self._logged_in(protocol.auth_sasl_final(final) + protocol.auth_ok())

    def _login_failed(self, code: str, text: str) -> None:
        self.pool.stats.client_logins["error" if code != "28P01" else "auth_failed"] += 1
        log.info("client_login_refused", client=self.describe(), code=code, reason=text)
        self.fatal(code, text)
        self.state = CLOSED

    def _logged_in(self, auth_messages: bytes) -> None:
        app = self.app
        self.process_id, self.secret_key = app.register_cancel_key(self)
        if self.admin:
            self._reader = MessageReader(side="client", max_message_size=protocol.MAX_INSPECTED_SIZE)
            welcome = self.pool.welcome or [("server_version", "15.0"), ("client_encoding", "UTF8")]
            self._finish_login(auth_messages, welcome, ADMIN)
            return
        welcome_params = self.pool.welcome
        if welcome_params is not None:
            self._finish_login(auth_messages, welcome_params, READY)
            return
        self.state = WELCOME
        app.spawn(self._wait_welcome(auth_messages))

    async def _wait_welcome(self, auth_messages: bytes) -> None:
        try:
            welcome_params = await self.pool.ensure_welcome()
        except ConnectError as exc:
            self.pool.stats.client_logins["error"] += 1
            self.fatal("08006", f"pool {self.pool.name!r} cannot reach its upstream: {exc}")
            return
        if not self.closed:
            self._finish_login(auth_messages, welcome_params, READY)

    def _finish_login(self, auth_messages: bytes, params: list[tuple[str, str]], state: int) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        overrides = tuple(sorted((k, v) for k, v in self.wanted.items() if k in TRACKED_PARAMETERS))
        body = self.app.welcome_bytes(params, overrides)
        self.transport.write(
            auth_messages
            + body
            + protocol.backend_key_data(self.process_id, self.secret_key)
            + protocol.ready_for_query()
        )
        self.state = state
        self.pool.stats.client_logins["ok"] += 1
        if state == READY:
            self.pool.clients.add(self)
        early, self._early = self._early, b""
        if early:
            self.data_received(early)

    # ------------------------------------------------------------- admin console

    def _on_admin_message(self, kind: bytes, body: bytes) -> None:
        if kind == b"X":
            self.transport.close()
        elif kind == b"Q":
            self.transport.write(self.app.admin_query(protocol.parse_query(body)))
        elif kind == b"S":
            self.transport.write(protocol.ready_for_query())
        elif kind in (b"P", b"B", b"D", b"E", b"C", b"H"):
            if kind == b"P":
                self.transport.write(
                    protocol.error_response(
                        "0A000", "the admin console only supports simple queries (psql, or SHOW commands)"
                    )
                )
        else:
            raise ProtocolError(f"unexpected message {kind!r} on the admin console")

    # ------------------------------------------------------------- display

    def describe(self) -> str:
        return f"client #{self.process_id} {self.user or '?'}@{self.peer}"

    def close_now(self) -> None:
        with contextlib.suppress(Exception):
            self.transport.abort()
