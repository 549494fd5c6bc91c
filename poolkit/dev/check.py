"""``poolkit check``: a doctor that tests the configured URLs step by step and says what to fix."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import ssl
import statistics
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import psycopg

# asn1crypto (pure Python, scramp's own dependency) reads the certificate's expiry: cryptography, which
# trustme brings for `poolkit dev`, is not a runtime dependency.
from asn1crypto import x509

from poolkit.core import detect
from poolkit.core.detect import Mode
from poolkit.core.dsn import Dsn
from poolkit.core.settings import Settings, load_settings
from poolkit.core.translate import translate_connect_error
from poolkit.errors import ConfigError

Status = Literal["ok", "warn", "fail", "skip"]
Target = Literal["pooled", "direct", "settings"]

_SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # the protocol's SSLRequest message
_PROBE_STATEMENTS = 5
_LATENCY_SAMPLES = 7
_USAGE_WARN = 0.8
_LATENCY_WARN_MS = 50.0
_CERT_WARN_DAYS = 14


@dataclass
class CheckResult:
    """One line of the report: ``status`` is ok / warn / fail / skip; ``fix`` says what to change."""

    target: Target
    check: str
    status: Status
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Probe:
    """What one target revealed, for the checks that combine targets (budget)."""

    mode: Mode | None = None
    max_connections: int | None = None
    reserved: int | None = None
    in_use: int | None = None


def _libpq_kwargs(dsn: Dsn, settings: Settings) -> dict[str, Any]:
    tls = detect.tls_config(dsn, settings.sslmode, settings.sslrootcert)
    kwargs: dict[str, Any] = {
        "host": dsn.host,
        "port": dsn.port,
        "user": dsn.user,
        "dbname": dsn.database,
        "application_name": "poolkit-check",
        "connect_timeout": max(2, round(settings.connect_timeout)),
        **tls.libpq_params(),
        **dsn.without_params(*detect.TOOL_ONLY_PARAMS).query,
    }
    if dsn.password is not None:
        kwargs["password"] = dsn.password
    return kwargs


class _Doctor:
    def __init__(self, settings: Settings, *, instances: int | None, probe_timeout: float) -> None:
        self.settings = settings
        self.instances = instances
        self.probe_timeout = probe_timeout
        self.results: list[CheckResult] = []

    def add(self, target: Target, check: str, status: Status, detail: str, fix: str = "", **data: Any) -> None:
        self.results.append(CheckResult(target, check, status, detail, fix, dict(data)))

    async def run(self) -> list[CheckResult]:
        pooled = self.settings.pooled_dsn()
        direct = self.settings.direct_dsn()
        probes: dict[str, _Probe] = {}
        probes["pooled"] = await self.target("pooled", pooled)
        if direct is not None and direct != pooled:
            probes["direct"] = await self.target("direct", direct)
        self.budget(probes)
        return self.results

    # -- one URL ------------------------------------------------------------------------------------------------

    async def target(self, target: Target, dsn: Dsn) -> _Probe:
        probe = _Probe()
        self.add(target, "url", "ok", dsn.redacted())
        if not dsn.is_unix_socket:
            addresses = self.dns(target, dsn)
            if not addresses or not self.tcp(target, dsn, addresses):
                return probe
            self.tls(target, dsn, addresses[0])
        kwargs = _libpq_kwargs(dsn, self.settings)
        try:
            first = await psycopg.AsyncConnection.connect(autocommit=True, prepare_threshold=None, **kwargs)
        except Exception as exc:
            error = translate_connect_error(exc, dsn, connect_timeout=self.settings.connect_timeout)
            self.add(target, "auth", "fail", f"cannot log in as {dsn.user!r}", str(error), reason=error.reason)
            return probe
        try:
            self.add(target, "auth", "ok", f"logged in as {dsn.user!r} to database {dsn.database!r}")
            await self.server(target, first, probe)
            await self.behind(target, dsn, first, kwargs, probe)
            await self.latency(target, first)
        finally:
            await first.close()
        return probe

    def dns(self, target: Target, dsn: Dsn) -> list[tuple[int, str]]:
        try:
            infos = socket.getaddrinfo(dsn.host, dsn.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            error = translate_connect_error(exc, dsn, connect_timeout=self.settings.connect_timeout)
            self.add(target, "dns", "fail", f"{dsn.host} does not resolve", str(error))
            return []
        v4 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET})
        v6 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET6})
        detail = f"IPv4 {', '.join(v4) or 'none'}; IPv6 {', '.join(v6) or 'none'}"
        if v6 and not v4:
            self.add(
                target,
                "dns",
                "warn",
                detail + " (IPv6 only)",
                "this host has no IPv4 address: networks without IPv6 (many serverless platforms) cannot reach "
                "it. Supabase: use the pooler host (aws-0-<region>.pooler.supabase.com) or the IPv4 add-on",
                ipv4=v4,
                ipv6=v6,
            )
        else:
            self.add(target, "dns", "ok", detail, ipv4=v4, ipv6=v6)
        return [(int(socket.AF_INET), a) for a in v4] + [(int(socket.AF_INET6), a) for a in v6]

    def tcp(self, target: Target, dsn: Dsn, addresses: list[tuple[int, str]]) -> bool:
        reached: list[str] = []
        failures: list[str] = []
        last: OSError | None = None
        for family in (socket.AF_INET, socket.AF_INET6):
            addr = next((a for f, a in addresses if f == family), None)
            if addr is None:
                continue
            try:
                with socket.create_connection((addr, dsn.port), timeout=self.settings.connect_timeout):
                    reached.append(addr)
            except OSError as exc:
                last = exc
                failures.append(f"{addr}: {exc.strerror or type(exc).__name__}")
        if reached:
            status: Status = "warn" if failures else "ok"
            detail = f"port {dsn.port} open on {', '.join(reached)}"
            fix = f"unreachable: {'; '.join(failures)}" if failures else ""
            self.add(target, "tcp", status, detail, fix)
            return True
        assert last is not None
        error = translate_connect_error(last, dsn, connect_timeout=self.settings.connect_timeout)
        self.add(target, "tcp", "fail", f"port {dsn.port} unreachable ({'; '.join(failures)})", str(error))
        return False

    def tls(self, target: Target, dsn: Dsn, address: tuple[int, str]) -> None:
        tls = detect.tls_config(dsn, self.settings.sslmode, self.settings.sslrootcert)
        if tls.sslmode == "disable":
            self.add(target, "tls", "warn", "sslmode=disable: plain text (accepted for loopback only)")
            return
        context = tls.ssl_context()
        assert isinstance(context, ssl.SSLContext)
        try:
            with socket.create_connection((address[1], dsn.port), timeout=self.settings.connect_timeout) as raw:
                raw.sendall(_SSL_REQUEST)
                answer = raw.recv(1)
                if answer != b"S":
                    self.add(
                        target,
                        "tls",
                        "fail",
                        "the server does not offer TLS",
                        f"sslmode={tls.sslmode} needs TLS: enable ssl on the server or pooler, or point the URL "
                        "at one that has it",
                    )
                    return
                with context.wrap_socket(raw, server_hostname=dsn.host) as wrapped:
                    version, cipher = wrapped.version(), wrapped.cipher()
                    der = wrapped.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError) as exc:
            error = translate_connect_error(exc, dsn, connect_timeout=self.settings.connect_timeout)
            self.add(target, "tls", "fail", f"TLS handshake failed (sslmode={tls.sslmode})", str(error))
            return
        detail = f"{version} {cipher[0] if cipher else ''}".strip()
        data: dict[str, Any] = {"sslmode": tls.sslmode, "version": version}
        fix = ""
        status: Status = "ok"
        if der:
            not_after: dt.datetime = x509.Certificate.load(der)["tbs_certificate"]["validity"]["not_after"].native
            days = (not_after - dt.datetime.now(dt.UTC)).days
            data["certificate_days_left"] = days
            detail += f", certificate valid {days} more day(s)"
            if days < _CERT_WARN_DAYS:
                status, fix = "warn", "the server certificate expires soon: renew it"
        if tls.sslmode == "require":
            detail += ", certificate NOT verified (sslmode=require)"
            if status == "ok":
                status = "warn"
                fix = "encrypted but the server is not authenticated: set sslmode=verify-full and POOLKIT_SSLROOTCERT"
        else:
            detail += f", certificate verified ({tls.sslmode})"
        self.add(target, "tls", status, detail, fix, **data)

    async def server(self, target: Target, conn: Any, probe: _Probe) -> None:
        cur = await conn.execute(
            "SELECT current_setting('server_version'), current_setting('max_connections')::int, "
            "current_setting('superuser_reserved_connections')::int, "
            "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int"
        )
        row = await cur.fetchone()
        version, max_conn, reserved, in_use = row
        self.add(target, "server", "ok", f"PostgreSQL {version}", version=version)
        probe.max_connections, probe.reserved, probe.in_use = max_conn, reserved, in_use
        usable = max(max_conn - reserved, 1)
        share = in_use / usable
        detail = f"{in_use} of {usable} connection(s) in use (max_connections={max_conn}, {reserved} reserved)"
        data: dict[str, Any] = {"max_connections": max_conn, "reserved": reserved, "in_use": in_use}
        if share >= 1:
            fix = (
                "the server is full: stop idle clients, lower POOLKIT_MAX_SIZE, or send app traffic through the pooler"
            )
            self.add(target, "connections", "fail", detail, fix, **data)
        elif share >= _USAGE_WARN:
            self.add(target, "connections", "warn", detail, "the server is close to max_connections", **data)
        else:
            self.add(target, "connections", "ok", detail, **data)

    async def behind(self, target: Target, dsn: Dsn, first: Any, kwargs: dict[str, Any], probe: _Probe) -> None:
        """Tell a transaction pooler, a session pooler and PostgreSQL apart by how they behave."""
        sidecar = first.info.parameter_status(detect.SIDECAR_PARAMETER)
        if sidecar is not None:
            probe.mode = Mode.SESSION  # for the connection budget: the sidecar's clients hold no server
            self.add(
                target,
                "behind",
                "ok",
                f"a poolkit sidecar (its upstream: {sidecar} pooling), which handles named prepared statements "
                "and session state for its clients",
                mode="sidecar",
            )
            self._judge_sidecar(target, dsn)
            return
        pids = []
        for _ in range(_PROBE_STATEMENTS):
            cur = await first.execute("SELECT pg_backend_pid(), inet_client_port()")
            pid, client_port = await cur.fetchone()
            pids.append(pid)
        local_port = _local_port(first)
        evidence: list[str] = []
        mode: Mode
        if len(set(pids)) > 1:
            mode = Mode.TRANSACTION
            evidence.append(f"{len(set(pids))} server processes served {_PROBE_STATEMENTS} statements of one client")
        else:
            second_pid = await self._second_client_pid(kwargs)
            if second_pid is None:
                mode = Mode.SESSION
                evidence.append("a second client waited while the first sat idle: the idle client holds a server")
            elif second_pid in pids:
                mode = Mode.TRANSACTION
                evidence.append("two clients were served by the same server process")
            elif client_port is not None and local_port is not None and client_port != local_port:
                mode = Mode.SESSION
                evidence.append(
                    f"one server process per client, and the server sees client port {client_port}, not ours "
                    f"({local_port}): a pooler or proxy in session mode sits between"
                )
            else:
                mode = Mode.DIRECT
                evidence.append("one server process per client, and the server sees our own socket")
        probe.mode = mode
        self.add(target, "behind", "ok", f"{mode.value}: {'; '.join(evidence)}", mode=mode.value)
        self._judge(target, dsn, mode)

    async def _second_client_pid(self, kwargs: dict[str, Any]) -> int | None:
        async def pid() -> int:
            async with await psycopg.AsyncConnection.connect(
                autocommit=True, prepare_threshold=None, **kwargs
            ) as second:
                cur = await second.execute("SELECT pg_backend_pid()")
                row = await cur.fetchone()
                assert row is not None
                return int(row[0])

        try:
            return await asyncio.wait_for(pid(), self.probe_timeout)
        except TimeoutError:
            return None

    def _judge_sidecar(self, target: Target, dsn: Dsn) -> None:
        configured = detect.detect_mode(dsn, self.settings.pool_mode)
        if target == "pooled" and configured.mode is Mode.TRANSACTION:
            self.add(
                target,
                "prepared statements",
                "warn",
                f"safe behind the sidecar, but poolkit turns them off because {configured.reason}",
                "drop pgbouncer=true / POOLKIT_POOL_MODE=transaction (or move the sidecar off port 6543) to "
                "get statement caching back",
            )
        else:
            self.add(target, "prepared statements", "ok", "safe: the poolkit sidecar keeps them for each client")

    def _judge(self, target: Target, dsn: Dsn, mode: Mode) -> None:
        configured = detect.detect_mode(dsn, self.settings.pool_mode) if target == "pooled" else None
        if target == "direct":
            if mode is Mode.TRANSACTION:
                self.add(
                    target,
                    "prepared statements",
                    "fail",
                    "the direct URL goes through a transaction pooler",
                    "migrations and session features (LISTEN, advisory locks, prepared statements) need a real "
                    "session: set POOLKIT_DIRECT_URL to the database itself (Supabase: db.<ref>.supabase.co:5432) "
                    "or to the session pooler (port 5432 on the pooler host)",
                )
            else:
                self.add(target, "prepared statements", "ok", "safe: every client keeps its server session")
            return
        assert configured is not None
        if mode is Mode.TRANSACTION and configured.mode is not Mode.TRANSACTION:
            self.add(
                target,
                "prepared statements",
                "fail",
                f"UNSAFE: a transaction pooler answers, but poolkit treats this URL as {configured.mode.value} "
                f"({configured.reason}) and would use named prepared statements",
                "set POOLKIT_POOL_MODE=transaction (or add pgbouncer=true to the URL) so poolkit turns them off",
            )
        elif mode is Mode.TRANSACTION:
            self.add(
                target,
                "prepared statements",
                "ok",
                f"unsafe here, and poolkit turns them off ({configured.reason})",
            )
        elif configured.mode is Mode.TRANSACTION:
            self.add(
                target,
                "prepared statements",
                "warn",
                f"safe here ({mode.value}), but poolkit turns them off because {configured.reason}",
                "drop pgbouncer=true / POOLKIT_POOL_MODE=transaction to get statement caching back",
            )
        else:
            self.add(target, "prepared statements", "ok", f"safe: {mode.value}, every client keeps its session")
        if mode is Mode.DIRECT:
            self.add(
                target,
                "pooler",
                "warn",
                "the pooled URL reaches PostgreSQL directly",
                "each app instance's connections count against max_connections: use the transaction pooler "
                "URL for app traffic (Supabase: port 6543)",
            )

    async def latency(self, target: Target, conn: Any) -> None:
        samples = []
        for _ in range(_LATENCY_SAMPLES):
            t0 = time.perf_counter()
            await conn.execute("SELECT 1")
            samples.append((time.perf_counter() - t0) * 1000)
        median = statistics.median(samples)
        detail = f"median {median:.1f} ms, min {min(samples):.1f} ms, max {max(samples):.1f} ms over {len(samples)}"
        data: dict[str, Any] = {
            "median_ms": round(median, 3),
            "min_ms": round(min(samples), 3),
            "max_ms": round(max(samples), 3),
        }
        if median > _LATENCY_WARN_MS:
            fix = "every statement pays this round trip: run the app in the database's region"
            self.add(target, "latency", "warn", detail, fix, **data)
        else:
            self.add(target, "latency", "ok", detail, **data)

    # -- the connection budget ----------------------------------------------------------------------------------

    def budget(self, probes: dict[str, _Probe]) -> None:
        instances = self.instances or 1
        max_size = self.settings.max_size
        wanted = instances * max_size
        server = probes.get("direct") if probes.get("direct", _Probe()).max_connections else probes.get("pooled")
        pooled = probes["pooled"]
        if server is None or server.max_connections is None or pooled.mode is None:
            self.add("settings", "budget", "skip", "no connection reached the server: budget unknown")
            return
        capacity = server.max_connections - (server.reserved or 0)
        data: dict[str, Any] = {"instances": instances, "max_size": max_size, "wanted": wanted, "capacity": capacity}
        what = f"{instances} instance(s) x max_size {max_size} = {wanted} connection(s)"
        if pooled.mode is Mode.TRANSACTION:
            self.add(
                "settings",
                "budget",
                "ok",
                f"{what} to the transaction pooler; the server only sees the pooler's pool "
                f"(server capacity {capacity})",
                **data,
            )
            return
        if wanted <= capacity:
            self.add("settings", "budget", "ok", f"{what} fit the server's {capacity} usable connection(s)", **data)
            return
        per_instance = capacity // instances
        if per_instance >= 1:
            fix = (
                f"set POOLKIT_MAX_SIZE={per_instance} (x {instances} = {per_instance * instances} of {capacity}), "
                "or send app traffic through the transaction pooler (Supabase: port 6543)"
            )
        else:
            fix = (
                f"{instances} instances cannot each hold a direct connection ({capacity} usable): send app "
                "traffic through the transaction pooler (Supabase: port 6543)"
            )
        self.add(
            "settings", "budget", "fail", f"{what} exceed the server's {capacity} usable connection(s)", fix, **data
        )


def _local_port(conn: Any) -> int | None:
    fd = conn.pgconn.socket
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            name = sock.getsockname()
    except OSError:
        return None
    return int(name[1]) if isinstance(name, tuple) else None


async def run_checks(
    settings: Settings, *, instances: int | None = None, probe_timeout: float = 3.0
) -> list[CheckResult]:
    """Run every check against ``settings``' URLs; never raises for a failing check (see ``status``)."""
    return await _Doctor(settings, instances=instances, probe_timeout=probe_timeout).run()


def render(results: Sequence[CheckResult]) -> str:
    """The human-readable table (with the fixes under the failing lines)."""
    marks = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
    width = max((len(r.check) for r in results), default=5)
    lines = [f"{'STATUS':<6}  {'TARGET':<8}  {'CHECK':<{width}}  DETAIL"]
    for r in results:
        lines.append(f"{marks[r.status]:<6}  {r.target:<8}  {r.check:<{width}}  {r.detail}")
        if r.fix and r.status in ("warn", "fail"):
            lines.append(f"{'':<6}  {'':<8}  {'':<{width}}  fix: {r.fix}")
    failed = sum(r.status == "fail" for r in results)
    warned = sum(r.status == "warn" for r in results)
    lines.append(f"\n{failed} failing, {warned} warning(s), {len(results)} check(s)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``poolkit check`` options."""
    parser.add_argument("--pooled-url", help="pooled URL (default: POOLKIT_POOLED_URL / DATABASE_URL)")
    parser.add_argument("--direct-url", help="direct URL (default: POOLKIT_DIRECT_URL / DIRECT_DATABASE_URL)")
    parser.add_argument("--max-size", type=int, help="per-instance pool size to budget for (default: POOLKIT_MAX_SIZE)")
    parser.add_argument("--instances", type=int, help="how many app instances run at once (connection budget)")
    parser.add_argument("--probe-timeout", type=float, default=3.0, help="seconds a pooler probe may wait")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the checks; print the table (or JSON); 1 if any check failed, else 0."""
    overrides: dict[str, Any] = {}
    if args.pooled_url:
        overrides["pooled_url"] = args.pooled_url
    if args.direct_url:
        overrides["direct_url"] = args.direct_url
    if args.max_size is not None:
        overrides["max_size"] = args.max_size
        overrides.setdefault("profile", "server" if args.max_size > 3 else "serverless")
    try:
        if args.instances is not None and args.instances < 1:
            raise ConfigError(f"--instances={args.instances}: must be at least 1")
        settings = load_settings(**overrides)
        settings.pooled_dsn()
        results = asyncio.run(run_checks(settings, instances=args.instances, probe_timeout=args.probe_timeout))
    except ConfigError as exc:
        results = [CheckResult("settings", "settings", "fail", "the settings are not usable", str(exc))]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(render(results))
    return 1 if any(r.status == "fail" for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m poolkit.dev.check``: the same as ``poolkit check``, without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="poolkit check", description=__doc__)
    add_arguments(parser)
    with contextlib.suppress(AttributeError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
