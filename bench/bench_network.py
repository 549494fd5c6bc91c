"""The real deployment, measured: an app host reaching a remote transaction pooler over a network with delay.

Usage: .venv/bin/python bench/bench_network.py [--seconds 10] [--delays 0,0.25,1] [--only a,b,c,d,pgbench,drivers]

The far side is the stack's PostgreSQL 15 with a PgBouncer 1.18 in transaction mode in front of it (the
stand-in for Supavisor: client TLS, SCRAM, 20 backends). Between the app's host and the far side sits
tests/support/netdelay.py, a C relay adding the same one-way delay to every chunk in both directions (tc/netem is
not available here). Side by side, for each delay:

  (a) the app straight to the remote pooler (TLS, one pooler connection per client: what users do today)
  (b) the app -> a poolkit sidecar on its host (pool 3) -> the remote pooler (TLS, 3 connections)
  (c) the app -> a PgBouncer on its host (pool 3, transaction mode) -> the remote pooler (TLS, 3 connections);
      POOLKIT_PGBOUNCER=/path/to/pgbouncer uses that build here (1.21+ gets max_prepared_statements=200)
  (d) the app straight to PostgreSQL (TLS), over the same network

Workloads: pgbench -S at -c 1/10/50 with -M simple and -M prepared, TPC-B at -c 10, -S -C -c 50 (a new
connection per transaction: the serverless cold path), then asyncpg and psycopg through poolkit pools
(10 tasks, `SELECT $1 * 100 + 3` with every answer checked). The app side talks plain TCP to (b) and
(c), which are on its own host. A target that cannot run a workload (-M prepared through a transaction
pooler without prepared-statement support) is run anyway and its errors are reported, not hidden.
Latency: mean and p99 from pgbench's per-transaction log. CPU: microseconds of CPU per transaction of the
process in the middle ((b) the sidecar, (c) the local PgBouncer), of the remote pooler and of the relay.
Machines are noisy: compare the columns of one run, never runs on different days.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import benchlib

from poolkit import Pool
from poolkit.core.settings import load_settings
from poolkit.dev.devstack import DevStack, PgBouncerHandle, find_pgbouncer, free_port

sys.path.insert(0, str(benchlib.REPO / "tests"))  # the delay relay lives with the tests' support code
from support.netdelay import DelayRelay

TARGETS = {"a": "remote pooler", "b": "sidecar", "c": "local PgBouncer", "d": "direct PostgreSQL"}
WORKLOADS: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("-S -c 1", ["-S", "-c", "1"], ("simple", "prepared")),
    ("-S -c 10", ["-S", "-c", "10"], ("simple", "prepared")),
    ("-S -c 50", ["-S", "-c", "50"], ("simple", "prepared")),
    ("TPC-B -c 10", ["-c", "10"], ("simple",)),
    ("-S -C -c 50", ["-S", "-C", "-c", "50"], ("simple",)),
]
REMOTE_BACKENDS = 20
LOCAL_POOL = 3
DRIVER_TASKS = 10


class LocalBouncer(PgBouncerHandle):
    """A PgBouncer beside the app whose upstream is the remote pooler through the relay (not PostgreSQL)."""

    def __init__(self, stack: DevStack, *, upstream_port: int, binary: str, **settings: str) -> None:
        super().__init__(
            stack,
            name=f"local-pgbouncer-{upstream_port}",
            port=None,
            client_tls=False,
            pool_size=LOCAL_POOL,
            pool_mode="transaction",
            max_client_conn=20000,
            settings=settings,
        )
        self.upstream_port = upstream_port
        self.binary = binary

    def _config(self) -> str:
        return super()._config().replace(f"port={self._stack.pg_port} ", f"port={self.upstream_port} ")

    def start(self) -> None:
        # PgBouncerHandle finds its binary through the stack; this one may be another build (POOLKIT_PGBOUNCER).
        saved = self._stack._pgbouncer_path
        self._stack._pgbouncer_path = self.binary
        try:
            super().start()
        finally:
            self._stack._pgbouncer_path = saved


def pgbouncer_version(binary: str) -> tuple[int, ...]:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", done.stdout + done.stderr)
    return tuple(int(part) for part in found.groups() if part) if found else (0,)


@dataclass
class Side:
    """Everything on the app's side of the network at one delay, and the processes whose CPU is read."""

    urls: dict[str, str]
    cpu_pids: dict[str, dict[str, int]]  # target -> role -> pid
    sidecar_http_port: int = 0
    notes: list[str] = field(default_factory=list)


@contextmanager
def app_side(stack: DevStack, remote: PgBouncerHandle, delay_ms: float, targets: str) -> Iterator[Side]:
    """Relays to the far side at ``delay_ms`` one way, the sidecar and the local PgBouncer in front of them."""
    with ExitStack() as cleanup:
        to_pooler = cleanup.enter_context(DelayRelay(stack.host, remote.port, delay_ms))
        to_postgres = cleanup.enter_context(DelayRelay(stack.host, stack.pg_port, delay_ms))
        assert to_pooler.pid is not None
        assert to_postgres.pid is not None
        assert remote.pid is not None

        def far(port: int, **params: str) -> str:
            return stack._build_url(port, user=None, password=None, database=None, sslmode="require", params=params)

        side = Side(urls={}, cpu_pids={})
        if "a" in targets:
            side.urls["a"] = far(to_pooler.port)
            side.cpu_pids["a"] = {"relay": to_pooler.pid, "remote pooler": remote.pid}
        if "b" in targets:
            port, http_port = free_port(), free_port()
            sidecar = benchlib.start_sidecar(
                {
                    "POOLKIT_POOLED_URL": stack._build_url(
                        to_pooler.port, user=None, password=None, database=None, sslmode="verify-full", params={}
                    ),
                    "POOLKIT_SSLROOTCERT": str(stack.ca_file),
                    "POOLKIT_SIDECAR_UPSTREAM": "pooled",
                    "POOLKIT_SIDECAR_MAX_SIZE": str(LOCAL_POOL),
                    "POOLKIT_SIDECAR_USERS": benchlib.sidecar_users(stack.app_user, stack.app_password),
                },
                port,
                http_port,
            )
            cleanup.callback(benchlib.stop_process, sidecar)
            side.urls["b"] = stack._build_url(
                port, user=None, password=None, database=None, sslmode="disable", params={}
            )
            side.sidecar_http_port = http_port
            side.cpu_pids["b"] = {"middle": sidecar.pid, "relay": to_pooler.pid, "remote pooler": remote.pid}
        if "c" in targets:
            binary = str(find_pgbouncer())
            extra = {"log_connections": "0", "log_disconnections": "0"}
            if pgbouncer_version(binary) >= (1, 21):
                extra["max_prepared_statements"] = "200"
            local = LocalBouncer(stack, upstream_port=to_pooler.port, binary=binary, **extra)
            cleanup.callback(local.stop)
            local.start()
            assert local.pid is not None
            side.urls["c"] = local.url(sslmode="disable")
            side.cpu_pids["c"] = {"middle": local.pid, "relay": to_pooler.pid, "remote pooler": remote.pid}
            version = ".".join(map(str, pgbouncer_version(binary)))
            side.notes.append(f"(c) is PgBouncer {version} ({binary}), settings {extra}")
        if "d" in targets:
            side.urls["d"] = far(to_postgres.port)
            side.cpu_pids["d"] = {"relay": to_postgres.pid}
        yield side


@dataclass
class Run:
    result: benchlib.PgbenchResult
    cpu_us: dict[str, float]  # role -> CPU microseconds per transaction


def measured(side: Side, target: str, wargs: list[str], seconds: int, mode: str) -> Run:
    pids = side.cpu_pids[target]
    before = {role: benchlib.cpu_seconds(pid) for role, pid in pids.items()}
    result = benchlib.pgbench(side.urls[target], wargs, seconds, mode, check=False)
    after = {role: benchlib.cpu_seconds(pid) for role, pid in pids.items()}
    count = max(result.transactions, 1)
    return Run(result, {role: (after[role] - before[role]) * 1e6 / count for role in pids})


def ratio(top: benchlib.PgbenchResult, bottom: benchlib.PgbenchResult) -> str:
    if top.errors or bottom.errors or bottom.tps <= 0:
        return "-"
    return f"{top.tps / bottom.tps:.2f}"


def cell(result: benchlib.PgbenchResult) -> str:
    return f"✗ ({result.transactions:,} tx)" if result.errors else f"{result.tps:,.0f}"


def pgbench_table(side: Side, delay_ms: float, seconds: int, targets: str) -> list[str]:
    for target in "abc":
        if target in side.urls:  # every pooler opens its whole pool first: the state after any burst
            benchlib.pgbench(side.urls[target], ["-S", "-c", "50"], 2, check=False)
    lines: list[str] = []
    cpu_lines: list[str] = []
    errors_seen: dict[str, str] = {}
    for name, wargs, modes in WORKLOADS:
        for mode in modes:
            runs = {t: measured(side, t, wargs, seconds, mode) for t in targets if t in side.urls}
            res = {t: run.result for t, run in runs.items()}

            def col(values: dict[str, str]) -> str:
                return " / ".join(values.get(t, "-") for t in "abcd" if t in targets)

            # A run with errors has no throughput worth comparing: pgbench stops a client at its first error.
            tps = " | ".join(cell(res[t]) if t in res else "-" for t in "abcd")
            b_a = ratio(res["b"], res["a"]) if "a" in res and "b" in res else "-"
            b_c = ratio(res["b"], res["c"]) if "c" in res and "b" in res else "-"
            means = col({t: f"{r.mean_ms:.2f}" for t, r in res.items()})
            p99s = col({t: f"{r.p99_ms:.2f}" for t, r in res.items()})
            errs = col({t: str(r.errors) for t, r in res.items()})
            lines.append(f"| {delay_ms:g} ms | `{name}` | {mode} | {tps} | {b_a} | {b_c} | {means} | {p99s} | {errs} |")
            for t, r in res.items():
                if r.errors and t not in errors_seen:
                    errors_seen[t] = f"({t}) `{name} -M {mode}`: {r.first_error or 'failed transactions'}"
            cpu_lines.append(
                f"  {name:<12} {mode:<8} "
                + "  ".join(
                    f"({t}) " + " ".join(f"{role} {us:,.0f}" for role, us in run.cpu_us.items())
                    for t, run in runs.items()
                    if not run.result.errors  # (a failed run's few transactions say nothing per transaction)
                )
            )
            print(lines[-1], flush=True)
    print(f"CPU microseconds per transaction at {delay_ms:g} ms (middle = sidecar for (b), local PgBouncer for (c)):")
    print("\n".join(cpu_lines))
    for text in errors_seen.values():
        print(f"first error {text}")
    if side.sidecar_http_port:
        open_now = benchlib.server_connections(side.sidecar_http_port)
        print(f"sidecar upstream connections open after the runs: {open_now} (max_size {LOCAL_POOL})")
    return lines


# ---------------------------------------------------------------------------------------------- drivers


@dataclass
class DriverResult:
    qps: float
    mean_ms: float
    p99_ms: float
    errors: int
    wrong: int
    mode: str
    first_error: str


async def driver_load(url: str, driver: str, seconds: int, ca_file: str, name: str) -> DriverResult:
    """DRIVER_TASKS tasks running ``SELECT $1::int * 100 + 3`` through a poolkit pool; every answer checked."""
    settings = load_settings(
        driver=driver,
        name=name,
        profile="server",
        max_size=DRIVER_TASKS,
        pooled_url=url,
        sslrootcert=ca_file,
        application_name=name,
        acquire_timeout=30.0,
    )
    pool = Pool(settings)
    sql = "SELECT $1::int * 100 + 3" if driver == "asyncpg" else "SELECT %s::int * 100 + 3"
    latencies: list[float] = []
    counts = {"errors": 0, "wrong": 0}
    first_error: list[str] = []
    try:
        await pool.open()
        began = time.monotonic()
        stop = began + seconds

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop:
                value = rng.randrange(1_000_000)
                t0 = time.perf_counter()
                try:
                    got = await pool.fetchval(sql, value)
                except Exception as exc:
                    counts["errors"] += 1
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {str(exc).strip()[:120]}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if got != value * 100 + 3:
                    counts["wrong"] += 1

        await asyncio.gather(*(worker(i) for i in range(DRIVER_TASKS)))
        elapsed = time.monotonic() - began
        mode = pool.mode.value
    finally:
        await pool.close(timeout=5.0)
    latencies.sort()
    return DriverResult(
        qps=len(latencies) / elapsed,
        mean_ms=statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else float("nan"),
        errors=counts["errors"],
        wrong=counts["wrong"],
        mode=mode,
        first_error=first_error[0] if first_error else "",
    )


def driver_table(side: Side, stack: DevStack, delay_ms: float, seconds: int) -> list[str]:
    import uvloop  # noqa: PLC0415 - only this part needs it

    lines: list[str] = []
    for driver in ("asyncpg", "psycopg"):
        for target, url in side.urls.items():
            # Transaction-pooler URLs carry the pgbouncer=true marker, as Prisma's and `poolkit dev`'s do:
            # on Supabase the port (6543) says it; here the ports are random.
            marked = f"{url}&pgbouncer=true" if target in "ac" else url
            res = uvloop.run(driver_load(marked, driver, seconds, str(stack.ca_file), f"bench-{target}-{driver}"))
            lines.append(
                f"| {delay_ms:g} ms | {driver} | ({target}) {TARGETS[target]} | {res.mode} | {res.qps:,.0f} | "
                f"{res.mean_ms:.2f} | {res.p99_ms:.2f} | {res.errors} | {res.wrong} |"
            )
            print(lines[-1] + (f" first error: {res.first_error}" if res.first_error else ""), flush=True)
    return lines


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per pgbench run and per driver run")
    parser.add_argument("--delays", default="0,0.25,1", help="one-way delays in ms, comma-separated")
    parser.add_argument(
        "--only",
        default="a,b,c,d,pgbench,drivers",
        help="comma-separated subset of the targets a,b,c,d and the parts pgbench,drivers",
    )
    args = parser.parse_args()
    only = {item.strip() for item in args.only.split(",") if item.strip()}
    unknown = only - {*TARGETS, "pgbench", "drivers"}
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; use a,b,c,d,pgbench,drivers")
    targets = "".join(t for t in TARGETS if t in only) or "abcd"
    parts = {p for p in ("pgbench", "drivers") if p in only} or {"pgbench", "drivers"}
    delays = [float(d) for d in args.delays.split(",")]
    # SIGTERM unwinds like Ctrl-C: the with-blocks stop the sidecars, PgBouncers, relays and the stack.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    # The far side is always the Debian PgBouncer 1.18 (the Supavisor stand-in); POOLKIT_PGBOUNCER is (c) only.
    with DevStack(max_connections=200, pgbouncer_max_client_conn=20000, pgbouncer_path="/usr/sbin/pgbouncer") as stack:
        remote = stack.start_pgbouncer(
            client_tls=True, pool_size=REMOTE_BACKENDS, log_connections="0", log_disconnections="0"
        )
        benchlib.pgbench_init(stack.url(via="direct"))
        header = " | ".join(f"({t}) {TARGETS[t]}" for t in "abcd")
        short = " / ".join(t for t in "abcd" if t in targets)
        pgbench_lines = [
            f"| one-way delay | workload | -M | {header} | (b)/(a) | (b)/(c) | mean ms {short} | p99 ms {short} "
            f"| errors {short} |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
        ]
        driver_lines = [
            "| one-way delay | driver | target | pool mode | q/s | mean ms | p99 ms | errors | wrong answers |",
            "|---|---|---|---|---:|---:|---:|---:|---:|",
        ]
        print(
            f"pgbench -j 2 -T {args.seconds}; remote pooler: PgBouncer 1.18, transaction mode, client TLS, "
            f"{REMOTE_BACKENDS} backends; (b) and (c): {LOCAL_POOL} upstream connections each",
            flush=True,
        )
        for delay in delays:
            with app_side(stack, remote, delay, targets) as side:
                for note in side.notes:
                    print(note)
                if "pgbench" in parts:
                    pgbench_lines += pgbench_table(side, delay, args.seconds, targets)
                if "drivers" in parts:
                    driver_lines += driver_table(side, stack, delay, args.seconds)
        print()
        if "pgbench" in parts:
            print("\n".join(pgbench_lines))
            print()
        if "drivers" in parts:
            print(f"poolkit pools, {DRIVER_TASKS} tasks, max_size {DRIVER_TASKS}, `SELECT $1::int * 100 + 3`:")
            print("\n".join(driver_lines))
    return 0


if __name__ == "__main__":
    tempfile.tempdir = tempfile.gettempdir()
    sys.exit(main())
