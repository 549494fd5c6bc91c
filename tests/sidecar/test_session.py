"""Session features through the sidecar: pin/route decisions (pure), pinning, routing, the limit, metrics, tools."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING

import asyncpg
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolkit.dev.devstack import DevStack, find_pg_binary
from poolkit.errors import ConfigError
from poolkit.sidecar.conn.client import ClientConnection
from poolkit.sidecar.policy.session import (
    CLEAR_ALL,
    NOTHING,
    PIN_REASONS,
    ROUTE_REASONS,
    TAP_LIMIT,
    Effect,
    StatementTap,
    autocommit_head,
    chunk_effect,
    decide,
    quick_nothing,
)
from poolkit.sidecar.wire import protocol as p
from poolkit.sidecar.wire.protocol import FrontendScanner

from .conftest import upstream_settings
from .test_ops import admin, samples

if TYPE_CHECKING:
    from .conftest import SidecarThread

Factory = Callable[..., "SidecarThread"]
ASYNCPG_RESET = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"

# ---------------------------------------------------------------- pure decisions (no sockets)


@pytest.mark.parametrize(
    ("sql", "route", "pins", "clears"),
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 42;", "", (), set()),
        ("BEGIN ISOLATION LEVEL REPEATABLE READ", "", (), set()),
        ("SET search_path TO app, public", "", ("session_set",), set()),
        ("set statement_timeout = 5000", "", ("session_set",), set()),
        ("SET app.tenant = 'acme'", "", ("session_set",), set()),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", "", ("session_set",), set()),
        # Reported by ParameterStatus: the relay carries these per client, no pin needed.
        ("SET TimeZone = 'UTC'", "", (), set()),
        ("SET TIME ZONE 'Europe/Berlin'", "", (), set()),
        ("SET NAMES 'UTF8'", "", (), set()),
        ('SET "DateStyle" TO ISO', "", (), set()),
        ("set application_name = 'worker'", "", (), set()),
        ("SET search_path TO DEFAULT", "", (), set()),
        ("RESET search_path", "", (), set()),
        ("SET LOCAL search_path = x", "", (), set()),
        ("SET ROLE reporting", "", ("set_role",), set()),
        ("SET SESSION AUTHORIZATION bob", "", ("set_role",), set()),
        ("SET ROLE NONE", "", (), set()),
        ("RESET ROLE", "", (), set()),
        ("SELECT set_config('request.jwt.claims', '{}', false)", "", ("session_set",), set()),
        ("SELECT set_config('request.jwt.claims', $1, true)", "", (), set()),
        ("SELECT set_config('request.jwt.claims', $1, $2)", "", ("session_set",), set()),
        ("SELECT pg_advisory_lock(42)", "", ("advisory_lock",), set()),
        ("SELECT PG_TRY_ADVISORY_LOCK(1, 2)", "", ("advisory_lock",), set()),
        ("SELECT pg_advisory_xact_lock(42)", "", (), set()),
        ("SELECT pg_advisory_unlock(42)", "", (), set()),
        ("LISTEN jobs", "", ("listen",), set()),
        ("UNLISTEN jobs", "", (), set()),
        ("UNLISTEN *", "", (), {"listen"}),
        ("PREPARE q(int) AS SELECT $1", "", ("prepare",), set()),
        ("EXECUTE q(1)", "", (), set()),
        ("DEALLOCATE q", "", (), set()),
        ("DEALLOCATE PREPARE ALL", "", (), {"prepare"}),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "", ("hold_cursor",), set()),
        ("DECLARE c CURSOR FOR SELECT 1", "", (), set()),
        ("CLOSE ALL", "", (), {"hold_cursor"}),
        ("CREATE TEMP TABLE scratch (x int)", "", ("temp_table",), set()),
        ("CREATE TEMPORARY TABLE scratch (x int) ON COMMIT DROP", "", (), set()),
        ("SELECT * INTO TEMP copy_of FROM t", "", ("temp_table",), set()),
        ("DISCARD TEMP", "", (), {"temp_table"}),
        ("DISCARD ALL", "", (), set(CLEAR_ALL)),
        ("RESET ALL", "", (), {"session_set"}),
        (ASYNCPG_RESET, "", (), {"advisory_lock", "hold_cursor", "listen", "session_set"}),
        ("SELECT c.relname FROM pg_catalog.pg_class c", "catalog", (), set()),
        ("SELECT * FROM information_schema.tables", "catalog", (), set()),
        ("CREATE TABLE t (x int)", "ddl", (), set()),
        ("ALTER TABLE t ADD COLUMN y int", "ddl", (), set()),
        ("COPY t TO '/tmp/t.csv'", "copy", (), set()),
        ("COPY t TO STDOUT", "", (), set()),
        # Several statements: a later one still pins, and order decides what a reset undoes.
        ("CREATE TABLE t (x int); SET search_path = t", "ddl", ("session_set",), set()),
        ("SET search_path = x; DISCARD ALL", "", (), set(CLEAR_ALL)),
        ("DISCARD ALL; SET search_path = x", "", ("session_set",), set(CLEAR_ALL)),
    ],
)
def test_decide(sql: str, route: str, pins: tuple[str, ...], clears: set[str]) -> None:
    assert decide(sql) == Effect(route, pins, frozenset(clears))


def test_reasons_are_routing_reasons() -> None:
    from poolkit.routing import REASONS

    assert set(PIN_REASONS) | set(ROUTE_REASONS) == REASONS
    assert not set(PIN_REASONS) & set(ROUTE_REASONS)


def test_effects_compose_in_statement_order() -> None:
    listen = Effect(pins=("listen",))
    unlisten_all = Effect(clears=frozenset({"listen"}))
    assert listen.then(unlisten_all).apply(frozenset()) == frozenset()
    assert unlisten_all.then(listen).apply(frozenset({"listen"})) == frozenset({"listen"})
    assert NOTHING.then(listen) is listen and listen.then(NOTHING) is listen
    assert decide(ASYNCPG_RESET).apply(frozenset({"listen", "temp_table"})) == frozenset({"temp_table"})


def _corpus() -> list[str]:
    from corpus import load_corpus  # type: ignore[import-not-found]

    return [case.sql for case in load_corpus()]


def test_quick_nothing_never_hides_an_effect_in_the_corpus() -> None:
    sqls = _corpus()
    quick = [sql for sql in sqls if quick_nothing(sql)]
    assert quick, "the fast path should answer some real application statements"
    assert [sql for sql in quick if not decide(sql).nothing] == []
    assert quick_nothing("SELECT abalance FROM pgbench_accounts WHERE aid = 123456;")
    assert quick_nothing("INSERT INTO orders (user_id, total) VALUES ($1, $2) RETURNING id")


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (b"SELECT abalance FROM pgbench_accounts WHERE aid = 1", True),
        (b"  insert into t values (1)", True),
        (b"WITH x AS (SELECT 1) SELECT * FROM x", True),
        (b"values (1)", True),
        (b"TABLE t", True),
        (b"update t set a = 1", True),
        (b"delete from t", True),
        (b"select(1)", True),
        # Transaction control opens or ends a block: the next client's request must not run after it.
        (b"BEGIN", False),
        (b"begin;", False),
        (b"START TRANSACTION", False),
        (b"COMMIT", False),
        (b"END", False),
        (b"ROLLBACK", False),
        (b"SAVEPOINT s", False),
        (b"FETCH 1 FROM c", False),
        (b"SHOW search_path", False),
        (b"selected_things", False),
        (b"tablespace", False),
        (b"", False),
    ],
)
def test_autocommit_head(sql: bytes, expected: bool) -> None:
    assert autocommit_head(sql) is expected


def test_pipelinable_statements_in_the_corpus_are_plain_dml() -> None:
    heads = ("select", "insert", "update", "delete", "with", "values", "table")
    pipelinable = [sql for sql in _corpus() if quick_nothing(sql) and autocommit_head(sql.encode())]
    assert pipelinable
    for sql in pipelinable:
        assert decide(sql).nothing, sql
        assert sql.lstrip().split(None, 1)[0].lower().startswith(heads), sql


_WORDS = st.sampled_from(
    [
        "select",
        "SELECT",
        "insert into t",
        "with x as (select 1)",
        "begin",
        "pg_advisory_lock(1)",
        "PG_ADVISORY_LOCK(1)",
        "set_config('a', 'b', false)",
        "from pg_class",
        "into temp t",
        "into t",
        ";",
        "; set search_path = x",
        "listen x",
        "information_schema.tables",
        "format_type(1, 2)",
        "obj_description(1)",
        "x",
        "1",
        "'a;b'",
        "(",
        ")",
        ",",
        " ",
        "\n",
    ]
)


@given(st.lists(_WORDS, min_size=1, max_size=8).map(" ".join))
def test_quick_nothing_implies_nothing(sql: str) -> None:
    if quick_nothing(sql):
        assert decide(sql).nothing, sql


def _parse(sql: str, name: str = "") -> bytes:
    return p.message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


_BIND_EXECUTE_SYNC = (
    p.message(b"B", b"\x00\x00\x00\x00\x00\x00\x00") + p.message(b"E", b"\x00\x00\x00\x00\x00") + p.message(b"S")
)


def _effect_of(*chunks: bytes) -> Effect:
    """What the relay sees: chunks through FrontendScanner, then the session helpers (as client.py uses them)."""
    scanner = FrontendScanner()
    seen = b""
    tap: StatementTap | None = None
    total = NOTHING
    for data in chunks:
        scanner.feed(data)
        if tap is not None:
            done = tap.feed(data)
            if done is not None:
                total, tap = total.then(done), None
        if scanner.sql_chunk is not seen:
            seen = scanner.sql_chunk
            found, _, tap = chunk_effect(seen, scanner.sql_first, scanner.sql_start, scanner.sql_end)
            total = total.then(found)
    assert tap is None
    return total


def test_every_statement_of_a_chunk_counts_not_only_the_last() -> None:
    chunk = p.query("LISTEN jobs") + p.query("SELECT 1") + _parse("SELECT $1::int", "s1") + _BIND_EXECUTE_SYNC
    assert _effect_of(chunk).pins == ("listen",)
    named = _parse("SELECT pg_advisory_lock($1)", "__asyncpg_stmt_1__") + _BIND_EXECUTE_SYNC
    assert _effect_of(p.query("SELECT 1") + named).pins == ("advisory_lock",)
    # The statement name is not SQL: "asyncpg_" contains "pg_" but pins nothing.
    assert _effect_of(_parse("SELECT 1", "__asyncpg_stmt_2__") + _BIND_EXECUTE_SYNC).nothing


@pytest.mark.parametrize("cut", [1, 4, 5, 6, 9, 14])
def test_a_statement_split_across_reads_is_seen_whole(cut: int) -> None:
    data = p.query("SELECT 1") + p.query("SET search_path = app")
    at = len(p.query("SELECT 1")) + cut
    assert _effect_of(data[:at], data[at:]).pins == ("session_set",)
    parse = _parse("SELECT pg_advisory_lock(7)", "name") + _BIND_EXECUTE_SYNC
    assert _effect_of(parse[:cut], parse[cut:]).pins == ("advisory_lock",)


def test_the_relay_checks_a_statement_like_the_last_plain_one_by_bytes_but_never_misses_an_effect() -> None:
    app = SimpleNamespace(pool=None, settings=SimpleNamespace(max_message_size=1 << 30))
    client = ClientConnection(app)  # type: ignore[arg-type]

    def effect(data: bytes) -> Effect:
        client.scanner.feed(data)
        return client._chunk_effect(data)[0]

    assert effect(p.query("SELECT abalance FROM pgbench_accounts WHERE aid = 17;")).nothing
    assert client.session.plain_template == b"SELECT abalance FROM pgbench_accounts WHERE aid ="
    assert effect(p.query("SELECT abalance FROM pgbench_accounts WHERE aid = 99123;")).nothing
    assert effect(p.query("SELECT abalance FROM pgbench_accounts WHERE aid = 1; LISTEN x")).pins == ("listen",)
    assert effect(p.query("SELECT abalance FROM pgbench_accounts WHERE aid = 1; SELECT pg_advisory_lock(1)")).pins
    assert effect(_parse("SELECT abalance FROM pgbench_accounts WHERE aid = $1", "s") + _BIND_EXECUTE_SYNC).nothing
    assert client.session.plain_template == b"SELECT abalance FROM pgbench_accounts WHERE aid = $"
    assert effect(_parse("SELECT abalance FROM pgbench_accounts WHERE aid = $1", "s") + _BIND_EXECUTE_SYNC).nothing
    assert effect(_parse("SELECT pg_advisory_lock($1)", "__asyncpg_stmt_9__") + _BIND_EXECUTE_SYNC).pins


def test_a_long_statement_is_decided_on_its_start() -> None:
    sql = "LISTEN jobs; SELECT " + ", ".join(["1"] * TAP_LIMIT)
    data = p.query(sql)
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    assert _effect_of(*chunks).pins == ("listen",)


def test_settings_name_what_is_wrong(stack: DevStack) -> None:
    with pytest.raises(ConfigError, match=r"max_pinned_clients.*0 or more"):
        upstream_settings(stack, max_pinned_clients=-1)
    with pytest.raises(ConfigError, match=r"direct_max_size.*at least 1"):
        upstream_settings(stack, direct_max_size=0)
    pooled = {"pooled_url": stack.url(via="pgbouncer", sslmode="verify-full"), "upstream": "pooled"}
    with pytest.raises(ConfigError, match=r"direct_url.*sslmode=prefer"):
        upstream_settings(stack, **pooled, direct_url=stack.url(via="direct", sslmode="prefer"))
    settings = upstream_settings(stack, **pooled)
    assert settings.direct_route_enabled and settings.direct_max_size == 3 and settings.max_pinned_clients is None
    assert not upstream_settings(stack).direct_route_enabled  # upstream=direct: no second pool


# ---------------------------------------------------------------- through a running sidecar


def _pids(conn: psycopg.Connection[tuple[object, ...]], n: int = 3) -> set[int]:
    return {int(conn.execute("SELECT pg_backend_pid()").fetchone()[0]) for _ in range(n)}  # type: ignore[index]


def _value(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> object:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def _connect(sidecar: SidecarThread) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None)


def test_a_session_set_pins_the_client_until_it_leaves(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=2)
    with _connect(sidecar) as a, _connect(sidecar) as b:
        a.execute("SET search_path TO pin_nowhere, public")
        [pinned_pid] = _pids(a)  # every transaction of A on the same backend
        assert _value(a, "SHOW search_path") == "pin_nowhere, public"
        assert pinned_pid not in _pids(b)  # B never gets A's backend
        assert _value(b, "SHOW search_path") == '"$user", public'
        [pin] = admin(sidecar.url(database="poolkit"), "SHOW PINS")
        assert (pin["reason"], pin["server_pid"], pin["state"]) == ("session_set", str(pinned_pid), "idle")
        clients = {row["pinned"] for row in admin(sidecar.url(database="poolkit"), "SHOW CLIENTS")}
        assert clients == {"session_set", ""}
        metrics = samples(sidecar.metrics_url)
        pool = sidecar.call(lambda app: app.pool.name)
        assert metrics[("poolkit_sidecar_pinned_clients", (("pool", pool), ("reason", "session_set")))] == 1
        assert metrics[("poolkit_sidecar_pinned_clients", (("pool", pool), ("reason", "listen")))] == 0
        assert metrics[("poolkit_sidecar_pins_total", (("pool", pool), ("reason", "session_set")))] == 1
        # A setting the relay already carries per client does not pin.
        b.execute("SET TimeZone = 'Asia/Tokyo'")
        assert sidecar.call(lambda app: len(app.pool.pinned)) == 1
        assert _value(b, "SHOW TimeZone") == "Asia/Tokyo"
    # A left: its server is reset (DISCARD ALL), then reused warm (it is the last one given back).
    _wait_no_active_server(sidecar)
    with _connect(sidecar) as c:
        assert _value(c, "SELECT pg_backend_pid()") == pinned_pid
        assert _value(c, "SHOW search_path") == '"$user", public'
    metrics = samples(sidecar.metrics_url)
    assert metrics[("poolkit_sidecar_pinned_clients", (("pool", pool), ("reason", "session_set")))] == 0
    assert admin(sidecar.url(database="poolkit"), "SHOW PINS") == []


def _wait_no_active_server(sidecar: SidecarThread) -> None:
    deadline = time.monotonic() + 10
    while sidecar.call(lambda app: app.pool.server_counts()["active"]):
        assert time.monotonic() < deadline, "a server connection stayed busy"
        time.sleep(0.02)


def test_a_listening_client_gets_notifications_between_transactions(sidecar_factory: Factory, stack: DevStack) -> None:
    channel = f"pk_{uuid.uuid4().hex[:8]}"
    # Through PgBouncer (transaction mode) the LISTEN stays on a server the client no longer holds: the
    # notification goes to whichever client has that server, or nobody.
    with psycopg.connect(stack.pooled_url, autocommit=True, prepare_threshold=None) as listener:
        listener.execute(f"LISTEN {channel}")
        with psycopg.connect(stack.pooled_url, autocommit=True, prepare_threshold=None) as sender:
            sender.execute(f"NOTIFY {channel}, 'via pgbouncer'")
        assert [n.payload for n in listener.notifies(timeout=1.0, stop_after=1)] == []
    # Through the sidecar LISTEN pins the client: the notification reaches it while it is idle.
    sidecar = sidecar_factory(max_size=2)
    with _connect(sidecar) as listener:
        listener.execute(f"LISTEN {channel}")
        with _connect(sidecar) as sender:
            sender.execute(f"NOTIFY {channel}, 'via sidecar'")
        assert [n.payload for n in listener.notifies(timeout=10.0, stop_after=1)] == ["via sidecar"]


def test_a_session_feature_inside_a_transaction_pins_that_server(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=2)
    with _connect(sidecar) as a:
        with a.transaction():
            pid = _value(a, "SELECT pg_backend_pid()")
            a.execute("SELECT pg_advisory_lock(918273)")
        assert _pids(a) == {pid}
        assert sidecar.call(lambda app: [c.session.pin_reason for c in app.pool.pinned]) == ["advisory_lock"]
        a.execute("SELECT pg_advisory_unlock_all()")
        assert sidecar.call(lambda app: len(app.pool.pinned)) == 0  # the client undid it: unpinned


def test_discard_all_unpins_but_not_when_it_failed(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=2)
    with _connect(sidecar) as a:
        a.execute("LISTEN pin_jobs")
        a.execute("CREATE TEMP TABLE pin_scratch (x int)")
        reasons = sidecar.call(lambda app: sorted(next(iter(app.pool.pinned)).session.pin_reasons))
        assert reasons == ["listen", "temp_table"]
        with pytest.raises(psycopg.errors.ActiveSqlTransaction), a.transaction():
            a.execute("DISCARD ALL")  # refused inside a transaction block
        assert sidecar.call(lambda app: len(app.pool.pinned)) == 1
        a.execute("UNLISTEN *")  # undoes one reason of two
        assert sidecar.call(lambda app: [c.session.pin_reason for c in app.pool.pinned]) == ["temp_table"]
        a.execute("DISCARD ALL")
        assert sidecar.call(lambda app: len(app.pool.pinned)) == 0
        assert _value(a, "SELECT to_regclass('pin_scratch')") is None


def test_max_pinned_clients_refuses_with_a_clear_error(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(max_size=3, max_pinned_clients=1)
    with _connect(sidecar) as a, _connect(sidecar) as b:
        a.execute("SET statement_timeout = '31s'")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as refused:
            b.execute("SET statement_timeout = '32s'")
        text = str(refused.value)
        assert "max_pinned_clients=1" in text and "session_set" in text
        assert "Raise max_pinned_clients" in (refused.value.diag.message_hint or "")
        assert _value(b, "SHOW statement_timeout") == "0"  # the SET never ran, and B carries on
        # Mid-transaction nothing can be answered for the server: the client is ended, its transaction rolled back.
        b.execute("BEGIN")
        b.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="max_pinned_clients=1"):
            b.execute("LISTEN pin_refused")
    with _connect(sidecar) as c:
        c.execute("SET statement_timeout = '33s'")  # A left: room for one pin again
        assert _value(c, "SHOW statement_timeout") == "33s"


async def test_asyncpg_pool_reset_unpins_what_it_undoes(sidecar_factory: Factory, stack: DevStack) -> None:
    direct = await asyncpg.connect(stack.url(via="direct"))
    try:
        assert direct.get_reset_query() == ASYNCPG_RESET  # what asyncpg's pool sends on release
    finally:
        await direct.close()
    sidecar = sidecar_factory(max_size=1)
    pool = await asyncpg.create_pool(sidecar.url(), min_size=1, max_size=1, statement_cache_size=0)
    try:
        async with pool.acquire() as conn:
            listener = lambda *args: None  # noqa: E731
            await conn.add_listener("pin_events", listener)  # LISTEN
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.remove_listener("pin_events", listener)  # UNLISTEN pin_events: may leave others
            assert sidecar.call(lambda app: [c.session.pin_reason for c in app.pool.pinned]) == ["listen"]
        # Released: asyncpg's reset undid the LISTEN, so the client is no longer pinned.
        assert sidecar.call(lambda app: len(app.pool.pinned)) == 0
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            assert await conn.fetch("SELECT pg_listening_channels()") == []
            await conn.execute("CREATE TEMP TABLE pin_survivor (x int)")
        # asyncpg's reset does not drop temporary tables: this client stays pinned.
        assert sidecar.call(lambda app: [c.session.pin_reason for c in app.pool.pinned]) == ["temp_table"]
    finally:
        await pool.close()


# ---------------------------------------------------------------- with PgBouncer upstream + a direct URL


@pytest.fixture
def routed(sidecar_factory: Factory, stack: DevStack) -> SidecarThread:
    """A sidecar whose upstream is the stack's PgBouncer, with the direct URL for routing and pins."""
    return sidecar_factory(
        pooled_url=stack.url(via="pgbouncer", sslmode="verify-full"), upstream="pooled", direct_max_size=2
    )


def _direct_pids(sidecar: SidecarThread) -> set[int]:
    return sidecar.call(lambda app: {s.backend_pid for s in app.pool.direct.servers})  # type: ignore[union-attr]


def test_introspection_and_ddl_go_direct_and_pins_use_the_direct_upstream(routed: SidecarThread) -> None:
    table = f"pin_routed_{uuid.uuid4().hex[:8]}"
    with _connect(routed) as conn:
        pooled_pid = _value(conn, "SELECT pg_backend_pid()")
        catalog_pid = _value(conn, "SELECT pg_backend_pid() FROM pg_catalog.pg_class LIMIT 1")
        conn.execute(f"CREATE TABLE {table} (x int)")
        conn.execute(f"DROP TABLE {table}")
        assert catalog_pid in _direct_pids(routed)
        assert pooled_pid not in _direct_pids(routed)  # plain statements stay on PgBouncer
        conn.execute("SET search_path TO public")
        [pid] = _pids(conn)
        assert pid in _direct_pids(routed)
    pool = routed.call(lambda app: app.pool.name)
    metrics = samples(routed.metrics_url)
    assert metrics[("poolkit_sidecar_routed_total", (("pool", pool), ("reason", "catalog")))] == 1
    assert metrics[("poolkit_sidecar_routed_total", (("pool", pool), ("reason", "ddl")))] == 2
    assert metrics[("poolkit_sidecar_pins_total", (("pool", pool), ("reason", "session_set")))] == 1
    direct_servers = [
        metrics[("poolkit_sidecar_servers", (("pool", pool), ("route", "direct"), ("state", state)))]
        for state in ("active", "idle", "connecting")
    ]
    assert 1 <= sum(direct_servers) <= 2  # direct_max_size
    pools = admin(routed.url(database="poolkit"), "SHOW POOLS")
    assert [row["database"] for row in pools] == [pool, f"{pool}/direct"]
    routes = {(row["kind"], row["reason"]): row for row in admin(routed.url(database="poolkit"), "SHOW ROUTES")}
    assert routes["direct", "catalog"]["total"] == "1" and routes["direct", "ddl"]["total"] == "2"
    assert routes["pin", "session_set"]["total"] == "1" and routes["pin", "session_set"]["pinned_now"] == "0"


@pytest.fixture(scope="module")
def dump_schema(stack: DevStack) -> Iterator[str]:
    schema = "pin_dump"
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        conn.execute(
            f"""
            DROP SCHEMA IF EXISTS {schema} CASCADE;
            CREATE SCHEMA {schema};
            CREATE TABLE {schema}.items (id serial PRIMARY KEY, name text NOT NULL, price numeric(10, 2));
            CREATE INDEX items_name ON {schema}.items (name);
            COMMENT ON TABLE {schema}.items IS 'things for sale';
            CREATE VIEW {schema}.cheap AS SELECT name FROM {schema}.items WHERE price < 10;
            INSERT INTO {schema}.items (name, price) SELECT 'item ' || i, i FROM generate_series(1, 200) i;
            """
        )
    yield schema
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _run(argv: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _without_restrict_keys(dump: str) -> str:
    # pg_dump 15.14+ writes a random \restrict key per run.
    return re.sub(r"^\\(un)?restrict \S+$", "", dump, flags=re.MULTILINE)


def test_pg_dump_and_psql_describe_through_sidecar(routed: SidecarThread, stack: DevStack, dump_schema: str) -> None:
    pg_dump, psql = str(find_pg_binary("pg_dump")), str(find_pg_binary("psql"))
    direct_url = stack.url(via="direct")
    through = _without_restrict_keys(_run([pg_dump, "--schema", dump_schema, "-d", routed.url()]))
    expected = _without_restrict_keys(_run([pg_dump, "--schema", dump_schema, "-d", direct_url]))
    assert through == expected
    assert "CREATE TABLE pin_dump.items" in through and "item 200\t200.00" in through
    for command in (r"\d", r"\dt pin_dump.*", r"\dt+ pin_dump.*", r"\d pin_dump.items", r"\d+ pin_dump.items"):
        argv = [psql, "--no-psqlrc", "-X", "-c", command]
        got, want = _run([*argv, routed.url()]), _run([*argv, direct_url])
        assert got == want, command
    described = _run([psql, "--no-psqlrc", "-X", "-c", r"\d+ pin_dump.items", routed.url()])
    assert '"items_name" btree (name)' in described and "numeric(10,2)" in described
    listed = _run([psql, "--no-psqlrc", "-X", "-c", r"\dt+ pin_dump.*", routed.url()])
    assert "pin_dump | items | table" in listed and "things for sale" in listed
    view = _run([psql, "--no-psqlrc", "-X", "-c", r"\d+ pin_dump.cheap", routed.url()])
    assert "View definition:" in view and "items.price < 10" in view
    pool = routed.call(lambda app: app.pool.name)
    metrics = samples(routed.metrics_url)
    assert metrics[("poolkit_sidecar_routed_total", (("pool", pool), ("reason", "catalog")))] >= 5  # psql's \d
    assert metrics[("poolkit_sidecar_pins_total", (("pool", pool), ("reason", "session_set")))] >= 1  # pg_dump


def test_reload_resizes_then_retires_the_direct_pool(routed: SidecarThread, stack: DevStack) -> None:
    pooled = {"pooled_url": stack.url(via="pgbouncer", sslmode="verify-full"), "upstream": "pooled"}
    assert routed.call(lambda app: app.reload(upstream_settings(stack, **pooled, direct_max_size=1)))
    assert routed.call(lambda app: app.pool.direct.max_size) == 1  # type: ignore[union-attr]
    with _connect(routed) as pinned:
        pinned.execute("LISTEN pin_reload")
        [pid] = _pids(pinned)
        old = routed.call(lambda app: app.pool.direct)
        # Without a pooled upstream there is nothing to route around: the direct pool is retired...
        assert routed.call(lambda app: app.reload(upstream_settings(stack)))
        assert routed.call(lambda app: app.pool.direct) is None
        assert _pids(pinned) == {pid}  # ...but its pinned client keeps its server until it leaves
    deadline = time.monotonic() + 10
    while routed.call(lambda app: len(old.servers)):  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the retired pool kept a server"
        time.sleep(0.02)
