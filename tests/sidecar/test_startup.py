"""Startup parameters: the greeting carries the server's values, and one the server rejects fails the login.

Each case logs in to PostgreSQL directly and through the sidecar (in front of PostgreSQL, and in front of
the stack's PgBouncer in transaction mode) with a raw protocol client that sends exactly the given startup
parameters, and compares what comes back: the ParameterStatus values, ``SHOW`` after the login, or the
FATAL's severity, SQLSTATE and message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from poolkit.dev.devstack import DevStack
from poolkit.sidecar.policy.auth import UpstreamAuth
from poolkit.sidecar.policy.pooling import parameter_changes
from poolkit.sidecar.policy.startup import StartupChecks, check_query, first_column, sync_statements
from poolkit.sidecar.wire import protocol
from poolkit.sidecar.wire.protocol import MessageReader

from .conftest import SidecarThread

Factory = Callable[..., SidecarThread]


@dataclass
class Greeting:
    """What a login got: ParameterStatus by lower-case name, the FATAL's fields, SHOW answers."""

    status: dict[str, str] = field(default_factory=dict)
    error: dict[str, str] | None = None
    ready: bool = False
    shown: dict[str, str | None] = field(default_factory=dict)
    key: tuple[int, int] | None = None  # BackendKeyData: (process id, secret key)


async def login(  # noqa: PLR0912 - a raw client's login and SHOWs: one branch per message type PostgreSQL may answer with
    port: int,
    params: dict[str, str],
    *,
    password: str | None = None,
    ca_file: Any = None,
    show: tuple[str, ...] = (),
) -> Greeting:
    """Log in as ``app`` with exactly ``params`` in the startup packet (TLS when ``ca_file``), then SHOW ``show``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if ca_file is not None:
            writer.write(protocol.ssl_request())
            await writer.drain()
            assert await reader.readexactly(1) == b"S"
            await writer.start_tls(ssl.create_default_context(cafile=str(ca_file)), server_hostname="localhost")
        writer.write(protocol.startup_message({"user": "app", "database": "app", **params}))
        auth = UpstreamAuth("app", password)
        messages = MessageReader(side="server", max_message_size=1 << 20)
        greeting = Greeting()
        pending: list[tuple[bytes, bytes]] = []

        async def next_message() -> tuple[bytes, bytes]:
            while not pending:
                data = await asyncio.wait_for(reader.read(65536), 30)
                if not data:
                    raise ConnectionError("closed")
                pending.extend(messages.feed(data))
            return pending.pop(0)

        while True:
            kind, body = await next_message()
            if kind == b"R":
                reply = auth.respond(*protocol.parse_auth_request(body))
                if reply is not None:
                    writer.write(reply)
            elif kind == b"S":
                name, value = protocol.parse_parameter_status(body)
                greeting.status[name.lower()] = value
            elif kind == b"E":
                greeting.error = protocol.parse_error_fields(body)
                return greeting
            elif kind == b"K":
                greeting.key = protocol.parse_backend_key_data(body)
            elif kind == b"Z":
                greeting.ready = True
                break
        for name in show:
            writer.write(protocol.query(f"SHOW {name}"))
            while True:
                kind, body = await next_message()
                if kind == b"D":
                    greeting.shown[name] = first_column(body)
                elif kind == b"E":
                    greeting.shown[name] = "error: " + protocol.parse_error_fields(body).get("M", "")
                elif kind == b"Z":
                    break
        writer.write(protocol.terminate())
        return greeting
    finally:
        writer.close()


def direct_login(stack: DevStack, params: dict[str, str], show: tuple[str, ...] = ()) -> Greeting:
    return asyncio.run(login(stack.pg_port, params, password=stack.app_password, ca_file=stack.ca_file, show=show))


def sidecar_login(sidecar: SidecarThread, params: dict[str, str], show: tuple[str, ...] = ()) -> Greeting:
    return asyncio.run(login(sidecar.port, params, show=show))


@pytest.fixture(params=["postgresql", "pgbouncer"])
def any_upstream(request: pytest.FixtureRequest, stack: DevStack, sidecar_factory: Factory) -> SidecarThread:
    """A sidecar (max_size=1, so every check and sync uses one session) in front of PostgreSQL or PgBouncer."""
    if request.param == "pgbouncer":
        url = stack.url(via="pgbouncer", sslmode="verify-full")
        return sidecar_factory(pooled_url=url, upstream="pooled", max_size=1)
    return sidecar_factory(max_size=1)


# Startup parameters PostgreSQL accepts, each spelled otherwise than PostgreSQL reports or shows it.
ACCEPTED = [
    {"client_encoding": "eucjp"},
    {"client_encoding": "latin1"},
    {"client_encoding": "utf-8"},
    {"TimeZone": "europe/paris"},
    {"timezone": "utc"},
    {"DateStyle": "german"},
    {"DateStyle": "iso"},
    {"IntervalStyle": "SQL_STANDARD"},
    {"application_name": "é" * 40},  # cleaned to ASCII and cut to 63 bytes by PostgreSQL
    {"standard_conforming_strings": "yes"},
    {"default_transaction_read_only": "yes"},  # reported since PostgreSQL 14, not otherwise tracked
    {"search_path": "a,b"},  # two schemas, not one named "a,b"
    {"statement_timeout": "90000"},
    {"myapp.tenant": "42"},  # a custom placeholder setting
    {"client_encoding": "sjis", "TimeZone": "asia/tokyo", "DateStyle": "sql, dmy", "application_name": "batch"},
]


@pytest.mark.parametrize("params", ACCEPTED, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_the_greeting_carries_the_servers_values(any_upstream: SidecarThread, stack: DevStack, params: dict) -> None:
    names = tuple(params)
    baseline = sidecar_login(any_upstream, {}, show=names)
    direct = direct_login(stack, params, show=names)
    assert direct.ready and direct.error is None
    for _ in range(2):  # the first login checks the values on a server connection, the second uses the cache
        through = sidecar_login(any_upstream, params, show=names)
        assert through.ready, through.error
        for name in names:
            if name.lower() in direct.status:  # reported: the greeting says what PostgreSQL says
                assert through.status[name.lower()] == direct.status[name.lower()], name
        # And the session has what a direct one has (the same canonical value, search_path as two schemas).
        assert through.shown == direct.shown
    # Nothing stays behind on the (only) server connection: a client that asked for nothing gets the defaults.
    # (Not application_name through PgBouncer: RESET there gives PgBouncer's server login value, '', not the
    # sidecar's, an older quirk of syncing through a pooler that this change does not touch.
    # Nor a custom placeholder: once set in a session PostgreSQL keeps it defined, empty after RESET; its value
    # does not stay.)
    after = sidecar_login(any_upstream, {}, show=names).shown
    for name in names:
        if "." in name or (name == "application_name" and any_upstream.settings.upstream == "pooled"):
            assert after.pop(name) in ("", baseline.shown.pop(name))
    assert after == baseline.shown


def test_without_the_check_the_greeting_echoed_the_clients_spelling(sidecar_factory: Factory, stack: DevStack) -> None:
    # What a check does, shown by its absence: the cache pre-filled with the client's spelling as its own
    # canonical value (as if the check were skipped) makes the sidecar echo `eucjp` again, which
    # psycopg/libpq then use as the name of the connection's encoding; PostgreSQL says EUC_JP.
    sidecar = sidecar_factory(max_size=1)
    generation = sidecar.call(lambda app: app.pool.generation)
    sidecar.call(
        lambda app: app.startup_checks_for(app.pool).learn([("client_encoding", "eucjp")], ["eucjp"], generation)
    )
    assert sidecar_login(sidecar, {"client_encoding": "eucjp"}).status["client_encoding"] == "eucjp"
    assert direct_login(stack, {"client_encoding": "eucjp"}).status["client_encoding"] == "EUC_JP"
    fresh = sidecar_factory(max_size=1)
    assert sidecar_login(fresh, {"client_encoding": "eucjp"}).status["client_encoding"] == "EUC_JP"


REJECTED = [
    {"client_encoding": "bogus"},
    {"TimeZone": "mars/olympus_mons"},
    {"DateStyle": "bogus"},
    {"IntervalStyle": "bogus"},
    {"standard_conforming_strings": "maybe"},
    {"statement_timeout": "soon"},
    {"no_such_setting": "1"},
    {"is_superuser": "on"},
    {"application_name": "fine", "TimeZone": "utc", "client_encoding": "bogus"},  # one bad among good ones
]


@pytest.mark.parametrize("params", REJECTED, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_a_rejected_startup_parameter_fails_the_login(
    any_upstream: SidecarThread, stack: DevStack, params: dict
) -> None:
    direct = direct_login(stack, params)
    assert not direct.ready and direct.error is not None
    for _ in range(2):  # rejections are not cached: the second login is checked (and refused) again
        through = sidecar_login(any_upstream, params)
        assert not through.ready, f"the sidecar accepted {params}, PostgreSQL refuses it"
        assert through.error is not None
        for key in ("S", "C", "M", "D", "H"):
            assert through.error.get(key) == direct.error.get(key), key
    # The sidecar and its server connection are fine afterwards.
    after = sidecar_login(any_upstream, {"TimeZone": "utc"}, show=("TimeZone", "client_encoding"))
    assert after.ready and after.shown == {"TimeZone": "UTC", "client_encoding": "UTF8"}
    assert sidecar_login(any_upstream, {}, show=("client_encoding",)).shown == {"client_encoding": "UTF8"}


def test_psycopg_with_pgclientencoding(sidecar: SidecarThread, stack: DevStack) -> None:
    """The issue's case with libpq: PGCLIENTENCODING=eucjp / bogus."""
    with psycopg.connect(sidecar.url(), client_encoding="eucjp", autocommit=True) as conn:
        assert conn.info.parameter_status("client_encoding") == "EUC_JP"
        assert conn.info.encoding == "euc_jp"
        assert conn.execute("SELECT 'ア'").fetchone() == ("ア",)  # converted both ways by PostgreSQL
    for url in (stack.url(via="direct"), sidecar.url()):
        with pytest.raises(psycopg.OperationalError, match='invalid value for parameter "client_encoding": "bogus"'):
            psycopg.connect(url, client_encoding="bogus").close()


def test_a_known_value_needs_no_server_connection_and_a_new_one_waits_for_one(
    sidecar_factory: Factory, stack: DevStack
) -> None:
    sidecar = sidecar_factory(max_size=1, query_wait_timeout=60)
    assert sidecar_login(sidecar, {"TimeZone": "europe/paris"}).status["timezone"] == "Europe/Paris"
    with psycopg.connect(sidecar.url(), autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # holds the only server connection
        # Known: logs in at once, with the canonical value, though no server connection is free.
        assert sidecar_login(sidecar, {"TimeZone": "europe/paris"}).status["timezone"] == "Europe/Paris"

        async def new_value() -> Greeting:
            return await login(sidecar.port, {"TimeZone": "asia/tokyo"})

        with _background(new_value) as pending:
            _wait_for(lambda: sidecar.call(lambda app: len(app.pool.waiters)) == 1)
            assert not pending.done()
            holder.execute("COMMIT")
            greeting = pending.result(timeout=30)
    assert greeting.ready and greeting.status["timezone"] == "Asia/Tokyo"


def test_a_check_that_finds_no_server_connection_in_time_fails_that_login_only(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=1, query_wait_timeout=0.5)
    with psycopg.connect(sidecar.url(), autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # holds the only server connection past query_wait_timeout
        refused = sidecar_login(sidecar, {"TimeZone": "asia/tokyo"})
        assert not refused.ready and refused.error is not None
        assert refused.error["C"] == "57014" and "exhausted" in refused.error["M"]
        holder.execute("COMMIT")
    # Nothing was left waiting or held: the same value is checked and accepted now.
    assert sidecar.call(lambda app: (len(app.pool.waiters), len(app.pool.idle))) == (0, 1)
    assert sidecar_login(sidecar, {"TimeZone": "asia/tokyo"}).status["timezone"] == "Asia/Tokyo"


class _background:
    """Run a coroutine factory on a fresh event loop in a thread; a concurrent.futures.Future of its result."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._future = self._pool.submit(lambda: asyncio.run(factory()))

    def __enter__(self) -> Any:
        return self._future

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)


def _wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# ---------------------------------------------------------------- sans-IO


def test_check_query_is_local_quoted_and_refuses_bad_names() -> None:
    sql = check_query([("timezone", "it's"), ("search_path", "a,b")])
    assert sql == (
        "SET LOCAL \"timezone\" TO DEFAULT; SELECT pg_catalog.set_config('timezone', 'it''s', true); "
        "SET LOCAL \"search_path\" TO DEFAULT; SELECT pg_catalog.set_config('search_path', 'a,b', true)"
    )
    with pytest.raises(ValueError, match="invalid setting name"):
        check_query([('x"; DROP TABLE t; --', "1")])
    assert sync_statements([("search_path", "a,b"), ("timezone", None)]) == (
        "SELECT pg_catalog.set_config('search_path', 'a,b', false); RESET \"timezone\""
    )


def test_checks_cache_canonical_values_per_generation() -> None:
    checks = StartupChecks(limit=3)
    wanted = {"client_encoding": "eucjp", "timezone": "utc"}
    canonical, unknown = checks.resolve(wanted, generation=0)
    assert unknown == [("client_encoding", "eucjp"), ("timezone", "utc")] and canonical == wanted
    assert checks.learn(unknown, ["EUC_JP", "UTC"], generation=0) == {"client_encoding": "EUC_JP", "timezone": "UTC"}
    assert checks.resolve(wanted, generation=0) == ({"client_encoding": "EUC_JP", "timezone": "UTC"}, [])
    # A value learned for an older upstream is not kept; a new upstream forgets everything.
    checks.learn([("datestyle", "iso")], ["ISO, MDY"], generation=7)
    assert len(checks) == 2
    assert checks.resolve(wanted, generation=1)[1] == list(wanted.items())
    assert len(checks) == 0
    # Bounded: past the limit it starts over.
    checks.learn([("a", "1"), ("b", "2"), ("c", "3")], ["1", "2", "3"], generation=1)
    checks.learn([("d", "4")], ["4"], generation=1)
    assert len(checks) == 1
    with pytest.raises(ValueError, match="returned 1 values"):
        checks.learn([("a", "1"), ("b", "2")], ["1"], generation=1)


def test_first_column_reads_a_data_row() -> None:
    row = protocol.data_row(["EUC_JP", "x"])
    assert first_column(row[5:]) == "EUC_JP"
    assert first_column(protocol.data_row([None])[5:]) is None


def test_canonical_values_need_no_sync_against_what_the_server_reports() -> None:
    # The greeting's values are the server's own: a server session already set to them needs no SET.
    assert parameter_changes({"client_encoding": "EUC_JP"}, {"client_encoding": "EUC_JP"}, {}) == []
