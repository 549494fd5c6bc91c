"""The upstream pool: idle server connections, the FIFO of waiting clients, opening and closing servers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from poolkit.core.dsn import redact
from poolkit.errors import AuthenticationFailed, ConnectError, ProtocolError, SSLError
from poolkit.obs.log import get_logger
from poolkit.sidecar.conn.server import ServerConnection
from poolkit.sidecar.policy.auth import upstream_tls
from poolkit.sidecar.policy.pooling import (
    ServerState,
    connections_to_open,
    login_retry_wait,
    may_pipeline,
    needs_check,
    pool_exhausted_message,
    server_expired,
)
from poolkit.sidecar.policy.session import PIN_REASONS
from poolkit.sidecar.policy.shapes import RequestTimes
from poolkit.sidecar.stats.metrics import SidecarStats
from poolkit.sidecar.wire.protocol import IDLE
from poolkit.sql.normalize import normalize

if TYPE_CHECKING:
    from poolkit.sidecar.conn.client import ClientConnection
    from poolkit.sidecar.policy.config import SidecarSettings

log = get_logger("sidecar")


def _password_refused(exc: BaseException, user: str, setting: str) -> BaseException:
    """A pooler's answer to a wrong password, as the authentication failure it is.

    PgBouncer (and other poolers) refuse a wrong password with SQLSTATE 08P01 ("SASL authentication
    failed") where PostgreSQL says 28P01, so the SQLSTATE alone files it under "cannot connect".
    """
    if type(exc) is ConnectError and exc.reason == "refused" and "authentication failed" in str(exc):
        answer = str(exc).removeprefix("the upstream refused the login: ")
        return AuthenticationFailed(
            f'the upstream refused the password of user "{user}": {answer}; check the password in {setting}',
            reason="auth",
        )
    return exc


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, SSLError):
        return "tls"
    if isinstance(exc, AuthenticationFailed):
        return "auth"
    if isinstance(exc, ProtocolError):
        return "protocol"
    return "connect"


class UpstreamPool:
    """At most ``max_size`` server connections to one upstream URL, handed out per transaction.

    Every method is synchronous and runs on the event loop: a free server goes to a client in the
    same callback that freed it, without a task switch.

    The sidecar's pool forwards to the configured upstream. When that is the pooled URL and a direct
    URL is set too, ``direct`` is a second, small pool (``is_direct``, ``direct_max_size``, sharing
    ``stats``) for pinned clients and routed transactions. ``pinned`` holds the clients pinned to a
    server connection (kept on the sidecar's pool, whichever pool their server came from).
    """

    def __init__(self, settings: SidecarSettings, stats: SidecarStats | None = None, *, direct: bool = False) -> None:
        self.stats = stats or SidecarStats()
        self.is_direct = direct
        self.direct: UpstreamPool | None = None
        self.pinned: set[ClientConnection] = set()
        self.idle: list[ServerConnection] = []  # LIFO: the warmest connection is reused first
        self.servers: set[ServerConnection] = set()
        self.clients: set[ClientConnection] = set()
        self.waiters: deque[ClientConnection] = deque()
        self.connecting = 0
        self.checking = 0  # idle servers taken out for server_check_delay's empty query
        # Servers a forwarded CancelRequest is on its way to, with how many; one released meanwhile
        # waits in ``held`` until they are done, so that no cancel reaches the next client's query.
        self.being_canceled: dict[ServerConnection, int] = {}
        self.held: set[ServerConnection] = set()
        self.retry_at = 0.0  # no connect attempt before this (server_login_retry after a failure)
        self._retry_timer: asyncio.TimerHandle | None = None
        self.generation = 0
        self.times = RequestTimes()  # which request shapes run quickly (only those pipelined while one is idle)
        self.gathering: set[ServerConnection] = set()  # servers whose write waits for the end of this loop turn
        self.draining = False
        self.welcome: list[tuple[str, str]] | None = None
        self.last_error: str | None = None
        self._welcome_waiters: list[asyncio.Future[None]] = []
        self._wait_timer: asyncio.TimerHandle | None = None
        self._next_ident = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.settings = settings
        self.configure(settings)

    def configure(self, settings: SidecarSettings) -> None:
        """Apply (re)loaded settings. A new upstream URL retires the old connections as they free up."""
        dsn = settings.direct_dsn() if self.is_direct else settings.upstream_dsn()
        old = getattr(self, "dsn", None)
        if old is not None and (old.to_url() != dsn.to_url() or settings.sslrootcert != self.settings.sslrootcert):
            self.generation += 1
            self.welcome = None
            for server in list(self.idle):
                self._close_idle(server, "reload")
        self.settings = settings
        self.dsn = dsn
        self.tls = upstream_tls(dsn, settings.sslrootcert)
        self.name = settings.effective_pool_name
        self.route = "direct" if self.is_direct else settings.route
        self.label = f"{self.name} (direct)" if self.is_direct else self.name  # for messages, not metrics
        self.max_size = settings.direct_max_size if self.is_direct else settings.effective_max_size
        # Decided per pool: the direct URL is always a session. A change of URL retires the old servers,
        # so every server keeps the mode it was opened with.
        self.transaction_pooler = not self.is_direct and settings.transaction_pooler
        self.query_wait_timeout = settings.query_wait_timeout
        self.slow_query_seconds = settings.slow_query_seconds
        self.pipeline_depth = settings.pipeline_depth
        self.max_message_size = settings.max_message_size
        self.reset_query = settings.server_reset_query.strip()
        self.startup = {
            "user": dsn.user,
            "database": dsn.database,
            "application_name": settings.application_name,
        }
        while len(self.servers) > self.max_size and self.idle:
            self._close_idle(self.idle[0], "reload")

    def __repr__(self) -> str:
        # The pool's name and route, never its URL: the password lives there.
        servers = self.server_counts()
        flags = " draining" if self.draining else ""
        return (
            f"<UpstreamPool {self.name} {self.route}{flags} max={self.max_size} active={servers['active']} "
            f"idle={servers['idle']} connecting={servers['connecting']} waiting={len(self.waiters)} "
            f"clients={len(self.clients)} pinned={len(self.pinned)}>"
        )

    # ------------------------------------------------------------- counts (metrics, admin)

    def client_counts(self) -> dict[str, int]:
        active = sum(1 for c in self.clients if c.server is not None)
        waiting = len(self.waiters) + (len(self.direct.waiters) if self.direct is not None else 0)
        return {"active": active, "waiting": waiting, "idle": max(0, len(self.clients) - active - waiting)}

    def pinned_counts(self) -> dict[str, int]:
        """Pinned clients by the reason that pinned them (every reason present, 0 when none)."""
        counts = dict.fromkeys(PIN_REASONS, 0)
        for client in self.pinned:
            reason = client.session.pin_reason
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    @property
    def pin_limit(self) -> int:
        """``max_pinned_clients``, or by default one less than the connections pins draw from (at least 1)."""
        configured = self.settings.max_pinned_clients
        if configured is not None:
            return configured
        size = self.direct.max_size if self.direct is not None else self.max_size
        return max(1, size - 1)

    def retire(self) -> None:
        """Stop using this pool (its upstream was removed on reload): idle servers close now, busy ones on release."""
        self.generation += 1
        self.draining = True
        for server in list(self.idle):
            self._close_idle(server, "reload")

    def server_counts(self) -> dict[str, int]:
        idle = len(self.idle)
        return {
            "active": len(self.servers) - idle - self.connecting,
            "idle": idle,
            "connecting": self.connecting,
        }

    # ------------------------------------------------------------- hand-out and give-back

    def acquire(self, client: ClientConnection, now: float) -> ServerConnection | None:
        """A server for ``client`` now, or ``None`` after queueing it (it is attached when one frees up)."""
        idle = self.idle
        while idle:
            server = idle.pop()
            if server.state is ServerState.IDLE:
                self._change_state(server, ServerState.ACTIVE)
                if needs_check(now=now, idle_since=server.idle_since, check_delay=self.settings.server_check_delay):
                    # Idle long enough to have died unseen: check it first; this client waits for it
                    # (or for any other server that frees up sooner).
                    self.checking += 1
                    self._spawn(self._check(server))
                    break
                return server
        self.waiters.append(client)
        client.wait_started = now
        if self._wait_timer is None and self.query_wait_timeout > 0:
            self._arm_wait_timer(now)
        if len(self.servers) < self.max_size:  # at max_size (the busy steady state) nothing to open
            self._fill()
        return None

    def pipeline_target(self, client: ClientConnection, now: float) -> ServerConnection | None:
        """A busy server ``client``'s request may be pipelined on, the least loaded; ``None`` if none may."""
        best: ServerConnection | None = None
        depth = self.pipeline_depth
        idle = bool(self.idle)
        candidates = self.servers
        if idle:
            # Only a quick request may be pipelined, and only onto a write still being gathered (pooling.may_pipeline).
            if not self.gathering or not self.times.quick(client.pipeline.shape):
                return None
            candidates = self.gathering
        fewest = depth  # the least loaded so far must have fewer queued than pipeline_depth
        for server in candidates:
            pipeline = server.pipeline
            queued = len(pipeline.queued)
            if (
                queued < fewest
                and server.can_pipeline(client)
                and may_pipeline(
                    state=server.state,
                    being_canceled=server in self.being_canceled,
                    current_generation=server.generation == self.generation,
                    writable=server.writable,
                    running_for=now - server.query_started,
                    idle_elsewhere=idle,
                    onto_quick_write=pipeline.quick,  # candidates are the writes being gathered
                )
            ):
                best, fewest = server, queued
        return best

    def top_up(self, server: ServerConnection) -> None:
        """Queue waiting clients' pipelinable requests on ``server``, in their order, in one write."""
        waiters = self.waiters
        if not waiters or not server.pipeline.open or server in self.being_canceled or self.draining:
            return
        room = self.pipeline_depth - len(server.pipeline.queued)
        taken: list[ClientConnection] = []
        while waiters and room > 0:
            client = waiters[0]
            if client.closed:
                waiters.popleft()
                continue
            if not client.pipeline.pipelinable or not server.can_pipeline(client):
                break  # first come, first served: nobody overtakes a client that needs a server of its own
            waiters.popleft()
            taken.append(client)
            room -= 1
        if taken:
            now = time.monotonic()
            for client in taken:
                client.waiting = False
                waited = now - client.wait_started
                self.stats.client_wait.observe(waited)
                self.stats.wait_time_total += waited
            server.add_to_pipeline(taken)

    def release(self, server: ServerConnection, now: float) -> None:
        """``server`` finished a transaction: give it to the next waiting client or put it back."""
        server.client = None
        server.pipeline.open = False
        if server.state is ServerState.CLOSED:
            return
        if server in self.being_canceled:
            self.held.add(server)  # handed on when its cancels are done (cancel_done)
            return
        if (
            server.generation != self.generation
            or len(self.servers) > self.max_size
            or server.scanner.status != IDLE
            or server.transport is None
            or server.transport.is_closing()
            or (self.settings.server_lifetime > 0 and now - server.created_at >= self.settings.server_lifetime)
        ):
            self.close_server(server, "lifetime" if server.generation == self.generation else "reload")
            self._fill()
            return
        waiters = self.waiters
        while waiters:
            client = waiters.popleft()
            if not client.closed:
                self._change_state(server, ServerState.ACTIVE)
                client.attach(server, now)
                if server.pipeline.open:
                    self.top_up(server)
                return
        self._change_state(server, ServerState.IDLE)
        server.idle_since = now
        self.idle.append(server)

    def cancel_started(self, server: ServerConnection) -> None:
        """A CancelRequest is being forwarded to ``server``: it serves nobody else until :meth:`cancel_done`."""
        count = self.being_canceled.get(server, 0)
        self.being_canceled[server] = count + 1
        if not count:
            server.cancel_started()

    def cancel_done(self, server: ServerConnection) -> None:
        left = self.being_canceled.get(server, 0) - 1
        if left > 0:
            self.being_canceled[server] = left
            return
        self.being_canceled.pop(server, None)
        server.cancel_over()
        if server in self.held:
            self.held.discard(server)
            self.release(server, time.monotonic())

    def forget_waiter(self, client: ClientConnection) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(client)

    # ------------------------------------------------------------- a server's state (only here)

    def _change_state(self, server: ServerConnection, state: ServerState) -> None:
        # The one assignment of a server's state (PgBouncer's change_server_state).
        server.state = state

    def _forget(self, server: ServerConnection) -> None:
        """``server`` is closed: no longer counted in this pool (its transport is the caller's to close)."""
        self._change_state(server, ServerState.CLOSED)
        self.servers.discard(server)

    def close_server(self, server: ServerConnection, reason: str) -> None:
        """Close ``server`` politely (Terminate) and stop counting it; the caller takes it out of ``idle``."""
        self._forget(server)
        server.close(reason)

    # ------------------------------------------------------------- losing servers

    def server_lost(self, server: ServerConnection, exc: BaseException | None) -> None:
        """The transport closed (upstream restart, pg_terminate_backend, network)."""
        if server.state is ServerState.CONNECTING:
            return  # the connect coroutine reports it
        was_closed = server.state is ServerState.CLOSED
        self._forget(server)
        if server in self.idle:
            self.idle.remove(server)
        self.held.discard(server)
        client = server.client
        server.client = None
        pipelined = server.end_pipeline()
        if client is not None or pipelined:
            if not was_closed:
                self.stats.upstream_errors["terminated"] += 1
            detail = f": {exc}" if exc else ""
            text = f"the server connection of pool {self.name!r} was lost{detail}"
            if client is not None:
                client.server_lost(None if server.fatal_sent else text)
            for queued in pipelined:
                queued.server_lost(text)
        elif not was_closed and not server.close_reason:
            self.stats.upstream_errors["terminated"] += 1
            log.info("server_closed", pool=self.name, server=server.describe(), reason="closed by upstream")
        self._fill()

    def close_busy(self, server: ServerConnection, reason: str) -> None:
        """Close a server a client holds (query_timeout), at once; the caller tells that client."""
        client = server.client
        server.client = None
        if client is not None and client.server is server:
            client.server = None
        self._forget(server)
        self.held.discard(server)
        server.abort(reason)  # not close(): a stalled upstream would never take a polite Terminate
        self._fill()

    def server_broken(self, server: ServerConnection, message: str) -> None:
        """The upstream sent something the codec rejects: drop that connection (and its client)."""
        log.warning("server_protocol_error", pool=self.name, server=server.describe(), error=message)
        server.abort("protocol")

    def _close_idle(self, server: ServerConnection, reason: str) -> None:
        if server in self.idle:
            self.idle.remove(server)
        self.close_server(server, reason)

    def close_expired(self, now: float) -> int:
        """Close idle servers past server_idle_timeout or server_lifetime; return how many."""
        closed = 0
        for server in list(self.idle):
            reason = server_expired(
                now=now,
                created_at=server.created_at,
                idle_since=server.idle_since,
                idle_timeout=self.settings.server_idle_timeout,
                lifetime=self.settings.server_lifetime,
            )
            if reason is not None:
                self._close_idle(server, reason)
                closed += 1
        return closed

    def close_all(self, reason: str) -> None:
        for server in list(self.servers):
            self._change_state(server, ServerState.CLOSED)
            server.close(reason)
        self.servers.clear()
        self.idle.clear()
        self.held.clear()
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------- waiting clients

    def _arm_wait_timer(self, now: float) -> None:
        # One timer for the whole FIFO, armed for its head: far cheaper than a timer per wait.
        if not self.waiters:
            return
        head = self.waiters[0].wait_started
        delay = max(0.0, head + self.query_wait_timeout - now)
        self._wait_timer = asyncio.get_running_loop().call_later(delay, self._on_wait_timer)

    def _on_wait_timer(self) -> None:
        self._wait_timer = None
        now = time.monotonic()
        timeout = self.query_wait_timeout
        waiters = self.waiters
        while waiters and (timeout <= 0 or now - waiters[0].wait_started >= timeout - 0.001):
            client = waiters.popleft()
            if client.closed:
                continue
            if timeout <= 0:
                waiters.appendleft(client)
                break
            self.stats.query_wait_timeouts += 1
            waited = now - client.wait_started
            text = pool_exhausted_message(pool=self.label, max_size=self.max_size, waited=waited, waiting=len(waiters))
            log.warning(
                "pool_exhausted",
                pool=self.label,
                max_size=self.max_size,
                waited=round(waited, 3),
                waiting=len(waiters),
                client=client.describe(),
            )
            client.wait_timed_out(text)
        if waiters and timeout > 0:
            self._arm_wait_timer(now)

    # ------------------------------------------------------------- opening servers

    def _fill(self) -> None:
        if self.draining and not self.waiters:
            return
        count = connections_to_open(
            waiting=len(self.waiters),
            connecting=self.connecting + self.checking,  # a server being checked will serve a waiter too
            total=len(self.servers),
            max_size=self.max_size,
        )
        if count <= 0:
            return
        now = time.monotonic()
        wait = login_retry_wait(now=now, retry_at=self.retry_at)
        if wait > 0:
            # server_login_retry: the last attempt failed moments ago. The waiting clients wait for the
            # next one (failing them now with that stale error would also fail them right after the
            # upstream came back); if it fails too, _connect_failed tells them.
            self._arm_retry(wait)
            return
        for _ in range(count):
            self._spawn(self._open_one(self._new_server()))

    def _arm_retry(self, wait: float) -> None:
        if self._retry_timer is None:
            self._retry_timer = asyncio.get_running_loop().call_later(wait, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        if self._welcome_waiters and not self.servers:
            self._spawn(self._open_one(self._new_server()))
        self._fill()

    def _fail_waiters(self, message: str) -> None:
        while self.waiters:
            client = self.waiters.popleft()
            if not client.closed:
                client.upstream_failed(message)

    async def _check(self, server: ServerConnection) -> None:
        """server_check_delay: an empty query; a server that fails it is closed, the pool opens another."""
        failure = ""
        try:
            async with asyncio.timeout(self.settings.server_check_timeout):
                error = await server.run_internal("")
            if error is not None:
                failure = error.get("M", "error")
        except (Exception, asyncio.CancelledError) as exc:
            failure = "no answer within server_check_timeout" if isinstance(exc, TimeoutError) else repr(exc)
            if isinstance(exc, asyncio.CancelledError):
                self.checking -= 1
                raise
        self.checking -= 1
        now = time.monotonic()
        if not failure:
            server.idle_since = now
            self.release(server, now)
            return
        if server.state is not ServerState.CLOSED:  # else server_lost has counted and logged it
            log.warning("server_check_failed", pool=self.name, server=server.describe(), error=failure)
            self.stats.upstream_errors["terminated"] += 1
            self._forget(server)
            server.abort("check failed")
        self._fill()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _new_server(self) -> ServerConnection:
        # Counted in ``servers`` and ``connecting`` now, not when its task first runs: every client
        # queued in this loop iteration calls _fill, and each must see the connections already on the way.
        self._next_ident += 1
        server = ServerConnection(self, self._next_ident, self.generation)
        self.servers.add(server)
        self.connecting += 1
        return server

    async def _open_one(self, server: ServerConnection) -> None:
        began = time.monotonic()
        try:
            timeout = self.settings.connect_timeout or None
            async with asyncio.timeout(timeout):
                await server.connect(self.dsn, self.tls, self.startup)
        except (Exception, asyncio.CancelledError) as exc:
            self.connecting -= 1
            self._forget(server)
            server.abort("connect failed")
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._connect_failed(exc, time.monotonic() - began)
            return
        self.connecting -= 1
        self.last_error = None
        if (
            server.state is ServerState.CONNECTING
            and server.transport is not None
            and not server.transport.is_closing()
        ):
            self._change_state(server, ServerState.ACTIVE)
            if self.welcome is None:
                self.welcome = list(server.reported)
            self._wake_welcome(None)
            self.release(server, time.monotonic())
        else:
            # Lost while logging in (server_lost left it to us) or closed by close_all: its state stays.
            self.servers.discard(server)
            self._fill()

    def _connect_failed(self, exc: BaseException, elapsed: float) -> None:
        if isinstance(exc, TimeoutError) and not isinstance(exc, ConnectError):
            message = (
                f"connecting to the upstream {self.dsn.redacted()} took more than connect_timeout="
                f"{self.settings.connect_timeout:g}s"
            )
        else:
            setting = "direct_url" if self.is_direct else self.settings.upstream_field()
            exc = _password_refused(exc, self.dsn.user, setting)
            # Driver and TLS messages carry no password today; redact anyway, this text reaches logs and clients.
            message = redact(str(exc), self.dsn.password)
        kind = _error_kind(exc)
        self.stats.upstream_errors[kind] += 1
        self.last_error = message
        log.warning("upstream_connect_failed", pool=self.name, kind=kind, error=message, seconds=round(elapsed, 3))
        if self.settings.server_login_retry > 0:
            self.retry_at = time.monotonic() + self.settings.server_login_retry
        error = (AuthenticationFailed if kind == "auth" else ConnectError)(message, reason=kind)
        self._wake_welcome(error)
        # With no live server, nobody would serve the waiting clients: tell them now instead of
        # letting them sit until query_wait_timeout.
        if not self.servers:
            self._fail_waiters(message)
        elif self.waiters:
            self._fill()  # live servers may still free up; arm the retry for the shortfall

    # ------------------------------------------------------------- welcome parameters

    async def ensure_welcome(self) -> list[tuple[str, str]]:
        """The ParameterStatus list new clients get; connects a first server if none has logged in."""
        while self.welcome is None:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._welcome_waiters.append(future)
            if not self.servers:
                wait = login_retry_wait(now=time.monotonic(), retry_at=self.retry_at)
                if wait > 0:
                    self._arm_retry(wait)  # server_login_retry: join the next attempt
                else:
                    self._spawn(self._open_one(self._new_server()))
            await future
        return self.welcome

    def _wake_welcome(self, error: BaseException | None) -> None:
        waiters, self._welcome_waiters = self._welcome_waiters, []
        for future in waiters:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    # ------------------------------------------------------------- logging

    def slow_query(self, client: ClientConnection, elapsed: float) -> None:
        self.stats.slow_queries += 1
        log.warning(
            "slow_query",
            pool=self.name,
            seconds=round(elapsed, 3),
            sql=normalize(client.scanner.last_sql()),
            client=client.describe(),
        )
