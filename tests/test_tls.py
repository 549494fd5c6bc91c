"""TLS: require refuses a server without TLS, verify-full refuses a wrong CA and a wrong host name."""

from __future__ import annotations

import pathlib

import asyncpg
import psycopg
import pytest
import trustme

import poolkit
from poolkit.dev.devstack import DevStack


@pytest.fixture
def plain_bouncer(stack: DevStack):  # type: ignore[no-untyped-def]
    bouncer = stack.start_pgbouncer(client_tls=False)
    yield bouncer
    bouncer.stop()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_require_refuses_a_server_without_tls(stack: DevStack, plain_bouncer, driver: str) -> None:  # type: ignore[no-untyped-def]
    # No sslmode in the URL: poolkit's default (require) applies.
    url = poolkit.Dsn.parse(plain_bouncer.url()).without_params("sslmode").to_url()
    # Without poolkit: asyncpg's and libpq's default (prefer) quietly connects in plain text.
    if driver == "asyncpg":
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    else:
        aconn = await psycopg.AsyncConnection.connect(url)
        assert aconn.info.pgconn.ssl_in_use is False
        await aconn.close()

    with pytest.raises(poolkit.SSLError) as info:
        await poolkit.create_pool(driver=driver, pooled_url=url, pool_mode="transaction", connect_timeout=5)
    assert info.value.reason == "ssl_unavailable"
    assert "does not offer TLS" in str(info.value)
    assert stack.app_password not in str(info.value)


def test_sync_require_refuses_a_server_without_tls(plain_bouncer) -> None:  # type: ignore[no-untyped-def]
    url = poolkit.Dsn.parse(plain_bouncer.url()).without_params("sslmode").to_url()
    with pytest.raises(poolkit.SSLError, match="does not offer TLS"):
        poolkit.create_sync_pool(pooled_url=url, pool_mode="transaction")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_verify_full_refuses_a_wrong_ca(stack: DevStack, tmp_path: pathlib.Path, driver: str) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with pytest.raises(poolkit.SSLError) as info:
        await poolkit.create_pool(
            driver=driver, pooled_url=stack.direct_url, sslmode="verify-full", sslrootcert=other_ca
        )
    assert info.value.reason == "ssl_verify"
    assert "POOLKIT_SSLROOTCERT" in str(info.value)
    # The right CA passes, so the refusal above is about the CA, not about the set-up.
    pool = await poolkit.create_pool(
        driver=driver, pooled_url=stack.direct_url, sslmode="verify-full", sslrootcert=stack.ca_file
    )
    assert await pool.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    await pool.close()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_verify_full_refuses_a_wrong_host_name(misnamed_bouncer, driver: str) -> None:  # type: ignore[no-untyped-def]
    bouncer, ca_file = misnamed_bouncer
    url = poolkit.Dsn.parse(bouncer.url()).without_params("sslmode").to_url()
    with pytest.raises(poolkit.SSLError) as info:
        await poolkit.create_pool(
            driver=driver, pooled_url=url, pool_mode="transaction", sslmode="verify-full", sslrootcert=ca_file
        )
    assert info.value.reason == "ssl_hostname", info.value
    # verify-ca checks the CA only, so the same server is accepted: the refusal was about the name.
    pool = await poolkit.create_pool(
        driver=driver, pooled_url=url, pool_mode="transaction", sslmode="verify-ca", sslrootcert=ca_file
    )
    assert await pool.fetchval("SELECT 1") == 1
    await pool.close()


async def test_plain_text_to_postgres_is_refused_by_pg_hba(stack: DevStack) -> None:
    url = stack.url(via="direct", sslmode="disable")
    with pytest.raises(poolkit.SSLError) as info:
        await poolkit.create_pool(pooled_url=url)
    assert info.value.reason == "ssl_required"
    assert "only accepts TLS" in str(info.value)
