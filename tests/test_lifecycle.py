"""Pool lifecycle on the real stack: idle timeout, connect timeout, exhaustion, reloads, fork, new event loops."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import socket
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from conftest import backend_pids  # type: ignore[import-not-found]

import poolkit
from poolkit.dev.devstack import DevStack
from poolkit.pool.registry import forget_pools


def _app_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_idle_timeout_closes_the_backend(stack: DevStack, driver: str) -> None:
    app = _app_name()
    pool = await poolkit.create_pool(driver=driver, pooled_url=stack.direct_url, idle_timeout=1, application_name=app)
    try:
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        assert backend_pids(stack, app) == {pid}
        # psycopg-pool shrinks once per idle period, so allow a few periods on a loaded machine.
        assert await asyncio.to_thread(_wait_for, lambda: not backend_pids(stack, app), 15)
        assert "idle=0" in repr(pool)
        assert await pool.fetchval("SELECT 1") == 1  # and it reconnects on demand
    finally:
        await pool.close()


def test_sync_idle_timeout_closes_the_backend(stack: DevStack) -> None:
    app = _app_name()
    pool = poolkit.create_sync_pool(pooled_url=stack.direct_url, idle_timeout=1, application_name=app)
    try:
        assert len(backend_pids(stack, app)) == 1
        assert _wait_for(lambda: not backend_pids(stack, app), 15)
    finally:
        pool.close()


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A socket that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for s in held:
        s.close()
    server.close()


@pytest.mark.parametrize(("driver", "timeout"), [("asyncpg", 1.0), ("psycopg", 2.0)])
async def test_connect_timeout_against_a_silent_server(black_hole: int, driver: str, timeout: float) -> None:
    url = f"postgresql://app:pw@127.0.0.1:{black_hole}/app"
    started = time.monotonic()
    with pytest.raises(poolkit.ConnectTimeout) as info:
        await poolkit.create_pool(driver=driver, pooled_url=url, connect_timeout=timeout)
    elapsed = time.monotonic() - started
    assert elapsed < timeout + 1.0, elapsed  # libpq's floor is 2 s, hence psycopg's larger timeout
    assert f"connect_timeout={timeout:g}s" in str(info.value)


def test_sync_connect_timeout_against_a_silent_server(black_hole: int) -> None:
    started = time.monotonic()
    with pytest.raises(poolkit.ConnectTimeout):
        poolkit.create_sync_pool(pooled_url=f"postgresql://app:pw@127.0.0.1:{black_hole}/app", connect_timeout=2)
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_exhaustion_raises_pool_timeout_naming_the_pool(stack: DevStack, driver: str) -> None:
    pool = await poolkit.create_pool(driver=driver, pooled_url=stack.direct_url, acquire_timeout=0.5, name="tiny")
    try:
        async with pool.acquire():
            assert repr(pool).endswith("max=1 in_use=1 idle=0 waiting=0>")
            started = time.monotonic()
            waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
            while pool.waiting == 0 and not waiter.done():
                await asyncio.sleep(0)  # let the waiter run up to its wait
            assert "waiting=1" in repr(pool)
            with pytest.raises(poolkit.PoolTimeout) as info:
                await waiter
            elapsed = time.monotonic() - started
        assert 0.45 <= elapsed < 2.0, elapsed
        err = info.value
        assert (err.pool, err.max_size, err.waiting, err.timeout) == ("tiny", 1, 1, 0.5)
        for fragment in (
            "'tiny'",
            "all 1 connection",
            "0.5s",
            "1 caller(s) waited",
            "POOLKIT_ACQUIRE_TIMEOUT",
        ):
            assert fragment in str(err)
        assert await pool.fetchval("SELECT 2") == 2  # the pool serves again once the holder is back
    finally:
        await pool.close()


def test_sync_exhaustion(stack: DevStack) -> None:
    pool = poolkit.create_sync_pool(pooled_url=stack.direct_url, acquire_timeout=0.5, name="tiny-sync")
    try:
        with pool.acquire():
            started = time.monotonic()
            with pytest.raises(poolkit.PoolTimeout, match=r"'tiny-sync'.*all 1 connection"):
                pool.fetchval("SELECT 1")
            assert 0.45 <= time.monotonic() - started < 2.0
        assert pool.fetchval("SELECT 3") == 3
    finally:
        pool.close()


def test_repr_shows_state_and_no_secret(stack: DevStack) -> None:
    pool = poolkit.create_sync_pool(pooled_url=stack.direct_url, name="app", max_size=3)
    try:
        assert repr(pool) == "<SyncPool app pooled psycopg-sync mode=direct max=3 in_use=0 idle=1 waiting=0>"
        with pool.acquire():
            assert "in_use=1 idle=0" in repr(pool)
        assert stack.app_password not in repr(pool) + repr(pool.settings) + str(pool.stats())
    finally:
        pool.close()
    assert repr(pool) == "<SyncPool app pooled psycopg-sync closed>"


USER_MODULE = """
import poolkit
pool = poolkit.get_pool()
"""


async def test_get_pool_survives_100_reloads(stack: DevStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app_name()
    monkeypatch.setenv("POOLKIT_POOLED_URL", stack.direct_url)
    monkeypatch.setenv("POOLKIT_APPLICATION_NAME", app)
    (tmp_path / "userapp_db.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    forget_pools()
    import userapp_db  # type: ignore[import-not-found]

    first = userapp_db.pool
    ours = [
        sys.modules[m]
        for m in ("poolkit.pool.async_pool", "poolkit.pool.registry", "poolkit.core.settings", "poolkit.obs.metrics")
    ]
    try:
        for i in range(100):
            importlib.reload(userapp_db)
            if i % 10 == 0:
                for module in ours:
                    importlib.reload(module)
            assert await userapp_db.pool.fetchval("SELECT 1") == 1
        assert userapp_db.pool is first
        assert len(backend_pids(stack, app)) == first.max_size == 1
    finally:
        await first.close()
        forget_pools()


async def test_changed_settings_give_a_new_pool_and_close_the_old(stack: DevStack) -> None:
    forget_pools()
    app = _app_name()
    old = poolkit.get_pool(pooled_url=stack.direct_url, application_name=app, name="reloaded")
    await old.fetchval("SELECT 1")
    assert poolkit.get_pool(pooled_url=stack.direct_url, application_name=app, name="reloaded") is old
    new = poolkit.get_pool(pooled_url=stack.direct_url, application_name=app, name="reloaded", idle_timeout=5)
    assert new is not old
    assert await asyncio.to_thread(_wait_for, lambda: old.closed and not backend_pids(stack, app), 10)
    await new.close()
    forget_pools()


def test_twenty_asyncio_runs_leave_no_backend_behind(stack: DevStack, monkeypatch: pytest.MonkeyPatch) -> None:
    app = _app_name()
    monkeypatch.setenv("POOLKIT_POOLED_URL", stack.direct_url)
    monkeypatch.setenv("POOLKIT_APPLICATION_NAME", app)
    forget_pools()

    # Without poolkit: a pool made in one invocation's loop is dead in the next one.
    raw: list[asyncpg.Pool] = []

    async def raw_handler() -> int:
        if not raw:
            raw.append(await asyncpg.create_pool(stack.direct_url, min_size=1, max_size=1))
        return int(await raw[0].fetchval("SELECT 1"))

    asyncio.run(raw_handler())
    with pytest.raises(Exception, match=r"different loop|Event loop is closed|another operation|attached"):
        asyncio.run(raw_handler())

    pids: set[int] = set()

    async def handler() -> None:
        pool = poolkit.get_pool()
        pids.add(await pool.fetchval("SELECT pg_backend_pid()"))

    for _ in range(20):
        asyncio.run(handler())
        # Each invocation's connections end with its loop: nothing accumulates.
        assert _wait_for(lambda: len(backend_pids(stack, app)) == 0, 5)
    assert len(pids) == 20
    forget_pools()


def test_forked_child_uses_its_own_backend(stack: DevStack) -> None:
    # Without the fork guard: a child closing its inherited copy of a connection ends the parent's session.
    victim = psycopg.connect(stack.direct_url)
    child = os.fork()
    if child == 0:
        victim.close()  # libpq sends Terminate on the shared socket
        os._exit(0)
    os.waitpid(child, 0)
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")

    pool = poolkit.create_sync_pool(pooled_url=stack.direct_url, name="forked")
    parent_pid = pool.fetchval("SELECT pg_backend_pid()")
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            child_pid = pool.fetchval("SELECT pg_backend_pid()")
            pool.close()
            os.write(write_fd, str(child_pid).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(child, 0)
    child_pid = int(os.read(read_fd, 32) or b"0")
    os.close(read_fd)
    assert status == 0 and child_pid not in (0, parent_pid)
    assert pool.fetchval("SELECT pg_backend_pid()") == parent_pid  # the parent's session is untouched
    pool.close()


async def test_forked_child_with_async_pool(stack: DevStack) -> None:
    pool = await poolkit.create_pool(pooled_url=stack.direct_url, name="forked-async")
    parent_pid = await pool.fetchval("SELECT pg_backend_pid()")
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        signal.alarm(20)  # without the fork guard, closing the parent's pool here can hang on its dead loop

        async def work() -> int:
            backend = int(await pool.fetchval("SELECT pg_backend_pid()"))
            await pool.close()  # what a worker's shutdown hook does: it must close only the child's connections
            return backend

        try:
            os.write(write_fd, str(asyncio.run(work())).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    await asyncio.to_thread(os.waitpid, child, 0)
    child_pid = int(os.read(read_fd, 32) or b"0")
    os.close(read_fd)
    assert child_pid not in (0, parent_pid)
    assert await pool.fetchval("SELECT pg_backend_pid()") == parent_pid
    await pool.close()


async def test_provider_holds_both_drivers(stack: DevStack) -> None:
    provider = poolkit.DatabaseProvider(pooled_url=stack.direct_url)
    a = await provider.asyncpg()
    b = await provider.psycopg()
    assert a is await provider.asyncpg() and b is await provider.psycopg()
    assert (a.driver, b.driver) == ("asyncpg", "psycopg")
    assert await a.fetchval("SELECT 1") == await b.fetchval("SELECT 1") == 1
    await provider.disconnect()
    assert a.closed and b.closed
    c = await provider.asyncpg()
    assert c is not a
    provider.reset()
    assert await provider.asyncpg() is not c
    await c.close()
    assert poolkit.get_provider() is poolkit.get_provider()


async def test_connect_errors_are_translated(stack: DevStack) -> None:
    with pytest.raises(poolkit.AuthenticationFailed) as info:
        await poolkit.create_pool(pooled_url=stack.url(via="direct", password="Wrong-Pa55word"))
    assert "Wrong-Pa55word" not in str(info.value) and "rejected the password" in str(info.value)
    with pytest.raises(poolkit.ConnectError) as dns:
        await poolkit.create_pool(pooled_url="postgresql://app:pw@no-such-host.invalid:5432/app")
    assert dns.value.reason == "dns"
    stack.psql(
        "DROP ROLE IF EXISTS limited; CREATE ROLE limited LOGIN PASSWORD 'limited-pw' CONNECTION LIMIT 1;"
        "GRANT CONNECT ON DATABASE app TO limited;"
    )
    url = stack.url(via="direct", user="limited", password="limited-pw")
    holder = await asyncpg.connect(url)
    try:
        with pytest.raises(poolkit.TooManyConnections, match="53300"):
            await poolkit.create_pool(pooled_url=url)
    finally:
        await holder.close()
