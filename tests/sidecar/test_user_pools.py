"""user_pools: a pool per user, each logging in upstream as its user (PgBouncer's pools per user)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest
from scramp import ScramMechanism

from poolkit.dev.devstack import DevStack
from poolkit.errors import ConfigError

from .conftest import SidecarThread, upstream_settings
from .test_admin_console import console, show

Factory = Callable[..., SidecarThread]
BOB_PASSWORD = "bob-upstream-pw"


@pytest.fixture
def bob(stack: DevStack) -> Iterator[str]:
    """A second login role upstream, ``bob``, with its own password."""
    with psycopg.connect(stack.url(via="direct", user=stack.superuser), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS bob")
        conn.execute(f"CREATE ROLE bob LOGIN PASSWORD '{BOB_PASSWORD}'")
    yield "bob"
    with psycopg.connect(stack.url(via="direct", user=stack.superuser), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'bob'")
        conn.execute("DROP ROLE IF EXISTS bob")


def identity(url: str) -> tuple[str, str]:
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        row = conn.execute("SELECT session_user, current_user").fetchone()
        assert row is not None
        return row


def test_each_user_runs_upstream_as_itself(sidecar_factory: Factory, stack: DevStack, bob: str) -> None:
    users = {"app": stack.app_password, "bob": BOB_PASSWORD}
    # Without user_pools (the default, PgBouncer's force_user), bob runs upstream as the URL's role.
    forced = sidecar_factory(users=users)
    assert identity(forced.url(user="bob", password=BOB_PASSWORD)) == ("app", "app")

    sidecar = sidecar_factory(users=users, user_pools=True)
    assert identity(sidecar.url(user="bob", password=BOB_PASSWORD)) == ("bob", "bob")
    assert identity(sidecar.url(password=stack.app_password)) == ("app", "app")
    with psycopg.connect(stack.direct_url, autocommit=True) as conn:
        seen = conn.execute(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name = 'poolkit-sidecar'"
        ).fetchall()
    assert {"app", "bob"} <= {name for (name,) in seen}
    pools = show(console(sidecar, "app", stack.app_password), "POOLS")
    assert sorted((row["database"], row["user"]) for row in pools) == [("app", "app"), ("app", "bob")]
    assert {row["database"] for row in show(console(sidecar, "app", stack.app_password), "STATS")} == {
        "app",
        "bob@app",
    }
    metrics = httpx.get(sidecar.metrics_url).text
    assert 'poolkit_sidecar_transactions_total{pool="bob@app"} 1.0' in metrics
    assert 'poolkit_sidecar_transactions_total{pool="app"} 1.0' in metrics


def test_a_user_without_a_password_to_log_in_upstream_is_refused(sidecar_factory: Factory, stack: DevStack) -> None:
    salt, stored, server, iterations = ScramMechanism().make_auth_info("carol-pw", iteration_count=4096)
    b64 = [base64.b64encode(x).decode() for x in (salt, stored, server)]
    verifier = f"SCRAM-SHA-256${iterations}:{b64[0]}${b64[1]}:{b64[2]}"
    sidecar = sidecar_factory(users={"app": stack.app_password, "carol": verifier}, user_pools=True)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar.url(user="carol", password="carol-pw"))
    assert 'user_pools is on, but the sidecar has no password for "carol"' in str(info.value)
    assert "a SCRAM verifier only checks clients" in str(info.value)


def test_a_wrong_upstream_password_for_a_user_is_an_auth_failure(
    sidecar_factory: Factory, stack: DevStack, bob: str
) -> None:
    # bob's password in the users file is not the one PostgreSQL has: bob logs in to the sidecar,
    # and the sidecar cannot log in upstream as bob.
    sidecar = sidecar_factory(users={"app": stack.app_password, "bob": "stale-pw"}, user_pools=True)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar.url(user="bob", password="stale-pw"))
    message = str(info.value)
    assert "pool 'bob@app' cannot log in to its upstream" in message
    assert 'password authentication failed for user "bob"' in message
    assert "stale-pw" not in message
    metrics = httpx.get(sidecar.metrics_url).text
    assert 'poolkit_sidecar_upstream_errors_total{kind="auth",pool="bob@app"} 1.0' in metrics
    assert identity(sidecar.url(password=stack.app_password)) == ("app", "app")  # the others are unaffected


def test_user_pools_need_users_with_passwords(stack: DevStack) -> None:
    with pytest.raises(ConfigError, match=r"user_pools .*needs users with passwords"):
        upstream_settings(stack, user_pools=True)  # trust auth: no passwords to log in upstream with


def test_a_reload_with_the_right_password_fixes_a_users_pool(
    sidecar_factory: Factory, stack: DevStack, bob: str
) -> None:
    sidecar = sidecar_factory(users={"app": stack.app_password, "bob": "stale-pw"}, user_pools=True)
    with pytest.raises(psycopg.OperationalError, match="cannot log in to its upstream"):
        psycopg.connect(sidecar.url(user="bob", password="stale-pw"))
    fixed = upstream_settings(stack, users={"app": stack.app_password, "bob": BOB_PASSWORD}, user_pools=True)
    assert sidecar.call(lambda app: app.reload(fixed))  # what SIGHUP does with the edited file
    assert identity(sidecar.url(user="bob", password=BOB_PASSWORD)) == ("bob", "bob")
