"""Soak: thousands of mostly idle asyncpg clients through one sidecar for a minute; latency and sidecar memory.

    .venv/bin/python bench/soak.py [--clients 2000] [--workers 4] [--seconds 60] [--max-size 3]

Standalone it starts a DevStack and a sidecar process (trust auth on loopback, ``max_size`` upstream
connections); tests/reliability/test_soak.py runs the same :func:`drive` against its own sidecar and asserts
on the :class:`Report`. Clients are spread over worker processes (one Python process cannot drive 2,000
connections fast enough on two cores); each connects during a short ramp, then, once all are connected, loops:
sleep 2-5 s, then one operation: a read (69 %), a write transaction (20 %: BEGIN, UPDATE, INSERT, COMMIT), a
slow query (1 %, pg_sleep 50 ms) or a disconnect and reconnect (10 %). That keeps three upstream connections
about two-thirds busy: a soak, not a saturation test. Every second the sidecar's VmRSS and CPU time are read
from /proc and, every five, its client gauge from /metrics. Latency is measured per operation on the client
side (so it includes the client's own scheduling), over the steady window after the ramp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ACCOUNTS = 1000  # rows in soak_accounts (SETUP_SQL)
RAMP = 8.0  # seconds for every client to connect before the measured window starts
SLOW_SLEEP = 0.05

SETUP_SQL = """
DROP TABLE IF EXISTS soak_accounts, soak_log;
CREATE TABLE soak_accounts (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0);
INSERT INTO soak_accounts (id) SELECT g FROM generate_series(1, 1000) g;
CREATE TABLE soak_log (id bigserial PRIMARY KEY, account int NOT NULL, at timestamptz NOT NULL DEFAULT now());
"""


# ---------------------------------------------------------------- one worker process


async def _client(url: str, start: float, end: float, rng: random.Random, out: dict[str, Any]) -> None:
    import asyncpg  # noqa: PLC0415 - only worker processes need it

    async def connect() -> Any:
        began = time.monotonic()
        conn = await asyncpg.connect(url, statement_cache_size=0, timeout=30)
        out["connect_seconds"].append(time.monotonic() - began)
        return conn

    await asyncio.sleep(max(0.0, start + rng.uniform(0, RAMP - 2) - time.time()))
    conn = None
    try:
        conn = await connect()
        await asyncio.sleep(max(0.0, start + RAMP - time.time()))  # the window starts with everyone connected
        while True:
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            if time.time() >= end:
                break
            pick = rng.random()
            account = rng.randint(1, ACCOUNTS)
            began = time.monotonic()
            try:
                if pick < 0.69:
                    kind = "read"
                    await conn.fetchval("SELECT v FROM soak_accounts WHERE id = $1", account)
                elif pick < 0.89:
                    kind = "write"
                    async with conn.transaction():
                        await conn.execute("UPDATE soak_accounts SET v = v + 1 WHERE id = $1", account)
                        await conn.execute("INSERT INTO soak_log (account) VALUES ($1)", account)
                    out["writes"] += 1
                elif pick < 0.90:
                    kind = "slow"
                    await conn.execute(f"SELECT pg_sleep({SLOW_SLEEP})")
                else:
                    kind = "reconnect"
                    await conn.close(timeout=30)
                    conn = None
                    conn = await connect()
            except Exception as exc:
                out["errors"].append(f"{kind}: {exc!r}")
                if conn is None or conn.is_closed():
                    conn = await connect()
                continue
            out["ops"].append((round(time.time() - start, 3), kind, round(time.monotonic() - began, 6)))
    except Exception as exc:
        out["errors"].append(f"connect: {exc!r}")
    finally:
        if conn is not None:
            await conn.close(timeout=30)


async def _worker(url: str, clients: int, start: float, seconds: float, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"ops": [], "errors": [], "connect_seconds": [], "writes": 0}
    end = start + RAMP + seconds
    rng = random.Random(seed)
    tasks = [_client(url, start, end, random.Random(rng.random()), out) for _ in range(clients)]
    await asyncio.gather(*tasks)
    return out


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="soak.py worker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.clients + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    try:
        import uvloop  # noqa: PLC0415

        result = uvloop.run(_worker(args.url, args.clients, args.start, args.seconds, args.seed))
    except ImportError:
        result = asyncio.run(_worker(args.url, args.clients, args.start, args.seconds, args.seed))
    json.dump(result, sys.stdout)
    return 0


# ---------------------------------------------------------------- the driver


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def connected_clients(metrics_url: str) -> int:
    import httpx  # noqa: PLC0415

    total = 0.0
    for line in httpx.get(metrics_url, timeout=5).text.splitlines():
        if line.startswith("poolkit_sidecar_clients{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Report:
    """What a soak measured (times in seconds, memory in MiB). ``window`` is the steady part after the ramp."""

    clients: int
    seconds: float
    ops: int = 0
    ops_by_kind: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    writes: int = 0
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max_latency: float = 0.0
    p99_by_kind: dict[str, float] = field(default_factory=dict)
    p99_per_10s: list[float] = field(default_factory=list)
    connect_p99: float = 0.0
    connects: int = 0
    max_connected: int = 0
    rss_mib: list[float] = field(default_factory=list)  # one sample per second of the window
    sidecar_cpu: float = 0.0  # fraction of one core the sidecar used during the window
    wall_seconds: float = 0.0

    @property
    def rss_thirds(self) -> tuple[float, float, float]:
        third = max(1, len(self.rss_mib) // 3)
        parts = [self.rss_mib[:third], self.rss_mib[third : 2 * third], self.rss_mib[2 * third :]]
        return tuple(statistics.fmean(part) if part else float("nan") for part in parts)  # type: ignore[return-value]

    def lines(self) -> list[str]:
        first, middle, last = self.rss_thirds
        return [
            f"soak: {self.clients} clients for {self.seconds:g}s (+{RAMP:g}s ramp), wall {self.wall_seconds:.1f}s",
            f"  operations: {self.ops} ({self.ops / self.seconds:.0f}/s) {self.ops_by_kind}; "
            f"write transactions committed: {self.writes}; errors: {len(self.errors)}",
            f"  latency: p50 {self.p50 * 1000:.1f} ms, p95 {self.p95 * 1000:.1f} ms, p99 {self.p99 * 1000:.1f} ms, "
            f"max {self.max_latency * 1000:.0f} ms; p99 by kind (ms) "
            + str({k: round(v * 1000, 1) for k, v in self.p99_by_kind.items()}),
            "  p99 per 10 s (ms): " + ", ".join(f"{v * 1000:.1f}" for v in self.p99_per_10s),
            f"  connects: {self.connects} (p99 {self.connect_p99 * 1000:.0f} ms); clients connected at once: "
            f"{self.max_connected}",
            f"  sidecar RSS (MiB, 1/s): min {min(self.rss_mib, default=0):.1f}, max {max(self.rss_mib, default=0):.1f};"
            f" thirds {first:.1f} / {middle:.1f} / {last:.1f}; sidecar CPU {self.sidecar_cpu:.0%} of one core",
        ]


def drive(
    url: str, sidecar_pid: int, metrics_url: str, *, clients: int = 2000, workers: int = 4, seconds: float = 60.0
) -> Report:
    """Run the soak against the sidecar at ``url`` (process ``sidecar_pid``) and measure it."""
    began = time.monotonic()
    start = time.time() + 2.0  # time for the workers to start their interpreters
    per_worker = [clients // workers + (i < clients % workers) for i in range(workers)]
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, str(HERE), "worker", "--url", url, "--clients", str(n)),
                *("--start", str(start), "--seconds", str(seconds), "--seed", str(i)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, n in enumerate(per_worker)
    ]
    samples: list[tuple[float, float]] = []
    cpu: list[tuple[float, float]] = []
    connected: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        tick = 0
        while not stop.wait(max(0.0, start + tick - time.time())):
            now = time.time() - start
            if RAMP <= now <= RAMP + seconds:
                samples.append((now, memory_kib(sidecar_pid) / 1024))
                cpu.append((now, cpu_seconds(sidecar_pid)))
            if tick % 5 == 0 and now >= 0:
                try:
                    connected.append(connected_clients(metrics_url))
                except Exception as exc:  # a scrape that fails is a finding, not a crash of the soak
                    connected.append(-1)
                    print(f"soak: metrics scrape failed: {exc!r}", file=sys.stderr)
            tick += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=RAMP + seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"soak worker failed ({proc.returncode}): {err[-2000:]}")
        results.append(json.loads(out))
    stop.set()
    sampler.join(timeout=10)
    report = _summarise(results, clients=clients, seconds=seconds, wall_seconds=time.monotonic() - began)
    report.max_connected = max(connected, default=0)
    report.rss_mib = [rss for _, rss in samples]
    if len(cpu) >= 2:
        report.sidecar_cpu = (cpu[-1][1] - cpu[0][1]) / (cpu[-1][0] - cpu[0][0])
    return report


def _summarise(results: list[dict[str, Any]], *, clients: int, seconds: float, wall_seconds: float) -> Report:
    """The workers' operations inside the measured window, as latencies and counts (the sidecar's side aside)."""
    report = Report(clients=clients, seconds=seconds, wall_seconds=wall_seconds)
    window = [(t, kind, lat) for r in results for t, kind, lat in r["ops"] if RAMP <= t <= RAMP + seconds]
    latencies = [lat for _, _, lat in window]
    report.ops = len(window)
    report.errors = [e for r in results for e in r["errors"]]
    report.writes = sum(r["writes"] for r in results)
    for kind in ("read", "write", "slow", "reconnect"):
        of_kind = [lat for _, k, lat in window if k == kind]
        report.ops_by_kind[kind] = len(of_kind)
        report.p99_by_kind[kind] = percentile(of_kind, 0.99)
    report.p50, report.p95, report.p99 = (percentile(latencies, q) for q in (0.50, 0.95, 0.99))
    report.max_latency = max(latencies, default=0.0)
    for lo in range(int(RAMP), int(RAMP + seconds), 10):
        report.p99_per_10s.append(percentile([lat for t, _, lat in window if lo <= t < lo + 10], 0.99))
    connects = [s for r in results for s in r["connect_seconds"]]
    report.connects = len(connects)
    report.connect_p99 = percentile(connects, 0.99)
    return report


# ---------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-size", type=int, default=3)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE.parent.parent))
    import psycopg  # noqa: PLC0415

    from poolkit.dev.devstack import DevStack  # noqa: PLC0415

    with DevStack() as stack:
        with psycopg.connect(stack.direct_url, autocommit=True) as conn:
            conn.execute(SETUP_SQL)
        port, http_port = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_") and k != "DATABASE_URL"}
        env |= {
            "POOLKIT_DIRECT_URL": stack.url(via="direct", sslmode="verify-full"),
            "POOLKIT_SSLROOTCERT": str(stack.ca_file),
            "POOLKIT_SIDECAR_UPSTREAM": "direct",
            "POOLKIT_SIDECAR_MAX_SIZE": str(args.max_size),
        }
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "poolkit.sidecar", "--listen-port", str(port), "--http-port", str(http_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(2)
            report = drive(
                f"postgresql://app@127.0.0.1:{port}/app?sslmode=disable",
                sidecar.pid,
                f"http://127.0.0.1:{http_port}/metrics",
                clients=args.clients,
                workers=args.workers,
                seconds=args.seconds,
            )
        finally:
            sidecar.terminate()
            sidecar.wait(timeout=60)
    print("\n".join(report.lines()))
    for error in report.errors[:20]:
        print("  error:", error)
    return 1 if report.errors else 0


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
