"""Side-by-side pgbench: direct PostgreSQL vs PgBouncer vs the poolkit sidecar; plus idle-client memory.

Usage: .venv/bin/python bench/bench_sidecar.py [--seconds 10] [--pool-size 3] [--idle-clients 5000]
       [--only simple|prepared] [--cold]

The prepared case is what the sidecar's named prepared statements buy: pgbench -S -M prepared through
the sidecar beside -S -M simple through PgBouncer (1.18 cannot run -M prepared in transaction mode).

The sidecar runs twice: as configured by default, and with pipeline_depth=0 (no pipelining across
clients), which shows what that feature adds. Before the tables every pooler runs a short -c 50 burst so
that each has its whole pool open, the state a pool is in after any burst: with fewer connections open
the sidecar puts a -c 10 load on one connection and is faster still (`--cold` measures that instead).
Every target gets the same upstream pool size; PgBouncer and the sidecar both reach PostgreSQL over TLS
(sslmode=require) and authenticate clients with SCRAM; pgbench talks plain TCP to both poolers. Direct
PostgreSQL only accepts TLS, so its numbers include TLS on every connection.
Machines are noisy: compare the columns of one run, never runs on different days. The sidecar's CPU time per
transaction (the cpu columns) moves less with other load than tps does: compare code versions with it, and
run the same version twice to see how much it moves by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import subprocess
import sys
import tempfile

import benchlib

from poolkit.dev.devstack import DevStack, free_port

WORKLOADS = [
    ("-S -c 10", ["-S", "-c", "10"]),
    ("-S -c 50", ["-S", "-c", "50"]),
    ("-S -C -c 50", ["-S", "-C", "-c", "50"]),
]
PREPARED_WORKLOADS = [
    ("-S -c 10", ["-S", "-c", "10"]),
    ("-S -c 50", ["-S", "-c", "50"]),
]


def pgbench(url: str, args: list[str], seconds: int, mode: str = "simple") -> float:
    return benchlib.pgbench(url, args, seconds, mode).tps


def pgbench_cpu(url: str, args: list[str], seconds: int, pid: int) -> tuple[float, float]:
    """tps, and the CPU time process ``pid`` spent per transaction (µs): steadier than tps on a shared box."""
    before = benchlib.cpu_seconds(pid)
    result = benchlib.pgbench(url, args, seconds)
    used = benchlib.cpu_seconds(pid) - before
    return result.tps, used / max(result.transactions, 1) * 1e6


def start_sidecar(
    stack: DevStack, pool_size: int, port: int, http_port: int, pipeline_depth: int | None = None
) -> subprocess.Popen[str]:
    settings = {
        "POOLKIT_DIRECT_URL": stack.url(via="direct", sslmode="require"),
        "POOLKIT_SIDECAR_UPSTREAM": "direct",
        "POOLKIT_SIDECAR_MAX_SIZE": str(pool_size),
        "POOLKIT_SIDECAR_USERS": benchlib.sidecar_users(stack.app_user, stack.app_password),
    }
    if pipeline_depth is not None:
        settings["POOLKIT_SIDECAR_PIPELINE_DEPTH"] = str(pipeline_depth)
    return benchlib.start_sidecar(settings, port, http_port)


server_connections = benchlib.server_connections
rss_kib = benchlib.rss_kib


async def hold_idle_clients(port: int, user: str, password: str, count: int) -> list[object]:
    import asyncpg  # noqa: PLC0415

    conns: list[object] = []
    for start in range(0, count, 200):
        batch = await asyncio.gather(
            *(
                asyncpg.connect(
                    host="127.0.0.1",
                    port=port,
                    user=user,
                    password=password,
                    database="app",
                    ssl=False,
                    statement_cache_size=0,
                )
                for _ in range(min(200, count - start))
            )
        )
        conns.extend(batch)
    return conns


def idle_memory(pid: int, port: int, user: str, password: str, count: int) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        before = rss_kib(pid)
        conns = await hold_idle_clients(port, user, password, count)
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
        await asyncio.gather(*(c.close() for c in conns))  # type: ignore[attr-defined]
        return before, after

    return asyncio.run(run())


def simple_table(targets: dict[str, str], pids: dict[str, int], seconds: int, pool_size: int) -> None:
    """pgbench -M simple through every target; the sidecar's CPU per transaction beside its tps."""
    print(f"pgbench -M simple -j 2 -T {seconds}; pool size {pool_size} for both poolers")
    print("depth0: the sidecar with pipeline_depth=0 (no pipelining across clients)")
    print("cpu: the sidecar process's CPU time per transaction (µs; compare code versions with this)")
    print(
        f"{'workload':<14}{'direct':>10}{'pgbouncer':>11}{'sidecar':>10}{'depth0':>9}"
        f"{'sidecar/pgb':>13}{'depth0/pgb':>12}{'sidecar cpu':>13}{'depth0 cpu':>12}"
    )
    for name, wargs in WORKLOADS:
        tps: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for target, url in targets.items():
            if target in pids:
                tps[target], cpu[target] = pgbench_cpu(url, wargs, seconds, pids[target])
            else:
                tps[target] = pgbench(url, wargs, seconds)
        ratio = tps["sidecar"] / tps["pgbouncer"]
        flat_ratio = tps["depth0"] / tps["pgbouncer"]
        print(
            f"{name:<14}{tps['direct']:>10.0f}{tps['pgbouncer']:>11.0f}{tps['sidecar']:>10.0f}"
            f"{tps['depth0']:>9.0f}{ratio:>13.2f}{flat_ratio:>12.2f}"
            f"{cpu['sidecar']:>13.1f}{cpu['depth0']:>12.1f}"
        )


def prepared_table(targets: dict[str, str], seconds: int, pool_size: int) -> None:
    """pgbench -M prepared through the sidecars against -M simple through PgBouncer."""
    print(
        f"\nnamed prepared statements: pgbench -S -M prepared through the sidecar vs -M simple through "
        f"PgBouncer (-j 2 -T {seconds}, pool size {pool_size}; goal: ratio >= 1.25)"
    )
    print(f"{'workload':<14}{'pgb simple':>11}{'sidecar prep':>14}{'depth0 prep':>13}{'ratio':>8}")
    for name, wargs in PREPARED_WORKLOADS:
        bouncer_tps = pgbench(targets["pgbouncer"], wargs, seconds, "simple")
        sidecar_tps = pgbench(targets["sidecar"], wargs, seconds, "prepared")
        flat_tps = pgbench(targets["depth0"], wargs, seconds, "prepared")
        print(f"{name:<14}{bouncer_tps:>11.0f}{sidecar_tps:>14.0f}{flat_tps:>13.0f}{sidecar_tps / bouncer_tps:>8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--pool-size", type=int, default=3)
    parser.add_argument("--idle-clients", type=int, default=5000)
    parser.add_argument("--only", choices=["simple", "prepared"], help="run one of the two tables only")
    parser.add_argument("--cold", action="store_true", help="no warm-up burst: the poolers open connections as needed")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    with DevStack(max_connections=100, pgbouncer_max_client_conn=20000) as stack:
        bouncer = stack.start_pgbouncer(
            client_tls=False, pool_size=args.pool_size, log_connections="0", log_disconnections="0"
        )
        benchlib.pgbench_init(stack.url(via="direct"))
        port, http_port = free_port(), free_port()
        sidecar = start_sidecar(stack, args.pool_size, port, http_port)
        # The same sidecar without pipelining across clients (pipeline_depth=0): what that feature adds.
        flat_port, flat_http_port = free_port(), free_port()
        flat = start_sidecar(stack, args.pool_size, flat_port, flat_http_port, pipeline_depth=0)
        credentials = f"{stack.app_user}:{stack.app_password}"
        try:
            targets = {
                "direct": stack.url(via="direct", sslmode="require"),
                "pgbouncer": bouncer.url(sslmode="disable"),
                "sidecar": f"postgresql://{credentials}@127.0.0.1:{port}/app?sslmode=disable",
                "depth0": f"postgresql://{credentials}@127.0.0.1:{flat_port}/app?sslmode=disable",
            }
            if not args.cold:
                for target in ("pgbouncer", "sidecar", "depth0"):
                    pgbench(targets[target], ["-S", "-c", "50"], 2)
            if args.only != "prepared":
                simple_table(targets, {"sidecar": sidecar.pid, "depth0": flat.pid}, args.seconds, args.pool_size)
            if args.only != "simple":
                prepared_table(targets, args.seconds, args.pool_size)
            open_now = server_connections(http_port)
            print(f"sidecar server connections open after the runs: {open_now} (pool size {args.pool_size})")
            if args.idle_clients:
                before, after = idle_memory(sidecar.pid, port, stack.app_user, stack.app_password, args.idle_clients)
                per = (after - before) / args.idle_clients
                print(
                    f"sidecar RSS with {args.idle_clients} idle clients: {before} KiB -> {after} KiB "
                    f"= {per:.1f} KiB per client"
                )
        finally:
            for proc in (sidecar, flat):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    tempfile.tempdir = tempfile.gettempdir()
    sys.exit(main())
