"""Sidecar fixtures: a sidecar in a background thread (its own uvloop loop) and one as a subprocess.

``sidecar``          a running in-process sidecar (trust auth, max_size=3) in front of ``stack``'s
                     direct PostgreSQL (TLS + SCRAM upstream); blocking clients can be used freely.
``sidecar_factory``  start more with different settings: ``sidecar_factory(max_size=1, ...)``.
``sidecar_process``  ``python -m poolkit.sidecar`` as a child process, for SIGTERM/SIGHUP tests.
``pgbench_tables``   pgbench's tables (scale 1) in the app database, loaded straight into PostgreSQL.
``run``              a client binary (psql, pgbench) with the caller's PG* environment removed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from poolkit.core.dsn import Dsn
from poolkit.dev.devstack import DevStack, find_pg_binary, free_port
from poolkit.sidecar.policy.config import SidecarSettings, load_sidecar_settings
from poolkit.sidecar.service.app import Sidecar

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


class SidecarThread:
    """A :class:`Sidecar` running on a uvloop loop in a daemon thread."""

    def __init__(self, settings: SidecarSettings) -> None:
        self.settings = settings
        self.app: Sidecar | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="sidecar", daemon=True)
        self._ready: Future[None] = Future()

    def _main(self) -> None:
        loop = uvloop.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        app = Sidecar(self.settings)
        try:
            await app.start()
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self.app = app
        self._ready.set_result(None)
        await app.wait_stopped()

    def start(self) -> SidecarThread:
        self._thread.start()
        self._ready.result(timeout=30)
        return self

    def call(self, fn: Callable[[Sidecar], T]) -> T:
        """Run ``fn(app)`` on the sidecar's loop (state is only consistent there)."""
        assert self.loop is not None and self.app is not None
        app = self.app

        async def run() -> T:
            return fn(app)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def stop(self, grace: float = 0.0) -> None:
        if self.loop is None or self.app is None or not self._thread.is_alive():
            return
        app = self.app
        asyncio.run_coroutine_threadsafe(app.shutdown(grace), self.loop).result(timeout=60)
        self._thread.join(timeout=30)

    @property
    def port(self) -> int:
        assert self.app is not None
        return self.app.port

    @property
    def http_port(self) -> int:
        assert self.app is not None
        return self.app.http_port

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"

    def url(self, *, user: str = "app", password: str | None = None, database: str = "app", **params: str) -> str:
        """A client URL to this sidecar (plain TCP on loopback)."""
        query = {"sslmode": "disable", **params}
        return Dsn(
            host="127.0.0.1",
            port=self.port,
            user=user,
            database=database,
            password=password,
            params=tuple(query.items()),
        ).to_url()


def upstream_settings(stack: DevStack, **overrides: Any) -> SidecarSettings:
    """Sidecar settings forwarding to the stack's direct PostgreSQL (TLS verified against its CA)."""
    base: dict[str, Any] = {
        "direct_url": stack.url(via="direct", sslmode="verify-full"),
        "upstream": "direct",
        "sslrootcert": stack.ca_file,
        "listen_port": 0,
        "http_port": 0,
        "max_size": 3,
    }
    base.update(overrides)
    for name in list(os.environ):
        if name.startswith("POOLKIT_SIDECAR_"):
            raise RuntimeError(f"{name} is set in the environment; unset it for the sidecar tests")
    return load_sidecar_settings(None, **base)


@pytest.fixture
def sidecar_factory(stack: DevStack) -> Iterator[Callable[..., SidecarThread]]:
    started: list[SidecarThread] = []

    def factory(**overrides: Any) -> SidecarThread:
        running = SidecarThread(upstream_settings(stack, **overrides)).start()
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


@pytest.fixture
def sidecar(sidecar_factory: Callable[..., SidecarThread]) -> SidecarThread:
    """A sidecar with trust auth and max_size=3 in front of the stack's PostgreSQL."""
    return sidecar_factory()


def sidecar_argv(port: int, http_port: int, config_file: Path | None = None) -> list[str]:
    """The command line of ``python -m poolkit.sidecar`` on these ports (the Dockerfile's entry point)."""
    argv = [sys.executable, "-m", "poolkit.sidecar", "--listen-port", str(port), "--http-port", str(http_port)]
    return [*argv, "--config", str(config_file)] if config_file is not None else argv


def stop_child(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    """SIGTERM (the image's STOPSIGNAL), wait, kill if it hangs; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode


class SidecarProcess:
    """``python -m poolkit.sidecar`` in a child process; ``stderr`` collects its log lines."""

    def __init__(self, env: dict[str, str], config_file: Path | None = None) -> None:
        self.port = free_port()
        self.http_port = free_port()
        argv = sidecar_argv(self.port, self.http_port, config_file)
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sidecar did not start listening within 30s")

    def url(self, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
        return f"postgresql://app@127.0.0.1:{self.port}/app?{query}"

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


@pytest.fixture
def sidecar_process(stack: DevStack) -> Iterator[Callable[..., SidecarProcess]]:
    started: list[SidecarProcess] = []

    def factory(config_file: Path | None = None, **env_settings: str) -> SidecarProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POOLKIT_") and k != "DATABASE_URL"}
        env.update(
            {
                "POOLKIT_DIRECT_URL": stack.url(via="direct", sslmode="verify-full"),
                "POOLKIT_SSLROOTCERT": str(stack.ca_file),
                "POOLKIT_SIDECAR_UPSTREAM": "direct",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update({f"POOLKIT_SIDECAR_{k.upper()}": v for k, v in env_settings.items()})
        process = SidecarProcess(env, config_file)
        started.append(process)
        return process

    yield factory
    for process in started:
        process.stop()


def run(argv: list[str], *, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a client binary without the caller's PG* variables (they would redirect it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input, check=False)


@pytest.fixture(scope="module")
def pgbench_tables(stack: DevStack) -> None:
    """pgbench's tables (scale 1) in the app database, loaded straight into PostgreSQL."""
    done = run([str(find_pg_binary("pgbench")), "-i", "-q", "-s", "1", stack.url(via="direct")], timeout=300)
    assert done.returncode == 0, done.stderr
