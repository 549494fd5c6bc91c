"""A client before the relay: its login carried out (login.py's and startup.py's actions), then its admin console feed.

:class:`ClientLogin` reads what a client sends until it is greeted: it feeds the sans-IO :class:`~login.Login`,
does what that answers (bytes to send, TLS to start, a cancel to forward, a refusal), chooses the client's pool
or console once it is authenticated, has a server connection check startup parameters the upstream has not
seen (startup.py), sends the welcome and hands the client over to the relay (``ClientConnection``), or to
:class:`ConsoleFeed` for the admin console. It counts and logs logins; ``client_login_timeout`` is its timer.
The client connection keeps the transport and its identity (process id, cancel key, place in ``connections``)
throughout: it is what the pools, the cancel keys and ``SHOW CLIENTS`` see, logged in or not.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from poolkit.errors import AuthenticationFailed, ConnectError, ProtocolError
from poolkit.obs.log import get_logger
from poolkit.sidecar.policy.login import (
    Action,
    AskPassword,
    Authenticated,
    Login,
    LoginRules,
    Refuse,
    Send,
    StartTLS,
    WrongPassword,
)
from poolkit.sidecar.policy.pooling import TRACKED_PARAMETERS, ClientState
from poolkit.sidecar.policy.startup import Rejection, check_query, first_column, rejection
from poolkit.sidecar.wire import protocol
from poolkit.sidecar.wire.protocol import MessageReader

if TYPE_CHECKING:
    from poolkit.sidecar.conn.client import AdminSession, ClientConnection
    from poolkit.sidecar.conn.server import ServerConnection

log = get_logger("sidecar")

_INTERNAL_QUERY_TIMEOUT = 10.0
_LOGGING_IN = (ClientState.STARTUP, ClientState.AUTH, ClientState.WELCOME)


class ClientLogin:
    """One client's login under way, carried out on its connection (dropped once the client is greeted)."""

    __slots__ = ("client", "login", "loopback", "server", "timer")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.login = Login()
        self.loopback = client.unix  # a Unix-socket client is as local as a loopback one (trust admits it)
        self.timer: asyncio.TimerHandle | None = None
        # A server connection on its way to check startup parameters (ClientConnection.attach hands it).
        self.server: asyncio.Future[ServerConnection] | None = None

    def start(self, host: str | None) -> None:
        """The client connected from ``host`` (None: a Unix socket) and is counted in ``connections``: refused
        over ``max_client_conn``, else ``client_login_timeout`` (0 = none) starts now."""
        client = self.client
        if host is not None:
            self.loopback = client.app.is_loopback(host)
        settings = client.app.settings
        if len(client.app.connections) > settings.max_client_conn:
            client.fatal("53300", f"too many clients: max_client_conn={settings.max_client_conn} reached")
            return
        if settings.client_login_timeout > 0:
            self.timer = asyncio.get_running_loop().call_later(settings.client_login_timeout, self._timed_out)

    def abandon(self) -> None:
        """The client left: stop the timer and stop waiting for a server connection."""
        self._stop_timer()
        if self.server is not None and not self.server.done():
            self.server.cancel()

    def take_server(self, server: ServerConnection) -> bool:
        """The pool hands the client ``server``: True if it is this login's, for its startup parameter check."""
        future = self.server
        if future is None:
            return False
        self.server = None
        future.set_result(server)
        return True

    def data_received(self, data: bytes) -> None:
        client = self.client
        state = client.state
        try:
            if state in (ClientState.STARTUP, ClientState.AUTH):
                self._carry_out(self.login.feed(data, self._rules()))
            elif state == ClientState.WELCOME:
                self.login.early += data
        except ProtocolError as exc:
            client.pool.stats.client_logins["error"] += 1
            client.protocol_violation(str(exc))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        client = self.client
        if client.state in _LOGGING_IN:
            client.pool.stats.client_logins["error"] += 1
            client.fatal("08006", f"client_login_timeout ({client.app.settings.client_login_timeout:g}s) expired")

    def _rules(self) -> LoginRules:
        client = self.client
        app = client.app
        settings = app.settings
        return LoginRules(
            users=app.users,
            database=client.pool.dsn.database,
            admin_database=settings.admin_database,
            trust=settings.effective_auth_type == "trust",
            tls_offered=app.client_tls_context is not None and not client.tls,
            tls_required=settings.effective_client_tls == "require" and not client.tls and not client.unix,
            loopback=self.loopback,
            peer=client.peer,
        )

    def _carry_out(self, actions: list[Action]) -> None:
        """Do what the login (login.py) decided, in its order."""
        client, login = self.client, self.login
        client.user = login.user
        client.database = login.database
        if login.wanted is not None and client.state == ClientState.STARTUP:
            client.session.set_wanted_all(login.wanted)
        transport = client.transport
        for action in actions:
            if isinstance(action, Send):
                transport.write(action.data)
            elif isinstance(action, AskPassword):
                client.state = ClientState.AUTH
                transport.write(action.data)
            elif isinstance(action, Authenticated):
                self._logged_in(action.auth_messages)
            elif isinstance(action, Refuse):
                self._failed(action.code, action.text)
            elif isinstance(action, WrongPassword):
                client.pool.stats.client_logins["auth_failed"] += 1
                log.info("client_auth_failed", client=client.describe())
                client.fatal("28P01", action.text)
                client.state = ClientState.CLOSED
            elif isinstance(action, StartTLS):
                transport.write(b"S")
                # Stop reading now: the ClientHello must reach the TLS layer, not this protocol.
                transport.pause_reading()
                client.app.spawn(self._start_tls())
            else:
                # The app closes this connection once the cancel is forwarded (PostgreSQL's order too);
                # CLOSED: nothing more is read from it and client_login_timeout does not answer it.
                client.state = ClientState.CLOSED
                self._stop_timer()
                client.app.cancel(action.process_id, action.secret_key, transport)

    async def _start_tls(self) -> None:
        client = self.client
        context = client.app.client_tls_context
        assert context is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(client.transport, client, context, server_side=True)
        except (OSError, ValueError, ConnectionError) as exc:
            log.info("client_tls_failed", client=client.describe(), error=str(exc))
            client.transport.abort()
            return
        if transport is None:
            return
        client.transport = transport
        client.tls = True

    def _failed(self, code: str, text: str) -> None:
        client = self.client
        client.pool.stats.client_logins["error" if code != "28P01" else "auth_failed"] += 1
        log.info("client_login_refused", client=client.describe(), code=code, reason=text)
        client.fatal(code, text)
        client.state = ClientState.CLOSED

    def _logged_in(self, auth_messages: bytes) -> None:
        client = self.client
        app = client.app
        console: AdminSession | None = None
        if self.login.admin:
            opened = app.open_console(client)
            if isinstance(opened, str):
                self._failed("28000", opened)  # after the password check, as PgBouncer
                return
            console = opened
        else:
            pool = app.pool_for(client.user)
            if isinstance(pool, str):
                self._failed("28000", pool)
                return
            client.pool = pool
        client.process_id, client.secret_key = app.register_cancel_key(client)
        if console is not None:
            client.console = ConsoleFeed(client, console)
            welcome = client.pool.welcome or [("server_version", "15.0"), ("client_encoding", "UTF8")]
            self._finish(auth_messages, welcome, ClientState.ADMIN)
            return
        pool = client.pool
        welcome_params = pool.welcome
        canonical, unknown = app.startup_checks_for(pool).resolve(client.session.wanted, pool.generation)
        if welcome_params is not None and not unknown:
            client.session.set_wanted_all(canonical)
            self._finish(auth_messages, welcome_params, ClientState.READY)
            return
        client.state = ClientState.WELCOME
        app.spawn(self._wait_welcome(auth_messages, unknown))

    async def _wait_welcome(self, auth_messages: bytes, unknown: list[tuple[str, str]]) -> None:
        client = self.client
        pool = client.pool
        try:
            welcome_params = await pool.ensure_welcome()
        except ConnectError as exc:
            pool.stats.client_logins["error"] += 1
            problem = "cannot log in to" if isinstance(exc, AuthenticationFailed) else "cannot reach"
            client.fatal("08006", f"pool {pool.name!r} {problem} its upstream: {exc}")
            return
        if unknown and not self._over():
            refused = await self._check_startup(unknown)
            if refused is not None:
                self._refuse_startup(auth_messages, refused)
                return
        if not self._over():
            self._finish(auth_messages, welcome_params, ClientState.READY)

    def _over(self) -> bool:
        """Did the login end while it waited (the client left, a FATAL was sent: login timeout, pool failure)?"""
        client = self.client
        return client.closed or client.state != ClientState.WELCOME or client.transport.is_closing()

    async def _check_startup(self, unknown: list[tuple[str, str]]) -> Rejection | None:
        """Have a server connection check startup parameters not seen before (startup.py); the rejection, if any.

        The server is taken like a transaction's (waiting, query_wait_timeout and all) and given back
        unchanged: the check's settings are local to its implicit transaction.
        """
        client = self.client
        pool = client.pool
        generation = pool.generation
        self.server = future = asyncio.get_running_loop().create_future()
        server = pool.acquire(client, time.monotonic())
        if server is None:
            client.waiting = True  # attach() hands it a server (or _fail_queued ends the login)
        else:
            client.attach(server, time.monotonic())
        server = await future
        rows: list[bytes] = []
        try:
            async with asyncio.timeout(_INTERNAL_QUERY_TIMEOUT):
                spelling = self.login.spelling or {}
                spelled = [(spelling.get(name, name), value) for name, value in unknown]
                error = await server.run_internal(check_query(spelled), rows)
        except (Exception, asyncio.CancelledError) as exc:
            pool.server_broken(server, f"startup parameter check failed: {exc!r}")
            if not self._over():
                pool.stats.client_logins["error"] += 1
                client.fatal("08006", f"the server connection of pool {pool.name!r} failed while being set up")
            client.state = ClientState.CLOSED
            if isinstance(exc, asyncio.CancelledError):
                raise
            return None
        server.client = None
        pool.release(server, time.monotonic())
        if error is not None:
            return rejection(error)
        checks = client.app.startup_checks_for(pool)
        learned = checks.learn(unknown, [first_column(row) for row in rows], generation)
        client.session.set_wanted_all({**client.session.wanted, **learned})
        return None

    def _refuse_startup(self, auth_messages: bytes, refused: Rejection) -> None:
        """A startup parameter the upstream rejected fails the login after AuthenticationOk, as on PostgreSQL."""
        if self._over():
            return
        client = self.client
        client.pool.stats.client_logins["error"] += 1
        log.info("client_login_refused", client=client.describe(), code=refused.code, reason=refused.message)
        client.state = ClientState.CLOSED
        transport = client.transport
        if not transport.is_closing():
            error = protocol.error_response(
                refused.code, refused.message, severity="FATAL", detail=refused.detail, hint=refused.hint
            )
            transport.write(auth_messages + error)
            transport.close()

    def _finish(self, auth_messages: bytes, params: list[tuple[str, str]], state: ClientState) -> None:
        """Greet the client and hand it over to the relay (READY) or the admin console (ADMIN)."""
        self._stop_timer()
        client = self.client
        # Every setting the server reports that the client set (default_transaction_read_only too), with
        # the value the server made of it (startup.py).
        reported = {name.lower() for name, _ in params}
        overrides = tuple(
            sorted((k, v) for k, v in client.session.wanted.items() if k in TRACKED_PARAMETERS or k in reported)
        )
        body = client.app.welcome_bytes(params, overrides)
        client.transport.write(
            auth_messages
            + body
            + protocol.backend_key_data(client.process_id, client.secret_key)
            + protocol.ready_for_query()
        )
        client.state = state
        client.pool.stats.client_logins["ok"] += 1
        if state == ClientState.READY:
            client.pool.clients.add(client)
        client.login = None
        early = self.login.early
        if early:
            client.data_received(early)


class ConsoleFeed:
    """An admin console client's messages, read whole and fed to its console session (admin.Console)."""

    __slots__ = ("client", "reader", "session")

    def __init__(self, client: ClientConnection, session: AdminSession) -> None:
        self.client = client
        self.session = session
        self.reader = MessageReader(side="client", max_message_size=protocol.MAX_INSPECTED_SIZE)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client.state != ClientState.ADMIN:
            return
        try:
            for kind, body in self.reader.feed(data):
                self._on_message(kind, body)
        except ProtocolError as exc:
            client.protocol_violation(str(exc))

    def _on_message(self, kind: bytes, body: bytes) -> None:
        transport = self.client.transport
        if kind == b"X":
            transport.close()
        elif kind == b"Q":
            self.session.query(protocol.parse_query(body))
        elif kind == b"S":
            transport.write(protocol.ready_for_query())
        elif kind in (b"P", b"B", b"D", b"E", b"C", b"H"):
            if kind == b"P":
                transport.write(
                    protocol.error_response(
                        "0A000", "the admin console only supports simple queries (psql, or SHOW commands)"
                    )
                )
        else:
            raise ProtocolError(f"unexpected message {kind!r} on the admin console")
