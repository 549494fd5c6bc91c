"""Wiring: listeners, the pool, ops HTTP, background tasks, signals (SIGTERM drain, SIGHUP reload)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import ssl
import time
import weakref
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from poolkit.core.detect import SIDECAR_PARAMETER
from poolkit.core.dsn import Dsn
from poolkit.errors import ConfigError, SidecarError
from poolkit.obs.log import get_logger
from poolkit.sidecar.conn.client import ClientConnection
from poolkit.sidecar.conn.pool import UpstreamPool
from poolkit.sidecar.policy.auth import UserStore, client_tls_context, is_scram_verifier, read_auth_file
from poolkit.sidecar.policy.config import RELOADABLE, SidecarSettings, load_sidecar_settings
from poolkit.sidecar.policy.pooling import ServerState
from poolkit.sidecar.policy.startup import StartupChecks
from poolkit.sidecar.service import admin
from poolkit.sidecar.service.cancel import Cancels
from poolkit.sidecar.service.http import OpsHttpServer
from poolkit.sidecar.service.maintenance import (
    IdleTransactionReaper,
    MaintenanceTask,
    QueryTimeoutReaper,
    ServerReaper,
)
from poolkit.sidecar.stats.metrics import make_registry
from poolkit.sidecar.wire import protocol
from poolkit.sidecar.wire.protocol import IDLE

if TYPE_CHECKING:
    pass

log = get_logger("sidecar")
_WELCOME_CACHE_SIZE = 256


def _secrets_from(settings: SidecarSettings) -> dict[str, str]:
    users = {name: secret.get_secret_value() for name, secret in settings.users.items()}
    if settings.auth_file is not None:
        users = {**read_auth_file(settings.auth_file), **users}
    return users


def _users_from(settings: SidecarSettings) -> UserStore:
    return UserStore(_secrets_from(settings))


def _upstream_passwords(settings: SidecarSettings) -> dict[str, str]:
    """The users' plain passwords (user_pools logs in upstream with them; a SCRAM verifier cannot)."""
    if not settings.user_pools:
        return {}
    return {name: secret for name, secret in _secrets_from(settings).items() if not is_scram_verifier(secret)}


def _as_user(secret: SecretStr, user: str, password: str) -> SecretStr:
    return SecretStr(replace(Dsn.parse(secret.get_secret_value()), user=user, password=password).to_url())


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
        # user_pools: a pool per user, logging in upstream as that user (the pool above is the URL's role's).
        self.user_pools: dict[str, UpstreamPool] = {}
        self.upstream_passwords = _upstream_passwords(settings)
        self._user_jobs: dict[str, list[MaintenanceTask]] = {}
        self.client_tls_context: ssl.SSLContext | None = None
        if settings.effective_client_tls != "disable" and settings.tls_cert_file and settings.tls_key_file:
            self.client_tls_context = client_tls_context(settings.tls_cert_file, settings.tls_key_file)
        self.connections: set[ClientConnection] = set()
        self.cancels = Cancels(self)
        self.cancel_keys = self.cancels.keys  # the process id a client was given -> it (SHOW, tests)
        self.registry = make_registry(self.all_pools)
        self.http = OpsHttpServer(self.registry, self.readiness)
        self.port = 0
        self.http_port = 0
        self.unix_socket_path: str | None = None
        self.started_at = time.monotonic()
        self.draining = False
        self.paused = False  # the admin console's PAUSE/KILL: no server connections until RESUME
        # Settings a SIGHUP read but that only a restart applies (SHOW CONFIG's "pending").
        self.pending_restart: dict[str, object] = {}
        self.reload_error: str | None = None
        self._listeners: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._maintenance: list[MaintenanceTask] = []
        self._direct_maintenance: list[MaintenanceTask] = []
        self._stopped: asyncio.Event | None = None
        self._welcome_cache: dict[tuple[int, tuple[tuple[str, str], ...]], bytes] = {}
        # What each pool's upstream made of clients' startup parameters (per pool: per upstream and role, as
        # ALTER ROLE ... SET changes the defaults a value like DateStyle=ISO is read against).
        self._startup_checks: weakref.WeakKeyDictionary[UpstreamPool, StartupChecks] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        if self.draining:
            state = "draining"
        elif self.paused:
            state = "paused"
        else:
            state = "running" if self._listeners else "stopped"
        pools = ",".join(pool.name for pool in self.all_pools())
        return f"<Sidecar {state} port={self.port} pools={pools} clients={len(self.connections)}>"

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
            upstream_mode=s.upstream_pooling[0],
            upstream_mode_reason=s.upstream_pooling[1],
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
        if pool.direct is None and pool.transaction_pooler:
            log.warning(
                "sidecar_session_features_refused",
                pool=pool.name,
                detail="the upstream is a transaction pooler and direct_url is not set: statements that need "
                "a session (SET of untracked settings, LISTEN, advisory locks, temporary tables, ...) are "
                "refused; set POOLKIT_DIRECT_URL to run them on the direct URL",
            )

    async def wait_stopped(self) -> None:
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight transactions finish (up to ``shutdown_timeout``), then close."""
        if self.draining:
            return
        self.draining = True
        for pool in self.upstream_pools():
            pool.draining = True
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
        for jobs in self._user_jobs.values():
            for job in jobs:
                await job.stop()
        self._user_jobs.clear()
        await self.http.close()
        for pool in self.upstream_pools():
            pool.close_all("shutdown")
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
        """Re-read settings (or apply ``settings``) without dropping clients; False if they are invalid.

        Settings that need a restart keep their running values (``settings`` says what is in effect);
        the new ones wait in ``pending_restart``.
        """
        self.reload_error = None
        if settings is None:
            try:
                settings = load_sidecar_settings(self.config_file, **self.overrides)
            except ConfigError as exc:
                self.reload_error = str(exc)
                log.warning("reload_failed", error=str(exc))
                return False
        old = self.settings.model_dump()
        new = settings.model_dump()
        changed = sorted(k for k in new if new[k] != old[k])
        restart = [k for k in changed if k not in RELOADABLE]
        if restart:
            log.warning("reload_needs_restart", settings=restart)
        pending = {k: getattr(settings, k) for k in restart}
        settings = settings.model_copy(update={k: getattr(self.settings, k) for k in restart})
        try:
            users = _users_from(settings)
            passwords = _upstream_passwords(settings)
            self.pool.configure(settings)
            self._configure_direct(settings)
            for user, pool in self.user_pools.items():
                if user in passwords:  # else its clients keep the pool as it was; new logins are refused
                    self._configure_user_pool(pool, self._user_settings(settings, user, passwords[user]))
        except ConfigError as exc:
            self.reload_error = str(exc)
            log.warning("reload_failed", error=str(exc))
            return False
        if self.paused:
            for pool in self.upstream_pools():
                self._hold(pool)  # configure() restored their sizes
        self.pending_restart = pending
        self.users = users
        self.upstream_passwords = passwords
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

    def startup_checks_for(self, pool: UpstreamPool) -> StartupChecks:
        """The cache of checked startup parameters for ``pool`` (startup.py)."""
        checks = self._startup_checks.get(pool)
        if checks is None:
            checks = self._startup_checks[pool] = StartupChecks()
        return checks

    def client_opened(self, client: ClientConnection) -> None:
        self.connections.add(client)

    def client_closed(self, client: ClientConnection) -> None:
        self.connections.discard(client)
        client.pool.clients.discard(client)
        self.cancels.forget(client)

    def next_process_id(self) -> int:
        """A new connection's number, from its first byte (see :meth:`Cancels.next_process_id`)."""
        return self.cancels.next_process_id()

    def register_cancel_key(self, client: ClientConnection) -> tuple[int, int]:
        """``client``'s BackendKeyData (see :meth:`Cancels.register_cancel_key`)."""
        return self.cancels.register_cancel_key(client)

    def cancel(self, process_id: int, secret_key: int, requester: asyncio.BaseTransport | None = None) -> None:
        """A CancelRequest: forward it to the backend now running that client's query (cancel.py)."""
        self.cancels.cancel(process_id, secret_key, requester)

    def forward_held_cancel(self, client: ClientConnection) -> None:
        """A client whose cancel waited in a pipeline is at the head now: forward it (cancel.py)."""
        self.cancels.forward_held_cancel(client)

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
        # Says "a poolkit sidecar answers here" to `poolkit check` and to anyone who asks (psql: \conninfo
        # does not show it; libpq's PQparameterStatus does): named prepared statements are safe here.
        body += protocol.parameter_status(SIDECAR_PARAMETER, self.settings.upstream_pooling[0])
        if len(self._welcome_cache) >= _WELCOME_CACHE_SIZE:
            self._welcome_cache.clear()
        self._welcome_cache[key] = body
        return body

    # ------------------------------------------------------------- user pools

    def pool_for(self, user: str) -> UpstreamPool | str:
        """The pool a client logged in as ``user`` uses, or why it has none (user_pools without a password)."""
        if not self.settings.user_pools or user == self.pool.dsn.user:
            return self.pool
        password = self.upstream_passwords.get(user)
        if password is None:
            return (
                f'user_pools is on, but the sidecar has no password for "{user}" to log in upstream with: '
                "give the plain password in users / auth_file (a SCRAM verifier only checks clients), "
                "or turn user_pools off to run every client as the upstream URL's role"
            )
        pool = self.user_pools.get(user)
        if pool is None:
            settings = self._user_settings(self.settings, user, password)
            pool = UpstreamPool(settings)
            self.user_pools[user] = pool
            self._configure_user_pool(pool, settings)
            log.info("user_pool_created", pool=pool.name, user=user)
        return pool

    @staticmethod
    def _user_settings(settings: SidecarSettings, user: str, password: str) -> SidecarSettings:
        """``settings`` with the upstream URLs logging in as ``user``, and the pool named ``user@database``."""
        update: dict[str, Any] = {"pool_name": f"{user}@{settings.effective_pool_name}"}
        for field in ("pooled_url", "direct_url"):
            secret = getattr(settings, field)
            if secret is not None:
                update[field] = _as_user(secret, user, password)
        return settings.model_copy(update=update)

    def _configure_user_pool(self, pool: UpstreamPool, settings: SidecarSettings) -> None:
        """(Re)configure a user pool and its direct pool, and run their maintenance while listening."""
        pool.configure(settings)
        if settings.direct_route_enabled and pool.direct is None:
            pool.direct = UpstreamPool(settings, pool.stats, direct=True)
        elif settings.direct_route_enabled and pool.direct is not None:
            pool.direct.configure(settings)
        elif pool.direct is not None:
            pool.direct.retire()
            pool.direct = None
        if self.paused:
            for held in (pool, pool.direct):
                if held is not None:
                    self._hold(held)
        user = pool.dsn.user
        for job in self._user_jobs.pop(user, []):
            self.spawn(job.stop())
        if self._listeners:
            jobs: list[MaintenanceTask] = []
            for target in (pool, pool.direct):
                if target is not None:
                    jobs += [ServerReaper(target), IdleTransactionReaper(target), QueryTimeoutReaper(target)]
            for job in jobs:
                job.start()
            self._user_jobs[user] = jobs

    # ------------------------------------------------------------- admin console

    def open_console(self, client: ClientConnection) -> admin.Console | str:
        """An admin console session for a logged-in client, or why its user may not have one."""
        role = admin.console_role(self, client.user)
        if role is None:
            return admin.refusal(self, client.user)
        return admin.Console(self, client, role)

    # ------------------------------------------------------------- admin console control commands

    def reload_now(self) -> str | None:
        """RELOAD: as SIGHUP; the reason it failed, or None."""
        return None if self.reload() else self.reload_error or "invalid settings"

    def all_pools(self) -> list[UpstreamPool]:
        """The URL's role's pool, then the user pools (each with its direct pool in ``direct``)."""
        return [self.pool, *self.user_pools.values()]

    def upstream_pools(self) -> list[UpstreamPool]:
        """Every pool, direct ones included."""
        return [p for pool in self.all_pools() for p in (pool, pool.direct) if p is not None]

    def pause(self) -> None:
        """PAUSE: hand out no server connection; close each as its transaction ends (PgBouncer's PAUSE).

        Clients keep their connections and their next transactions wait (``query_wait_timeout``
        still applies) until :meth:`resume`.
        """
        self.paused = True
        for pool in self.upstream_pools():
            self._hold(pool)

    @staticmethod
    def _hold(pool: UpstreamPool) -> None:
        # A pool whose max_size is 0 opens nothing, closes every server it is given back
        # (release: more servers than max_size) and queues every client: a pause, with the pool's
        # own rules. configure() (resume, reload) restores the sizes. The private calls reuse the
        # pool's own closing and filling; they belong in pool.py once its rewrite has landed.
        pool.max_size = 0
        pool.pipeline_depth = 0  # nothing is pipelined on a busy server either
        for server in list(pool.idle):
            pool._close_idle(server, "pause")

    def servers_left(self) -> bool:
        """Has any upstream pool a server connection still open (PAUSE waits for none)?"""
        return any(pool.servers for pool in self.upstream_pools())

    def resume(self) -> None:
        """RESUME: serve again; waiting clients get server connections at once."""
        self.paused = False
        for pool in self.upstream_pools():
            pool.configure(pool.settings)  # each pool's own: a user pool's log in as its user
            pool._fill()  # open connections for the clients queued meanwhile

    def reconnect(self) -> None:
        """RECONNECT: every server connection is replaced; idle ones now, busy ones when their transaction ends."""
        for pool in self.upstream_pools():
            pool.generation += 1  # release() closes a server of an older generation
            for server in list(pool.idle):
                pool._close_idle(server, "reconnect")

    def kill(self) -> None:
        """KILL: drop every client and server connection of the database now, and stay paused until RESUME."""
        self.pause()
        for client in [c for pool in self.all_pools() for c in pool.clients]:
            client.fatal("57P01", "terminating connection: KILL on the poolkit admin console")
        for pool in self.upstream_pools():
            pool.generation += 1  # one still connecting closes when it is given back
            for server in list(pool.servers):
                if server.state is ServerState.ACTIVE:
                    pool.close_busy(server, "kill")

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
    return not (client.session.pin_reason and client.pending <= 0 and server.scanner.status == IDLE)


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
