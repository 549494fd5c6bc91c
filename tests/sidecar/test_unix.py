"""The sidecar's Unix-socket listener: psql, asyncpg and psycopg connect through it; trust applies to it."""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import TYPE_CHECKING

import asyncpg
import psycopg
import pytest

from poolkit.dev.devstack import find_pg_binary

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .conftest import SidecarThread


def _socket_dir(tmp_path: Path) -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be long.
    path = tmp_path / "s"
    path.mkdir()
    return path


async def test_clients_share_three_servers_through_the_unix_socket(
    sidecar_factory: Callable[..., SidecarThread], tmp_path: Path
) -> None:
    sock_dir = _socket_dir(tmp_path)
    sidecar = sidecar_factory(unix_socket_dir=sock_dir)
    socket_file = sock_dir / f".s.PGSQL.{sidecar.port}"
    assert socket_file.exists()

    async def one(i: int) -> tuple[int, int]:
        conn = await asyncpg.connect(host=str(sock_dir), port=sidecar.port, user="app", database="app", ssl=False)
        try:
            async with conn.transaction():
                value = await conn.fetchval("SELECT $1::int * 2", i)
                pid = await conn.fetchval("SELECT pg_backend_pid()")
            return value, pid
        finally:
            await conn.close()

    results = await asyncio.gather(*(one(i) for i in range(30)))
    assert [value for value, _ in results] == [i * 2 for i in range(30)]
    assert 1 <= len({pid for _, pid in results}) <= 3

    with psycopg.connect(host=str(sock_dir), port=sidecar.port, user="app", dbname="app") as conn:
        assert conn.execute("SELECT current_database(), current_user").fetchone() == ("app", "app")

    psql = str(find_pg_binary("psql"))
    done = subprocess.run(
        [psql, "--no-psqlrc", "-X", "-At", "-h", str(sock_dir), "-p", str(sidecar.port), "-U", "app", "-d", "app"],
        input="SELECT 40 + 2;\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"

    sidecar.stop()
    assert not socket_file.exists(), "the socket file is removed on shutdown"


def test_trust_admits_the_unix_socket_and_scram_still_applies_there(
    sidecar_factory: Callable[..., SidecarThread], tmp_path: Path
) -> None:
    sock_dir = _socket_dir(tmp_path)
    sidecar = sidecar_factory(unix_socket_dir=sock_dir, users={"app": "s3cret-unix"})
    with psycopg.connect(host=str(sock_dir), port=sidecar.port, user="app", dbname="app", password="s3cret-unix") as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "app"'):
        psycopg.connect(host=str(sock_dir), port=sidecar.port, user="app", dbname="app", password="wrong").close()
