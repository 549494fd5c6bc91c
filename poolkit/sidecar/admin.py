"""The admin console on the virtual ``poolkit`` database: PgBouncer-style SHOW commands, plus PINS and ROUTES."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from poolkit.sidecar import protocol
from poolkit.sidecar.protocol import IDLE

if TYPE_CHECKING:
    from poolkit.sidecar.app import Sidecar
    from poolkit.sidecar.client import ClientConnection
    from poolkit.sidecar.pool import UpstreamPool
    from poolkit.sidecar.server import ServerConnection

Rows = tuple[list[str], list[list[str | None]]]

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


def show_pools(app: Sidecar) -> Rows:
    """One row for the pool; a second, ``<name>/direct``, for the direct upstream when there is one."""
    pool = app.pool
    rows = [_pool_row(pool, pool.client_counts(), pool.name)]
    direct = pool.direct
    if direct is not None:
        on_direct = sum(1 for c in pool.clients if c.server is not None and c.server.pool is direct)
        counts = {"active": on_direct, "waiting": len(direct.waiters)}
        rows.append(_pool_row(direct, counts, f"{pool.name}/direct"))
    return POOLS_COLUMNS, rows


def show_stats(app: Sidecar) -> Rows:
    pool = app.pool
    s = pool.stats
    uptime = max(time.monotonic() - app.started_at, 1e-9)
    xacts, queries = s.transactions, s.queries
    row: list[str | None] = [
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
    return STATS_COLUMNS, [row]


def _client_row(app: Sidecar, client: ClientConnection, now: float) -> list[str | None]:
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
        client.wanted.get("application_name", ""),
        client.pin_reason,
        str(len(client.statements.names)) if client.statements is not None else "0",
    ]


def _server_row(app: Sidecar, server: ServerConnection) -> list[str | None]:
    pool = server.pool
    client = server.client
    state = {"connecting": "login", "closed": "closing"}.get(server.state, server.state)
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
        client.pin_reason if client is not None else "",
        str(len(server.statements)),
    ]


def show_clients(app: Sidecar) -> Rows:
    now = time.monotonic()
    clients = sorted(app.pool.clients, key=lambda c: c.process_id)
    return CONNECTION_COLUMNS, [_client_row(app, c, now) for c in clients]


def show_servers(app: Sidecar) -> Rows:
    """Every upstream connection (the direct pool's after the pool's)."""
    pools = [app.pool] if app.pool.direct is None else [app.pool, app.pool.direct]
    rows = [_server_row(app, s) for pool in pools for s in sorted(pool.servers, key=lambda s: s.ident)]
    return CONNECTION_COLUMNS, rows


def show_pins(app: Sidecar) -> Rows:
    """Clients pinned to a server connection: why, since when, and which upstream connection they hold."""
    now = time.time()
    rows: list[list[str | None]] = []
    for client in sorted(app.pool.pinned, key=lambda c: c.process_id):
        addr, port = _split_addr(client.peer)
        server = client.server or client.linking
        rows.append(
            [
                str(client.process_id),
                client.user,
                addr,
                port,
                client.pin_reason,
                ",".join(sorted(client.pin_reasons | {client.pin_reason})),
                _ts(client.pinned_since),
                str(int(now - client.pinned_since)),
                server.pool.route if server is not None else "",
                str(server.backend_pid) if server is not None else "",
                "active" if server is not None and server.scanner.status != IDLE else "idle",
                client.wanted.get("application_name", ""),
            ]
        )
    return PINS_COLUMNS, rows


def show_version(app: Sidecar) -> Rows:
    from poolkit import __version__  # noqa: PLC0415 - avoid importing the package root at module load

    return ["version"], [[f"poolkit sidecar {__version__}"]]


def show_config(app: Sidecar) -> Rows:
    rows: list[list[str | None]] = []
    for name, value in sorted(app.settings.model_dump().items()):
        if name in ("pooled_url", "direct_url", "users"):
            continue  # secrets; the upstream is shown redacted below
        rows.append([name, "" if value is None else str(value)])
    rows.append(["upstream", app.pool.dsn.redacted()])
    return ["key", "value"], rows


def show_routes(app: Sidecar) -> Rows:
    """Pins and routed transactions by reason since start (``pinned_now``: clients pinned for it now)."""
    stats = app.pool.stats
    now = app.pool.pinned_counts()
    rows: list[list[str | None]] = [
        ["pin", reason, str(total), str(now.get(reason, 0))] for reason, total in stats.pins.items()
    ]
    rows += [["direct", reason, str(total), ""] for reason, total in stats.routed.items()]
    return ["kind", "reason", "total", "pinned_now"], rows


COMMANDS: dict[str, Callable[[Sidecar], Rows]] = {
    "pools": show_pools,
    "stats": show_stats,
    "clients": show_clients,
    "servers": show_servers,
    "pins": show_pins,
    "routes": show_routes,
    "version": show_version,
    "config": show_config,
}
_SHOW = re.compile(r"^\s*show\s+([a-z_]+)\s*;?\s*$", re.IGNORECASE)


def execute(app: Sidecar, sql: str) -> bytes:
    """Answer one simple query on the admin console (always ends with ReadyForQuery)."""
    if not sql.strip().rstrip(";").strip():
        return protocol.empty_query_response() + protocol.ready_for_query()
    match = _SHOW.match(sql)
    command = COMMANDS.get(match.group(1).lower()) if match else None
    if command is None:
        known = ", ".join(f"SHOW {name.upper()}" for name in COMMANDS)
        return (
            protocol.error_response("42601", f"the poolkit admin console understands {known}")
            + protocol.ready_for_query()
        )
    columns, rows = command(app)
    out = [protocol.row_description(columns)]
    out.extend(protocol.data_row(row) for row in rows)
    out.append(protocol.command_complete("SHOW"))
    out.append(protocol.ready_for_query())
    return b"".join(out)
