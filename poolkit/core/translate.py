"""Driver exceptions to poolkit errors whose message says what happened and what to do."""

from __future__ import annotations

import errno
import socket
import ssl

from poolkit.core.detect import Mode
from poolkit.core.dsn import Dsn, redact
from poolkit.errors import (
    AuthenticationFailed,
    ConnectError,
    ConnectTimeout,
    PoolkitError,
    PreparedStatementError,
    SSLError,
    TooManyConnections,
)

# Where a Supabase project's database answers (direct: db.<ref>.supabase.co; pooler: *.pooler.supabase.com).
_SUPABASE_DOMAINS = ("supabase.co", "supabase.com")

# Prepared-statement failures seen through PgBouncer in transaction mode (see shared notes): SQLSTATEs plus
# the texts that come with the protocol-level ones, where the SQLSTATE (08P01, 22P03) alone is too broad.
_PREPARED_SQLSTATES = frozenset({"26000", "42P05"})
_PREPARED_TEXTS = (
    "bind message supplies",
    "incorrect binary data format in bind parameter",
    "insufficient data left in message",
    "prepared statement",
)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of an asyncpg or psycopg error, if it carries one."""
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str) and len(state) == 5:
        return state
    diag = getattr(exc, "diag", None)
    state = getattr(diag, "sqlstate", None)
    return state if isinstance(state, str) and len(state) == 5 else None


def is_supabase_host(host: str) -> bool:
    """True for Supabase's hosts: ``db.<ref>.supabase.co``, ``*.pooler.supabase.com``, ``*.supabase.com``."""
    host = host.lower().rstrip(".")
    return any(host == domain or host.endswith(f".{domain}") for domain in _SUPABASE_DOMAINS)


def translate_query_error(exc: BaseException, mode: Mode, *, pool: str = "") -> PoolkitError | None:
    """A PreparedStatementError for the errors a transaction pooler causes, else None (keep the driver's)."""
    state = sqlstate_of(exc)
    text = str(exc)
    is_prepared = state in _PREPARED_SQLSTATES or (
        state in ("08P01", "22P03", None) and any(t in text for t in _PREPARED_TEXTS)
    )
    if not is_prepared:
        return None
    first_line = text.splitlines()[0] if text else type(exc).__name__
    if mode is Mode.TRANSACTION:
        hint = (
            "poolkit detected the transaction pooler and disabled prepared statements, so this statement was "
            "prepared by hand (conn.prepare(), SQL PREPARE, or psycopg prepare=True): run it without preparing, "
            "or on pool.direct()"
        )
    else:
        hint = (
            f"the pool treats this URL as {mode.value}, but a transaction pooler is answering (a server connection "
            "changed between statements). Set POOLKIT_POOL_MODE=transaction (or add pgbouncer=true to the URL) "
            "so poolkit turns prepared statements off"
        )
    where = f" in pool {pool!r}" if pool else ""
    return PreparedStatementError(f"{first_line}{where}: {hint}")


def translate_connect_error(exc: BaseException, dsn: Dsn, *, connect_timeout: float) -> ConnectError:  # noqa: PLR0911 - one return per failure class, each with its own fix
    """Explain why a connection to ``dsn`` failed, with the fix. The message never holds the password."""
    target = f"{dsn.host}:{dsn.port}" if not dsn.is_unix_socket else dsn.host
    text = redact(str(exc), dsn.password)
    low = text.lower()
    state = sqlstate_of(exc)

    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, TimeoutError) or "timeout expired" in low or "timed out" in low:
        return ConnectTimeout(
            f"connecting to {target} took longer than connect_timeout={connect_timeout:g}s: the host accepted "
            "nothing or answered nothing. Check the host and port, a firewall, or raise POOLKIT_CONNECT_TIMEOUT",
            reason="timeout",
        )
    if isinstance(exc, socket.gaierror) or "could not translate host name" in low or "name or service not" in low:
        return ConnectError(
            f"cannot resolve host {dsn.host!r} (DNS): check the host name in the URL for a typo",
            reason="dns",
        )
    if state == "53300" or "too many connections" in low or "remaining connection slots" in low:
        return TooManyConnections(
            f"{target} refused the connection: too many connections (SQLSTATE 53300). Each app instance "
            "holds up to max_size connections; use the transaction pooler URL (port 6543) for app traffic, lower "
            "POOLKIT_MAX_SIZE, or stop the instances that leak connections",
            reason="too_many_connections",
        )
    if state == "28P01" or "password authentication failed" in low or "sasl authentication failed" in low:
        where = (
            " (reset it in the Supabase dashboard under Database settings)"
            if is_supabase_host(dsn.host)
            else " (or the role's password on the server: ALTER ROLE ... PASSWORD)"
        )
        return AuthenticationFailed(
            f"{target} rejected the password for user {dsn.user!r}: check the password in the URL{where}; "
            "special characters in it must be percent-encoded",
            reason="auth",
        )
    if "no encryption" in low and ("pg_hba" in low or state == "28000"):
        return SSLError(
            f"{target} only accepts TLS connections and this one was plain text (pg_hba: no encryption). "
            "Remove sslmode=disable from the URL",
            reason="ssl_required",
        )
    if "rejected ssl upgrade" in low or "does not support ssl" in low:
        return SSLError(
            f"{target} does not offer TLS, and sslmode requires it. Point the URL at a server with TLS; "
            "sslmode=disable is only accepted for a loopback host",
            reason="ssl_unavailable",
        )
    if "does not match host name" in low or "mismatch" in low or "doesn't match" in low:
        return SSLError(
            f"the certificate of {target} is not valid for host {dsn.host!r} (sslmode=verify-full). Use the host "
            "name the certificate was issued for, or sslmode=verify-ca",
            reason="ssl_hostname",
        )
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in low:
        return SSLError(
            f"the certificate of {target} is not signed by the CA in POOLKIT_SSLROOTCERT (certificate verify "
            "failed). Download the server's CA certificate (Supabase: Database settings, SSL) and point "
            "POOLKIT_SSLROOTCERT at it",
            reason="ssl_verify",
        )
    if isinstance(exc, ssl.SSLError):
        return SSLError(f"TLS with {target} failed: {text}", reason="ssl")
    if (isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)) or (
        "network is unreachable" in low
    ):
        return ConnectError(
            f"{target} is unreachable from this network. Supabase's direct host (db.<ref>.supabase.co) is "
            "IPv6-only unless the IPv4 add-on is enabled: use the pooler host (aws-0-<region>.pooler.supabase.com, "
            "session mode on 5432) as the direct URL, or enable IPv6 here",
            reason="unreachable",
        )
    if isinstance(exc, ConnectionRefusedError) or "connection refused" in low:
        return ConnectError(
            f"{target} refused the connection: nothing listens there. Check the port, and that the server runs",
            reason="refused",
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return ConnectError(f"cannot connect to {target}: {first}", reason="other")


def fresh_copy(error: ConnectError) -> ConnectError:
    """A new error equal to ``error``, to raise to a caller other than the code that first raised it.

    psycopg_pool opens connections in a worker; poolkit remembers the error the worker hit and raises it to
    the caller waiting for that connection. Raising the same object there would carry the worker's
    traceback, and the caller's psycopg_pool PoolTimeout as its context, into the caller's traceback.
    """
    return type(error)(str(error), reason=error.reason)


def is_connect_failure(exc: BaseException) -> bool:
    """True for errors raised while opening a connection (as opposed to running a query)."""
    if isinstance(exc, OSError | TimeoutError | ssl.SSLError):
        return True
    state = sqlstate_of(exc)
    if state is not None:
        return state[:2] in ("08", "28", "53") or state == "3D000"
    name = type(exc).__name__
    return name in ("OperationalError", "InterfaceError", "ConnectionError", "ConnectionDoesNotExistError")
