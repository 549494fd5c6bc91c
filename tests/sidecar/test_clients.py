"""Real clients through the sidecar: psql, pgbench (simple/extended), asyncpg, psycopg; COPY, NOTIFY, cancel."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
from typing import TYPE_CHECKING

import asyncpg
import psycopg
import pytest

from poolkit.dev.devstack import DevStack, find_pg_binary

from .conftest import run

if TYPE_CHECKING:
    from collections.abc import Callable

    from .conftest import SidecarThread


def test_psql_runs_queries_and_transactions(sidecar: SidecarThread) -> None:
    psql = str(find_pg_binary("psql"))
    script = (
        "BEGIN;\nCREATE TEMP TABLE t (x int) ON COMMIT DROP;\nINSERT INTO t VALUES (1), (2);\n"
        "SELECT 'sum=' || sum(x) FROM t;\nCOMMIT;\n"
        "SELECT 'server_version=' || current_setting('server_version_num')::int / 10000;\n"
        "SELECT count(*) FROM generate_series(1, 5000);\n"
    )
    done = run([psql, "--no-psqlrc", "-X", "-At", "-v", "ON_ERROR_STOP=1", sidecar.url()], input=script)
    assert done.returncode == 0, done.stderr
    assert "sum=3" in done.stdout
    assert "server_version=15" in done.stdout
    assert done.stdout.strip().endswith("5000")


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_pgbench_select_only(sidecar: SidecarThread, pgbench_tables: None, mode: str) -> None:
    pgbench = str(find_pg_binary("pgbench"))
    done = run([pgbench, "-n", "-S", "-M", mode, "-c", "8", "-j", "2", "-t", "200", sidecar.url()])
    assert done.returncode == 0, done.stderr
    assert "number of transactions actually processed: 1600/1600" in done.stdout
    assert "number of failed transactions: 0" in done.stdout
    assert sidecar.call(lambda app: len(app.pool.servers)) <= 3


def test_pgbench_tpcb_with_new_connection_per_transaction(sidecar: SidecarThread, pgbench_tables: None) -> None:
    pgbench = str(find_pg_binary("pgbench"))
    done = run([pgbench, "-n", "-C", "-M", "extended", "-c", "6", "-j", "2", "-t", "30", sidecar.url()])
    assert done.returncode == 0, done.stderr
    assert "number of transactions actually processed: 180/180" in done.stdout


def test_pgbench_init_uses_copy_in(sidecar: SidecarThread, stack: DevStack) -> None:
    # pgbench -i loads pgbench_accounts with COPY FROM STDIN through the sidecar.
    pgbench = str(find_pg_binary("pgbench"))
    url = sidecar.url()
    done = run([pgbench, "-i", "-q", "-s", "1", "-I", "dtg", url], timeout=300)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone() == (100_000,)


def test_copy_out_and_in_with_psycopg(sidecar: SidecarThread) -> None:
    with psycopg.connect(sidecar.url(), prepare_threshold=None) as conn:
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE c (id int, name text) ON COMMIT DROP")
            with conn.cursor().copy("COPY c FROM STDIN") as copy:
                for i in range(1000):
                    copy.write_row((i, f"name {i}"))
            out = bytearray()
            with conn.cursor().copy("COPY (SELECT * FROM c ORDER BY id) TO STDOUT") as copy:
                for block in copy:
                    out += block
        lines = bytes(out).decode().splitlines()
        assert len(lines) == 1000
        assert lines[999] == "999\tname 999"


async def test_asyncpg_queries_transactions_and_pipelined_executemany(sidecar: SidecarThread) -> None:
    conn = await asyncpg.connect(sidecar.url(), statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE a (x int) ON COMMIT DROP")
            # executemany pipelines Bind/Execute messages for every row before a single Sync.
            await conn.executemany("INSERT INTO a VALUES ($1)", [(i,) for i in range(500)])
            assert await conn.fetchval("SELECT sum(x) FROM a") == sum(range(500))
        rows = await conn.fetch("SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g")
        assert len(rows) == 2000
    finally:
        await conn.close()


def test_psycopg_pipeline_mode(sidecar: SidecarThread) -> None:
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int", [i]) for i in range(50)]
        assert [c.fetchone() for c in cursors] == [(i,) for i in range(50)]


async def test_200_concurrent_clients_over_3_servers(sidecar: SidecarThread) -> None:
    async def one(i: int) -> int:
        conn = await asyncpg.connect(sidecar.url(), statement_cache_size=0)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_sleep(0.01)")
                return int(await conn.fetchval("SELECT $1::int + 1000", i))
        finally:
            await conn.close()

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert results == [i + 1000 for i in range(200)]
    servers = sidecar.call(lambda app: (len(app.pool.servers), app.pool.stats.transactions))
    assert servers[0] <= 3
    assert servers[1] >= 200


def test_notice_and_notify_pass_through(sidecar: SidecarThread) -> None:
    notices: list[str] = []
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
        # LISTEN and NOTIFY in one transaction: the notification arrives at COMMIT, before
        # ReadyForQuery, on the server connection this client still holds.
        with conn.transaction():
            conn.execute("LISTEN poolkit_test")
            conn.execute("NOTIFY poolkit_test, 'payload-1'")
        received = list(conn.notifies(timeout=2, stop_after=1))
        conn.execute("UNLISTEN *")
    assert notices == ["hello from plpgsql"]
    assert [(n.channel, n.payload) for n in received] == [("poolkit_test", "payload-1")]


def test_cancel_reaches_the_right_backend(sidecar: SidecarThread) -> None:
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        # cancel_safe(): the legacy cancel() blocks inside libpq holding the GIL, which would stall
        # the sidecar running in this process's other thread.
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        began = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement due to user request"):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - began < 20
        # The session (and the pool) is usable afterwards.
        assert conn.execute("SELECT 7").fetchone() == (7,)


def test_session_settings_follow_the_client_across_server_connections(
    sidecar_factory: Callable[..., SidecarThread],
) -> None:
    sidecar = sidecar_factory(max_size=2)
    with (
        psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as a,
        psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None, application_name="b-app") as b,
    ):
        a.execute("SET TimeZone TO 'Asia/Tokyo'")
        for _ in range(5):
            # b never asked for Tokyo: it must see the server default, whichever server it gets.
            assert (
                b.execute("SELECT current_setting('TimeZone'), current_setting('application_name')").fetchone()[1]
                == "b-app"
            )
            assert b.execute("SELECT current_setting('TimeZone')").fetchone() != ("Asia/Tokyo",)
            assert a.execute("SELECT current_setting('TimeZone')").fetchone() == ("Asia/Tokyo",)


def test_psql_reports_client_encoding_it_asked_for(sidecar: SidecarThread) -> None:
    psql = str(find_pg_binary("psql"))
    env_cmd = [psql, "--no-psqlrc", "-X", "-At", "-c", "SHOW client_encoding", sidecar.url()]
    done = subprocess.run(
        env_cmd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PGCLIENTENCODING": "LATIN1", "PATH": "/usr/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"LATIN1\s*", done.stdout)
