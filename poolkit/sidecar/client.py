"""One client connection: TLS, startup and auth, then the relay's client side (queue, attach, release)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from poolkit.errors import AuthenticationFailed, ConnectError, ProtocolError
from poolkit.log import get_logger
from poolkit.sidecar import protocol
from poolkit.sidecar.login import Action as LoginAction
from poolkit.sidecar.login import AskPassword, Authenticated, Login, LoginRules, Refuse, Send, StartTLS, WrongPassword
from poolkit.sidecar.pipeline import ClientPipeline
from poolkit.sidecar.pooling import (
    POOL_EXHAUSTED_HINT,
    TRACKED_PARAMETERS,
    ClientGone,
    ClientState,
    ServerState,
    on_client_gone,
    take_server_now,
)
from poolkit.sidecar.prepared import AnswerHead, Bound, ClientStatements, Statement
from poolkit.sidecar.protocol import FrontendScanner, MessageReader
from poolkit.sidecar.session import (
    NOTHING,
    Effect,
    autocommit_head,
    decide,
    no_session_hint,
    no_session_message,
    pin_limit_hint,
    pin_limit_message,
    quick_nothing,
)
from poolkit.sidecar.startup import Rejection, check_query, first_column, rejection
from poolkit.sidecar.tracker import SessionTracker, pins_nothing

if TYPE_CHECKING:
    import ssl

    from poolkit.sidecar.auth import UserStore
    from poolkit.sidecar.config import SidecarSettings
    from poolkit.sidecar.pool import UpstreamPool
    from poolkit.sidecar.server import ServerConnection
    from poolkit.sidecar.startup import StartupChecks

log = get_logger("sidecar")

# data_received's test, a module global: one lookup per chunk relayed, not two.
_READY = ClientState.READY
# Client bytes buffered while waiting for a server before reading from that client pauses.
_QUEUE_LIMIT = 256 * 1024
_INTERNAL_QUERY_TIMEOUT = 10.0
# A pipelined request is kept until answered (it is re-sent if a cancel meant for another client
# hits it): only small ones are pipelined.
_PIPELINE_MAX_REQUEST = 8192


class AdminSession(Protocol):
    """An admin console session (admin.Console), as the client connection that feeds it sees it."""

    def query(self, sql: str) -> None: ...


class ClientServices(Protocol):
    """What a client connection uses of the sidecar (app.Sidecar), which sits a layer above it."""

    @property
    def settings(self) -> SidecarSettings: ...
    @property
    def pool(self) -> UpstreamPool: ...
    @property
    def users(self) -> UserStore: ...
    @property
    def connections(self) -> set[ClientConnection]: ...
    @property
    def client_tls_context(self) -> ssl.SSLContext | None: ...
    def is_loopback(self, host: str) -> bool: ...
    def next_process_id(self) -> int: ...
    def register_cancel_key(self, client: ClientConnection) -> tuple[int, int]: ...
    def client_opened(self, client: ClientConnection) -> None: ...
    def client_closed(self, client: ClientConnection) -> None: ...
    def pool_for(self, user: str) -> UpstreamPool | str: ...
    def open_console(self, client: ClientConnection) -> AdminSession | str: ...
    def startup_checks_for(self, pool: UpstreamPool) -> StartupChecks: ...
    def welcome_bytes(self, params: list[tuple[str, str]], overrides: tuple[tuple[str, str], ...]) -> bytes: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...
    def cancel(self, process_id: int, secret_key: int, requester: asyncio.BaseTransport | None = None) -> None: ...
    def forward_held_cancel(self, client: ClientConnection) -> None: ...


class ClientConnection(asyncio.Protocol):
    """A client of the sidecar. While it holds ``server``, bytes flow both ways untouched."""

    # Slots: thousands of idle clients each cost one of these objects.
    __slots__ = (
        "_login",
        "_login_server",
        "_login_timer",
        "_reader",
        "_wanted_key",
        "admin",
        "app",
        "buffer",
        "buffered",
        "close_after_release",
        "closed",
        "connect_time",
        "console",
        "database",
        "deferring",
        "dirty",
        "head",
        "held_effects",
        "input_paused",
        "linking",
        "loopback",
        "peer",
        "pending",
        "pipeline",
        "pool",
        "process_id",
        "request_time",
        "rewrite_queued",
        "scanner",
        "secret_key",
        "server",
        "session",
        "state",
        "statements",
        "tls",
        "transport",
        "unix",
        "user",
        "wait_started",
        "waiting",
        "wanted",
        "write_paused",
    )

    def __init__(self, app: ClientServices, *, unix: bool = False) -> None:
        self.app = app
        self.pool = app.pool
        self.unix = unix
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.state: ClientState = ClientState.STARTUP
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
        self.console: AdminSession | None = None
        # The login under way (login.py), dropped once the client is greeted.
        self._login: Login | None = Login()
        self._reader: MessageReader | None = None  # the admin console's
        self._wanted_key: tuple[tuple[str, str], ...] | None = None
        self._login_timer: asyncio.TimerHandle | None = None
        self._login_server: asyncio.Future[ServerConnection] | None = None  # to check its startup parameters
        # Session state (tracker.py): pins and their reasons, the reset guard, the statement tap.
        self.session = SessionTracker()
        # Named prepared statements (prepared.py), created at the first one; rewrite_queued: the
        # buffer holds messages naming one, to rewrite once a server is linked.
        self.statements: ClientStatements | None = None
        self.rewrite_queued = False
        # The session effects (and route) of a new transaction's first bytes, while they end mid-message.
        self.held_effects: tuple[Effect, Effect] | None = None
        # The head of its request's answer that the relay checks and removes (prepared.AnswerHead).
        self.head: AnswerHead | None = None
        # Its request is pipelined with other clients' on a server connection: whatever it sends meanwhile
        # waits in ``buffer`` (read per chunk, so a slot here rather than in ``pipeline``, which holds the
        # rest of its pipelining state: may its request be pipelined, what it binds; pipeline.py).
        self.deferring = False
        self.pipeline = ClientPipeline()

    # ------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        app = self.app
        self.process_id = app.next_process_id()  # from the first byte: refused logins are told apart in logs
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

    def data_received(self, data: bytes) -> None:  # noqa: PLR0911 - the relay's hot path: each return is one chunk's fast exit, not a call
        if self.state != _READY:
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
        if self.deferring:
            self._defer(data, syncs)
            return
        server = self.server
        if server is not None:
            # A new Query/Parse (or the rest of one): session state may pin this client (tracker.py).
            session = self.session
            if scanner.sql_chunk is not session.sql_seen or session.tap is not None:
                effect = session.chunk_effect(scanner, data)[0]  # mid-transaction: the route is chosen already
                if not effect.nothing and not self._apply(effect):
                    return
            if scanner.named_at >= 0 and self._send_rewritten(server, data, syncs):
                return
            if syncs:
                if self.pending <= 0:
                    server.query_started = now = time.monotonic()
                    if server.assigned_at < 0:  # a pinned client's next transaction starts
                        server.assigned_at = now
                self.pending += syncs
            server.pipeline.open = False  # more than one request: nothing may be pipelined behind it
            server.write(data)
            return
        if scanner.named_at >= 0:
            self._named_queued()
        self.pending += syncs
        self._queue(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.state = ClientState.CLOSED
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        if self._login_server is not None and not self._login_server.done():
            self._login_server.cancel()
        self.app.client_closed(self)
        if self.waiting:
            self.waiting = False
            self._forget_wait()
        reasons = self.session.held_reasons()
        if reasons:
            self._unpin("client left")
        server = self.server
        if server is not None:
            self.server = None
            if self.deferring:
                # Its request is a whole autocommit one: the pipeline goes on, its answer is dropped.
                self.deferring = False
                self.drop_held_cancels()
                server.forget(self)
                return
            server.client = None
            self._server_after_client(server, reasons)

    def pause_writing(self) -> None:
        self.write_paused = True
        server = self.server
        # Only the client being answered holds the server's reading back (one pipelined behind it does
        # once its turn comes: server._turn).
        if server is not None and server.client is self:
            server.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        server = self.server
        if server is not None and server.client is self:
            server.resume_reading(after_cancels=True)  # held back until a cancel is out (cancel.py)

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
        self._enqueue(data, *self._new_effects(data))

    def _new_effects(self, data: bytes) -> tuple[Effect, Effect]:
        """The session effect and route of SQL this chunk brings (none when it brings no new SQL)."""
        session = self.session
        if self.scanner.sql_chunk is not session.sql_seen or session.tap is not None:
            return session.chunk_effect(self.scanner, data)
        return NOTHING, NOTHING

    def _enqueue(self, data: bytes, effect: Effect, route: Effect) -> None:  # noqa: PLR0912 - per request on the hot path: a call per branch would cost throughput
        if self.waiting or self.linking is not None:
            self.pipeline.pipelinable = False  # more than its first request waits now
            # The pool is chosen: a session feature now pins whatever server this client gets.
            if not effect.nothing and not self._apply(effect):
                return
            self.buffer.append(data)
            self.buffered += len(data)
            if self.buffered > _QUEUE_LIMIT:
                self.pause_input()
            return
        if self.pool.draining:
            self.shutdown_close()
            return
        if self.held_effects is not None or not self.scanner.at_boundary:
            held = self.held_effects
            if held is not None:
                effect, route = held[0].then(effect), held[1].then(route)
            if not take_server_now(
                at_boundary=self.scanner.at_boundary, buffered=self.buffered + len(data), limit=_QUEUE_LIMIT
            ):
                # Half a message: keep its bytes (and their session effects) until the rest is here, so
                # that a client stalling mid-message holds no server connection.
                self.held_effects = (effect, route)
                self.buffer.append(data)
                self.buffered += len(data)
                return
            self.held_effects = None
        # A new transaction: the statements that start it choose the pool (session.py).
        pool = self.pool
        if not effect.nothing:
            if not self._apply(effect):
                return
            reason = effect.route or route.route
            pinned = self.session.pin_reason
            if pool.direct is not None and (pinned or reason):
                pool = pool.direct
                if not pinned:
                    pool.stats.routed[reason] += 1
        elif route.route and pool.direct is not None:
            pool = pool.direct
            pool.stats.routed[route.route] += 1
        now = time.monotonic()
        self.pipeline.pipelinable = ok = self._pipelinable(data, effect, route)
        if ok and not pool.waiters:
            target = pool.pipeline_target(self, now)
            if target is not None:
                self.request_time = time.time()
                pool.stats.client_wait.observe(0.0)
                target.add_to_pipeline([self], data)
                return
        self.buffer.append(data)
        self.buffered += len(data)
        self.request_time = time.time()
        server = pool.acquire(self, now)
        if server is not None:
            self.attach(server, now)
        else:
            self.waiting = True
            if self.buffered > _QUEUE_LIMIT:
                self.pause_input()

    # ------------------------------------------------------------- session state: pin, unpin, route

    def _chunk_effect(self, data: bytes) -> tuple[Effect, Effect]:
        """The session effect of the SQL in this chunk, and the route of a statement still arriving."""
        return self.session.chunk_effect(self.scanner, data)

    def _apply(self, effect: Effect) -> bool:
        """Apply a statement's pins and clears; False (and the client is answered) when over the limit."""
        pool = self.pool
        server = self.server or self.linking
        pin = self.session.apply(
            effect,
            transaction_pooler=pool.transaction_pooler,
            server_errors=server.scanner.errors if server is not None else None,
        )
        if pin is None:
            return True
        reason, reasons = pin
        limit = pool.pin_limit
        # Where it would land matters behind a pooler only: the waiters' scan is not made for nothing.
        on_pooler = pool.transaction_pooler and (
            server.pool is pool if server is not None else self.waiting and self in pool.waiters
        )
        if pins_nothing(
            transaction_pooler=pool.transaction_pooler, has_direct=pool.direct is not None, on_pooler=on_pooler
        ):
            log.warning("session_feature_refused", pool=pool.name, client=self.describe(), reason=reason)
            self._refuse("0A000", no_session_message(reason), no_session_hint())
            return False
        if len(pool.pinned) >= limit:
            log.warning("pin_limit_reached", pool=pool.name, client=self.describe(), reason=reason, limit=limit)
            self._refuse("53400", pin_limit_message(pool=pool.name, limit=limit, reason=reason), pin_limit_hint())
            return False
        self.session.pin(reason, reasons, time.time())
        pool.pinned.add(self)
        pool.stats.pins[reason] += 1
        log.info("client_pinned", pool=pool.name, client=self.describe(), reason=reason)
        return True

    def _refuse(self, code: str, text: str, hint: str) -> None:
        """Answer a statement that must not run (with no server, the client goes on)."""
        if self.server is not None or self.linking is not None:
            # Mid-transaction the statement cannot be answered for the server: end this client
            # (its transaction is rolled back) rather than run it without what it needs.
            self.fatal(code, text, hint=hint)
        else:
            if self.waiting:
                self.waiting = False
                self._forget_wait()
            self._fail_queued(code, text, hint)

    def _unpin(self, why: str) -> None:
        log.info(
            "client_unpinned", pool=self.pool.name, client=self.describe(), reason=self.session.pin_reason, why=why
        )
        self.pool.pinned.discard(self)
        self.session.unpin()

    # ------------------------------------------------------------- pipelining across clients (server.py)

    def _pipelinable(self, data: bytes, effect: Effect, route: Effect) -> bool:
        """May this chunk be pipelined on a busy server behind another client's request?

        Only one whole autocommit request of one plain statement (no session effect, no statement
        name, nothing else owed or held): it cannot leave a transaction or session state behind for
        the requests queued after it.
        """
        session = self.session
        plain, session.plain_req = session.plain_req, False
        self.head = None  # a new transaction: nothing of an earlier answer is still owed
        pipeline = self.pipeline
        pipeline.keys = None
        pipeline.shape = None
        scanner = self.scanner
        if not (
            self.pending == 1
            and not self.buffer
            and effect.nothing
            and route.nothing
            and not session.pin_reason
            and self.held_effects is None
            and scanner.at_boundary
            and not scanner.unsynced
            and len(data) <= _PIPELINE_MAX_REQUEST
            and self.pool.pipeline_depth > 0
        ):
            return False
        if self.rewrite_queued:
            # It binds named prepared statements: pipelinable where the server has them all (a rename).
            bound = self.statements.bound(data) if self.statements is not None else None
            if bound is None:
                return False
            keys = []
            for bind in bound:
                statement = bind[0]
                if not self._autocommit_statement(statement):
                    return False
                keys.append(statement.key)
            pipeline.keys = keys
            pipeline.binds = bound
            if len(keys) == 1:
                pipeline.shape = keys[0]
            return True
        if plain and scanner.sql_chunk is data and scanner.named_at < 0:
            pipeline.shape = session.plain_template
            return True
        return False

    @staticmethod
    def _autocommit_statement(statement: Statement) -> bool:
        autocommit = statement.autocommit
        if autocommit is None:
            sql = statement.key[: statement.key.find(b"\x00")]
            autocommit = statement.autocommit = quick_nothing(sql.decode("utf-8", "replace")) and autocommit_head(sql)
        return autocommit

    def _defer(self, data: bytes, syncs: int) -> None:
        """Hold what a client in a pipeline sends: it starts a new transaction once its answer is in."""
        effect, route = self._new_effects(data)
        held = self.held_effects
        self.held_effects = (effect, route) if held is None else (held[0].then(effect), held[1].then(route))
        self.buffer.append(data)
        self.buffered += len(data)
        self.pipeline.deferred_syncs += syncs
        if self.buffered > _QUEUE_LIMIT:
            self.pause_input()

    def pipelined_request(self, server: ServerConnection, data: bytes | None, owed_before: int) -> bytes:
        """Its request, to be pipelined on ``server`` behind ``owed_before`` others (``data``, or what it queued)."""
        if data is None:
            buffer = self.buffer
            data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
            self.buffer = []
            self.buffered = 0
        if self.rewrite_queued:
            # Statement names only (the server has them all: server.can_pipeline checked).
            self.rewrite_queued = False
            data = self.rename_for(server, data, owed_before)
        self.server = server
        self.deferring = True
        return data

    def pipeline_started(self) -> None:
        """Another client's request is pipelined behind its own: what it sends next waits (:meth:`_defer`)."""
        self.deferring = True

    def leave_pipeline(self, now: float, *, last: bool = False) -> bool:
        """Its answer is complete: the transaction is over; True if it holds bytes sent meanwhile.

        The server goes on with the next request, or (``last``) it is the last in the pipeline and the
        server goes back to the pool as after any transaction. What it holds goes out once the server
        has split the whole chunk of answers (:meth:`resume_deferred`).
        """
        self.deferring = False
        if last:
            self.release_server(now)
            return bool(self.buffer)
        server = self.server
        self.drop_held_cancels()
        if server is None:
            return bool(self.buffer)
        self._transaction_done(server, now)
        self.server = None
        if self.write_paused:
            server.resume_reading()
        if self.close_after_release:
            self.shutdown_close()
        return bool(self.buffer)

    def forward_held_cancels(self) -> None:
        """Its request reached the head of its pipeline: the cancels that waited for that go out now."""
        self.app.forward_held_cancel(self)

    def statements_discarded(self) -> None:
        """DISCARD ALL / DEALLOCATE ALL ran: in PostgreSQL's terms it has no prepared statement left."""
        if self.statements is not None:
            self.statements.clear()

    def drop_held_cancels(self) -> None:
        """Its request was answered (or never will be) before its turn came: nothing left to cancel."""
        for requester in self.pipeline.take_cancels():
            if requester is not None:
                requester.close()

    def _transaction_done(self, server: ServerConnection, now: float) -> None:
        self.pipeline.cancel_asked = False
        stats = self.pool.stats
        started = server.assigned_at
        elapsed = now - (started if started >= 0 else server.query_started)
        stats.transactions += 1
        stats.transaction_duration.observe(elapsed)
        stats.xact_time_total += elapsed
        self.scanner.sql_chunk = self.session.sql_seen = b""  # do not keep the last chunk alive while idle

    def resume_deferred(self) -> None:
        """Send what it held while in a pipeline, as a new transaction."""
        if self.closed or not self.buffer:
            return
        self.pending += self.pipeline.take_syncs()
        data = self.buffer[0] if len(self.buffer) == 1 else b"".join(self.buffer)
        self.buffer = []
        self.buffered = 0
        self._enqueue(data, NOTHING, NOTHING)  # held_effects carry what its statements do
        if self.buffered <= _QUEUE_LIMIT:
            self.resume_input()

    def _forget_wait(self) -> None:
        self.pool.forget_waiter(self)
        if self.pool.direct is not None:
            self.pool.direct.forget_waiter(self)

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
        future = self._login_server
        if future is not None:  # still logging in: the server is for checking its startup parameters
            self._login_server = None
            future.set_result(server)
            return
        changes = server.settings_changes(self.wanted_key(), self.wanted)
        if changes:
            self.linking = server
            self.app.spawn(self._sync_then_link(server, changes))
            return
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
        if self.write_paused:
            server.pause_reading()
        if server.write_paused:
            self.pause_input()
        else:
            self.resume_input()
        buffer = self.buffer
        if buffer:
            data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
            self.buffer = []
            self.buffered = 0
            if self.rewrite_queued:
                self.rewrite_queued = False
                pipeline = self.pipeline
                keys = pipeline.keys if pipeline.pipelinable else None
                if keys is not None and server.statements.renames_only(keys):
                    data = self.rename_for(server, data, 0)  # the pipelinable shape: names only
                elif keys is not None and server.statements.reprepares(pipeline.binds):
                    data = self.rename_for(server, data, 0)  # the same, behind a transaction pooler
                else:
                    # Nothing of this client's is outstanding on the server yet: its first message is at
                    # the server's current ReadyForQuery count, first in its batch.
                    data = self._rewrite(server, data, (server.scanner.ready_total, 0))
            if data:
                server.send_soon(data)
        # Others may be pipelined behind its request only if nothing in the server's answer is to be
        # rewritten (a Parse the sidecar added for it, say): server._split forwards answers untouched.
        carried = server.pipeline
        carried.open = self.pipeline.pipelinable and not server.statements.active
        carried.quick = carried.open and server.pool.times.quick(self.pipeline.shape)
        self.pipeline.shape = None  # its time to the answer includes the trip to the server: not a measure

    # ------------------------------------------------------------- named prepared statements (prepared.py)

    def _statements(self) -> ClientStatements | None:
        """This client's statements, or ``None`` (and the scanner's flag reset) with the feature off."""
        statements = self.statements
        if statements is None:
            if self.app.settings.max_prepared_statements <= 0:
                self.scanner.named_at = -1
                return None
            statements = self.statements = ClientStatements()
        return statements

    def _named_queued(self) -> None:
        """A queued chunk names a prepared statement: rewrite the buffer when a server is linked."""
        if self._statements() is not None:
            self.scanner.named_at = -1
            self.rewrite_queued = True

    def _send_rewritten(self, server: ServerConnection, data: bytes, syncs: int) -> bool:
        """Forward a chunk naming a prepared statement, rewritten; False to forward it untouched."""
        statements = self._statements()
        if statements is None:
            return False
        scanner = self.scanner
        head = b""
        start: tuple[int, int] | None = None
        binds = self._reprepared_here(server, statements, data)
        if binds is not None:
            # Behind a transaction pooler, one Bind of a statement first in a batch: prepared again and
            # described in front of it, and checked as it comes back (prepared.AnswerHead), as pipelined
            # requests are (rename_for); the same inside a transaction.
            self.pending += syncs
            server.query_started = time.monotonic()
            scanner.named_at = -1
            self.head = AnswerHead(binds[0][0])
            server.write(statements.reprepare(data, server.statements, binds, server.scanner.ready_total))
            return True
        if not statements.engaged:
            # Its messages before the first named one go as they are; the rest starts at the server's
            # position: ReadyForQuery seen + owed before it, and its place in the current batch.
            at = scanner.named_at
            start = (server.scanner.ready_total + self.pending + scanner.named_syncs, scanner.named_batch)
            if at:
                head, data = data[:at], data[at:]
        if syncs:
            if self.pending <= 0:
                server.query_started = now = time.monotonic()
                if server.assigned_at < 0:
                    server.assigned_at = now
            self.pending += syncs
        data = self._rewrite(server, data, start)
        if head or data:
            server.write(head + data)
        return True

    def _reprepared_here(
        self, server: ServerConnection, statements: ClientStatements, data: bytes
    ) -> list[Bound] | None:
        """The Binds of ``data`` if it is a request :meth:`ClientStatements.reprepare` serves on ``server`` now."""
        scanner = self.scanner
        if (
            not server.statements.transaction
            or statements.engaged
            or self.pending != 0
            or self.head is not None
            or scanner.named_at != 0
            or scanner.named_syncs != 0
            or scanner.named_batch != 0
        ):
            return None
        binds = statements.bound(data)
        return binds if binds is not None and server.statements.reprepares(binds) else None

    def rename_for(self, server: ServerConnection, data: bytes, owed_before: int) -> bytes:
        """Its pipelinable request, renamed for ``server``, which owes ``owed_before`` ReadyForQuery before it."""
        assert self.statements is not None
        binds, self.pipeline.binds = self.pipeline.binds, []
        self.scanner.named_at = -1
        statements = server.statements
        z = server.scanner.ready_total + owed_before
        if statements.transaction:
            self.head = AnswerHead(binds[0][0])
            return self.statements.reprepare(data, statements, binds, z)
        return self.statements.rename(data, statements, binds, z)

    def _rewrite(self, server: ServerConnection, data: bytes, start: tuple[int, int] | None) -> bytes:
        """Rewrite ``data`` for ``server``; answers due now go to the client. Returns the bytes to send."""
        statements = self.statements
        assert statements is not None
        try:
            data, answers = statements.rewrite(data, server.statements, start)
        except ProtocolError as exc:
            self.protocol_violation(str(exc))
            return b""
        # While a message is split across reads, every read must come through here.
        self.scanner.named_at = 0 if statements.engaged else -1
        if answers:
            self.transport.write(answers)
        return data

    async def _sync_then_link(self, server: ServerConnection, changes: list[tuple[str, str | None]]) -> None:
        # The server's session settings differ from what this client set up: align them first, in
        # a query the client never sees (PgBouncer does the same with its variable cache).
        try:
            async with asyncio.timeout(_INTERNAL_QUERY_TIMEOUT):
                error = await server.sync_settings(changes, self.wanted_key())
        except (Exception, asyncio.CancelledError) as exc:
            self.linking = None
            server.pool.server_broken(server, f"session parameter sync failed: {exc!r}")
            if not self.closed:
                self.fatal("08006", f"the server connection of pool {self.pool.name!r} failed while being set up")
            return
        self.linking = None
        if self.closed:
            server.client = None
            server.pool.release(server, time.monotonic())
            return
        if error is not None:
            server.client = None
            server.pool.release(server, time.monotonic())
            self.fatal(
                error.get("C", "22023"),
                f"startup parameter rejected by the server: {error.get('M', 'invalid value')}",
            )
            return
        self._link(server)

    def release_server(self, now: float) -> None:
        """ReadyForQuery(I) with nothing owed: the transaction is over, hand the server back.

        A pinned client keeps it (until it disconnects or a reset statement of its own frees it).
        """
        server = self.server
        if server is None:
            return
        self._transaction_done(server, now)
        session = self.session
        if session.pin_reason:
            if session.transaction_over(server.scanner.errors):
                server.assigned_at = -1.0  # data_received stamps the next transaction's start
                if self.close_after_release:
                    self.shutdown_close()
                return
            self._unpin("reset by the client")
        self.server = None
        if self.write_paused:
            server.resume_reading()
        if server.write_paused:
            self.resume_input()
        server.pool.release(server, now)
        if self.close_after_release:
            self.shutdown_close()

    def _server_after_client(self, server: ServerConnection, pinned: frozenset[str] = frozenset()) -> None:
        """Clean up a server whose client vanished while holding it (``pinned``: the session state it had)."""
        if server.state is ServerState.CLOSED:
            return
        if self.write_paused:
            server.resume_reading()
        action = on_client_gone(
            status=server.scanner.status,
            pending=self.pending,
            unsynced=self.scanner.unsynced,
            client_at_boundary=self.scanner.at_boundary and not self.dirty,
            server_at_boundary=server.scanner.at_boundary,
        )
        pool = server.pool
        if pinned and action is not ClientGone.CLOSE and not decide(pool.reset_query).clears >= pinned:
            # server_reset_query cannot undo this client's session state: nobody else may get it.
            log.info("server_closed", pool=pool.name, server=server.describe(), reason="pinned, no full reset")
            action = ClientGone.CLOSE
        if action is ClientGone.RELEASE and not pinned:
            pool.release(server, time.monotonic())
        elif action is not ClientGone.CLOSE:
            self.app.spawn(server.reset(rollback=action is ClientGone.ROLLBACK, timeout=_INTERNAL_QUERY_TIMEOUT))
        else:
            log.info("server_closed", pool=pool.name, server=server.describe(), reason="client left mid-query")
            pool.close_server(server, "client gone")
            # A no-op for a closed server; its connection_lost refills the pool (UpstreamPool.server_lost).
            pool.release(server, time.monotonic())

    # ------------------------------------------------------------- failures the client must hear about

    def _fail_queued(self, code: str, text: str, hint: str | None) -> None:
        """Answer every queued request with an error, keeping the session usable if the protocol allows."""
        self.waiting = False
        if self.session.pin_reason and self.server is None and self.linking is None:
            self._unpin("its statements never ran")  # pinned while waiting: no session state was made
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
            self._forget_wait()
            self._fail_queued("57014", "canceling statement due to user request", None)

    def server_lost(self, text: str | None) -> None:
        """Its server connection closed; ``None``: the server's own FATAL already reached this client."""
        self.server = None
        self.deferring = False
        self.drop_held_cancels()
        if text is None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
        else:
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
        elif self.deferring:
            if at > 0 or self.buffer:
                # Sent behind a pipelined request whose answer it did not wait for: there is no place
                # for it in that server's order, and nobody is left to answer (see README).
                log.warning("client_left_pipelined", client=self.describe())
            self.buffer = []
        elif at > 0 and self.server is not None:
            # Sent before Terminate, so still run (a Sync commits): with their statements renamed.
            if self.scanner.named_at < 0 or not self._send_rewritten(self.server, data[:at], 0):
                self.server.write(data[:at])
            # Nothing reads the answer to what was just sent (nor was its SQL checked for session
            # state): close that server rather than hand it to the next client.
            self.dirty = True
        self.transport.close()

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if self.state in (ClientState.STARTUP, ClientState.AUTH, ClientState.WELCOME):
            self.pool.stats.client_logins["error"] += 1
            self.fatal("08006", f"client_login_timeout ({self.app.settings.client_login_timeout:g}s) expired")

    # ------------------------------------------------------------- login (slow path)

    def _slow_data(self, data: bytes) -> None:
        # Dispatch on a local: the handlers change self.state.
        state = self.state
        try:
            if state in (ClientState.STARTUP, ClientState.AUTH):
                login = self._login
                assert login is not None
                self._carry_out(login, login.feed(data, self._login_rules()))
            elif state == ClientState.WELCOME:
                assert self._login is not None
                self._login.early += data
            elif state == ClientState.ADMIN:
                assert self._reader is not None
                for kind, body in self._reader.feed(data):
                    self._on_admin_message(kind, body)
        except ProtocolError as exc:
            self.pool.stats.client_logins["error"] += self.state != ClientState.ADMIN
            self.protocol_violation(str(exc))

    def _login_rules(self) -> LoginRules:
        app = self.app
        settings = app.settings
        return LoginRules(
            users=app.users,
            database=self.pool.dsn.database,
            admin_database=settings.admin_database,
            trust=settings.effective_auth_type == "trust",
            tls_offered=app.client_tls_context is not None and not self.tls,
            tls_required=settings.effective_client_tls == "require" and not self.tls and not self.unix,
            loopback=self.loopback,
            peer=self.peer,
        )

    def _carry_out(self, login: Login, actions: list[LoginAction]) -> None:
        """Do what the login (login.py) decided, in its order."""
        self.user = login.user
        self.database = login.database
        self.admin = login.admin
        if login.wanted is not None and self.state == ClientState.STARTUP:
            self.wanted = login.wanted
            self._wanted_key = None
        for action in actions:
            if isinstance(action, Send):
                self.transport.write(action.data)
            elif isinstance(action, AskPassword):
                self.state = ClientState.AUTH
                self.transport.write(action.data)
            elif isinstance(action, Authenticated):
                self._logged_in(action.auth_messages)
            elif isinstance(action, Refuse):
                self._login_failed(action.code, action.text)
            elif isinstance(action, WrongPassword):
                self.pool.stats.client_logins["auth_failed"] += 1
                log.info("client_auth_failed", client=self.describe())
                self.fatal("28P01", action.text)
                self.state = ClientState.CLOSED
            elif isinstance(action, StartTLS):
                self.transport.write(b"S")
                # Stop reading now: the ClientHello must reach the TLS layer, not this protocol.
                self.transport.pause_reading()
                self.app.spawn(self._start_tls())
            else:
                # The app closes this connection once the cancel is forwarded (PostgreSQL's order too);
                # CLOSED: nothing more is read from it and client_login_timeout does not answer it.
                self.state = ClientState.CLOSED
                if self._login_timer is not None:
                    self._login_timer.cancel()
                    self._login_timer = None
                self.app.cancel(action.process_id, action.secret_key, self.transport)

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

    def _login_failed(self, code: str, text: str) -> None:
        self.pool.stats.client_logins["error" if code != "28P01" else "auth_failed"] += 1
        log.info("client_login_refused", client=self.describe(), code=code, reason=text)
        self.fatal(code, text)
        self.state = ClientState.CLOSED

    def _logged_in(self, auth_messages: bytes) -> None:
        app = self.app
        if self.admin:
            console = app.open_console(self)
            if isinstance(console, str):
                self._login_failed("28000", console)  # after the password check, as PgBouncer
                return
            self.console = console
        else:
            pool = app.pool_for(self.user)
            if isinstance(pool, str):
                self._login_failed("28000", pool)
                return
            self.pool = pool
        self.process_id, self.secret_key = app.register_cancel_key(self)
        if self.admin:
            self._reader = MessageReader(side="client", max_message_size=protocol.MAX_INSPECTED_SIZE)
            welcome = self.pool.welcome or [("server_version", "15.0"), ("client_encoding", "UTF8")]
            self._finish_login(auth_messages, welcome, ClientState.ADMIN)
            return
        welcome_params = self.pool.welcome
        canonical, unknown = app.startup_checks_for(self.pool).resolve(self.wanted, self.pool.generation)
        if welcome_params is not None and not unknown:
            self._set_wanted_all(canonical)
            self._finish_login(auth_messages, welcome_params, ClientState.READY)
            return
        self.state = ClientState.WELCOME
        app.spawn(self._wait_welcome(auth_messages, unknown))

    async def _wait_welcome(self, auth_messages: bytes, unknown: list[tuple[str, str]]) -> None:
        try:
            welcome_params = await self.pool.ensure_welcome()
        except ConnectError as exc:
            self.pool.stats.client_logins["error"] += 1
            problem = "cannot log in to" if isinstance(exc, AuthenticationFailed) else "cannot reach"
            self.fatal("08006", f"pool {self.pool.name!r} {problem} its upstream: {exc}")
            return
        if unknown and not self._login_over():
            refused = await self._check_startup(unknown)
            if refused is not None:
                self._refuse_startup(auth_messages, refused)
                return
        if not self._login_over():
            self._finish_login(auth_messages, welcome_params, ClientState.READY)

    def _login_over(self) -> bool:
        """Did the login end while it waited (the client left, a FATAL was sent: login timeout, pool failure)?"""
        return self.closed or self.state != ClientState.WELCOME or self.transport.is_closing()

    async def _check_startup(self, unknown: list[tuple[str, str]]) -> Rejection | None:
        """Have a server connection check startup parameters not seen before (startup.py); the rejection, if any.

        The server is taken like a transaction's (waiting, query_wait_timeout and all) and given back
        unchanged: the check's settings are local to its implicit transaction.
        """
        pool = self.pool
        generation = pool.generation
        self._login_server = future = asyncio.get_running_loop().create_future()
        server = pool.acquire(self, time.monotonic())
        if server is None:
            self.waiting = True  # attach() hands it a server (or _fail_queued ends the login)
        else:
            self.attach(server, time.monotonic())
        server = await future
        rows: list[bytes] = []
        try:
            async with asyncio.timeout(_INTERNAL_QUERY_TIMEOUT):
                spelling = (self._login.spelling if self._login is not None else None) or {}
                spelled = [(spelling.get(name, name), value) for name, value in unknown]
                error = await server.run_internal(check_query(spelled), rows)
        except (Exception, asyncio.CancelledError) as exc:
            pool.server_broken(server, f"startup parameter check failed: {exc!r}")
            if not self._login_over():
                pool.stats.client_logins["error"] += 1
                self.fatal("08006", f"the server connection of pool {pool.name!r} failed while being set up")
            self.state = ClientState.CLOSED
            if isinstance(exc, asyncio.CancelledError):
                raise
            return None
        server.client = None
        pool.release(server, time.monotonic())
        if error is not None:
            return rejection(error)
        checks = self.app.startup_checks_for(pool)
        learned = checks.learn(unknown, [first_column(row) for row in rows], generation)
        self._set_wanted_all({**self.wanted, **learned})
        return None

    def _set_wanted_all(self, wanted: dict[str, str]) -> None:
        self.wanted = wanted
        self._wanted_key = None

    def _refuse_startup(self, auth_messages: bytes, refused: Rejection) -> None:
        """A startup parameter the upstream rejected fails the login after AuthenticationOk, as on PostgreSQL."""
        if self._login_over():
            return
        self.pool.stats.client_logins["error"] += 1
        log.info("client_login_refused", client=self.describe(), code=refused.code, reason=refused.message)
        self.state = ClientState.CLOSED
        transport = self.transport
        if not transport.is_closing():
            error = protocol.error_response(
                refused.code, refused.message, severity="FATAL", detail=refused.detail, hint=refused.hint
            )
            transport.write(auth_messages + error)
            transport.close()

    def _finish_login(self, auth_messages: bytes, params: list[tuple[str, str]], state: ClientState) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        # Every setting the server reports that the client set (default_transaction_read_only too), with
        # the value the server made of it (startup.py).
        reported = {name.lower() for name, _ in params}
        overrides = tuple(sorted((k, v) for k, v in self.wanted.items() if k in TRACKED_PARAMETERS or k in reported))
        body = self.app.welcome_bytes(params, overrides)
        self.transport.write(
            auth_messages
            + body
            + protocol.backend_key_data(self.process_id, self.secret_key)
            + protocol.ready_for_query()
        )
        self.state = state
        self.pool.stats.client_logins["ok"] += 1
        if state == ClientState.READY:
            self.pool.clients.add(self)
        login, self._login = self._login, None
        early = login.early if login is not None else b""
        if early:
            self.data_received(early)

    # ------------------------------------------------------------- admin console

    def _on_admin_message(self, kind: bytes, body: bytes) -> None:
        if kind == b"X":
            self.transport.close()
        elif kind == b"Q":
            assert self.console is not None
            self.console.query(protocol.parse_query(body))
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

    def __repr__(self) -> str:
        server = f"#{self.server.ident}" if self.server is not None else "-"
        pin_reason = self.session.pin_reason
        pinned = f" pinned={pin_reason}" if pin_reason else ""
        return (
            f"<ClientConnection #{self.process_id} {self.user or '?'}@{self.peer} {self.state.name.lower()} "
            f"server={server} pending={self.pending}{pinned}>"
        )
