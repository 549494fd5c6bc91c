"""The admin console as PgBouncer users know it: who may use it, and its control commands, driven with psql."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from poolkit.dev.devstack import DevStack, find_pg_binary, free_port

from .conftest import REPO, SidecarProcess, SidecarThread, run

Factory = Callable[..., SidecarThread]
PSQL = str(find_pg_binary("psql"))


def psql(url: str, command: str) -> subprocess.CompletedProcess[str]:
    """psql -c COMMAND against ``url`` (the binary, as an operator scripts it)."""
    return run([PSQL, "--no-psqlrc", "-X", "-A", "-F", "\t", "-c", command, url], timeout=60)


def table(done: subprocess.CompletedProcess[str]) -> list[dict[str, str]]:
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()[:-1]  # drop the "(n rows)" footer
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


def show(url: str, what: str) -> list[dict[str, str]]:
    return table(psql(url, f"SHOW {what}"))


def console(sidecar: SidecarThread, user: str = "app", password: str | None = None) -> str:
    return sidecar.url(user=user, password=password, database="poolkit")


def until(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``check`` until it returns something truthy (generous: the box is loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def in_thread(fn: Callable[[], Any]) -> Future[Any]:
    future: Future[Any] = Future()

    def main() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=main, daemon=True).start()
    return future


def backend_pids(stack: DevStack, application_name: str) -> set[int]:
    """PostgreSQL backends a sidecar holds (by its application_name), seen directly on the server."""
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [application_name])
        return {pid for (pid,) in rows.fetchall()}


# ------------------------------------------------------------------ admin_users / stats_users


def test_by_default_only_the_upstream_role_may_use_the_console(sidecar: SidecarThread) -> None:
    # Trust auth (loopback): any name logs in to the database, but the console is the upstream role's.
    with psycopg.connect(sidecar.url(user="bob"), autocommit=True, prepare_threshold=None) as bob:
        assert bob.execute("SELECT 1").fetchone() == (1,)
    refused = psql(console(sidecar, "bob"), "SHOW POOLS")
    assert refused.returncode != 0
    assert 'user "bob" may not use the admin console "poolkit"' in refused.stderr
    assert "admin_users (POOLKIT_SIDECAR_ADMIN_USERS)" in refused.stderr
    assert [row["database"] for row in show(console(sidecar), "POOLS")] == ["app"]
    assert psql(console(sidecar), "RECONNECT").stdout.strip() == "RECONNECT"


def test_stats_users_may_only_show_and_others_are_refused(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(
        users={"app": "app-pw", "ops": "ops-pw", "carol": "carol-pw", "eve": "eve-pw"},
        admin_users="ops",  # as PgBouncer writes it: comma-separated
        stats_users="carol",
    )
    assert show(console(sidecar, "ops", "ops-pw"), "VERSION")[0]["version"].startswith("poolkit sidecar")
    assert show(console(sidecar, "carol", "carol-pw"), "LISTS")
    reload = psql(console(sidecar, "carol", "carol-pw"), "RELOAD")
    assert reload.returncode != 0
    assert 'RELOAD needs an admin user: "carol" is in stats_users' in reload.stderr
    # admin_users is set: the upstream role is an ordinary user now.
    for user, password in (("app", "app-pw"), ("eve", "eve-pw")):
        refused = psql(console(sidecar, user, password), "SHOW POOLS")
        assert f'user "{user}" may not use the admin console' in refused.stderr
    # The refusal comes after the password check: a wrong password still says only that.
    wrong = psql(console(sidecar, "eve", "nope"), "SHOW POOLS")
    assert 'password authentication failed for user "eve"' in wrong.stderr
    assert "admin console" not in wrong.stderr
    assert psql(console(sidecar, "ops", "ops-pw"), "RECONNECT").stdout.strip() == "RECONNECT"


# ------------------------------------------------------------------ SHOW DATABASES / USERS / LISTS / HELP


def test_show_databases_users_lists_help(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(users={"app": "app-pw", "bob": "bob-pw"}, stats_users="bob")
    url = console(sidecar, "app", "app-pw")
    with psycopg.connect(sidecar.url(password="app-pw"), autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SELECT 1")
        databases = {row["name"]: row for row in show(url, "DATABASES")}
        assert set(databases) == {"app", "poolkit"}
        app = databases["app"]
        assert (app["database"], app["pool_size"], app["pool_mode"], app["paused"]) == ("app", "3", "transaction", "0")
        assert app["current_connections"] == "1"
        assert databases["poolkit"]["pool_mode"] == "statement"
        assert [row["name"] for row in show(url, "USERS")] == ["app", "bob"]
        lists = {row["list"]: int(row["items"]) for row in show(url, "LISTS")}
        assert lists["databases"] == 2 and lists["pools"] == 1 and lists["users"] == 2
        assert lists["used_clients"] == 2  # this client and the console
        assert lists["used_servers"] == 1
    helped = psql(url, "SHOW HELP")
    assert helped.returncode == 0, helped.stderr
    assert "Console usage" in helped.stderr
    for command in ("SHOW HELP|POOLS", "DATABASES", "RELOAD", "PAUSE [<db>]", "RESUME [<db>]", "KILL <db>", "SHUTDOWN"):
        assert command in helped.stderr
    unknown = psql(url, "SHOW NONSENSE")
    assert "SHOW DATABASES" in unknown.stderr and "PAUSE" in unknown.stderr


# ------------------------------------------------------------------ PAUSE / RESUME / RECONNECT / KILL


def test_pause_waits_for_transactions_then_holds_queries_until_resume(
    sidecar_factory: Factory, stack: DevStack
) -> None:
    sidecar = sidecar_factory(application_name="paused-sidecar")
    url = console(sidecar)
    with psycopg.connect(sidecar.url(), prepare_threshold=None) as busy:
        busy.execute("SELECT 1")  # a transaction holds a server
        pausing = subprocess.Popen(
            [PSQL, "--no-psqlrc", "-X", "-A", "-c", "PAUSE app", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        until(lambda: show(url, "DATABASES")[0]["paused"] == "1", "PAUSE to start")
        assert pausing.poll() is None  # PAUSE waits while a transaction is open...
        assert busy.execute("SELECT 2").fetchone() == (2,)  # ...which goes on undisturbed
        busy.commit()
    out, err = pausing.communicate(timeout=60)
    assert (pausing.returncode, out.strip()) == (0, "PAUSE"), err
    until(lambda: not backend_pids(stack, "paused-sidecar"), "the sidecar's PostgreSQL backends to close")
    assert show(url, "SERVERS") == []
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        waiting = in_thread(lambda: conn.execute("SELECT 'resumed'").fetchone())
        until(lambda: show(url, "POOLS")[0]["cl_waiting"] == "1", "the query to wait")
        assert not waiting.done()
        assert psql(url, "RESUME").stdout.strip() == "RESUME"
        assert waiting.result(timeout=30) == ("resumed",)
    assert show(url, "DATABASES")[0]["paused"] == "0"
    not_paused = psql(url, "RESUME")
    assert "the sidecar is not paused" in not_paused.stderr
    assert 'no such database: "other"' in psql(url, "PAUSE other").stderr


def test_reconnect_replaces_every_server_connection(sidecar_factory: Factory, stack: DevStack) -> None:
    sidecar = sidecar_factory(max_size=1, application_name="reconnected-sidecar")
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        [(first,)] = conn.execute("SELECT pg_backend_pid()").fetchall()
        [(again,)] = conn.execute("SELECT pg_backend_pid()").fetchall()
        assert again == first  # without RECONNECT the pool keeps its connection
        assert psql(console(sidecar), "RECONNECT").stdout.strip() == "RECONNECT"
        until(lambda: first not in backend_pids(stack, "reconnected-sidecar"), "the old backend to end")
        [(after,)] = conn.execute("SELECT pg_backend_pid()").fetchall()
        assert after != first
        assert after in backend_pids(stack, "reconnected-sidecar")


def test_kill_drops_clients_and_servers_and_pauses(sidecar_factory: Factory, stack: DevStack) -> None:
    sidecar = sidecar_factory(application_name="killed-sidecar")
    url = console(sidecar)
    victim = psycopg.connect(sidecar.url(), prepare_threshold=None)
    [(pid,)] = victim.execute("SELECT pg_backend_pid()").fetchall()  # idle in a transaction
    killed = psql(url, "KILL")
    assert "KILL needs a database name" in killed.stderr
    assert psql(url, "KILL app").stdout.strip() == "KILL"
    with pytest.raises(psycopg.OperationalError, match="KILL on the poolkit admin console"):
        victim.execute("SELECT 1")
    victim.close()
    until(lambda: pid not in backend_pids(stack, "killed-sidecar"), "the killed backend to end")
    assert show(url, "DATABASES")[0]["paused"] == "1"
    with psycopg.connect(sidecar.url(), autocommit=True, prepare_threshold=None) as conn:
        waiting = in_thread(lambda: conn.execute("SELECT 7").fetchone())
        until(lambda: show(url, "POOLS")[0]["cl_waiting"] == "1", "the query to wait for RESUME")
        psql(url, "RESUME")
        assert waiting.result(timeout=30) == (7,)


# ------------------------------------------------------------------ RELOAD, SHUTDOWN, refusals


def test_reload_applies_the_file_or_says_why_not(
    sidecar_process: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text("max_size = 1\n")
    process = sidecar_process(config_file=config)
    url = f"postgresql://app@127.0.0.1:{process.port}/poolkit?sslmode=disable"
    assert {r["key"]: r["value"] for r in show(url, "CONFIG")}["max_size"] == "1"
    config.write_text("max_size = 4\n")
    assert psql(url, "RELOAD").stdout.strip() == "RELOAD"
    assert {r["key"]: r["value"] for r in show(url, "CONFIG")}["max_size"] == "4"
    config.write_text("max_size = 0\n")
    bad = psql(url, "RELOAD")
    assert "RELOAD failed, nothing changed" in bad.stderr and "max_size" in bad.stderr
    assert {r["key"]: r["value"] for r in show(url, "CONFIG")}["max_size"] == "4"


def test_shutdown_drains_in_flight_work_then_exits_0(
    sidecar_process: Callable[..., SidecarProcess], stack: DevStack
) -> None:
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS shut; CREATE TABLE shut (x int)")
    process = sidecar_process(shutdown_timeout="60", admin_users="ops, app")
    url = f"postgresql://app@127.0.0.1:{process.port}/poolkit?sslmode=disable"
    with psycopg.connect(process.url(), prepare_threshold=None) as conn:
        conn.execute("INSERT INTO shut VALUES (1)")  # in a transaction
        done = psql(url, "SHUTDOWN")
        assert (done.returncode, done.stdout.strip()) == (0, "SHUTDOWN"), done.stderr
        refused = psql(url, "SHOW POOLS")  # no new clients...
        assert refused.returncode != 0
        assert process.proc.poll() is None  # ...but the process waits for the transaction
        conn.execute("INSERT INTO shut VALUES (2)")
        conn.commit()
    code, stderr = process.wait(timeout=60)
    assert code == 0, stderr
    assert "admin_command" in stderr and "SHUTDOWN" in stderr
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM shut").fetchone() == (2,)


def test_refused_logins_each_have_their_own_number(sidecar_process: Callable[..., SidecarProcess]) -> None:
    process = sidecar_process()
    for database in ("nope", "other"):
        failed = psql(f"postgresql://app@127.0.0.1:{process.port}/{database}?sslmode=disable", "SELECT 1")
        assert "does not exist on this sidecar" in failed.stderr
    process.signal(signal.SIGTERM)
    code, stderr = process.wait()
    assert code == 0, stderr
    refused = [line for line in stderr.splitlines() if "client_login_refused" in line]
    assert len(refused) == 2, stderr
    assert "client #0 " not in stderr
    numbers = {line.split("client #")[1].split()[0] for line in refused}
    assert len(numbers) == 2


def test_replication_connections_are_refused_at_login(sidecar: SidecarThread) -> None:
    for mode in ("database", "true"):
        failed = psql(f"{sidecar.url()}&replication={mode}", "IDENTIFY_SYSTEM")
        assert failed.returncode != 0
        assert f"replication connections (replication={mode}) are not relayed by the poolkit sidecar" in failed.stderr
        assert "direct URL (POOLKIT_DIRECT_URL)" in failed.stderr
    ordinary = psql(f"{sidecar.url()}&replication=false", "SELECT 1")
    assert ordinary.returncode == 0, ordinary.stderr


def test_wrong_password_through_a_pooler_is_an_auth_failure(sidecar_factory: Factory, stack: DevStack) -> None:
    wrong = stack.url(via="pgbouncer", password="not-the-password", sslmode="verify-full")
    with pytest.raises(psycopg.OperationalError, match="SASL authentication failed"):
        psycopg.connect(wrong, sslrootcert=str(stack.ca_file))  # PgBouncer's own answer
    sidecar = sidecar_factory(pooled_url=wrong, upstream="pooled")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar.url(), prepare_threshold=None)
    message = str(info.value)
    assert "cannot log in to its upstream" in message
    assert 'the upstream refused the password of user "app"' in message
    # PgBouncer says 08P01 (protocol violation) where PostgreSQL says 28P01: the SQLSTATE alone
    # filed this under "cannot reach" and kind="connect" before.
    assert "SASL authentication failed (SQLSTATE 08P01); check the password in pooled_url" in message
    assert "not-the-password" not in message
    metrics = httpx.get(sidecar.metrics_url).text
    assert 'poolkit_sidecar_upstream_errors_total{kind="auth",pool="app"} 1.0' in metrics
    assert 'poolkit_sidecar_upstream_errors_total{kind="connect",pool="app"} 0.0' in metrics


# ------------------------------------------------------------------ SHOW CONFIG after SIGHUP


def start_sidecar(stack: DevStack, config: Path) -> subprocess.Popen[str]:
    """``python -m poolkit.sidecar --config FILE`` with every port from the file (no flags override it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_") and k != "DATABASE_URL"}
    env.update(
        {
            "POOLKIT_DIRECT_URL": stack.url(via="direct", sslmode="verify-full"),
            "POOLKIT_SSLROOTCERT": str(stack.ca_file),
            "POOLKIT_SIDECAR_UPSTREAM": "direct",
        }
    )
    argv = [sys.executable, "-m", "poolkit.sidecar", "--config", str(config)]
    return subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_show_config_shows_values_in_effect_and_what_waits_for_a_restart(stack: DevStack, tmp_path: Path) -> None:
    port, new_port, http_port = free_port(), free_port(), free_port()
    config = tmp_path / "sidecar.toml"
    config.write_text(f"listen_port = {port}\nhttp_port = {http_port}\nmax_size = 1\n")
    proc = start_sidecar(stack, config)
    try:
        until(lambda: proc.poll() is not None or accepts(port), "the sidecar to listen")
        url = f"postgresql://app@127.0.0.1:{port}/poolkit?sslmode=disable"
        rows = show(url, "CONFIG")
        keys = [row["key"] for row in rows]
        assert len(keys) == len(set(keys)), "a setting is shown twice"
        config_now = {row["key"]: row for row in rows}
        assert config_now["upstream"]["value"] == "direct"
        assert config_now["direct_url"]["value"].startswith("postgresql://app:***@")
        assert stack.app_password not in str(rows)
        assert (config_now["listen_port"]["value"], config_now["listen_port"]["pending"]) == (str(port), "")
        assert config_now["listen_port"]["changeable"] == "no"
        max_size = config_now["max_size"]
        assert (max_size["value"], max_size["changeable"]) == ("1", "yes")
        assert max_size["default"] == "(3; 10 in front of a transaction pooler)"
        assert config_now["upstream_mode"]["value"] == "session"  # auto, decided: a direct upstream
        assert config_now["admin_users"]["value"] == "app"  # unset: the upstream URL's role

        config.write_text(f"listen_port = {new_port}\nhttp_port = {http_port}\nmax_size = 2\n")
        proc.send_signal(signal.SIGHUP)
        until(lambda: {r["key"]: r["value"] for r in show(url, "CONFIG")}["max_size"] == "2", "the reload")
        after = {row["key"]: row for row in show(url, "CONFIG")}
        # Still listening where it was: the new port is shown as waiting for a restart, not as in effect.
        assert (after["listen_port"]["value"], after["listen_port"]["pending"]) == (str(port), str(new_port))
        assert accepts(port)
        assert not accepts(new_port)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "reload_needs_restart" in stderr
