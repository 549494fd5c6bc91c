"""prometheus-client multiprocess mode: two workers, one scrape, the sum of both (and gunicorn for real)."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from prom_harness import Samples, free_port, scrape

import poolkit.metrics
from poolkit.dev.devstack import DevStack

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUNICORN_INSTALL = f"{sys.executable} -m pip install gunicorn (it belongs in the dev extra)"

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import poolkit, poolkit.metrics

    slow, serve = int(sys.argv[1]), sys.argv[2] == "serve"

    async def main():
        pool = await poolkit.create_pool(
            name="mp", max_size=2, slow_query_seconds=0.05, idle_timeout=300, pool_mode="transaction"
        )
        await asyncio.gather(*(pool.fetch("select pg_sleep($1)", 0.1) for _ in range(slow)))
        return pool

    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(main())  # kept open: its connections are the workers' gauges
    port = poolkit.metrics.serve(0).server_port if serve else 0
    print(port, flush=True)
    sys.stdin.read()
    loop.run_until_complete(pool.close())
    """
)


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def mp_dir() -> Iterator[pathlib.Path]:
    path = pathlib.Path(tempfile.mkdtemp(prefix="poolkit-mp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def worker_env(stack: DevStack, mp_dir: pathlib.Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOLKIT_", "PROMETHEUS_"))}
    env.update(stack.env())
    if mp_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(mp_dir)
    return env


def start_worker(env: dict[str, str], slow: int, *, serve: bool) -> Worker:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(slow), "serve" if serve else "no"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        raise AssertionError(f"worker failed:\n{proc.communicate(timeout=30)[1]}")
    return Worker(proc, int(line))


def poll(url: str, predicate: Callable[[Samples], bool], timeout: float = 20.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if predicate(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for _, v in samples.find(name, **labels))


@pytest.mark.parametrize("multiprocess", [True, False], ids=["multiprocess", "without"])
def test_one_scrape_shows_the_sum_of_two_workers(
    stack: DevStack, mp_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch, multiprocess: bool
) -> None:
    env = worker_env(stack, mp_dir if multiprocess else None)
    a = start_worker(env, 2, serve=True)
    b = start_worker(env, 3, serve=False)
    try:
        expected = 4 if multiprocess else 2
        s = poll(a.url, lambda s: total(s, "poolkit_pool_max_connections", pool="mp") >= expected)
        if not multiprocess:
            # The failure multiprocess mode prevents: the answering worker reports only itself.
            assert total(s, "poolkit_slow_queries_total", pool="mp") == 2
            assert total(s, "poolkit_pool_max_connections", pool="mp") == 2
            return
        assert total(s, "poolkit_slow_queries_total", pool="mp") == 5
        assert total(s, "poolkit_connections_opened_total", pool="mp") == 4  # 2 per worker
        assert total(s, "poolkit_query_duration_seconds_count", pool="mp") == 5
        # Pool gauges are livesum gauges written by each worker: the sum of both pools.
        assert total(s, "poolkit_pool_max_connections", pool="mp") == 4
        assert s.value("poolkit_pool_connections", pool="mp", state="idle") == 4
        assert s.value("poolkit_pool_connections", pool="mp", state="in_use") == 0
        assert "pid" not in {k for labels, _ in s.find("poolkit_pool_max_connections") for k in labels}

        # Worker b goes away; the child_exit hook's call drops its gauges, its counters stay counted.
        b.stop()
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mp_dir))
        poolkit.metrics.mark_process_dead(b.proc.pid)
        s = scrape(a.url)
        assert total(s, "poolkit_pool_max_connections", pool="mp") == 2
        assert s.value("poolkit_pool_connections", pool="mp", state="idle") == 2
        assert total(s, "poolkit_slow_queries_total", pool="mp") == 5
    finally:
        a.stop()
        b.stop()


def test_the_misspelt_multiprocess_variable_fails_loudly(stack: DevStack) -> None:
    env = worker_env(stack, None)
    env["PROMETHEUS_MULTIPROCESS_DIR"] = "/tmp/nowhere"
    proc = subprocess.run(
        [sys.executable, "-c", "import poolkit; poolkit.get_pool(name='x')"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "ConfigError" in proc.stderr
    assert "PROMETHEUS_MULTIPROC_DIR" in proc.stderr


# --------------------------------------------------------------------------- gunicorn, for real


@pytest.fixture
def gunicorn(stack: DevStack, mp_dir: pathlib.Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    binary = shutil.which("gunicorn", path=str(pathlib.Path(sys.executable).parent))
    if binary is None:
        raise RuntimeError(f"gunicorn is missing: install it with `{GUNICORN_INSTALL}`")
    port = free_port()
    env = worker_env(stack, mp_dir)
    env.update({"BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "2", "POOLKIT_POOL_MODE": "transaction"})
    example = ROOT / "examples" / "gunicorn"
    proc = subprocess.Popen(
        [binary, "-c", str(example / "gunicorn.conf.py"), "--chdir", str(example), "app:app"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"gunicorn did not start:\n{proc.communicate(timeout=30)[1].decode()}")
        time.sleep(0.2)
    try:
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_gunicorn_two_workers_scrape_sums_both(gunicorn: tuple[str, subprocess.Popen[bytes]]) -> None:
    base, _master = gunicorn
    # Four requests at once on two sync workers: each worker serves some (a busy one does not accept).
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        bodies = list(ex.map(lambda _: httpx.get(f"{base}/query", timeout=30).text, range(4)))
    pids = {int(b.split()[0].removeprefix("worker=")) for b in bodies}
    assert len(pids) == 2, bodies

    labels = {"pool": "gunicorn-example", "driver": "psycopg-sync", "route": "pooled"}
    s = poll(f"{base}/metrics", lambda s: total(s, "poolkit_pool_max_connections", **labels) == 4)
    assert total(s, "poolkit_pool_max_connections", **labels) == 4  # 2 workers x max_size 2
    assert s.value("poolkit_query_duration_seconds_count", **labels) == 4  # every request, whichever worker
    assert s.value("poolkit_pool_connections", state="in_use", **labels) == 0

    # One worker dies: gunicorn's child_exit hook (mark_process_dead) takes its pool out of the gauges;
    # the replacement has no pool until its first request.
    os.kill(pids.pop(), signal.SIGKILL)
    s = poll(f"{base}/metrics", lambda s: total(s, "poolkit_pool_max_connections", **labels) == 2)
    assert total(s, "poolkit_pool_max_connections", **labels) == 2
    assert s.value("poolkit_query_duration_seconds_count", **labels) == 4
