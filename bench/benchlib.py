"""Helpers the bench scripts share: pgbench runs with latency and errors, sidecar processes, CPU readings.

Imported as ``benchlib`` by the scripts in this directory (``python bench/x.py`` puts it on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from poolkit.dev.devstack import find_pg_binary

REPO = Path(__file__).resolve().parents[1]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class PgbenchResult:
    """One pgbench run: tps as pgbench reports it, latency from its per-transaction log, and errors.

    ``errors`` counts failed transactions plus clients pgbench aborted (it aborts a client on its first
    error that is not a serialization failure or deadlock, such as a missing prepared statement).
    """

    tps: float
    transactions: int
    mean_ms: float
    p99_ms: float
    errors: int
    first_error: str = ""


def pgbench(url: str, args: list[str], seconds: int, mode: str = "simple", *, check: bool = True) -> PgbenchResult:
    """Run pgbench -n -M ``mode`` -T ``seconds`` ``args`` against ``url`` (the caller's PG* variables removed).

    With ``check`` (the default) a run with errors raises; without, the errors are counted and returned.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    clients = int(args[args.index("-c") + 1]) if "-c" in args else 1
    with tempfile.TemporaryDirectory(prefix="pgbench-log-") as logs:
        prefix = str(Path(logs) / "tx")
        argv = [
            str(find_pg_binary("pgbench")),
            "-n",
            "-M",
            mode,
            "-j",
            str(min(2, clients)),
            "-T",
            str(seconds),
            "--log",
            f"--log-prefix={prefix}",
            *args,
            url,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds * 4 + 120, check=False)
        latencies: list[int] = []
        failed_in_log = 0
        for path in Path(logs).iterdir():
            for line in path.read_text().splitlines():
                fields = line.split()
                if len(fields) < 3:
                    continue
                if fields[2].isdigit():
                    latencies.append(int(fields[2]))
                elif fields[2] == "failed":
                    failed_in_log += 1
    tps_match = re.search(r"tps = ([\d.]+) \(", done.stdout)
    failed_match = re.search(r"number of failed transactions: (\d+)", done.stdout)
    aborted = re.findall(r"client \d+ (?:script \d+ )?aborted[^\n]*", done.stderr)
    errors = len(aborted) + max(int(failed_match.group(1)) if failed_match else 0, failed_in_log)
    if tps_match is None and not aborted:
        raise RuntimeError(f"pgbench failed ({done.returncode}): {done.stderr[-2000:]}")
    first_error = ""
    if aborted:
        found = re.search(r"aborted in [^:]*: (?:ERROR|FATAL):\s*([^\n]*)", done.stderr)
        first_error = found.group(1).strip() if found else aborted[0]
    if check and (errors or done.returncode != 0):
        raise RuntimeError(f"pgbench had {errors} errors ({done.returncode}): {done.stderr[-2000:]}")
    latencies.sort()
    return PgbenchResult(
        tps=float(tps_match.group(1)) if tps_match else 0.0,
        transactions=len(latencies),
        mean_ms=statistics.fmean(latencies) / 1000 if latencies else float("nan"),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000 if latencies else float("nan"),
        errors=errors,
        first_error=first_error,
    )


def pgbench_init(url: str) -> None:
    """pgbench's tables at scale 1 (``pgbench -i``) in the database at ``url``."""
    done = subprocess.run(
        [str(find_pg_binary("pgbench")), "-i", "-q", "-s", "1", url], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)


def start_sidecar(settings: dict[str, str], port: int, http_port: int) -> subprocess.Popen[str]:
    """``python -m poolkit.sidecar`` on ``port``; ``settings`` are ``POOLKIT_*`` variables (nothing inherited)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_") and k != "DATABASE_URL"}
    env.update({"POOLKIT_SIDECAR_MAX_CLIENT_CONN": "20000", "POOLKIT_SIDECAR_QUERY_WAIT_TIMEOUT": "120", **settings})
    argv = [sys.executable, "-m", "poolkit.sidecar", "--listen-port", str(port), "--http-port", str(http_port)]
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the sidecar exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the sidecar did not start")


def sidecar_users(user: str, password: str) -> str:
    """``POOLKIT_SIDECAR_USERS`` for one client role."""
    return json.dumps({user: password})


def stop_process(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, wait up to 30 s, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_connections(http_port: int) -> int:
    """How many upstream connections the sidecar has open (its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.finditer(r"^poolkit_sidecar_servers\{[^}]*\} ([\d.e+]+)$", text, re.MULTILINE)
    return round(sum(float(match.group(1)) for match in found))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")
