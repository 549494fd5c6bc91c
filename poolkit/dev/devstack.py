"""The local Supabase-like stack: PostgreSQL (TLS, SCRAM) + PgBouncer (transaction mode)."""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import os
import pathlib
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Self

import psycopg
import scramp
from psycopg.rows import dict_row

from poolkit.core.dsn import Dsn, redact
from poolkit.errors import ConfigError, DevStackError

__all__ = [
    "INSTALL_CLIENT",
    "INSTALL_SERVER",
    "DevStack",
    "PgBouncerHandle",
    "find_pg_binary",
    "find_pg_bindir",
    "find_pgbouncer",
    "run_dev",
]

INSTALL_SERVER = "apt-get install -y postgresql pgbouncer"
INSTALL_CLIENT = "apt-get install -y postgresql-client"
SERVER_USER = "postgres"
LOOPBACK = "127.0.0.1"

_SERVER_BINARIES = ("initdb", "postgres", "pg_ctl")
_CLIENT_BINARIES = frozenset({"psql", "pgbench", "pg_isready", "pg_dump", "pg_restore", "createdb"})
_DEBIAN_PG_ROOT = pathlib.Path("/usr/lib/postgresql")
_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
# sun_path is 108 bytes on Linux; PostgreSQL also needs room for ".s.PGSQL.NNNNN.lock".
_MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.65535.lock")
# The scram-sha-256 iteration count PostgreSQL itself uses by default.
_SCRAM_ITERATIONS = 4096


# --------------------------------------------------------------------------- binaries


def _version_key(path: pathlib.Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)


def find_pg_bindir(explicit: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The directory holding ``initdb``, ``postgres`` and ``pg_ctl``.

    Order: ``explicit``, then ``$POOLKIT_PG_BINDIR`` (either one is used alone, without
    fallback), then the highest ``/usr/lib/postgresql/*/bin`` (Debian's server binaries;
    ``pg_config --bindir`` names the client directory there), then ``$PATH``.
    Raises :class:`DevStackError` with the install command when none qualifies.
    """
    chosen = explicit if explicit is not None else os.environ.get("POOLKIT_PG_BINDIR") or None
    if chosen is not None:
        bindir = pathlib.Path(chosen)
        missing = [b for b in _SERVER_BINARIES if not _is_executable(bindir / b)]
        if missing:
            source = "pg_bindir" if explicit is not None else "POOLKIT_PG_BINDIR"
            raise DevStackError(
                f"PostgreSQL server binaries {', '.join(missing)} not found in {bindir} ({source}): "
                f"install them with `{INSTALL_SERVER}` or point {source} at a directory that has them"
            )
        return bindir
    candidates = sorted(_DEBIAN_PG_ROOT.glob("*/bin"), key=_version_key, reverse=True)
    for bindir in candidates:
        if all(_is_executable(bindir / b) for b in _SERVER_BINARIES):
            return bindir
    on_path = [shutil.which(b) for b in _SERVER_BINARIES]
    if all(on_path) and len({pathlib.Path(p).parent for p in on_path if p}) == 1:
        return pathlib.Path(on_path[0] or "").parent
    raise DevStackError(
        "PostgreSQL server binaries (initdb, postgres, pg_ctl) not found in "
        f"{_DEBIAN_PG_ROOT}/*/bin or on PATH: install them with `{INSTALL_SERVER}` "
        "(or set POOLKIT_PG_BINDIR to the directory that has them)"
    )


def find_pg_binary(name: str, bindir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """A PostgreSQL client program (``psql``, ``pgbench``, ...) next to the server binaries or on PATH.

    With an explicit ``bindir`` (or ``$POOLKIT_PG_BINDIR``) only that directory is searched.
    Raises :class:`DevStackError` naming ``apt-get install -y postgresql-client``.
    """
    install = INSTALL_CLIENT if name in _CLIENT_BINARIES else INSTALL_SERVER
    chosen = bindir if bindir is not None else os.environ.get("POOLKIT_PG_BINDIR") or None
    if chosen is not None:
        path = pathlib.Path(chosen) / name
        if _is_executable(path):
            return path
        raise DevStackError(f"{name} not found in {chosen}: install it with `{install}`")
    with contextlib.suppress(DevStackError):
        path = find_pg_bindir() / name
        if _is_executable(path):
            return path
    found = shutil.which(name)
    if found:
        return pathlib.Path(found)
    raise DevStackError(f"{name} not found (looked in {_DEBIAN_PG_ROOT}/*/bin and PATH): `{install}`")


def find_pgbouncer(explicit: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The ``pgbouncer`` executable: ``explicit``, ``$POOLKIT_PGBOUNCER``, ``/usr/sbin/pgbouncer``, PATH."""
    chosen = explicit if explicit is not None else os.environ.get("POOLKIT_PGBOUNCER") or None
    if chosen is not None:
        path = pathlib.Path(chosen)
        if _is_executable(path):
            return path
        raise DevStackError(f"pgbouncer not found at {path}: install it with `{INSTALL_SERVER}`")
    for candidate in ("/usr/sbin/pgbouncer", shutil.which("pgbouncer")):
        if candidate and _is_executable(pathlib.Path(candidate)):
            return pathlib.Path(candidate)
    raise DevStackError(f"pgbouncer not found in /usr/sbin or on PATH: install it with `{INSTALL_SERVER}`")


def _is_executable(path: pathlib.Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# --------------------------------------------------------------------------- helpers


class _RunAs:
    """Who the servers run as: the ``postgres`` system user when we are root, else ourselves."""

    def __init__(self, *, switch: bool) -> None:
        self.uid: int | None = None
        self.gid: int | None = None
        self.groups: list[int] = []
        self.home = os.environ.get("HOME", "/")
        if not switch:
            return
        try:
            entry = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise DevStackError(
                "running as root, and PostgreSQL/PgBouncer refuse to run as root, but there is no "
                f"'{SERVER_USER}' system user to run them as: `apt-get install -y postgresql` creates it "
                f"(or `useradd --system --home-dir /var/lib/postgresql {SERVER_USER}`)"
            ) from None
        self.uid, self.gid, self.home = entry.pw_uid, entry.pw_gid, entry.pw_dir
        self.groups = os.getgrouplist(SERVER_USER, entry.pw_gid)

    @property
    def switching(self) -> bool:
        return self.uid is not None

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups}

    def chown(self, *paths: pathlib.Path) -> None:
        if self.uid is None or self.gid is None:
            return
        for path in paths:
            os.chown(path, self.uid, self.gid)


def _child_env(home: str) -> dict[str, str]:
    # PG* variables of the caller (PGHOST, PGPASSWORD, PGSSLMODE, ...) would redirect our tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = home
    env.setdefault("LC_ALL", "C")
    return env


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port(*, ipv6: bool = False) -> int:
    """A port free on 127.0.0.1 (and ::1 when used); the caller retries if it is taken meanwhile."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port: int = s.getsockname()[1]
        if not ipv6:
            return port
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                s6.bind(("::1", port))
        except OSError:
            continue
        return port
    raise DevStackError("could not find a free TCP port on the loopback interface")


def _check_port_free(port: int, setting: str, *, ipv6: bool) -> None:
    hosts = [(socket.AF_INET, LOOPBACK)] + ([(socket.AF_INET6, "::1")] if ipv6 else [])
    for family, host in hosts:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # As the servers do: TIME_WAIT leftovers do not make a port busy, a listener does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise DevStackError(
                    f"{setting}={port} is not free on {host} ({exc.strerror}): choose another port "
                    "or leave it unset for a free one"
                ) from None


def _scram_verifier(password: str) -> str:
    """The ``SCRAM-SHA-256$...`` secret PostgreSQL stores, computed here so no plain password reaches SQL."""
    salt, stored_key, server_key, iterations = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=_SCRAM_ITERATIONS
    )

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _write(path: pathlib.Path, text: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


# --------------------------------------------------------------------------- PgBouncer


class PgBouncerHandle:
    """One running PgBouncer in front of the stack's PostgreSQL.

    ``url()`` builds a connection URL for it; ``admin()`` runs a command on its admin
    console (``SHOW POOLS``, ``SHOW SERVERS``, ...); ``stop()`` terminates it (idempotent).
    """

    def __init__(
        self,
        stack: DevStack,
        *,
        name: str,
        port: int | None,
        client_tls: bool,
        pool_size: int,
        pool_mode: str,
        max_client_conn: int,
        settings: Mapping[str, str],
    ) -> None:
        self._stack = stack
        self.name = name
        self.host = LOOPBACK
        self.dir = stack.base_dir / name
        self.config_file = self.dir / "pgbouncer.ini"
        self.auth_file = self.dir / "userlist.txt"
        self.log_file = self.dir / "pgbouncer.log"
        self.pid_file = self.dir / "pgbouncer.pid"
        self.client_tls = client_tls
        self.pool_size = pool_size
        self.pool_mode = pool_mode
        self.max_client_conn = max_client_conn
        self.settings = dict(settings)
        self._fixed_port = port
        self.port = port or 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The PgBouncer process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(
        self,
        user: str | None = None,
        password: str | None = None,
        *,
        database: str | None = None,
        sslmode: str | None = None,
        **params: str,
    ) -> str:
        """A URL to this PgBouncer; ``sslmode`` defaults to ``require`` (``disable`` without client TLS)."""
        if sslmode is None:
            sslmode = "require" if self.client_tls else "disable"
        return self._stack._build_url(
            self.port, user=user, password=password, database=database, sslmode=sslmode, params=params
        )

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run ``command`` on the admin console (database ``pgbouncer``, as ``postgres``), rows as dicts."""
        with psycopg.connect(
            host=str(self._stack.socket_dir),
            port=self.port,
            user=self._stack.superuser,
            password=self._stack.superuser_password,
            dbname="pgbouncer",
            autocommit=True,
            connect_timeout=10,
            row_factory=dict_row,
        ) as conn:
            cur = conn.execute(command)
            return cur.fetchall() if cur.description else []

    def _config(self) -> str:
        stack = self._stack
        tls = stack.tls_dir
        databases = "\n".join(
            f"{db} = host={LOOPBACK} port={stack.pg_port} dbname={db}"
            for db in dict.fromkeys((stack.database, "postgres"))
        )
        options: dict[str, str] = {
            "listen_addr": LOOPBACK,
            "listen_port": str(self.port),
            "unix_socket_dir": str(stack.socket_dir),
            "auth_type": "scram-sha-256",
            "auth_file": str(self.auth_file),
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": str(self.max_client_conn),
            "ignore_startup_parameters": "extra_float_digits",
            "admin_users": stack.superuser,
            "stats_users": stack.superuser,
            "server_tls_sslmode": "require",
            "log_connections": "1",
            "log_disconnections": "1",
        }
        if self.client_tls:
            options.update(
                client_tls_sslmode="allow",
                client_tls_key_file=str(tls / "server.key"),
                client_tls_cert_file=str(tls / "server.crt"),
                client_tls_ca_file=str(tls / "ca.pem"),
            )
        else:
            options["client_tls_sslmode"] = "disable"
        for key, value in self.settings.items():
            if not re.fullmatch(r"[a-z_]+", key) or "\n" in str(value):
                raise ConfigError(f"PgBouncer setting {key!r} is not a valid pgbouncer.ini key/value")
            options[key] = str(value)
        body = "\n".join(f"{k} = {v}" for k, v in options.items())
        return f"[databases]\n{databases}\n\n[pgbouncer]\n{body}\n"

    def _userlist(self) -> str:
        stack = self._stack

        def quoted(text: str) -> str:
            return '"' + text.replace('"', '""') + '"'

        users = {stack.app_user: stack.app_password, stack.superuser: stack.superuser_password}
        return "".join(f"{quoted(u)} {quoted(p)}\n" for u, p in users.items())

    def start(self) -> None:
        stack = self._stack
        binary = find_pgbouncer(stack._pgbouncer_path)
        self.dir.mkdir(mode=0o700, exist_ok=True)
        stack._run_as.chown(self.dir)
        if self._fixed_port:
            setting = "pgbouncer_port" if self is stack.pgbouncer or stack.pgbouncer is None else "port"
            _check_port_free(self._fixed_port, setting, ipv6=False)
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            if not self._fixed_port:
                self.port = free_port(ipv6=False)
            _write(self.config_file, self._config())
            _write(self.auth_file, self._userlist())
            stack._run_as.chown(self.config_file, self.auth_file)
            with open(self.log_file, "ab") as log:
                self._proc = subprocess.Popen(
                    [str(binary), str(self.config_file)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.dir,
                    env=_child_env(stack._run_as.home),
                    start_new_session=True,  # Ctrl-C in `poolkit dev` reaches us, we stop it in order
                    **stack._run_as.popen_kwargs(),
                )
            # For the watchdog, which cleans up if this process dies without stop().
            _write(self.pid_file, f"{self._proc.pid}\n", 0o644)
            try:
                self._wait_ready()
                return
            except DevStackError as exc:
                self._terminate()
                in_use = "Address already in use" in _tail(self.log_file, 5)
                if not (in_use and attempt + 1 < attempts):
                    raise DevStackError(
                        f"PgBouncer ({self.name}) did not start: {exc}\n--- tail of {self.log_file} ---\n"
                        + stack._redact(_tail(self.log_file))
                    ) from None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        last = "no attempt"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc else None
                raise DevStackError(f"pgbouncer exited with status {code}")
            try:
                self.admin("SHOW VERSION")
                return
            except psycopg.Error as exc:
                last = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            time.sleep(0.05)
        raise DevStackError(f"no answer on port {self.port} within {_READY_TIMEOUT:.0f}s ({last})")

    def stop(self) -> None:
        """Terminate PgBouncer (SIGTERM = immediate shutdown, SIGKILL after a grace period); idempotent."""
        self._terminate()
        with contextlib.suppress(ValueError):
            self._stack._bouncers.remove(self)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.pid_file.unlink(missing_ok=True)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"PgBouncerHandle(name={self.name!r}, {state}, port={self.port}, pool_mode={self.pool_mode}, "
            f"pool_size={self.pool_size}, client_tls={self.client_tls})"
        )


# --------------------------------------------------------------------------- the stack

# Run as ``python -I -S base_dir/watchdog.py base_dir keep created`` (standard library only).
# It blocks on stdin; EOF without "done" means the owner died, so it stops what the owner
# started. PIDs are checked against their command lines so a reused PID is never signalled.
_WATCHDOG = r"""
import os, pathlib, shutil, signal, sys, time
base, keep, created = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
if sys.stdin.buffer.readline().strip() == b"done":
    sys.exit(0)

def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        return ""

def alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"

def stop(pid, marker, signals):
    if marker not in cmdline(pid):
        return
    for sig, wait in signals:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive(pid):
            return

for pidfile in base.glob("pgbouncer*/pgbouncer.pid"):
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        continue
    stop(pid, str(pidfile.parent / "pgbouncer.ini"), [(signal.SIGTERM, 10), (signal.SIGKILL, 5)])
try:
    pid = int((base / "data" / "postmaster.pid").read_text().split()[0])
except (OSError, ValueError, IndexError):
    pid = None
if pid:
    stop(pid, str(base / "data"), [(signal.SIGINT, 10), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)])
if keep:
    sys.exit(0)
for child in base.iterdir() if not created else []:
    if child.is_dir() and not child.is_symlink():
        shutil.rmtree(child, ignore_errors=True)
    else:
        child.unlink(missing_ok=True)
if created:
    shutil.rmtree(base, ignore_errors=True)
"""

_LIVE: set[DevStack] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    for stack in list(_LIVE):
        with contextlib.suppress(Exception):
            stack.stop()


def _forget_after_fork() -> None:
    # A forked child must never stop its parent's servers (or remove its templates) at exit.
    _LIVE.clear()
    _TEMPLATES.clear()


# One initdb per process and server binaries, copied for each stack: initdb is most of
# the start time, a copy of its output is ~10x faster and gives the same cluster.
_TEMPLATE_PREFIX = "poolkit-initdb-"
_TEMPLATES: dict[tuple[str, int | None], pathlib.Path] = {}
_TEMPLATE_LOCK = threading.Lock()


def _remove_templates() -> None:
    for template in _TEMPLATES.values():
        shutil.rmtree(template.parent, ignore_errors=True)
    _TEMPLATES.clear()


def _remove_stale_templates() -> None:
    """Templates of processes that died without atexit (SIGKILL) are plain files; drop them."""
    for holder in pathlib.Path(tempfile.gettempdir()).glob(f"{_TEMPLATE_PREFIX}*-*"):
        pid = holder.name.removeprefix(_TEMPLATE_PREFIX).split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(holder, ignore_errors=True)


atexit.register(_remove_templates)
atexit.register(_stop_all_at_exit)  # runs first (atexit is last-in, first-out)
os.register_at_fork(after_in_child=_forget_after_fork)


class DevStack:
    """A throw-away PostgreSQL + PgBouncer pair shaped like Supabase, on loopback.

    PostgreSQL accepts TCP only over TLS with SCRAM (plain-text TCP is rejected by
    pg_hba with "no encryption"); PgBouncer pools in transaction mode in front of it,
    like Supabase's pooler on port 6543. Both run as the ``postgres`` system user when
    this process is root. Use as a context manager, or ``start()`` / ``stop()``.

    After ``start()``: ``pg_port``, ``pgbouncer_port``, ``base_dir`` (data, certificates,
    logs; also ``socket_dir``), ``ca_file``, ``pg_log_file``, ``pgbouncer`` (the main
    :class:`PgBouncerHandle`), ``postmaster_pid``, ``start_seconds`` and ``start_timings``
    (seconds per step). Passwords are ``app_password`` and ``superuser_password``; they
    appear in URLs and ``env()`` only, never in ``repr``, errors or server logs.
    """

    app_user = "app"
    superuser = "postgres"
    database = "app"
    host = LOOPBACK

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        password: str | None = None,
        pg_port: int | None = None,
        pgbouncer_port: int | None = None,
        max_connections: int = 60,
        pgbouncer_pool_size: int = 3,
        pgbouncer_max_client_conn: int = 2500,
        keep: bool = False,
        pg_bindir: str | os.PathLike[str] | None = None,
        pgbouncer_path: str | os.PathLike[str] | None = None,
    ) -> None:
        for name, port in (("pg_port", pg_port), ("pgbouncer_port", pgbouncer_port)):
            if port is not None and not 0 < port < 65536:
                raise ConfigError(f"{name}={port} is not a TCP port: use 1-65535 or leave it unset")
        if not 10 <= max_connections <= 10000:
            raise ConfigError(f"max_connections={max_connections}: use 10 to 10000")
        if pgbouncer_pool_size < 1 or pgbouncer_max_client_conn < 1:
            raise ConfigError("pgbouncer_pool_size and pgbouncer_max_client_conn must be at least 1")
        if password is not None and not password:
            raise ConfigError("password is empty: pass a non-empty password or None for a random one")
        password = password or secrets.token_urlsafe(18)
        self.app_password = password
        self.superuser_password = password
        self._given_dir = pathlib.Path(base_dir).absolute() if base_dir is not None else None
        self.base_dir = self._given_dir or pathlib.Path(tempfile.gettempdir()) / "poolkit-devstack-unstarted"
        self._fixed_pg_port = pg_port
        self.pg_port = pg_port or 0
        self._fixed_bouncer_port = pgbouncer_port
        self.max_connections = max_connections
        self.pgbouncer_pool_size = pgbouncer_pool_size
        self.pgbouncer_max_client_conn = pgbouncer_max_client_conn
        self.keep = keep
        self._pg_bindir_arg = pg_bindir
        self._pgbouncer_path = pgbouncer_path
        self.pg_bindir: pathlib.Path | None = None
        self.ipv6 = False
        self.start_seconds: float | None = None
        self.pgbouncer: PgBouncerHandle | None = None
        self._bouncers: list[PgBouncerHandle] = []
        self._bouncer_count = 0
        self._state = "new"
        self._created_dir = False
        self._owner_pid = os.getpid()
        self._lock = threading.RLock()
        self._run_as = _RunAs(switch=False)
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.start_timings: dict[str, float] = {}

    # ----------------------------------------------------------------- paths

    @property
    def socket_dir(self) -> pathlib.Path:
        """Directory of the Unix sockets of PostgreSQL and every PgBouncer (admin access, trust)."""
        return self.base_dir

    @property
    def data_dir(self) -> pathlib.Path:
        return self.base_dir / "data"

    @property
    def tls_dir(self) -> pathlib.Path:
        return self.base_dir / "tls"

    @property
    def ca_file(self) -> pathlib.Path:
        """PEM of the CA that signed the PostgreSQL and PgBouncer server certificates."""
        return self.tls_dir / "ca.pem"

    @property
    def pg_log_file(self) -> pathlib.Path:
        return self.base_dir / "postgresql.log"

    @property
    def pgbouncer_port(self) -> int:
        """Port of the main PgBouncer (0 before ``start()``)."""
        return self.pgbouncer.port if self.pgbouncer is not None else 0

    @property
    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster, read from ``postmaster.pid``."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        return self._state == "running"

    # ----------------------------------------------------------------- URLs

    def _build_url(
        self,
        port: int,
        *,
        user: str | None,
        password: str | None,
        database: str | None,
        sslmode: str | None,
        params: Mapping[str, str],
    ) -> str:
        user = user or self.app_user
        if password is None:
            password = {self.app_user: self.app_password, self.superuser: self.superuser_password}.get(user)
        query = {"sslmode": sslmode, **params} if sslmode else dict(params)
        dsn = Dsn(
            host=self.host,
            port=port,
            user=user,
            database=database or self.database,
            password=password,
            params=tuple(query.items()),
        )
        return dsn.to_url()

    def url(
        self,
        *,
        via: str = "direct",
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        sslmode: str | None = "require",
        **params: str,
    ) -> str:
        """A connection URL with the password: ``via`` is ``"direct"`` or ``"pgbouncer"`` (or ``"pooled"``).

        ``user`` defaults to the app role, ``password`` to that role's password (``app``/``postgres``),
        ``database`` to ``app``; extra ``params`` become query parameters (``sslrootcert=...``).
        ``sslmode=None`` leaves sslmode out of the URL.
        """
        if via == "direct":
            port = self.pg_port
        elif via in ("pgbouncer", "pooled"):
            port = self.pgbouncer_port
        else:
            raise ConfigError(f"via={via!r}: use 'direct' or 'pgbouncer'")
        if not port:
            raise DevStackError("the DevStack has no ports yet: call start() before asking for URLs")
        return self._build_url(port, user=user, password=password, database=database, sslmode=sslmode, params=params)

    @property
    def direct_url(self) -> str:
        """The app role straight to PostgreSQL over TCP, ``sslmode=require``."""
        return self.url(via="direct")

    @property
    def pooled_url(self) -> str:
        """The app role through PgBouncer (transaction mode), ``sslmode=require``."""
        return self.url(via="pgbouncer")

    @property
    def superuser_url(self) -> str:
        """The ``postgres`` superuser straight to PostgreSQL, database ``app``, ``sslmode=require``."""
        return self.url(via="direct", user=self.superuser)

    def env(self, *, sslmode: str = "require") -> dict[str, str]:
        """The environment poolkit reads: pooled URL, direct URL (both with ``sslmode``) and the CA file.

        The pooled URL carries ``pgbouncer=true`` (as Prisma's do): PgBouncer listens on a free port here,
        not on Supabase's 6543, and the marker is how poolkit knows it is a transaction pooler.
        ``poolkit dev`` exports ``sslmode=verify-full``: the CA file is there, so the servers can be
        verified, and ``poolkit check`` approves of nothing less.
        """
        return {
            "POOLKIT_POOLED_URL": self.url(via="pgbouncer", sslmode=sslmode, pgbouncer="true"),
            "POOLKIT_DIRECT_URL": self.url(via="direct", sslmode=sslmode),
            "POOLKIT_SSLROOTCERT": str(self.ca_file),
        }

    def _redact(self, text: str) -> str:
        return redact(text, self.app_password, self.superuser_password)

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Self:
        """Create the cluster, certificates and PgBouncer, and wait until both accept connections."""
        with self._lock:
            if self._state == "running":
                return self
            if self._state != "new":
                raise DevStackError("this DevStack was stopped; create a new DevStack to start again")
            began = time.monotonic()
            self.pg_bindir = find_pg_bindir(self._pg_bindir_arg)
            find_pgbouncer(self._pgbouncer_path)
            find_pg_binary("psql", self._pg_bindir_arg)
            self._run_as = _RunAs(switch=os.geteuid() == 0)
            self.ipv6 = _has_ipv6_loopback()
            # Busy fixed ports fail here, before any directory or process exists.
            if self._fixed_pg_port:
                _check_port_free(self._fixed_pg_port, "pg_port", ipv6=self.ipv6)
            if self._fixed_bouncer_port:
                _check_port_free(self._fixed_bouncer_port, "pgbouncer_port", ipv6=False)
            self._make_dir()
            self._state = "starting"
            with _LIVE_LOCK:
                _LIVE.add(self)
            try:
                self._start_watchdog()
                steps: list[tuple[str, Callable[[], object]]] = [
                    ("certificates", self._make_certs),
                    ("initdb", self._initdb),
                    ("postgres", self._start_postgres_first),
                    ("roles", self._bootstrap_sql),
                    ("pgbouncer", self._start_main_bouncer),
                ]
                for name, step in steps:
                    t0 = time.monotonic()
                    step()
                    self.start_timings[name] = time.monotonic() - t0
            except BaseException:
                self.stop()
                raise
            self._state = "running"
            self.start_seconds = time.monotonic() - began
            return self

    def _start_main_bouncer(self) -> None:
        self.pgbouncer = self._new_bouncer(
            port=self._fixed_bouncer_port,
            client_tls=True,
            pool_size=self.pgbouncer_pool_size,
            pool_mode="transaction",
            settings={},
        )

    def _start_watchdog(self) -> None:
        """A tiny child that takes the servers down if this process dies without ``stop()``.

        It waits for EOF on a pipe only we hold: SIGKILL, ``os._exit`` or a crash close it
        too, where atexit never runs. A clean ``stop()`` writes ``done`` first.
        """
        script = self.base_dir / "watchdog.py"
        _write(script, _WATCHDOG, 0o644)
        argv = [
            sys.executable,
            "-I",
            "-S",
            str(script),
            str(self.base_dir),
            "1" if self.keep else "0",
            "1" if self._created_dir else "0",
        ]
        self._watchdog = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C aimed at us must not reach it
        )

    def _release_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None or watchdog.stdin is None:
            return
        with contextlib.suppress(OSError):
            watchdog.stdin.write(b"done\n")
            watchdog.stdin.close()
        try:
            watchdog.wait(10)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()

    def _make_dir(self) -> None:
        if self._given_dir is None:
            self.base_dir = pathlib.Path(tempfile.mkdtemp(prefix="poolkit-devstack-"))
            self._created_dir = True
        else:
            self.base_dir = self._given_dir
            if self.base_dir.exists() and any(self.base_dir.iterdir()):
                raise DevStackError(
                    f"base_dir {self.base_dir} is not empty: pass an empty or new directory "
                    "(DevStack creates a fresh cluster there)"
                )
            self._created_dir = not self.base_dir.exists()
            self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if len(str(self.socket_dir)) > _MAX_SOCKET_DIR:
            self._remove_dir()
            raise DevStackError(
                f"base_dir {self.base_dir} is too long for a Unix socket path "
                f"(max {_MAX_SOCKET_DIR} characters): pass a shorter directory"
            )
        self.base_dir.chmod(0o700)
        self._run_as.chown(self.base_dir)
        if self._run_as.switching:
            probe = subprocess.run(
                ["test", "-w", str(self.base_dir), "-a", "-x", str(self.base_dir)],
                check=False,
                **self._run_as.popen_kwargs(),
            )
            if probe.returncode != 0:
                self._remove_dir()
                raise DevStackError(
                    f"the '{SERVER_USER}' user cannot reach base_dir {self.base_dir} (a parent "
                    "directory is not searchable by it, e.g. pytest's tmp_path or $TMPDIR under /root): "
                    "choose a directory under /tmp"
                )

    def _make_certs(self) -> None:
        try:
            import trustme  # noqa: PLC0415 - a dev-only dependency, needed only when a stack starts
        except ImportError:
            raise DevStackError("the dev stack needs trustme for its certificates: `pip install trustme`") from None

        self.tls_dir.mkdir(mode=0o755)
        ca = trustme.CA(organization_name="poolkit devstack")
        cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
        ca.cert_pem.write_to_path(str(self.ca_file))
        crt = self.tls_dir / "server.crt"
        _write(crt, "".join(blob.bytes().decode() for blob in cert.cert_chain_pems), 0o644)
        key = self.tls_dir / "server.key"
        _write(key, cert.private_key_pem.bytes().decode(), 0o600)
        self.ca_file.chmod(0o644)
        self._run_as.chown(self.tls_dir, self.ca_file, crt, key)

    def _server_run(self, argv: list[str], what: str, timeout: float = 120.0) -> str:
        """Run a server tool as the server user; a failure raises with its output and the log tail."""
        try:
            done: subprocess.CompletedProcess[str] = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                cwd=self.base_dir,
                env=_child_env(self._run_as.home),
                timeout=timeout,
                check=False,
                **self._run_as.popen_kwargs(),
            )
        except subprocess.TimeoutExpired:
            raise DevStackError(
                f"{what} did not finish within {timeout:.0f}s\n--- tail of {self.pg_log_file} ---\n"
                + self._redact(_tail(self.pg_log_file))
            ) from None
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            raise DevStackError(
                f"{what} failed (exit {done.returncode}): {self._redact(output)}\n"
                f"--- tail of {self.pg_log_file} ---\n{self._redact(_tail(self.pg_log_file))}"
            )
        return done.stdout

    def _bin(self, name: str) -> str:
        assert self.pg_bindir is not None
        return str(self.pg_bindir / name)

    def _initdb(self) -> None:
        """Copy this process's initdb output (made once, ~1 s) into the data dir (~0.1 s)."""
        template = self._initdb_template()
        self._server_run(
            ["cp", "-a", "--reflink=auto", str(template), str(self.data_dir)], "copying the initdb template"
        )
        self._configure_cluster()

    def _initdb_template(self) -> pathlib.Path:
        key = (str(self.pg_bindir), self._run_as.uid)
        with _TEMPLATE_LOCK:
            template = _TEMPLATES.get(key)
            if template is not None and (template / "PG_VERSION").is_file():
                return template
            _remove_stale_templates()
            holder = pathlib.Path(tempfile.mkdtemp(prefix=f"{_TEMPLATE_PREFIX}{os.getpid()}-"))
            self._run_as.chown(holder)
            template = holder / "data"
            try:
                self._run_initdb(template)
            except BaseException:
                shutil.rmtree(holder, ignore_errors=True)
                raise
            _TEMPLATES[key] = template
            return template

    def _run_initdb(self, data_dir: pathlib.Path) -> None:
        self._server_run(
            [
                self._bin("initdb"),
                "--pgdata",
                str(data_dir),
                "--username",
                self.superuser,
                "--auth",
                "trust",  # replaced below by our pg_hba.conf; local admin stays trust
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--wal-segsize=1",  # 1 MB WAL segments: a 16 MB smaller template to copy
            ],
            "initdb",
        )

    def _configure_cluster(self) -> None:
        hba = self.data_dir / "pg_hba.conf"
        lines = [
            "# poolkit devstack: Unix socket = admin (trust); TCP only over TLS with SCRAM.",
            "local all all trust",
            "hostssl all all 127.0.0.1/32 scram-sha-256",
            "hostssl all all ::1/128 scram-sha-256",
            "host all all 0.0.0.0/0 reject",
            "host all all ::/0 reject",
        ]
        _write(hba, "\n".join(lines) + "\n")
        conf = self.data_dir / "postgresql.conf"
        with open(conf, "a") as f:
            f.write("\ninclude = 'poolkit.conf'\n")
        self._run_as.chown(hba)

    def _write_pg_conf(self) -> None:
        listen = "127.0.0.1,::1" if self.ipv6 else "127.0.0.1"
        settings = {
            "listen_addresses": _conf_value(listen),
            "port": str(self.pg_port),
            "unix_socket_directories": _conf_value(str(self.socket_dir)),
            "max_connections": str(self.max_connections),
            "superuser_reserved_connections": "3",
            "password_encryption": "'scram-sha-256'",
            "ssl": "on",
            "ssl_cert_file": _conf_value(str(self.tls_dir / "server.crt")),
            "ssl_key_file": _conf_value(str(self.tls_dir / "server.key")),
            # Throw-away data: durability traded for start and test speed.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "jit": "off",
            "huge_pages": "off",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "log_connections": "on",
        }
        path = self.data_dir / "poolkit.conf"
        _write(path, "".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._run_as.chown(path)

    def _pg_ctl(self, action: str, *extra: str) -> None:
        argv = [self._bin("pg_ctl"), "--pgdata", str(self.data_dir), "--silent"]
        if action in ("start", "restart"):
            argv += ["--log", str(self.pg_log_file), "--wait", "--timeout", str(int(_READY_TIMEOUT))]
        self._server_run([*argv, *extra, action], f"pg_ctl {action}", timeout=_READY_TIMEOUT + 30)

    def _start_postgres_first(self) -> None:
        attempts = 1 if self._fixed_pg_port else 5
        for attempt in range(attempts):
            if not self._fixed_pg_port:
                self.pg_port = free_port(ipv6=self.ipv6)
            self._write_pg_conf()
            try:
                self._pg_ctl("start")
                break
            except DevStackError as exc:
                if "Address already in use" not in str(exc) or attempt + 1 == attempts:
                    raise
        self._wait_pg_ready()

    def _wait_pg_ready(self) -> None:
        """Connect over the Unix socket until a query answers (pg_ctl -w alone trusts postmaster.pid)."""
        deadline = time.monotonic() + _READY_TIMEOUT
        last = "no attempt"
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(
                    host=str(self.socket_dir),
                    port=self.pg_port,
                    user=self.superuser,
                    dbname="postgres",
                    connect_timeout=5,
                ) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                last = str(exc).strip() or type(exc).__name__
            time.sleep(0.05)
        raise DevStackError(
            f"PostgreSQL did not accept connections within {_READY_TIMEOUT:.0f}s ({last})\n"
            f"--- tail of {self.pg_log_file} ---\n{self._redact(_tail(self.pg_log_file))}"
        )

    def _bootstrap_sql(self) -> None:
        # Passwords go in as SCRAM verifiers: the plain text never reaches SQL, the log or `ps`.
        su, app = _sql_ident(self.superuser), _sql_ident(self.app_user)
        self.psql(
            f"ALTER ROLE {su} PASSWORD {_sql_literal(_scram_verifier(self.superuser_password))};\n"
            f"CREATE ROLE {app} LOGIN PASSWORD {_sql_literal(_scram_verifier(self.app_password))};\n"
            f"CREATE DATABASE {_sql_ident(self.database)} OWNER {app};\n",
            database="postgres",
        )

    def _new_bouncer(
        self,
        *,
        port: int | None,
        client_tls: bool,
        pool_size: int,
        pool_mode: str,
        settings: Mapping[str, str],
        max_client_conn: int | None = None,
    ) -> PgBouncerHandle:
        if pool_mode not in ("session", "transaction", "statement"):
            raise ConfigError(f"pool_mode={pool_mode!r}: use 'session', 'transaction' or 'statement'")
        if pool_size < 1:
            raise ConfigError(f"pool_size={pool_size}: must be at least 1")
        self._bouncer_count += 1
        name = "pgbouncer" if self._bouncer_count == 1 else f"pgbouncer-{self._bouncer_count}"
        handle = PgBouncerHandle(
            self,
            name=name,
            port=port,
            client_tls=client_tls,
            pool_size=pool_size,
            pool_mode=pool_mode,
            max_client_conn=max_client_conn or self.pgbouncer_max_client_conn,
            settings=settings,
        )
        self._bouncers.append(handle)
        try:
            handle.start()
        except BaseException:
            handle.stop()
            raise
        return handle

    def start_pgbouncer(
        self,
        *,
        client_tls: bool = True,
        pool_size: int | None = None,
        pool_mode: str = "transaction",
        port: int | None = None,
        **settings: str,
    ) -> PgBouncerHandle:
        """Start an extra PgBouncer on this cluster (``client_tls=False`` for a server without SSL).

        ``settings`` are extra ``pgbouncer.ini`` options (``server_lifetime="5"``). It is stopped
        by ``handle.stop()`` or with the stack.
        """
        with self._lock:
            if self._state != "running":
                raise DevStackError("start the DevStack before starting an extra PgBouncer")
            return self._new_bouncer(
                port=port,
                client_tls=client_tls,
                pool_size=pool_size or self.pgbouncer_pool_size,
                pool_mode=pool_mode,
                settings=settings,
            )

    def restart_postgres(self) -> None:
        """``pg_ctl restart -m fast`` on the same port; returns once PostgreSQL answers queries."""
        with self._lock:
            self._require_running()
            self._pg_ctl("restart", "--mode", "fast")
            self._wait_pg_ready()

    def stop_postgres(self) -> None:
        """Stop PostgreSQL only (``-m fast``); PgBouncer keeps running and reports server errors."""
        with self._lock:
            self._require_running()
            if self.postmaster_pid is not None:
                self._pg_ctl("stop", "--mode", "fast")

    def start_postgres(self) -> None:
        """Start PostgreSQL again after ``stop_postgres()``; returns once it answers queries."""
        with self._lock:
            self._require_running()
            if self.postmaster_pid is None:
                self._pg_ctl("start")
            self._wait_pg_ready()

    def _require_running(self) -> None:
        if self._state != "running":
            raise DevStackError(f"the DevStack is {self._state}; call start() first")

    def stop(self) -> None:
        """Stop every PgBouncer, then PostgreSQL (``-m fast``), then remove the directory unless ``keep``.

        Idempotent; also runs on ``__exit__`` and at interpreter exit.
        """
        with self._lock:
            if self._state not in ("running", "starting") or os.getpid() != self._owner_pid:
                return
            self._state = "stopping"
            errors: list[str] = []
            try:
                for bouncer in list(self._bouncers):
                    try:
                        bouncer.stop()
                    except Exception as exc:
                        errors.append(f"pgbouncer {bouncer.name}: {exc}")
                self._stop_postmaster(errors)
                if not self.keep:
                    self._remove_dir()
            finally:
                self._release_watchdog()
                self._state = "stopped"
                with _LIVE_LOCK:
                    _LIVE.discard(self)
            if errors:
                raise DevStackError("DevStack stopped with errors: " + "; ".join(errors))

    def _stop_postmaster(self, errors: list[str]) -> None:
        pid = self.postmaster_pid
        if pid is None or not _pid_alive(pid):
            return
        try:
            self._pg_ctl("stop", "--mode", "fast")
        except DevStackError as exc:
            errors.append(str(exc).splitlines()[0])
        # pg_ctl can fail (or be missing after an uninstall); the pid must still go.
        for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0)):
            deadline = time.monotonic() + wait
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _pid_alive(pid):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _remove_dir(self) -> None:
        if self._created_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        elif self.base_dir.is_dir():
            for child in self.base_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    # ----------------------------------------------------------------- admin

    def psql(self, sql: str, *, database: str = "app") -> str:
        """Run ``sql`` with psql as the superuser over the Unix socket; returns stdout.

        Output is unaligned and tuples-only (``SELECT 1`` gives ``"1\\n"``); statements run
        one by one in autocommit and the first error raises :class:`DevStackError`.
        """
        psql = find_pg_binary("psql", self._pg_bindir_arg)
        argv = [
            str(psql),
            "--no-psqlrc",
            "--quiet",
            "--no-align",
            "--tuples-only",
            "--set",
            "ON_ERROR_STOP=1",
            "--host",
            str(self.socket_dir),
            "--port",
            str(self.pg_port),
            "--username",
            self.superuser,
            "--dbname",
            database,
        ]
        done = subprocess.run(
            argv,
            input=sql,
            capture_output=True,
            text=True,
            env=_child_env(os.environ.get("HOME", "/")),
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise DevStackError(f"psql failed (exit {done.returncode}): {self._redact(done.stderr.strip())}")
        return done.stdout

    def __repr__(self) -> str:
        bouncers = ", ".join(f"{b.name}:{b.port}" for b in self._bouncers) or "none"
        return (
            f"DevStack({self._state}, host={self.host}, pg_port={self.pg_port}, "
            f"pgbouncer_port={self.pgbouncer_port}, pgbouncers=[{bouncers}], base_dir={self.base_dir})"
        )


# --------------------------------------------------------------------------- `poolkit dev`


def run_dev(argv: list[str] | None = None) -> int:
    """``poolkit dev``: start the stack, print ``export`` lines with the URLs, wait for Ctrl-C/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="poolkit dev",
        description="Run a local PostgreSQL (TLS, SCRAM) + PgBouncer (transaction mode) like Supabase's.",
    )
    parser.add_argument("--pg-port", type=int, default=None, help="PostgreSQL port (default: a free one)")
    parser.add_argument("--pgbouncer-port", type=int, default=None, help="PgBouncer port (default: free)")
    parser.add_argument("--dir", default=None, help="empty directory for data, certs and logs")
    parser.add_argument("--keep", action="store_true", help="keep the directory after stopping")
    parser.add_argument("--password", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            stack = DevStack(
                args.dir,
                password=args.password,
                pg_port=args.pg_port,
                pgbouncer_port=args.pgbouncer_port,
                keep=args.keep,
            ).start()
        except (DevStackError, ConfigError) as exc:
            print(f"poolkit dev: {exc}", file=sys.stderr)
            return 1
        try:
            # The one place poolkit prints passwords: the user asked for these URLs.
            for name, value in stack.env(sslmode="verify-full").items():
                print(f"export {name}={shlex.quote(value)}")
            sys.stdout.flush()
            print(
                f"poolkit dev: PostgreSQL on {stack.host}:{stack.pg_port} (direct), PgBouncer on "
                f"{stack.host}:{stack.pgbouncer_port} (transaction mode), data in {stack.base_dir}; "
                f"started in {stack.start_seconds or 0:.1f}s. Ctrl-C stops.",
                file=sys.stderr,
            )
            code = 0
            while not stop_requested.wait(1.0):
                if stack.pgbouncer is None or not stack.pgbouncer.running or stack.postmaster_pid is None:
                    print("poolkit dev: a server exited unexpectedly; stopping", file=sys.stderr)
                    code = 1
                    break
        finally:
            stack.stop()
        print("poolkit dev: stopped", file=sys.stderr)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
