"""Pooler detection, driver options and error translation: pure functions, no servers."""

from __future__ import annotations

import errno
import socket

import pytest

from poolkit import Dsn, Mode, detect_mode
from poolkit.core.detect import asyncpg_statement_options, psycopg_statement_options
from poolkit.core.translate import translate_connect_error, translate_query_error
from poolkit.errors import AuthenticationFailed, ConnectTimeout, PreparedStatementError, SSLError


@pytest.mark.parametrize(
    ("url", "override", "mode"),
    [
        ("postgresql://u:p@aws-0-eu-west-1.pooler.supabase.com:6543/postgres", "auto", Mode.TRANSACTION),
        ("postgresql://u:p@aws-0-eu-west-1.pooler.supabase.com:5432/postgres", "auto", Mode.SESSION),
        ("postgresql://u:p@db.abc.supabase.co:5432/postgres", "auto", Mode.DIRECT),
        ("postgresql://u:p@localhost:6553/app", "auto", Mode.TRANSACTION),
        ("postgresql://u:p@localhost:7000/app?pgbouncer=true", "auto", Mode.TRANSACTION),
        ("postgresql://u:p@localhost:6543/app", "session", Mode.SESSION),
        ("postgresql://u:p@localhost:6543/app", "direct", Mode.DIRECT),
        ("postgresql://u:p@localhost:5432/app", "transaction", Mode.TRANSACTION),
    ],
)
def test_detect_mode(url: str, override: str, mode: Mode) -> None:
    assert detect_mode(Dsn.parse(url), override).mode is mode


def test_statement_options_follow_the_mode() -> None:
    assert asyncpg_statement_options(Mode.TRANSACTION)["statement_cache_size"] == 0
    assert psycopg_statement_options(Mode.TRANSACTION) == {"prepare_threshold": None}
    assert asyncpg_statement_options(Mode.DIRECT) == {} == psycopg_statement_options(Mode.SESSION)


def test_dsn_redaction() -> None:
    dsn = Dsn.parse("postgresql://app:p%40ss@db.example.com:6543/postgres?password=x&sslmode=require")
    assert dsn.password == "p@ss"
    assert dsn.redacted() == "postgresql://app:***@db.example.com:6543/postgres?password=%2A%2A%2A&sslmode=require"
    assert "p@ss" not in repr(dsn) and "p%40ss" not in str(dsn)
    assert Dsn.parse(dsn.to_url()) == dsn


class _Err(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


DSN = Dsn.parse("postgresql://app:hunter2@db.example.com:5432/postgres")


@pytest.mark.parametrize(
    ("exc", "cls", "reason", "fragment"),
    [
        (TimeoutError(), ConnectTimeout, "timeout", "connect_timeout=10s"),
        (socket.gaierror(-2, "Name or service not known"), None, "dns", "DNS"),
        (_Err("sorry, too many clients already", "53300"), None, "too_many_connections", "53300"),
        (
            _Err('password authentication failed for user "app"', "28P01"),
            AuthenticationFailed,
            "auth",
            "password",
        ),
        (
            _Err('no pg_hba.conf entry for host "1.2.3.4", no encryption', "28000"),
            SSLError,
            "ssl_required",
            "TLS",
        ),
        (ConnectionError("rejected SSL upgrade"), SSLError, "ssl_unavailable", "does not offer TLS"),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), None, "unreachable", "IPv6"),
        (
            ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
            None,
            "refused",
            "nothing listens",
        ),
    ],
)
def test_connect_errors_say_what_to_do(exc: BaseException, cls: type | None, reason: str, fragment: str) -> None:
    err = translate_connect_error(exc, DSN, connect_timeout=10)
    assert err.reason == reason
    assert fragment in str(err)
    assert "hunter2" not in str(err)
    if cls is not None:
        assert isinstance(err, cls)


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ('prepared statement "__asyncpg_stmt_3__" does not exist', "26000"),
        ('prepared statement "_pg3_0" already exists', "42P05"),
        ('bind message supplies 1 parameters, but prepared statement "_pg3_1" requires 0', "08P01"),
        ("incorrect binary data format in bind parameter 1", "22P03"),
    ],
)
def test_prepared_statement_errors_are_explained(text: str, state: str) -> None:
    err = translate_query_error(_Err(text, state), Mode.DIRECT, pool="app")
    assert isinstance(err, PreparedStatementError)
    assert "POOLKIT_POOL_MODE=transaction" in str(err) and text in str(err)
    assert translate_query_error(_Err("duplicate key", "23505"), Mode.DIRECT) is None
