"""Operations: admin SHOW commands, /metrics over HTTP, slow_query events, SIGTERM drain, SIGHUP reload."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from poolkit.dev.devstack import DevStack, find_pg_binary

if TYPE_CHECKING:
    from .conftest import SidecarProcess, SidecarThread

Factory = Callable[..., "SidecarThread"]


def admin(url: str, command: str) -> list[dict[str, str]]:
    """Run a SHOW command with psql (the admin console speaks the simple query protocol, as PgBouncer's)."""
    psql = str(find_pg_binary("psql"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(
        [psql, "--no-psqlrc", "-X", "-A", "-F", "\t", "-c", command, url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()[:-1]  # drop the "(n rows)" footer
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def samples(metrics_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(metrics_url).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_admin_show_commands(sidecar: SidecarThread) -> None:
    with psycopg.connect(sidecar.url(application_name="busy-app"), prepare_threshold=None) as busy:
        busy.execute("SELECT 1")  # holds a server inside a transaction
        url = sidecar.url(database="poolkit")
        [pool] = admin(url, "SHOW POOLS")
        assert pool["database"] == "app"
        assert pool["cl_active"] == "1"
        assert pool["sv_active"] == "1"
        assert pool["pool_mode"] == "transaction"
        clients = admin(url, "SHOW CLIENTS")
        assert [c["state"] for c in clients if c["application_name"] == "busy-app"] == ["active"]
        servers = admin(url, "SHOW SERVERS")
        assert any(s["state"] == "active" and s["link"] for s in servers)
        assert all(s["tls"] == "TLS" for s in servers)
        busy.commit()
    [stats] = admin(url, "SHOW STATS")
    assert int(stats["total_xact_count"]) >= 1
    assert int(stats["total_query_count"]) >= 1
    config = {row["key"]: row["value"] for row in admin(url, "SHOW CONFIG")}
    assert config["max_size"] == "3"
    assert config["upstream"] == "direct"  # the setting; the URL it picks is upstream_url, redacted
    assert "***" in config["upstream_url"] or "@" in config["upstream_url"]
    psql = str(find_pg_binary("psql"))
    bad = subprocess.run([psql, "-X", "-c", "SHOW NONSENSE", url], capture_output=True, text=True, check=False)
    assert "SHOW POOLS" in bad.stderr


def test_metrics_over_http_reflect_the_workload(sidecar: SidecarThread) -> None:
    before = samples(sidecar.metrics_url)
    pool = (("pool", "app"),)
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        for i in range(25):
            conn.execute("SELECT %s::int", [i])
        with conn.transaction():
            conn.execute("SELECT 1")
            conn.execute("SELECT 2")
        after = samples(sidecar.metrics_url)
        assert after[("poolkit_sidecar_clients", (("pool", "app"), ("state", "idle")))] == 1
    xacts = after[("poolkit_sidecar_transactions_total", pool)] - before.get(
        ("poolkit_sidecar_transactions_total", pool), 0
    )
    queries = after[("poolkit_sidecar_queries_total", pool)] - before.get(("poolkit_sidecar_queries_total", pool), 0)
    assert xacts == 26  # 25 autocommit statements + 1 explicit transaction
    assert queries >= 29  # psycopg's BEGIN/COMMIT are queries too
    assert after[("poolkit_sidecar_transaction_duration_seconds_count", pool)] >= 26
    assert after[("poolkit_sidecar_client_wait_seconds_count", pool)] >= 26
    assert after[("poolkit_sidecar_received_bytes_total", pool)] > 0
    assert after[("poolkit_sidecar_sent_bytes_total", pool)] > 0
    servers = (("pool", "app"), ("route", "direct"), ("state", "idle"))
    assert after[("poolkit_sidecar_servers", servers)] >= 1
    assert httpx.get(f"http://127.0.0.1:{sidecar.http_port}/healthz").status_code == 200
    ready = httpx.get(f"http://127.0.0.1:{sidecar.http_port}/readyz")
    assert (ready.status_code, ready.text.strip()) == (200, "ready")


def test_slow_query_event_has_normalized_sql(sidecar_factory: Factory, caplog: pytest.LogCaptureFixture) -> None:
    sidecar = sidecar_factory(slow_query_seconds=0.2)
    caplog.set_level(logging.INFO, logger="poolkit.sidecar")
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SELECT 'fast-secret'")
        conn.execute("SELECT pg_sleep(0.4), 'slow-secret-literal'")
    # The event is logged on the sidecar's thread right after the reply is forwarded: allow it a moment.
    deadline = time.monotonic() + 5
    while True:
        events = [r.getMessage() for r in caplog.records if "slow_query" in r.getMessage()]
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(events) == 1
    assert "pg_sleep" in events[0]
    assert "slow-secret-literal" not in events[0]  # literals are normalised away
    assert samples(sidecar.metrics_url)[("poolkit_sidecar_slow_queries_total", (("pool", "app"),))] == 1


def test_sigterm_drains_an_in_flight_transaction_then_exits_0(
    sidecar_process: Callable[..., SidecarProcess], stack: DevStack
) -> None:
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS drained; CREATE TABLE drained (x int)")
    process = sidecar_process(shutdown_timeout="30")
    with psycopg.connect(process.url(), prepare_threshold=None) as conn:
        conn.execute("INSERT INTO drained VALUES (1)")  # inside a transaction
        process.signal(signal.SIGTERM)
        # Draining: new clients are refused (as soon as the signal is handled)...
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(process.url(), connect_timeout=3).close()
            except psycopg.OperationalError:
                break
            assert time.monotonic() < deadline, "the sidecar kept accepting clients after SIGTERM"
            time.sleep(0.05)
        # ...while the transaction in flight may still finish.
        conn.execute("INSERT INTO drained VALUES (2)")
        conn.commit()
    code, stderr = process.wait(timeout=60)
    assert code == 0, stderr
    assert "sidecar_draining" in stderr
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM drained").fetchone() == (2,)


def test_sighup_reloads_settings_without_dropping_clients(
    sidecar_process: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text("max_size = 1\nquery_wait_timeout = 0.5\n")
    process = sidecar_process(config_file=config)
    with (
        psycopg.connect(process.url(), prepare_threshold=None) as first,
        psycopg.connect(process.url(), autocommit=True, prepare_threshold=None) as second,
    ):
        first.execute("SELECT 1")  # holds the only server
        with pytest.raises(psycopg.errors.QueryCanceled, match="all 1 server connections"):
            second.execute("SELECT 2")
        config.write_text("max_size = 2\nquery_wait_timeout = 0.5\n")
        process.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert second.execute("SELECT 3").fetchone() == (3,)  # a second server is allowed now
                break
            except psycopg.errors.QueryCanceled:
                if time.monotonic() > deadline:
                    raise
        assert first.execute("SELECT 4").fetchone() == (4,)  # the first client was never dropped
        first.commit()
