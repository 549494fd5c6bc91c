"""What the async ``Pool`` and the sync ``SyncPool`` share: target, instruments, routing, session guard, stats."""

from __future__ import annotations

import inspect
import logging
import os
import re
import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Self

from poolkit.core import detect
from poolkit.core.detect import Mode
from poolkit.core.settings import HOOK_NAMES, Settings
from poolkit.core.state import get_state
from poolkit.errors import ConfigError, PoolkitError, PoolTimeout, SessionStateError, TooManyWaiting
from poolkit.obs.metrics import count_routed
from poolkit.obs.observe import Observer, normalized
from poolkit.sql.routing import classify

Route = Literal["pooled", "direct"]

#: Classifier reasons for state that outlives a transaction on the server connection.
SESSION_REASONS = frozenset(
    {"session_set", "set_role", "advisory_lock", "listen", "prepare", "hold_cursor", "temp_table"}
)
# Statements that only take session state away, or keep it inside the transaction: harmless on a pooler.
_UNDOES_STATE = re.compile(
    r"\s*(?:(?:reset|discard|unlisten|deallocate)\b|select\s+pg_advisory_unlock)|.*\bon\s+commit\s+drop\b",
    re.IGNORECASE | re.DOTALL,
)
# Distinct statement texts remembered as harmless per pool; beyond that they are classified each time
# (cached by poolkit.sql.routing too), which bounds memory for apps that build SQL with literals in it.
_CLEAN_MAX = 4096


def sql_text(query: Any, conn: Any) -> str:
    """The text of a statement as the app passed it: str, bytes, or a psycopg ``sql.Composable``."""
    if type(query) is str:
        return query
    if isinstance(query, bytes):
        return query.decode("utf-8", "replace")
    return str(query.as_string(conn))


def socket_has_data(fd: int) -> bool:
    """True if an idle connection's socket is readable: EOF or a message the server sent unasked
    (``terminating connection due to administrator command``, a shutdown notice)."""
    try:
        readable, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def neutralise_fd(fd: int) -> None:
    """Point a forked child's copy of a connection's descriptor at /dev/null.

    Whatever the child's copies of the driver objects write later (libpq's Terminate, a TLS close_notify)
    then cannot reach the parent's session.
    """
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


def _after_fork_in_child() -> None:
    # Runs in the child right after fork(), before any of the parent's pool objects can be finalised.
    for pool in list(get_state().live_pools):
        forget = getattr(pool, "_forget_after_fork", None)
        if forget is not None:
            forget()


def install_fork_hook() -> None:
    """Make every pool forget its parent's connections in a forked child (once per process)."""
    state = get_state()
    if not state.fork_hook_installed:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        state.fork_hook_installed = True


class SessionGuard:
    """Screens what a pool's connections run for session state (``poolkit.sql.routing.classify``).

    On a transaction pooler such state (``SET``, ``SET ROLE``, ``set_config(..., false)``, temp tables,
    session advisory locks, ``PREPARE``, ``LISTEN``, ``WITH HOLD`` cursors) stays on a server connection
    the pooler hands to other clients next: :meth:`dirty` refuses it with SessionStateError before it is
    sent. With full sessions (direct, session pooler) it is allowed, and the connection is marked for the
    full reset on release. Each distinct harmless text is classified once.
    """

    __slots__ = ("clean", "driver", "name", "pooler", "route")

    def __init__(self, name: str, route: str, driver: str, *, pooler: bool) -> None:
        self.name = name
        self.route = route
        self.driver = driver
        self.pooler = pooler
        self.clean: set[Any] = set()

    def dirty(self, query: Any, text: str) -> bool:
        """True if ``text`` leaves session state on the connection; raises SessionStateError on a pooler."""
        decision = classify(text)
        reason = decision.reason
        if reason in SESSION_REASONS or (reason == "ddl" and not self.pooler):
            # DDL includes DO blocks, which can SET anything: with full sessions, reset after it.
            if not self.pooler:
                return True
            if not (_UNDOES_STATE.match(text) and ";" not in text.strip().rstrip(";")):
                raise SessionStateError(
                    f"pool {self.name!r} ({self.route}, {self.driver}) goes through a transaction pooler, and "
                    f"this statement ({reason}: {normalized(text)}) would leave session state on a server "
                    "connection the pooler hands to other clients next. Run it on pool.direct() or "
                    "pool.routed(sql), or use the transaction-local form: SET LOCAL, set_config(..., true), "
                    "pg_advisory_xact_lock(), CREATE TEMP TABLE ... ON COMMIT DROP",
                    reason=reason,
                )
        if type(query) is str and len(self.clean) < _CLEAN_MAX:
            self.clean.add(query)
        return False


class _QuietPoolkitConnectErrors(logging.Filter):
    """Drops psycopg_pool's ``error connecting in 'name': ...`` warning for connections poolkit opened.

    poolkit's connection classes raise the translated error (a PoolkitError) from ``connect()``, and the
    caller gets that same error: psycopg_pool's line would only repeat it on stderr. Failures of other
    psycopg pools in the process carry psycopg's own errors and are still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        return not (
            isinstance(args, tuple)
            and len(args) == 2
            and isinstance(args[1], PoolkitError)
            and str(record.msg).startswith("error connecting in")
        )


def quiet_psycopg_pool_connect_errors() -> None:
    """Install :class:`_QuietPoolkitConnectErrors` on psycopg_pool's logger (once per process)."""
    logger = logging.getLogger("psycopg.pool")
    if not any(isinstance(f, _QuietPoolkitConnectErrors) for f in logger.filters):
        logger.addFilter(_QuietPoolkitConnectErrors())


Hook = Callable[[Any], Any]

# The driver each hook belongs to, and what to use instead on the other driver.
_HOOK_DRIVERS = {
    "init": ("asyncpg", "with psycopg, configure= runs once per new connection"),
    "setup": ("asyncpg", "psycopg_pool has no per-checkout hook: run it at the start of the acquire() block"),
    "configure": ("psycopg", "with asyncpg, init= runs once per new connection"),
}


@dataclass(frozen=True, slots=True)
class ConnectionHooks:
    """The app's connection set-up hooks, handed to the driver pool as its own arguments.

    ``init`` (asyncpg) and ``configure`` (psycopg) run once per new connection, e.g. to register a type
    codec; ``setup`` (asyncpg) runs on every checkout; ``reset`` runs when a connection comes back, after
    poolkit's own clean-up (both drivers). Async pools take coroutine functions, ``SyncPool`` plain ones.
    """

    init: Hook | None = None
    setup: Hook | None = None
    configure: Hook | None = None
    reset: Hook | None = None

    @classmethod
    def for_driver(cls, driver: str, *, asynchronous: bool, **hooks: Hook | None) -> ConnectionHooks:
        """The hooks given (``None`` ones left out), checked against ``driver``; ConfigError names a wrong one."""
        family = "asyncpg" if driver == "asyncpg" else "psycopg"
        for name, hook in hooks.items():
            if hook is None:
                continue
            if name not in HOOK_NAMES:
                raise ConfigError(f"unknown connection hook {name!r}; known hooks: {', '.join(HOOK_NAMES)}")
            if not callable(hook):
                raise ConfigError(f"{name}= must be a function that takes the connection, not {type(hook).__name__}")
            owner, instead = _HOOK_DRIVERS.get(name, (family, ""))
            if owner != family:
                raise ConfigError(f"{name}= is {owner}'s hook and this pool's driver is {driver}: {instead}")
            if inspect.iscoroutinefunction(hook) is not asynchronous:
                kind = "an async function (async def)" if asynchronous else "a plain function (not async def)"
                pool = "an async pool" if asynchronous else "the sync pool"
                raise ConfigError(f"{name}= must be {kind} in {pool}: the driver calls it and awaits it or not")
        return cls(**{k: v for k, v in hooks.items() if v is not None})


def psycopg_pool_options(
    settings: Settings, *, max_size: int, name: str, hooks: ConnectionHooks | None = None
) -> dict[str, Any]:
    """psycopg_pool's sizing, naming, timing and hook arguments, the same for the async and the sync pool.

    ``open=False``: poolkit opens it itself, waiting only when ``min_size`` asks for connections.
    ``max_waiting`` is not passed: poolkit's own queue in front of psycopg_pool enforces it (callers
    waiting inside psycopg_pool are only those whose connection is being opened).
    """
    options: dict[str, Any] = {
        "conninfo": "",
        "min_size": settings.min_size,
        "max_size": max_size,
        "open": False,
        "name": name,
        "timeout": settings.acquire_timeout,
        "max_idle": settings.idle_timeout,
        "max_lifetime": settings.max_lifetime,
        "reconnect_timeout": max(settings.connect_timeout * 3, 30.0),
    }
    if hooks is not None:
        if hooks.configure is not None:
            options["configure"] = hooks.configure
        if hooks.reset is not None:
            options["reset"] = hooks.reset
    return options


def exhaustion_hint(max_size: int, profile: str) -> str:
    if profile == "serverless":
        return (
            "hold connections for less time (no network calls inside a transaction), raise POOLKIT_ACQUIRE_TIMEOUT, "
            f"or raise POOLKIT_MAX_SIZE (now {max_size}, serverless range 1-3)"
        )
    return f"hold connections for less time, raise POOLKIT_ACQUIRE_TIMEOUT, or raise POOLKIT_MAX_SIZE (now {max_size})"


class PoolBase:
    """Where a pool connects and what it reports; subclasses own the driver pool and the acquire path."""

    def __init__(
        self,
        settings: Settings,
        *,
        route: Route = "pooled",
        driver: str | None = None,
        hooks: ConnectionHooks | None = None,
    ) -> None:
        # State first: repr() and close() must work even when the checks below raise.
        self._closed = False
        self._direct: Self | None = None
        self.waiting = 0
        self.settings = settings
        self.name = settings.name
        self.driver = driver or settings.driver
        self.route: Route = route
        self.profile = settings.profile
        self.max_size = settings.max_size
        self.max_waiting = settings.max_waiting
        self.hooks = hooks or ConnectionHooks()
        self.dsn, self.detection = detect.pool_target(
            settings.pooled_dsn(), settings.direct_dsn(), route=route, override=settings.pool_mode
        )
        self.mode: Mode = self.detection.mode
        self.tls = detect.tls_config(self.dsn, settings.sslmode, settings.sslrootcert)
        self.guard = SessionGuard(self.name, route, self.driver, pooler=self.mode is Mode.TRANSACTION)
        self.observer = Observer(
            self.name,
            self.driver,
            route,
            slow_query_seconds=settings.slow_query_seconds,
            query_log=settings.query_log,
            env=settings.env,
        )
        get_state().live_pools.add(self)
        install_fork_hook()
        quiet_psycopg_pool_connect_errors()

    def direct(self) -> Self:
        """A pool on the direct URL (migrations, introspection, session features), created on first use."""
        if self.route == "direct":
            return self
        if self._direct is None:
            if self.settings.direct_url is None and self.mode is not Mode.TRANSACTION:
                return self  # the pooled URL already reaches the server with full sessions
            self._direct = type(self)(self.settings, route="direct", hooks=self.hooks)
        return self._direct

    def routed(self, sql: str) -> Self:
        """The pool ``sql`` should run on: :meth:`direct` when ``poolkit.sql.routing.classify`` says so, else this one.

        ``pool.routed(sql).execute(sql, *args)``: DDL, catalog reads and session features (``SET``,
        ``LISTEN``, advisory locks, ...) go to the direct URL, everything else stays pooled. Each call is
        counted in ``poolkit_routed_statements_total{route,reason}``. Raises ConfigError when ``sql`` needs
        the direct connection and only a transaction pooler is configured.
        """
        decision = classify(sql)
        target = self.direct() if decision.direct else self
        count_routed(self.name, self.driver, decision.route.value, decision.reason)
        return target

    def psycopg_kwargs(self, cursor_factory: type[Any]) -> dict[str, Any]:
        """psycopg's connect arguments for this pool's target, with poolkit's timed cursor."""
        kwargs = detect.psycopg_connect_kwargs(
            self.dsn,
            self.mode,
            self.tls,
            application_name=self.settings.application_name,
            connect_timeout=self.settings.connect_timeout,
        )
        kwargs["cursor_factory"] = cursor_factory
        return kwargs

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def metric_labels(self) -> tuple[str, str, str]:
        return self.observer.inst.labels

    def gauge_values(self) -> tuple[int, int, int, int, int]:
        """(in_use, idle, max, min, waiting), read by the metrics collector at scrape time."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """A snapshot: sizes, connections in use / idle, callers waiting, detected mode."""
        in_use, idle, max_size, min_size, waiting = self.gauge_values()
        return {
            "name": self.name,
            "driver": self.driver,
            "route": self.route,
            "mode": self.mode.value,
            "max_size": max_size,
            "min_size": min_size,
            "in_use": in_use,
            "idle": idle,
            "waiting": waiting,
            "closed": self._closed,
        }

    def timeout_error(self, limit: float) -> PoolTimeout:
        """The PoolTimeout for a caller that waited ``limit`` seconds: names the pool, its size, the waiters."""
        in_use = self.gauge_values()[0]
        return PoolTimeout(
            f"pool {self.name!r} ({self.route}, {self.driver}) is exhausted: all {self.max_size} connection(s) "
            f"stayed in use for {limit:g}s while {self.waiting} caller(s) waited ({in_use} in use). "
            + exhaustion_hint(self.max_size, self.profile),
            pool=self.name,
            max_size=self.max_size,
            waiting=self.waiting,
            timeout=limit,
        )

    def too_many_waiting(self) -> TooManyWaiting:
        """Count and log a caller refused because ``max_waiting`` callers already wait; return the error.

        Counted and logged as exhaustion (``poolkit_pool_acquire_timeouts_total``, ``pool_exhausted`` with
        ``timeout_s=0``): the pool is exhausted, and the exhaustion alert must see these callers too.
        """
        error = TooManyWaiting(
            f"pool {self.name!r} ({self.route}, {self.driver}) is exhausted and {self.waiting} caller(s) already "
            f"wait for one of its {self.max_size} connection(s), the max_waiting limit: this one was refused at "
            "once. Raise POOLKIT_MAX_WAITING (0: no limit), or " + exhaustion_hint(self.max_size, self.profile),
            pool=self.name,
            max_size=self.max_size,
            waiting=self.waiting,
            timeout=0.0,
        )
        self.observer.exhausted(error, in_use=self.gauge_values()[0], hint="raise POOLKIT_MAX_WAITING")
        return error

    def exhausted(self, limit: float) -> PoolTimeout:
        """Count and log a caller giving up after ``limit`` seconds; return the PoolTimeout to raise.

        The caller records its wait in the acquire-duration histogram itself: the wait of a caller who gave
        up is a wait too, and leaving it out would hide the worst ones exactly when the pool is exhausted.
        """
        error = self.timeout_error(limit)
        hint = exhaustion_hint(self.max_size, self.profile)
        self.observer.exhausted(error, in_use=self.gauge_values()[0], hint=hint)
        return error

    def __repr__(self) -> str:
        kind = type(self).__name__
        if self._closed:
            return f"<{kind} {self.name} {self.route} {self.driver} closed>"
        in_use, idle, max_size, _, waiting = self.gauge_values()
        return (
            f"<{kind} {self.name} {self.route} {self.driver} mode={self.mode.value} max={max_size} "
            f"in_use={in_use} idle={idle} waiting={waiting}>"
        )
