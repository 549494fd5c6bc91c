"""One client connection: the relay's client side (queue, attach, release), after its login (client_login.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from poolkit.errors import ProtocolError
from poolkit.obs.log import get_logger
from poolkit.sidecar.conn.client_login import ClientLogin, ConsoleFeed
from poolkit.sidecar.policy.pipeline import ClientPipeline
from poolkit.sidecar.policy.pooling import (
    POOL_EXHAUSTED_HINT,
    ClientGone,
    ClientState,
    ServerState,
    on_client_gone,
    take_server_now,
)
from poolkit.sidecar.policy.prepared import AnswerHead, ClientStatements, Statement
from poolkit.sidecar.policy.session import (
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
from poolkit.sidecar.policy.tracker import SessionTracker, pins_nothing
from poolkit.sidecar.wire import protocol
from poolkit.sidecar.wire.protocol import FrontendScanner

if TYPE_CHECKING:
    import ssl

    from poolkit.sidecar.conn.pool import UpstreamPool
    from poolkit.sidecar.conn.server import ServerConnection
    from poolkit.sidecar.policy.auth import UserStore
    from poolkit.sidecar.policy.config import SidecarSettings
    from poolkit.sidecar.policy.startup import StartupChecks

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
        "login",
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
        self.peer = "unix" if unix else "?"
        self.user = ""
        self.database = ""
        self.process_id = 0
        self.secret_key = 0
        self.connect_time = time.time()
        self.request_time = self.connect_time
        # What reads its bytes until the relay does (client_login.py): the login under way, dropped once
        # the client is greeted; then, on the admin console, the console's feed.
        self.login: ClientLogin | None = ClientLogin(self)
        self.console: ConsoleFeed | None = None
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
        peer = None if self.unix else transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        app.client_opened(self)
        if self.login is not None:
            self.login.start(peer[0] if peer else None)

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
        if self.login is not None:
            self.login.abandon()
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
        login = self.login
        if login is not None and login.take_server(server):  # still logging in: it checks startup parameters
            return
        changes = server.settings_changes(self.session.wanted_key(), self.session.wanted)
        if changes:
            self.linking = server
            self.app.spawn(self._sync_then_link(server, changes))
            return
        self._link(server)

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
        binds = statements.reprepared_binds(
            data, server.statements, scanner, owed=self.pending, head_owed=self.head is not None
        )
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
        # Its messages before the first named one go as they are; the rest starts at the server's
        # position: ReadyForQuery seen + owed before it, and its place in the current batch.
        head, data, answers, error = statements.forward(
            data, server.statements, scanner, server.scanner.ready_total + self.pending
        )
        if syncs:
            if self.pending <= 0:
                server.query_started = now = time.monotonic()
                if server.assigned_at < 0:
                    server.assigned_at = now
            self.pending += syncs
        if error is not None:
            self.protocol_violation(error)
        elif answers:
            self.transport.write(answers)
        if head or data:
            server.write(head + data)
        return True

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
            data, answers = statements.rewrite_chunk(data, server.statements, start, self.scanner)
        except ProtocolError as exc:
            self.protocol_violation(str(exc))
            return b""
        if answers:
            self.transport.write(answers)
        return data

    async def _sync_then_link(self, server: ServerConnection, changes: list[tuple[str, str | None]]) -> None:
        # The server's session settings differ from what this client set up: align them first, in
        # a query the client never sees (PgBouncer does the same with its variable cache).
        try:
            async with asyncio.timeout(_INTERNAL_QUERY_TIMEOUT):
                error = await server.sync_settings(changes, self.session.wanted_key())
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

    # ------------------------------------------------------------- before the relay (client_login.py)

    def _slow_data(self, data: bytes) -> None:
        login = self.login
        if login is not None:
            login.data_received(data)
        elif self.console is not None:
            self.console.data_received(data)

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
