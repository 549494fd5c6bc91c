"""The dev stack: real PostgreSQL (TLS + SCRAM) and PgBouncer (transaction mode), started and stopped."""

from __future__ import annotations

import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from poolkit.dev.devstack import DevStack, DevStackError, find_pg_binary
from poolkit.errors import ConfigError

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def server_tmp() -> Iterator[pathlib.Path]:
    """A temp dir the ``postgres`` user can reach (pytest's tmp_path sits under a 0700 root-only dir)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="poolkit-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the postmaster's checkpointer, walwriter, backends, ...)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _uid_of(pid: int) -> int:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
    assert match
    return int(match.group(1))


def _backend_pid(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row
        return int(row[0])


# --------------------------------------------------------------------------- TLS and auth


def test_direct_url_is_tls_with_scram(stack: DevStack) -> None:
    assert stack.direct_url.endswith("?sslmode=require")
    with psycopg.connect(stack.direct_url) as conn:
        assert conn.info.user == "app"
        assert conn.execute("SHOW ssl").fetchone() == ("on",)
        row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row is not None
        assert row[0] is True
        assert row[1].startswith("TLSv1.")
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
        assert conn.execute("SELECT current_database()").fetchone() == ("app",)
    # The stored secret is a SCRAM verifier, never md5 or plain text.
    secret = stack.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'").strip()
    assert secret.startswith("SCRAM-SHA-256$4096:")
    assert stack.app_password not in secret


def test_verify_full_with_the_stack_ca(stack: DevStack) -> None:
    url = stack.url(sslmode="verify-full", sslrootcert=str(stack.ca_file))
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    # The same URL without our CA fails certificate verification (the system store does not know it).
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        psycopg.connect(stack.url(sslmode="verify-full", sslrootcert="system"), connect_timeout=10)


async def test_asyncpg_direct_verify_full_and_pooled(stack: DevStack) -> None:
    conn = await asyncpg.connect(stack.url(sslmode="verify-full", sslrootcert=str(stack.ca_file)))
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    finally:
        await conn.close()
    # asyncpg through PgBouncer in transaction mode needs its statement cache off.
    conn = await asyncpg.connect(stack.pooled_url, statement_cache_size=0)
    try:
        assert await conn.fetchval("SELECT current_user") == "app"
        assert await conn.fetchval("SELECT inet_server_port()") == stack.pg_port
    finally:
        await conn.close()


def test_plain_text_tcp_is_refused_with_no_encryption(stack: DevStack) -> None:
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(stack.url(sslmode="disable"), connect_timeout=10)
    # The same user and password over TLS are accepted: only the missing encryption was refused.
    with psycopg.connect(stack.url(sslmode="require"), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_wrong_password_is_refused_by_scram(stack: DevStack) -> None:
    for via in ("direct", "pgbouncer"):
        with pytest.raises(
            psycopg.OperationalError, match=r"password authentication failed|SASL authentication failed"
        ):
            psycopg.connect(stack.url(via=via, password="not-the-password"), connect_timeout=10)


def test_superuser_url(stack: DevStack) -> None:
    with psycopg.connect(stack.superuser_url) as conn:
        row = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        assert row == ("postgres", True)


def test_pooled_url_is_tls_on_both_sides(stack: DevStack) -> None:
    assert stack.pgbouncer is not None
    with psycopg.connect(stack.pooled_url, autocommit=True) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (stack.pg_port,)
        server_pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        clients = [c for c in stack.pgbouncer.admin("SHOW CLIENTS") if c["database"] == "app"]
        assert clients
        assert all(c["tls"].startswith("TLSv1.") for c in clients)
    assert server_pid is not None
    # PgBouncer -> PostgreSQL runs over TLS too (server_tls_sslmode = require).
    ssl = stack.psql(f"SELECT ssl FROM pg_stat_ssl WHERE pid = {int(server_pid[0])}").strip()
    assert ssl == "t"


def test_settings_match_the_supabase_shape(stack: DevStack) -> None:
    assert stack.pgbouncer is not None
    assert stack.psql("SHOW max_connections").strip() == "60"
    assert stack.psql("SHOW superuser_reserved_connections").strip() == "3"
    assert stack.psql("SHOW listen_addresses").strip() == ("127.0.0.1,::1" if stack.ipv6 else "127.0.0.1")
    config = {row["key"]: row["value"] for row in stack.pgbouncer.admin("SHOW CONFIG")}
    assert config["pool_mode"] == "transaction"
    assert config["default_pool_size"] == "3"
    assert config["max_client_conn"] == "2500"
    assert config["auth_type"] == "scram-sha-256"
    assert config["client_tls_sslmode"] == "allow"
    assert config["server_tls_sslmode"] == "require"
    assert config["ignore_startup_parameters"] == "extra_float_digits"
    assert stack.host == "127.0.0.1"
    assert stack.env() == {
        # marked as Prisma marks a transaction pooler, so poolkit detects it on a non-6543 port
        "POOLKIT_POOLED_URL": stack.url(via="pgbouncer", pgbouncer="true"),
        "POOLKIT_DIRECT_URL": stack.direct_url,
        "POOLKIT_SSLROOTCERT": str(stack.ca_file),
    }


def test_ipv6_loopback_when_the_machine_has_it(stack: DevStack) -> None:
    if not stack.ipv6:
        assert stack.psql("SHOW listen_addresses").strip() == "127.0.0.1"
        return
    url = stack.url(sslmode="verify-full", sslrootcert=str(stack.ca_file)).replace("@127.0.0.1:", "@[::1]:")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT inet_server_addr()::text").fetchone() == ("::1/128",)


def test_servers_run_as_the_server_user(stack: DevStack) -> None:
    assert stack.pgbouncer is not None
    assert stack.pgbouncer.pid is not None
    pid = stack.postmaster_pid
    assert pid is not None
    expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert _uid_of(pid) == expected
    assert _uid_of(stack.pgbouncer.pid) == expected
    key = stack.ca_file.parent / "server.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.stat().st_uid == expected


# --------------------------------------------------------------------------- transaction pooling


def test_transaction_mode_shares_one_server_between_idle_clients(stack: DevStack) -> None:
    """Two open clients, queries outside a transaction: transaction mode hands both the same backend.

    In session mode (the same test below) each client keeps its own backend for its whole session,
    which is what exhausts max_connections behind a serverless fleet.
    """
    assert stack.pgbouncer is not None
    assert {p["pool_mode"] for p in stack.pgbouncer.admin("SHOW POOLS") if p["database"] == "app"} == {"transaction"}
    pids: dict[str, tuple[int, int]] = {}
    for mode in ("transaction", "session"):
        bouncer = stack.start_pgbouncer(pool_mode=mode, pool_size=2)
        try:
            with (
                psycopg.connect(bouncer.url(), autocommit=True) as a,
                psycopg.connect(bouncer.url(), autocommit=True) as b,
            ):
                first = a.execute("SELECT pg_backend_pid()").fetchone()
                second = b.execute("SELECT pg_backend_pid()").fetchone()
                assert first
                assert second
                pids[mode] = (first[0], second[0])
                servers = [s for s in bouncer.admin("SHOW SERVERS") if s["database"] == "app"]
                assert len(servers) == (1 if mode == "transaction" else 2)
        finally:
            bouncer.stop()
    assert pids["transaction"][0] == pids["transaction"][1]
    assert pids["session"][0] != pids["session"][1]


def test_a_transaction_keeps_its_backend(stack: DevStack) -> None:
    with psycopg.connect(stack.pooled_url) as conn, conn.transaction():
        first = conn.execute("SELECT pg_backend_pid()").fetchone()
        second = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert first == second


def test_extra_pgbouncer_without_client_tls(stack: DevStack) -> None:
    bouncer = stack.start_pgbouncer(client_tls=False, pool_size=1)
    try:
        assert bouncer.port not in (stack.pgbouncer_port, stack.pg_port)
        with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
            psycopg.connect(bouncer.url(sslmode="require"), connect_timeout=10)
        with psycopg.connect(bouncer.url(sslmode="disable")) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app",)
        config = {row["key"]: row["value"] for row in bouncer.admin("SHOW CONFIG")}
        assert config["default_pool_size"] == "1"
        assert config["client_tls_sslmode"] == "disable"
    finally:
        bouncer.stop()
    assert not bouncer.running
    bouncer.stop()  # idempotent


# --------------------------------------------------------------------------- secrets


def test_logs_and_repr_never_show_passwords(stack: DevStack) -> None:
    assert stack.pgbouncer is not None
    # Exercise every path that could log: success and failure, direct and pooled.
    for via in ("direct", "pgbouncer"):
        with psycopg.connect(stack.url(via=via)) as conn:
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(stack.url(via=via, password="wrong-" + stack.app_password))
    text = stack.pg_log_file.read_text() + stack.pgbouncer.log_file.read_text()
    assert "connection authorized" in text  # the log is the real one, with content
    assert stack.app_password not in text
    assert stack.superuser_password not in text
    assert stack.app_password not in repr(stack)
    assert stack.app_password not in repr(stack.pgbouncer)


def test_given_password_with_url_and_userlist_special_characters(server_tmp: pathlib.Path) -> None:
    password = 'Se"cret@For:Re/dac%tion 1'
    with DevStack(server_tmp / "stack", password=password) as stack:
        assert stack.app_password == stack.superuser_password == password
        for url in (stack.direct_url, stack.pooled_url, stack.superuser_url):
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        assert stack.psql("SELECT 40 + 2").strip() == "42"
        # psql errors echo the failing SQL; the password in it is replaced by ***.
        with pytest.raises(DevStackError, match="psql failed") as info:
            stack.psql(f"SELECT * FROM no_such_table WHERE x = '{password}'")
        assert "no_such_table" in str(info.value)
        assert password not in str(info.value)


# --------------------------------------------------------------------------- lifecycle


def test_stop_leaves_no_process_and_no_directory() -> None:
    stack = DevStack()
    stack.start()
    base_dir = stack.base_dir
    extra = stack.start_pgbouncer(client_tls=False)
    with psycopg.connect(stack.pooled_url) as conn:
        conn.execute("SELECT 1")
    postmaster = stack.postmaster_pid
    assert postmaster is not None
    assert stack.pgbouncer is not None
    pids = [postmaster, *_children(postmaster), stack.pgbouncer.pid, extra.pid]
    assert all(pid is not None and _alive(pid) for pid in pids)
    assert base_dir.is_dir()
    # A generous bound for a loaded 2-core machine; measured numbers go to the report, not here.
    assert stack.start_seconds is not None
    assert stack.start_seconds < 60
    assert set(stack.start_timings) == {"certificates", "initdb", "postgres", "roles", "pgbouncer"}

    stack.stop()

    assert [pid for pid in pids if pid is not None and _alive(pid)] == []
    assert not base_dir.exists()
    assert "stopped" in repr(stack)
    stack.stop()  # idempotent
    with pytest.raises(DevStackError, match="create a new DevStack"):
        stack.start()


def test_a_killed_owner_leaves_no_server_behind(server_tmp: pathlib.Path) -> None:
    """SIGKILL skips atexit; the watchdog still stops both servers and removes the directory."""
    base = server_tmp / "orphan"
    code = (
        "import sys, time; from poolkit.dev.devstack import DevStack\n"
        "s = DevStack(sys.argv[1]).start()\n"
        "print(s.postmaster_pid, s.pgbouncer.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(base)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        assert all(_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while (any(_alive(p) for p in pids) or base.exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if _alive(p)] == []
    assert not base.exists()


def test_keep_and_given_dir(server_tmp: pathlib.Path) -> None:
    base = server_tmp / "kept"
    with DevStack(base, keep=True) as stack:
        assert stack.base_dir == base
        assert stack.socket_dir == base
        assert (base / f".s.PGSQL.{stack.pg_port}").is_socket()
        postmaster = stack.postmaster_pid
    assert postmaster is not None
    assert not _alive(postmaster)
    assert (base / "data" / "PG_VERSION").is_file()  # kept for inspection
    assert not (base / "data" / "postmaster.pid").exists()  # ... but not running
    with pytest.raises(DevStackError, match="not empty"):
        DevStack(base).start()


def test_restart_and_stop_start_postgres() -> None:
    with DevStack() as stack:
        port = stack.pg_port
        old = psycopg.connect(stack.direct_url, autocommit=True)
        try:
            old_pid = stack.postmaster_pid
            stack.restart_postgres()
            assert stack.pg_port == port
            assert stack.postmaster_pid != old_pid
            # The connection from before the restart is gone; new ones work, direct and pooled.
            with pytest.raises(psycopg.OperationalError):
                old.execute("SELECT 1")
        finally:
            old.close()
        with psycopg.connect(stack.direct_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(stack.pooled_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)

        stack.stop_postgres()
        assert stack.postmaster_pid is None
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(stack.direct_url, connect_timeout=5)
        stack.start_postgres()
        with psycopg.connect(stack.pooled_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_fixed_ports_are_used_and_a_busy_one_is_named() -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    with DevStack(pg_port=ports[0], pgbouncer_port=ports[1]) as stack:
        assert (stack.pg_port, stack.pgbouncer_port) == tuple(ports)
        assert f"127.0.0.1:{ports[0]}/" in stack.direct_url
        assert f"127.0.0.1:{ports[1]}/" in stack.pooled_url
        with psycopg.connect(stack.pooled_url) as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone() == (ports[0],)
        with pytest.raises(DevStackError, match=f"pg_port={ports[0]} is not free"):
            DevStack(pg_port=ports[0]).start()
        with pytest.raises(DevStackError, match=f"pgbouncer_port={ports[1]} is not free"):
            DevStack(pgbouncer_port=ports[1]).start()


# --------------------------------------------------------------------------- bad input


def test_missing_server_binaries_name_the_install_command(tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    base = tmp_path / "never-created"
    with pytest.raises(DevStackError, match=r"apt-get install -y postgresql pgbouncer"):
        DevStack(base, pg_bindir=empty).start()
    with pytest.raises(DevStackError, match=r"apt-get install -y postgresql pgbouncer"):
        DevStack(base, pgbouncer_path=empty / "pgbouncer").start()
    assert not base.exists()


def test_missing_binary_via_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("POOLKIT_PG_BINDIR", str(tmp_path))
    with pytest.raises(DevStackError, match=r"POOLKIT_PG_BINDIR.*apt-get install"):
        DevStack(tmp_path / "stack").start()
    with pytest.raises(DevStackError, match=r"apt-get install -y postgresql-client"):
        find_pg_binary("psql")
    with pytest.raises(DevStackError, match=r"apt-get install -y postgresql-client"):
        find_pg_binary("pgbench")


def test_bad_arguments_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="pg_port"):
        DevStack(pg_port=70000)
    with pytest.raises(ConfigError, match="max_connections"):
        DevStack(max_connections=1)
    with pytest.raises(ConfigError, match="via"):
        DevStack().url(via="replica")
    with pytest.raises(DevStackError, match=r"call start\(\)"):
        _ = DevStack().pooled_url


# --------------------------------------------------------------------------- poolkit dev


def test_run_dev_prints_urls_and_stops_on_sigterm(server_tmp: pathlib.Path) -> None:
    base = server_tmp / "dev"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from poolkit.dev.devstack import run_dev; sys.exit(run_dev(sys.argv[1:]))",
            "--dir",
            str(base),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        exports: dict[str, str] = {}
        while len(exports) < 3:
            line = proc.stdout.readline()
            assert line, f"poolkit dev exited early: {proc.stderr.read() if proc.stderr else ''}"
            name, _, value = line.removeprefix("export ").strip().partition("=")
            exports[name] = value.strip("'")
        assert set(exports) == {"POOLKIT_POOLED_URL", "POOLKIT_DIRECT_URL", "POOLKIT_SSLROOTCERT"}
        assert exports["POOLKIT_POOLED_URL"].endswith("&pgbouncer=true")
        # The marker is for poolkit: plain libpq rejects it, which is why poolkit strips it.
        # Exported as verify-full (what `poolkit check` approves of): libpq needs the exported CA file.
        ca = exports["POOLKIT_SSLROOTCERT"]
        with psycopg.connect(exports["POOLKIT_POOLED_URL"].removesuffix("&pgbouncer=true"), sslrootcert=ca) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app",)
        assert "sslmode=verify-full" in exports["POOLKIT_DIRECT_URL"]
        with psycopg.connect(exports["POOLKIT_DIRECT_URL"] + f"&sslrootcert={ca}") as conn:
            pid = conn.execute("SELECT pg_postmaster_start_time() IS NOT NULL").fetchone()
            assert pid == (True,)
        postmaster = int((base / "data" / "postmaster.pid").read_text().split()[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while _alive(postmaster) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(postmaster)
    assert not base.exists()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "stopped" in stderr
    password = exports["POOLKIT_DIRECT_URL"].split(":")[2].split("@")[0]
    assert password not in stderr  # only the export lines carry it


def test_stack_env_fixture_sets_poolkit_urls_and_clears_others(
    monkeypatch: pytest.MonkeyPatch, stack: DevStack, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://someone:else@example.invalid/db")
    monkeypatch.setenv("PGPASSWORD", "not-ours")
    request.getfixturevalue("stack_env")
    assert "DATABASE_URL" not in os.environ
    assert "PGPASSWORD" not in os.environ
    assert os.environ["POOLKIT_POOLED_URL"] == stack.url(via="pgbouncer", pgbouncer="true")
    assert os.environ["POOLKIT_DIRECT_URL"] == stack.direct_url
    assert pathlib.Path(os.environ["POOLKIT_SSLROOTCERT"]).read_text().startswith("-----BEGIN CERTIFICATE")
