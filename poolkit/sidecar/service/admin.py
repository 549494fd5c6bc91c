"""The admin console on the virtual ``poolkit`` database: PgBouncer's SHOW and control commands, who may run them."""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import SecretStr

from poolkit.core.dsn import Dsn
from poolkit.obs.log import get_logger
from poolkit.sidecar.policy.config import RELOADABLE, SidecarSettings
from poolkit.sidecar.policy.pooling import ClientState, ServerState
from poolkit.sidecar.wire import protocol
from poolkit.sidecar.wire.protocol import IDLE

if TYPE_CHECKING:
    from poolkit.sidecar.conn.client import ClientConnection
    from poolkit.sidecar.conn.pool import UpstreamPool
    from poolkit.sidecar.conn.server import ServerConnection
    from poolkit.sidecar.policy.auth import UserStore

Rows = tuple[list[str], list[list[str | None]]]
log = get_logger("sidecar")


class ConsoleHost(Protocol):
    """What the console reads and drives of the sidecar (``app.Sidecar`` satisfies it; app.py imports this module,
    not the other way round)."""

    settings: SidecarSettings
    pool: UpstreamPool
    users: UserStore
    connections: set[ClientConnection]
    paused: bool
    port: int
    started_at: float
    pending_restart: dict[str, object]

    def all_pools(self) -> list[UpstreamPool]: ...
    def upstream_pools(self) -> list[UpstreamPool]: ...
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...
    def reload_now(self) -> str | None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def reconnect(self) -> None: ...
    def kill(self) -> None: ...
    def servers_left(self) -> bool: ...
    async def shutdown(self, grace: float | None = None) -> None: ...


POOLS_COLUMNS = [
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
]
STATS_COLUMNS = [
    "database",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "avg_xact_count",
    "avg_query_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
]
CONNECTION_COLUMNS = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
    "pinned",  # poolkit: why the client keeps its server connection across transactions ("" = it does not)
    "prepared_statements",  # named statements: the client's own, or those prepared on the server (PgBouncer 1.21)
]
PINS_COLUMNS = [
    "pid",
    "user",
    "addr",
    "port",
    "reason",
    "reasons",
    "pinned_since",
    "pinned_seconds",
    "route",
    "server_pid",
    "state",
    "application_name",
]


def _ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _split_addr(peer: str) -> tuple[str, str]:
    if peer in ("unix", "?"):
        return peer, "0"
    host, _, port = peer.rpartition(":")
    return host, port


def _pool_row(pool: UpstreamPool, clients: dict[str, int], database: str) -> list[str | None]:
    servers = pool.server_counts()
    now = time.monotonic()
    maxwait = max((now - c.wait_started for c in pool.waiters), default=0.0)
    return [
        database,
        pool.dsn.user,
        str(clients["active"]),
        str(clients["waiting"]),
        "0",
        "0",
        str(servers["active"]),
        "0",
        "0",
        str(servers["idle"]),
        "0",
        "0",
        str(servers["connecting"]),
        str(int(maxwait)),
        str(int((maxwait % 1) * 1_000_000)),
        "transaction",
    ]


def show_pools(app: ConsoleHost) -> Rows:
    """A row per pool (per user with user_pools); another, ``<name>/direct``, for each direct upstream."""
    database = app.pool.name
    rows = []
    for pool in app.all_pools():
        rows.append(_pool_row(pool, pool.client_counts(), database))
        direct = pool.direct
        if direct is not None:
            on_direct = sum(1 for c in pool.clients if c.server is not None and c.server.pool is direct)
            counts = {"active": on_direct, "waiting": len(direct.waiters)}
            rows.append(_pool_row(direct, counts, f"{database}/direct"))
    return POOLS_COLUMNS, rows


def show_stats(app: ConsoleHost) -> Rows:
    """A row per pool (``user@database`` for a user pool), PgBouncer's columns."""
    return STATS_COLUMNS, [_stats_row(app, pool) for pool in app.all_pools()]


def _stats_row(app: ConsoleHost, pool: UpstreamPool) -> list[str | None]:
    s = pool.stats
    uptime = max(time.monotonic() - app.started_at, 1e-9)
    xacts, queries = s.transactions, s.queries
    return [
        pool.name,
        str(xacts),
        str(queries),
        str(s.received_bytes),
        str(s.sent_bytes),
        str(int(s.xact_time_total * 1e6)),
        str(int(s.query_time_total * 1e6)),
        str(int(s.wait_time_total * 1e6)),
        str(int(xacts / uptime)),
        str(int(queries / uptime)),
        str(int(s.received_bytes / uptime)),
        str(int(s.sent_bytes / uptime)),
        str(int(s.xact_time_total * 1e6 / xacts) if xacts else 0),
        str(int(s.query_time_total * 1e6 / queries) if queries else 0),
        str(int(s.wait_time_total * 1e6 / xacts) if xacts else 0),
    ]


def _client_row(app: ConsoleHost, client: ClientConnection, now: float) -> list[str | None]:
    addr, port = _split_addr(client.peer)
    if client.server is not None:
        state = "active"
    elif client.waiting:
        state = "waiting"
    else:
        state = "idle"
    wait = now - client.wait_started if client.waiting else 0.0
    server = client.server
    return [
        "C",
        client.user,
        client.database,
        state,
        addr,
        port,
        app.settings.listen_host,
        str(app.port),
        _ts(client.connect_time),
        _ts(client.request_time),
        str(int(wait)),
        str(int((wait % 1) * 1_000_000)),
        "0",
        f"{id(client):#x}",
        f"{id(server):#x}" if server is not None else "",
        str(client.process_id),
        "TLS" if client.tls else "",
        client.session.wanted.get("application_name", ""),
        client.session.pin_reason,
        str(len(client.statements.names)) if client.statements is not None else "0",
    ]


def _server_row(app: ConsoleHost, server: ServerConnection) -> list[str | None]:
    pool = server.pool
    client = server.client
    # SHOW SERVERS' words (PgBouncer's): the plain strings, not the enum members.
    state = {ServerState.CONNECTING: "login", ServerState.CLOSED: "closing"}.get(server.state, str(server.state))
    return [
        "S",
        pool.dsn.user,
        pool.dsn.database,
        state,
        pool.dsn.host,
        str(pool.dsn.port),
        "",
        "",
        _ts(time.time() - (time.monotonic() - server.created_at)),
        # A pinned client's server between transactions has no start stamp: show its last answer.
        _ts(time.time() - (time.monotonic() - (server.assigned_at if server.assigned_at >= 0 else server.last_ready))),
        "0",
        "0",
        "1" if server.generation != pool.generation else "0",
        f"{id(server):#x}",
        f"{id(client):#x}" if client is not None else "",
        str(server.backend_pid),
        "TLS" if server.peer == "tls" else "",
        server.current.get("application_name", ""),
        client.session.pin_reason if client is not None else "",
        str(len(server.statements)),
    ]


def show_clients(app: ConsoleHost) -> Rows:
    now = time.monotonic()
    clients = sorted((c for pool in app.all_pools() for c in pool.clients), key=lambda c: c.process_id)
    return CONNECTION_COLUMNS, [_client_row(app, c, now) for c in clients]


def show_servers(app: ConsoleHost) -> Rows:
    """Every upstream connection (the direct pool's after the pool's)."""
    pools = app.upstream_pools()
    rows = [_server_row(app, s) for pool in pools for s in sorted(pool.servers, key=lambda s: s.ident)]
    return CONNECTION_COLUMNS, rows


def show_pins(app: ConsoleHost) -> Rows:
    """Clients pinned to a server connection: why, since when, and which upstream connection they hold."""
    now = time.time()
    rows: list[list[str | None]] = []
    for client in sorted((c for pool in app.all_pools() for c in pool.pinned), key=lambda c: c.process_id):
        addr, port = _split_addr(client.peer)
        server = client.server or client.linking
        session = client.session
        rows.append(
            [
                str(client.process_id),
                client.user,
                addr,
                port,
                session.pin_reason,
                ",".join(sorted(session.pin_reasons | {session.pin_reason})),
                _ts(session.pinned_since),
                str(int(now - session.pinned_since)),
                server.pool.route if server is not None else "",
                str(server.backend_pid) if server is not None else "",
                "active" if server is not None and server.scanner.status != IDLE else "idle",
                client.session.wanted.get("application_name", ""),
            ]
        )
    return PINS_COLUMNS, rows


def show_version(app: ConsoleHost) -> Rows:
    # The installed distribution's version, not `poolkit.__version__`: the sidecar does not import the package root.
    return ["version"], [[f"poolkit sidecar {importlib.metadata.version('poolkit')}"]]


def _shown(app: ConsoleHost, name: str, value: object) -> str:
    """A setting's value as SHOW CONFIG prints it: URLs redacted, user names without their passwords."""
    if value is None:
        return ""
    if name in ("pooled_url", "direct_url"):
        return Dsn.parse(str(value)).redacted() if value else ""
    if name == "users" and isinstance(value, dict):
        return ",".join(sorted(value))
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _decided(app: ConsoleHost, name: str) -> tuple[object, str] | None:
    """For a setting whose unset value is decided at run time: the decision, and the rule (SHOW CONFIG)."""
    settings = app.settings
    if name == "admin_users":
        return admin_users(app), "(the upstream URL's role)"
    if name == "max_size":
        return settings.effective_max_size, "(3; 10 in front of a transaction pooler)"
    if name == "pool_name":
        return app.pool.name, "(the database name)"
    if name == "upstream_mode":
        return settings.upstream_pooling[0], "auto"
    if name == "client_tls":
        return settings.effective_client_tls, "(allow with a certificate, else disable)"
    return None


def show_config(app: ConsoleHost) -> Rows:
    """Every setting as in effect now (``pending``: a value read by SIGHUP that waits for a restart)."""
    settings = app.settings
    rows: list[list[str | None]] = []
    for name, info in sorted(SidecarSettings.model_fields.items()):
        value: object = getattr(settings, name)
        default: object = info.get_default(call_default_factory=True)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif name == "users":
            value = dict(settings.users)
        elif (decided := _decided(app, name)) is not None:
            value, default = decided
        pending = app.pending_restart.get(name)
        rows.append(
            [
                name,
                _shown(app, name, value),
                _shown(app, name, default),
                "yes" if name in RELOADABLE else "no",
                "" if name not in app.pending_restart else _shown(app, name, pending),
            ]
        )
    # What the pool actually forwards to (upstream=auto picks one of the two URLs).
    rows.append(["upstream_url", app.pool.dsn.redacted(), "", "yes", ""])
    return ["key", "value", "default", "changeable", "pending"], rows


def show_routes(app: ConsoleHost) -> Rows:
    """Pins and routed transactions by reason since start (``pinned_now``: clients pinned for it now)."""
    pins: Counter[str] = Counter()
    routed: Counter[str] = Counter()
    now: Counter[str] = Counter()
    for pool in app.all_pools():  # summed over the user pools
        pins.update(pool.stats.pins)
        routed.update(pool.stats.routed)
        now.update(pool.pinned_counts())
    rows: list[list[str | None]] = [
        ["pin", reason, str(total), str(now.get(reason, 0))] for reason, total in pins.items()
    ]
    rows += [["direct", reason, str(total), ""] for reason, total in routed.items()]
    return ["kind", "reason", "total", "pinned_now"], rows


DATABASES_COLUMNS = [
    "name",
    "host",
    "port",
    "database",
    "force_user",
    "pool_size",
    "min_pool_size",
    "reserve_pool",
    "pool_mode",
    "max_connections",
    "current_connections",
    "paused",
    "disabled",
]


def _pools(app: ConsoleHost) -> list[tuple[UpstreamPool, str]]:
    """Each upstream pool with the name the console shows for it (clients connect to the first)."""
    pool = app.pool
    name = pool.dsn.database
    pools = [(pool, name)]
    if pool.direct is not None:
        pools.append((pool.direct, f"{name}/direct"))
    return pools


def show_databases(app: ConsoleHost) -> Rows:
    """The database clients connect to (and its direct route), then the admin console itself, as PgBouncer."""
    rows: list[list[str | None]] = []
    for pool, name in _pools(app):
        size = app.settings.direct_max_size if pool.is_direct else app.settings.effective_max_size
        route = [p for p in app.upstream_pools() if p.is_direct == pool.is_direct]  # every user's
        dsn = pool.dsn
        rows.append(
            [
                name,
                dsn.host,
                str(dsn.port),
                dsn.database,
                "",
                str(size),
                "0",
                "0",
                "transaction",
                "0",
                str(sum(len(p.servers) for p in route)),
                "1" if app.paused else "0",
                "0",
            ]
        )
    console = app.settings.admin_database
    rows.append([console, "", str(app.port), console, "", "0", "0", "0", "statement", "0", "0", "0", "0"])
    return DATABASES_COLUMNS, rows


def show_users(app: ConsoleHost) -> Rows:
    """Users the sidecar knows: configured ones, admin and stats users, and any logged in now."""
    names = set(app.users.names()) | set(admin_users(app)) | set(app.settings.stats_users)
    names |= {c.user for c in app.connections if c.user and c.state in (ClientState.READY, ClientState.ADMIN)}
    return ["name", "pool_mode"], [[name, ""] for name in sorted(names)]


def show_lists(app: ConsoleHost) -> Rows:
    """Counts of the sidecar's internal lists (PgBouncer's rows; the DNS ones are always 0 here)."""
    pools = app.upstream_pools()
    logged_in = sum(1 for c in app.connections if c.state in (ClientState.READY, ClientState.ADMIN))
    servers = sum(len(pool.servers) for pool in pools)
    idle = sum(len(pool.idle) for pool in pools)
    users = len(show_users(app)[1])
    items = [
        ("databases", len(_pools(app)) + 1),
        ("users", users),
        ("pools", len(pools)),
        ("free_clients", 0),
        ("used_clients", logged_in),
        ("login_clients", len(app.connections) - logged_in),
        ("free_servers", 0),
        ("used_servers", servers),
        ("idle_servers", idle),  # poolkit: of used_servers, those waiting for a client
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ]
    return ["list", "items"], [[name, str(count)] for name, count in items]


COMMANDS: dict[str, Callable[[ConsoleHost], Rows]] = {
    "pools": show_pools,
    "stats": show_stats,
    "clients": show_clients,
    "servers": show_servers,
    "databases": show_databases,
    "users": show_users,
    "lists": show_lists,
    "pins": show_pins,
    "routes": show_routes,
    "version": show_version,
    "config": show_config,
}
CONTROL = ("reload", "pause", "resume", "reconnect", "kill", "shutdown")
HELP = "\n".join(
    [
        "\tSHOW HELP|" + "|".join(name.upper() for name in COMMANDS),
        "\tRELOAD",
        "\tPAUSE [<db>]",
        "\tRESUME [<db>]",
        "\tRECONNECT [<db>]",
        "\tKILL <db>",
        "\tSHUTDOWN",
    ]
)
_COMMAND = re.compile(r"^\s*([a-z_]+)(?:\s+([^\s;]+))?\s*;?\s*$", re.IGNORECASE)
# PAUSE waits for the pool's server connections to close; nothing signals the last one, so it polls.
_PAUSE_POLL = 0.05


def admin_users(app: ConsoleHost) -> list[str]:
    """``admin_users``, or when it is unset the upstream URL's role."""
    configured = app.settings.admin_users
    return list(configured) if configured is not None else [app.pool.dsn.user]


def console_role(app: ConsoleHost, user: str) -> str | None:
    """``"admin"`` (every command), ``"stats"`` (SHOW commands) or None (refused at login)."""
    if user in admin_users(app):
        return "admin"
    if user in app.settings.stats_users:
        return "stats"
    return None


def refusal(app: ConsoleHost, user: str) -> str:
    """The login error of a user who is neither an admin nor a stats user."""
    return (
        f'user "{user}" may not use the admin console "{app.settings.admin_database}": add it to '
        "admin_users (POOLKIT_SIDECAR_ADMIN_USERS) for every command, or to stats_users "
        "(POOLKIT_SIDECAR_STATS_USERS) for SHOW commands"
    )


class Console:
    """One admin console session: its user's rights, and its queries answered in order (PAUSE waits)."""

    __slots__ = ("_backlog", "app", "client", "role")

    def __init__(self, app: ConsoleHost, client: ClientConnection, role: str) -> None:
        self.app = app
        self.client = client
        self.role = role
        self._backlog: list[str] | None = None  # queries that arrived while one was still being answered

    def query(self, sql: str) -> None:
        """Answer one simple query (now, or after the one still running)."""
        if self._backlog is not None:
            self._backlog.append(sql)
            return
        try:
            answer = execute(self.app, sql, self)
        except Exception as exc:  # a bug in one command must not end the operator's session silently
            log.warning("admin_command_failed", error=repr(exc))
            answer = _error("XX000", f"the admin console failed on this command: {exc!r}")
        if isinstance(answer, bytes):
            self._write(answer)
            return
        self._backlog = []
        self.app.spawn(self._answer_later(answer))

    async def _answer_later(self, pending: Coroutine[Any, Any, bytes]) -> None:
        self._write(await pending)
        backlog, self._backlog = self._backlog or [], None
        for sql in backlog:
            self.query(sql)

    def _write(self, data: bytes) -> None:
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    @property
    def gone(self) -> bool:
        return self.client.closed


def _error(code: str, text: str) -> bytes:
    return protocol.error_response(code, text) + protocol.ready_for_query()


def _done(tag: str) -> bytes:
    return protocol.command_complete(tag) + protocol.ready_for_query()


def _usage() -> bytes:
    known = ", ".join([f"SHOW {name.upper()}" for name in ("help", *COMMANDS)] + [c.upper() for c in CONTROL])
    return _error("42601", f"the poolkit admin console understands {known}")


def _rows(columns: list[str], rows: list[list[str | None]]) -> bytes:
    out = [protocol.row_description(columns)]
    out.extend(protocol.data_row(row) for row in rows)
    out.append(protocol.command_complete("SHOW"))
    out.append(protocol.ready_for_query())
    return b"".join(out)


def _target_problem(app: ConsoleHost, verb: str, database: str | None) -> str | None:
    """Why ``database`` is no valid argument of ``verb`` (None: it names the sidecar's database, or is absent)."""
    if database is None:
        return f"{verb.upper()} needs a database name" if verb == "kill" else None
    if verb in ("reload", "shutdown"):
        return f"{verb.upper()} takes no argument"
    names = {name for _, name in _pools(app)} | {app.pool.name}
    if database in names:
        return None
    if database == app.settings.admin_database:
        return f"{verb.upper()} does not apply to the admin console"
    return f'no such database: "{database}" (this sidecar serves "{app.pool.dsn.database}")'


def execute(app: ConsoleHost, sql: str, console: Console) -> bytes | Coroutine[Any, Any, bytes]:  # noqa: PLR0911, PLR0912 - one branch per console command, matched in PgBouncer's order
    """Answer one simple query on the admin console (always ends with ReadyForQuery).

    Returns the answer, or for PAUSE a coroutine that returns it once the pool's servers are closed.
    """
    if not sql.strip().rstrip(";").strip():
        return protocol.empty_query_response() + protocol.ready_for_query()
    match = _COMMAND.match(sql)
    if match is None:
        return _usage()
    verb, argument = match.group(1).lower(), match.group(2)
    if verb == "show":
        name = (argument or "").lower()
        if name == "help":
            notice = protocol.error_response("00000", "Console usage", severity="NOTICE", detail=HELP, notice=True)
            return notice + _done("SHOW")
        command = COMMANDS.get(name)
        return _usage() if command is None else _rows(*command(app))
    if verb not in CONTROL:
        return _usage()
    if console.role != "admin":
        return _error(
            "42501",
            f'{verb.upper()} needs an admin user: "{console.client.user}" is in stats_users, which may run '
            "SHOW commands only; add it to admin_users (POOLKIT_SIDECAR_ADMIN_USERS)",
        )
    problem = _target_problem(app, verb, argument)
    if problem is not None:
        return _error("42601", problem)
    log.info("admin_command", command=verb.upper(), user=console.client.user, database=argument)
    if verb == "reload":
        error = app.reload_now()
        return _done("RELOAD") if error is None else _error("22023", f"RELOAD failed, nothing changed: {error}")
    if verb == "pause":
        app.pause()
        return _paused(app, console)
    if verb == "resume":
        if not app.paused:
            return _error("55000", "the sidecar is not paused")
        app.resume()
        return _done("RESUME")
    if verb == "reconnect":
        app.reconnect()
        return _done("RECONNECT")
    if verb == "kill":
        app.kill()
        return _done("KILL")
    app.spawn(app.shutdown())  # runs after this answer is written: the drain then closes this console
    return _done("SHUTDOWN")


async def _paused(app: ConsoleHost, console: Console) -> bytes:
    """PAUSE's answer, once every server connection is closed (each after its transaction ends)."""
    while app.paused and app.servers_left() and not console.gone:  # noqa: ASYNC110 - see _PAUSE_POLL
        await asyncio.sleep(_PAUSE_POLL)
    if not app.paused:
        return _error("57014", "PAUSE canceled: RESUME came before the server connections were closed")
    return _done("PAUSE")
