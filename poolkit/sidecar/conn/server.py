"""One upstream server connection: TLS + login handshake, internal queries, and the relay's server side."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

from poolkit.core.dsn import Dsn
from poolkit.errors import AuthenticationFailed, ConnectError, ProtocolError, SSLError
from poolkit.obs.log import get_logger
from poolkit.sidecar.policy.auth import UpstreamAuth, UpstreamTls
from poolkit.sidecar.policy.pipeline import Deliver, ServerPipeline, Turn
from poolkit.sidecar.policy.pooling import TRACKED_PARAMETERS, ServerState, parameter_changes, should_release
from poolkit.sidecar.policy.prepared import ServerStatements
from poolkit.sidecar.policy.startup import sync_statements
from poolkit.sidecar.wire import protocol
from poolkit.sidecar.wire.protocol import IDLE, BackendScanner, MessageReader

if TYPE_CHECKING:
    from poolkit.sidecar.conn.client import ClientConnection
    from poolkit.sidecar.conn.pool import UpstreamPool

log = get_logger("sidecar")
# Bytes relayed from one server connection before the event loop gets to run everything else once. libuv
# reads a readable socket up to 32 times (256 KiB each) per loop turn: a large result of small messages
# then kept every other socket waiting for hundreds of milliseconds per turn on a busy box, a CancelRequest
# among them (issue 15). One turn per full read costs a few microseconds against milliseconds of relaying.
_TURN_BUDGET = 256 * 1024


class ServerConnection(asyncio.Protocol):
    """An upstream connection. ``client`` is the client it serves now (``None`` while idle).

    Handshake and internal queries (``SET`` sync, ``ROLLBACK``) read whole messages; once ``relay``
    is on, received chunks are scanned for ReadyForQuery and written to the client unchanged, except
    while ``statements`` (its named prepared statements, prepared.py) owes the client rewritten answers.

    Pipelining across clients: while the request it runs is one autocommit statement (``pipeline.open``),
    other clients' such requests may be pipelined right behind it (``pipeline.queued``, in order).
    PostgreSQL answers them in order, so the answers are split at each ReadyForQuery and ``client``
    moves on to the next (``pipeline.active`` until none is left). ``pipeline`` (pipeline.py) holds that
    state and decides; this connection moves the bytes and carries out its actions. This saves the
    round trip between transactions and lets PostgreSQL read several requests per wake-up; PgBouncer
    does not do it. Nothing can leave state behind for the next request: each one is a whole implicit
    transaction of a statement without session effect (client.py ``_pipelinable``).
    """

    def __init__(self, pool: UpstreamPool, ident: int, generation: int) -> None:
        self.pool = pool
        self.ident = ident
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.relay = False
        self.state = ServerState.CONNECTING  # only the pool changes it (UpstreamPool._change_state)
        self.scanner = BackendScanner(pool.max_message_size)
        self.backend_pid = 0
        self.fatal_sent = False  # the server sent a FATAL ErrorResponse: it is about to close
        self.backend_key = 0
        self.reported: list[tuple[str, str]] = []  # ParameterStatus at login, original spelling
        self.defaults: dict[str, str] = {}  # lower-case name -> value at login
        self.current: dict[str, str] = {}  # lower-case name -> value now
        self.statements = ServerStatements(
            self.scanner,
            pool.settings.max_prepared_statements,
            pool.stats.prepared_statements,
            transaction=pool.transaction_pooler,
        )
        # The settings key of the last client this session was aligned for: when the next client
        # has the same key, comparing settings is skipped (the usual case: one app, one key).
        self.session_key: tuple[tuple[str, str], ...] | None = None
        now = time.monotonic()
        self.created_at = now
        self.idle_since = now
        self.assigned_at = now
        self.query_started = now
        self.last_ready = now
        self.close_reason = ""
        self.write_paused = False
        # Pipelining across clients (pipeline.py): the clients queued behind ``client``, their answers.
        self.pipeline: ServerPipeline[ClientConnection] = ServerPipeline(self._can_rerun)
        self._loop = asyncio.get_running_loop()  # cached: the lookup costs a getpid() per call
        self.peer = ""
        self._reader = MessageReader(side="server", max_message_size=protocol.MAX_INSPECTED_SIZE)
        self._inbox: deque[tuple[bytes, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ssl_byte: asyncio.Future[bytes] | None = None
        self._lost: BaseException | None = None
        self._lost_flag = False
        self._relayed = 0  # bytes relayed since the loop last had a turn of its own (_TURN_BUDGET)
        self._yielding = False

    # ------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:  # noqa: PLR0912 - the relay's hot path: one chunk, no call per message
        if not self.relay:
            self._handshake_data(data)
            return
        self._relayed += len(data)
        if self._relayed >= _TURN_BUDGET and not self._yielding:
            self._yield_turn()
        client = self.client
        errors = self.scanner.errors
        try:
            ready = self.scanner.feed(data)
        except ProtocolError as exc:
            self.pool.stats.upstream_errors["protocol"] += 1
            self.pool.server_broken(self, f"upstream protocol error: {exc}")
            return
        if self.scanner.errors != errors and b"VFATAL\x00" in data:
            # The server says why it ends the session (pg_terminate_backend, a shutdown): the client that
            # gets this answer hears it in PostgreSQL's words, not the sidecar's "lost" (pool.server_lost).
            self.fatal_sent = True
        if self.scanner.parameters is not None:
            self._parameters_changed(client)
        if self.scanner.discarded:
            self._statements_discarded(client)
        if self.pipeline.active:
            self._split(data)
            return
        if client is None:
            if self.statements.active:
                self.statements.responses(data)  # keep its walk in step
            return  # an idle server's notice or notification: nobody to tell
        if self.statements.active:
            data = self.statements.responses(data)  # answers for rewritten requests (prepared.py)
        head = client.head  # what _deliver does, inline: one call fewer per chunk on the relay's hot path
        if head is not None:
            data = head.feed(data)
            if head.done:
                client.head = None
        client.transport.write(data)
        self.pool.stats.sent_bytes += len(data)
        if ready:
            now = self._answered(client, ready)
            cscan = client.scanner
            # Positional: this runs once per transaction on the hot path.
            if should_release(self.scanner.status, client.pending, cscan.unsynced, cscan.at_boundary):
                client.release_server(now)

    def _yield_turn(self) -> None:
        """Stop reading until the loop has run its other callbacks once (see _TURN_BUDGET)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._yielding = True
        transport.pause_reading()
        self._loop.call_soon(self._turn_over)

    def _turn_over(self) -> None:
        self._yielding = False
        self._relayed = 0
        transport = self.transport
        client = self.client
        # Read on unless someone else holds reading back: a client whose socket is full, a cancel on its way.
        if (
            transport is not None
            and not transport.is_closing()
            and not (client is not None and client.write_paused)
            and self not in self.pool.being_canceled
        ):
            transport.resume_reading()

    def _answered(self, client: ClientConnection | None, ready: int) -> float:
        """``ready`` ReadyForQuery reached ``client`` (``None``: nobody): count the queries; return now."""
        now = time.monotonic()
        elapsed = now - self.query_started
        self.query_started = now
        self.last_ready = now
        stats = self.pool.stats
        stats.queries += ready
        stats.query_duration.observe(elapsed)
        stats.query_time_total += elapsed
        if client is not None:
            pipeline = client.pipeline
            shape = pipeline.shape
            if shape is not None:
                pipeline.shape = None
                self.pool.times.observe(shape, elapsed)
            client.pending -= ready
            if elapsed >= self.pool.slow_query_seconds > 0:
                self.pool.slow_query(client, elapsed)
        return now

    # ------------------------------------------------------------- pipelining across clients (pipeline.py)

    def can_pipeline(self, client: ClientConnection) -> bool:
        """Could ``client``'s pipelinable request go behind what runs here, as it is (or only renamed)?

        Everything here is pipelinable, nothing in its answers is to be rewritten, its session has the
        client's settings, and it has every prepared statement the request binds.
        """
        statements = self.statements
        if not self.pipeline.open or statements.active or self.session_key != client.session.wanted_key():
            return False
        request = client.pipeline
        keys = request.keys
        return keys is None or statements.renames_only(keys) or statements.reprepares(request.binds)

    def _can_rerun(self, keys: list[bytes] | None) -> bool:
        """Does this connection still have what a request binding ``keys`` needs to run again?"""
        statements = self.statements
        return keys is None or statements.transaction or all(key in statements.cache for key in keys)

    @property
    def writable(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing() and not self.write_paused

    def add_to_pipeline(self, clients: list[ClientConnection], data: bytes | None = None) -> None:
        """Pipeline these clients' requests behind what this connection runs now (one write)."""
        pipeline = self.pipeline
        if not pipeline.active and self.client is not None:
            self.client.pipeline_started()
        quick = self.pool.times.quick
        flush = False
        for client in clients:
            request = client.pipelined_request(self, data, 1 + len(pipeline.queued))
            flush = pipeline.add(client, request, quick=quick(client.pipeline.shape)) or flush
        self.pool.stats.pipelined_requests += len(clients)
        if flush:
            self._flush_soon()

    def send_soon(self, request: bytes) -> None:
        """Write ``request`` at the end of this turn of the event loop, with whatever else is queued here by then."""
        self._send_soon([request])

    def _send_soon(self, requests: list[bytes]) -> None:
        if self.pipeline.gather(requests):
            self._flush_soon()

    def _flush_soon(self) -> None:
        # The turn ends after the other sockets ready now are read, so a lone request waits for nothing.
        self.pool.gathering.add(self)
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        data = self.pipeline.take_outbox()
        self.pool.gathering.discard(self)
        if data:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)

    def forget(self, client: ClientConnection) -> None:
        """``client`` left while its request is in the pipeline: its answer will be dropped."""
        if self.client is client:
            self.client = None
        else:
            self.pipeline.forget(client)

    def end_pipeline(self) -> list[ClientConnection]:
        """The connection is gone: the clients still pipelined on it (each must be told: client.server_lost)."""
        return self.pipeline.end()

    def _split(self, data: bytes) -> None:
        """Deliver a pipelined connection's answers (pipeline.py splits them): each ReadyForQuery ends one turn."""
        resume: list[ClientConnection] = []  # clients done here with bytes held meanwhile (client._defer)
        for action in self.pipeline.split(data, tuple(self.scanner.ends), self.client):
            # A broken or last turn is the split's last action: the loop ends with it (no break, which would
            # leave the generator to be closed).
            if type(action) is Turn:  # not isinstance: a call per answer on the hot path
                self._turn(action, resume)
            else:
                assert isinstance(action, Deliver)  # the start of the next answer, once per chunk at most
                self._deliver(action.client, action.data)
        # Their transaction is over whatever became of this connection: what they held goes out now.
        for client in resume:
            client.resume_deferred()

    def _deliver(self, client: ClientConnection, part: bytes) -> None:
        answer_head = client.head
        if answer_head is not None:
            part = answer_head.feed(part)
            if answer_head.done:
                client.head = None
        client.transport.write(part)
        self.pool.stats.sent_bytes += len(part)

    def _turn(self, turn: Turn[ClientConnection], resume: list[ClientConnection]) -> None:
        """Carry out one turn of the pipeline (pipeline.Turn)."""
        answered = turn.answered
        if answered is not None:
            if turn.data:
                self._deliver(answered, turn.data)
            if turn.late is not None or turn.resent:
                self._answer_held(answered, turn)
        now = self._answered(answered, 1)
        if turn.broken:
            log.warning("pipeline_left_transaction", pool=self.pool.name, server=self.describe())
            self.abort("a pipelined request left a transaction open")
            return
        done = turn.done
        if not turn.last:
            if done is not None and done.leave_pipeline(now):
                resume.append(done)  # what it sent meanwhile goes out as a new transaction
            nxt = self.client = turn.next
            self.assigned_at = now
            if nxt is not None:
                if nxt.write_paused:
                    self.pause_reading()  # its socket is full: hold the rest of the pipeline back
                if turn.cancels:
                    nxt.forward_held_cancels()
            self.pool.top_up(self)
            return
        self._pipeline_over(done, turn.rest, now, resume)

    def _pipeline_over(
        self, done: ClientConnection | None, rest: bytes, now: float, resume: list[ClientConnection]
    ) -> None:
        """The last request of the pipeline is answered: the connection goes back as after any transaction."""
        if done is not None:
            if done.leave_pipeline(now, last=True):
                resume.append(done)
        else:
            self.client = None
            self.pool.release(self, now)
        if rest and self.client is not None:
            self._deliver(self.client, rest)

    def _answer_held(self, client: ClientConnection, turn: Turn[ClientConnection]) -> None:
        """``client``'s answer was held (a cancel may have hit it): write it now, or send its request again."""
        if turn.late is not None:
            self._deliver(client, turn.late)
        elif turn.resent:
            # It never ran to completion and was rolled back: running it again is what its client asked.
            self.pool.stats.pipeline_retries += 1
            log.info("pipelined_request_retried", pool=self.pool.name, client=client.describe())
            client.pending += 1
            if turn.resend is not None:
                self._send_soon([turn.resend])

    def cancel_started(self) -> None:
        """A cancel is on its way to this connection (the pool's count went from none to one)."""
        self.pipeline.cancel_started()

    def cancel_over(self) -> None:
        """No cancel is on its way to this connection any more: send the requests that waited for that."""
        requests = self.pipeline.cancel_over()
        if requests:
            self._send_soon(requests)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost_flag = True
        self._lost = exc
        self._wake()
        if self._ssl_byte is not None and not self._ssl_byte.done():
            self._ssl_byte.set_exception(ConnectError("the upstream closed the connection during TLS setup"))
        self.pool.server_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        client = self.client
        if client is not None and self.relay:
            client.pause_input()

    def resume_writing(self) -> None:
        self.write_paused = False
        client = self.client
        if client is not None:
            client.resume_input()

    # ------------------------------------------------------------- relay helpers

    def _parameters_changed(self, client: ClientConnection | None) -> None:
        params = self.scanner.parameters or []
        self.scanner.parameters = None
        self.session_key = None  # the session changed: compare settings again at the next hand-out
        for name, value in params:
            key = name.lower()
            self.current[key] = value
            if client is not None and key in TRACKED_PARAMETERS:
                # The client changed it itself (SET): it expects it in its next transactions too.
                client.session.set_wanted(key, value)

    def _statements_discarded(self, client: ClientConnection | None) -> None:
        # DISCARD ALL / DEALLOCATE ALL: the session has no prepared statement left, and in
        # PostgreSQL's terms neither has the client that ran it.
        self.scanner.discarded = False
        self.statements.discard_all()
        if client is not None:
            client.statements_discarded()

    def pause_reading(self) -> None:
        """Stop reading answers (the client's socket is full)."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self, *, after_cancels: bool = False) -> None:
        """Read answers again (``after_cancels``: unless a cancel on its way holds reading back: cancel.py)."""
        transport = self.transport
        if (
            transport is not None
            and not transport.is_closing()
            and not (after_cancels and self in self.pool.being_canceled)
        ):
            transport.resume_reading()

    def write(self, data: bytes) -> None:
        """Write ``data`` now, or behind what :meth:`send_soon` queued this turn (order is the protocol)."""
        outbox = self.pipeline.outbox
        if outbox is not None:
            outbox.append(data)
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def close(self, reason: str) -> None:
        """Close the connection politely (Terminate) and remember why."""
        if not self.close_reason:
            self.close_reason = reason
        self._flush()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self.relay and self.scanner.at_boundary:
                transport.write(protocol.terminate())
            transport.close()

    def abort(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------- handshake / internal queries

    def _handshake_data(self, data: bytes) -> None:
        if self._ssl_byte is not None and not self._ssl_byte.done():
            self._ssl_byte.set_result(data[:1])
            data = data[1:]
            if not data:
                return
        try:
            self._inbox.extend(self._reader.feed(data))
        except ProtocolError as exc:
            self._lost = exc
            self._lost_flag = True
            if self.transport is not None:
                self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next_message(self) -> tuple[bytes, bytes]:
        while not self._inbox:
            if self._lost_flag:
                if isinstance(self._lost, ProtocolError):
                    raise self._lost
                raise ConnectionResetError("the upstream closed the connection")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._inbox.popleft()

    async def connect(self, dsn: Dsn, tls: UpstreamTls, startup: dict[str, str]) -> None:  # noqa: PLR0912, PLR0915 - the login handshake, step by step in the protocol's order
        """Open the socket, negotiate TLS as ``tls`` says, log in, and switch to relay mode."""
        loop = asyncio.get_running_loop()
        try:
            if dsn.is_unix_socket:
                await loop.create_unix_connection(lambda: self, f"{dsn.host}/.s.PGSQL.{dsn.port}")
            else:
                await loop.create_connection(lambda: self, dsn.host, dsn.port)
        except OSError as exc:
            raise ConnectError(
                f"cannot reach the upstream {dsn.redacted()}: {exc.strerror or exc}", reason="connect"
            ) from None
        assert self.transport is not None
        if tls.context is not None:
            self._ssl_byte = loop.create_future()
            self.transport.write(protocol.ssl_request())
            answer = await self._ssl_byte
            if answer != b"S":
                raise SSLError(
                    f"the upstream {dsn.redacted()} does not accept TLS but sslmode={tls.mode}: "
                    "enable ssl on the server or use sslmode=disable for a loopback upstream",
                    reason="tls",
                )
            try:
                new_transport = await loop.start_tls(
                    self.transport, self, tls.context, server_hostname=tls.server_hostname
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise SSLError(f"TLS to the upstream {dsn.redacted()} failed: {exc}", reason="tls") from None
            if new_transport is None:
                raise SSLError("TLS to the upstream failed: connection closed", reason="tls")
            self.transport = new_transport
            self.peer = "tls"
        self.transport.write(protocol.startup_message(startup))
        auth = UpstreamAuth(dsn.user, dsn.password)
        while True:
            kind, body = await self._next_message()
            if kind == b"R":
                code, data = protocol.parse_auth_request(body)
                reply = auth.respond(code, data)
                if reply is not None:
                    self.transport.write(reply)
            elif kind == b"S":
                name, value = protocol.parse_parameter_status(body)
                self.reported.append((name, value))
                self.defaults[name.lower()] = value
            elif kind == b"K":
                self.backend_pid, self.backend_key = protocol.parse_backend_key_data(body)
            elif kind == b"Z":
                break
            elif kind == b"E":
                fields = protocol.parse_error_fields(body)
                reason = fields.get("M", "unknown error")
                text = f"the upstream refused the login: {reason} (SQLSTATE {fields.get('C')})"
                if fields.get("C", "").startswith("28"):
                    raise AuthenticationFailed(text, reason="auth")
                raise ConnectError(text, reason="refused")
            # NoticeResponse, NegotiateProtocolVersion: nothing to do
        self.current = dict(self.defaults)
        for name, value in startup.items():
            self.current.setdefault(name.lower(), value)
            self.defaults.setdefault(name.lower(), value)
        self._reader = MessageReader(side="server", max_message_size=protocol.MAX_INSPECTED_SIZE)
        self.relay = True

    def settings_changes(
        self, key: tuple[tuple[str, str], ...], wanted: dict[str, str]
    ) -> list[tuple[str, str | None]]:
        """What to change for a client whose settings are ``wanted`` (``key``: their snapshot); [] for nothing."""
        if self.session_key == key:
            return []
        changes = parameter_changes(wanted, self.current, self.defaults)
        if not changes:
            self.session_key = key
        return changes

    async def sync_settings(
        self, changes: list[tuple[str, str | None]], key: tuple[tuple[str, str], ...]
    ) -> dict[str, str] | None:
        """Apply ``changes`` (from :meth:`settings_changes`) in a query the client never sees; its error, if any.

        Then the session has the settings whose snapshot is ``key`` (a rejected value is the client's to
        hear about): the next client with that key skips the comparison.
        """
        for name, value in changes:
            if value is None:
                if name in self.defaults:
                    self.current[name] = self.defaults[name]
                else:
                    self.current.pop(name, None)
            else:
                self.current[name] = value
        error = await self.run_internal(sync_statements(changes))
        self.session_key = key
        return error

    async def reset(self, *, rollback: bool, timeout: float) -> None:
        """ROLLBACK (if in a transaction) and server_reset_query, then go back to the pool; close on failure."""
        pool = self.pool
        error: dict[str, str] | None = None
        try:
            async with asyncio.timeout(timeout):
                if rollback:
                    error = await self.run_internal("ROLLBACK")
                if error is None and pool.reset_query:
                    error = await self.run_internal(pool.reset_query)
                    if error is None and pool.reset_query.upper().endswith("ALL"):
                        self.current = dict(self.defaults)
                        self.session_key = None
        except (Exception, asyncio.CancelledError) as exc:
            error = {"M": repr(exc)}
        if error is not None:
            log.warning("server_reset_failed", pool=pool.name, server=self.describe(), error=error.get("M"))
            pool.close_server(self, "reset failed")
        pool.release(self, time.monotonic())

    async def run_internal(self, sql: str, rows: list[bytes] | None = None) -> dict[str, str] | None:
        """Run ``sql`` as a simple query the client never sees; return the first error's fields, if any.

        ParameterStatus changes are recorded in ``current``; DataRow bodies go to ``rows`` when given.
        The server must be at ReadyForQuery.
        """
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the upstream connection is closed")
        self.statements.reset()
        self.relay = False
        # Its answer must be read whatever held reading back for the relay (a turn yielded, a client whose
        # socket was full when this server was handed to it); the relay pauses again where it must.
        self.transport.resume_reading()
        self._flush()  # whatever was written before goes first
        self.transport.write(protocol.query(sql))
        error: dict[str, str] | None = None
        while True:
            kind, body = await self._next_message()
            if kind == b"E" and error is None:
                error = protocol.parse_error_fields(body)
            elif kind == b"D" and rows is not None:
                rows.append(body)
            elif kind == b"C" and body in (b"DISCARD ALL\x00", b"DEALLOCATE ALL\x00"):
                self.statements.discard_all()  # the reset query: nothing stays prepared
            elif kind == b"S":
                name, value = protocol.parse_parameter_status(body)
                self.current[name.lower()] = value
                self.session_key = None
            elif kind == b"Z":
                self.scanner.status = body[0] if body else IDLE
                break
        # Anything after ReadyForQuery is an asynchronous notice for nobody.
        self._inbox.clear()
        rest = self._reader.take_rest()
        if rest:
            self.scanner.feed(rest)  # keep the header walk in step with the byte stream
        self.relay = True
        return error

    def __repr__(self) -> str:
        client = f"#{self.client.process_id}" if self.client is not None else "-"
        return (
            f"<ServerConnection #{self.ident} {self.pool.name} {self.pool.route} {self.state} "
            f"pid={self.backend_pid} client={client} pipelined={len(self.pipeline.queued)}>"
        )

    def describe(self) -> str:
        return f"server #{self.ident} (backend pid {self.backend_pid})"
