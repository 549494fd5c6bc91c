"""Pure decisions: is a URL a transaction pooler, and which driver options follow from that."""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poolkit.core.dsn import Dsn
from poolkit.errors import ConfigError

# Ports the transaction poolers listen on: Supavisor/Supabase 6543, PgBouncer's Supabase default 6553.
TRANSACTION_POOLER_PORTS = frozenset({6543, 6553})
SUPABASE_POOLER_SUFFIX = ".pooler.supabase.com"
#: The ParameterStatus a poolkit sidecar sends every client at login (value: what its upstream keeps,
#: "transaction" or "session"). Behind it named prepared statements are safe whatever the upstream is.
SIDECAR_PARAMETER = "poolkit_sidecar"

# Query parameters that tools put in URLs for themselves (Prisma: pgbouncer, connection_limit, ...).
# libpq and asyncpg reject or misread them, so they are removed before a URL reaches a driver.
TOOL_ONLY_PARAMS = (
    "pgbouncer",
    "connection_limit",
    "pool_timeout",
    "socket_timeout",
    "statement_cache_size",
    "connect_timeout",
    "sslmode",
    "sslrootcert",
    "application_name",
    "schema",
)


class Mode(enum.StrEnum):
    """What sits behind a URL, as far as connection state is concerned."""

    TRANSACTION = "transaction"  # a transaction pooler: no session state, no named prepared statements
    SESSION = "session"  # a session pooler: a server connection per client connection
    DIRECT = "direct"  # PostgreSQL itself


@dataclass(frozen=True, slots=True)
class Detection:
    mode: Mode
    reason: str  # why: shown by `poolkit check`, the demo and the pool's repr


def detect_mode(dsn: Dsn, override: str = "auto") -> Detection:
    """Decide what is behind ``dsn``. An explicit ``override`` (POOLKIT_POOL_MODE) wins."""
    if override != "auto":
        return Detection(Mode(override), f"POOLKIT_POOL_MODE={override}")
    if dsn.query.get("pgbouncer", "").lower() in ("true", "1", "yes"):
        return Detection(Mode.TRANSACTION, "the URL says pgbouncer=true")
    host = dsn.host.lower()
    if dsn.port in TRANSACTION_POOLER_PORTS:
        return Detection(Mode.TRANSACTION, f"port {dsn.port} is a transaction pooler port")
    if host.endswith(SUPABASE_POOLER_SUFFIX):
        return Detection(Mode.SESSION, f"Supabase pooler host on port {dsn.port} (session mode)")
    return Detection(Mode.DIRECT, "no pooler markers in the URL")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The TLS a connection must have: one of require / verify-ca / verify-full / disable."""

    sslmode: str
    rootcert: Path | None

    def ssl_context(self) -> ssl.SSLContext | bool:
        """An SSLContext for asyncpg (``False`` for plain text)."""
        if self.sslmode == "disable":
            return False
        if self.sslmode == "require":
            # libpq's "require": encrypted, certificate not checked (Supabase's default guidance).
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        ctx = ssl.create_default_context(cafile=str(self.rootcert) if self.rootcert else None)
        ctx.check_hostname = self.sslmode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def libpq_params(self) -> dict[str, str]:
        params = {"sslmode": self.sslmode}
        if self.rootcert is not None:
            params["sslrootcert"] = str(self.rootcert)
        return params


def tls_config(dsn: Dsn, sslmode: str | None, rootcert: Path | None) -> TlsConfig:
    """The TLS settings for ``dsn``: the setting wins over the URL, and the default is ``require``."""
    mode = sslmode or dsn.query.get("sslmode") or "require"
    cert = rootcert or (Path(dsn.query["sslrootcert"]) if dsn.query.get("sslrootcert") else None)
    return TlsConfig(mode, cert)


def pool_target(pooled: Dsn, direct: Dsn | None, *, route: str, override: str) -> tuple[Dsn, Detection]:
    """Where a pool on ``route`` connects, and what is there (shared by the async and sync pools)."""
    if route == "pooled":
        return pooled, detect_mode(pooled, override)
    if direct is None:
        raise ConfigError(
            "no direct URL is configured: set POOLKIT_DIRECT_URL (or DIRECT_DATABASE_URL / "
            "POSTGRES_URL_NON_POOLING) to the database's direct address (Supabase: port 5432)"
        )
    return direct, Detection(Mode.DIRECT, "the direct URL")


def psycopg_connect_kwargs(
    dsn: Dsn, mode: Mode, tls: TlsConfig, *, application_name: str, connect_timeout: float
) -> dict[str, Any]:
    """libpq keywords for psycopg (async and sync pools): the URL's own, TLS, and the statement options."""
    kwargs: dict[str, Any] = {
        "host": dsn.host,
        "port": dsn.port,
        "user": dsn.user,
        "dbname": dsn.database,
        "application_name": application_name,
        # libpq rounds connect_timeout up to 2 s and takes whole seconds.
        "connect_timeout": max(2, round(connect_timeout)),
        **tls.libpq_params(),
        **dsn.without_params(*TOOL_ONLY_PARAMS).query,
        **psycopg_statement_options(mode),
    }
    if dsn.password is not None:
        kwargs["password"] = dsn.password
    return kwargs


def prepared_statements_allowed(mode: Mode) -> bool:
    """Named prepared statements survive only where a client keeps its server connection."""
    return mode is not Mode.TRANSACTION


def asyncpg_statement_options(mode: Mode) -> dict[str, Any]:
    """asyncpg options: with a transaction pooler no statement may be named or cached."""
    if prepared_statements_allowed(mode):
        return {}
    return {"statement_cache_size": 0, "max_cached_statement_lifetime": 0, "max_cacheable_statement_size": 0}


def psycopg_statement_options(mode: Mode) -> dict[str, Any]:
    """psycopg options: ``prepare_threshold=None`` never prepares server-side."""
    if prepared_statements_allowed(mode):
        return {}
    return {"prepare_threshold": None}


def url_tls_problem(dsn: Dsn, *, sslmode: str | None = None, rootcert_configured: bool = False) -> str | None:
    """What breaks poolkit's TLS policy in ``dsn`` (TLS required except to loopback), or ``None``.

    The library settings and the sidecar's both use it; the text follows the setting's name in
    their errors ("pooled_url has sslmode=prefer, ..."). ``sslmode`` overrides the URL's own.
    """
    mode = sslmode or dsn.query.get("sslmode", "require")
    if mode in ("allow", "prefer"):
        return (
            f"has sslmode={mode}, which silently falls back to plain text. Use sslmode=require (the default) "
            "or verify-full with POOLKIT_SSLROOTCERT"
        )
    if mode == "disable" and not dsn.is_loopback:
        return (
            f"asks for sslmode=disable on host {dsn.host!r}; plain text is only allowed to a loopback host or "
            "Unix socket. Remove sslmode=disable (TLS is required)"
        )
    if mode in ("verify-ca", "verify-full") and not rootcert_configured and "sslrootcert" not in dsn.query:
        return f"has sslmode={mode}; set POOLKIT_SSLROOTCERT to the CA's PEM file"
    rootcert = dsn.query.get("sslrootcert")
    if rootcert and rootcert != "system" and not Path(rootcert).is_file():  # "system": libpq's own CA store
        return (
            f"has sslrootcert={rootcert}, which is not a file: point it at the PEM file of the CA that signed "
            "the server certificate (or set POOLKIT_SSLROOTCERT and drop it from the URL)"
        )
    return None
