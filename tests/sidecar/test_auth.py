"""Client auth (SCRAM via scramp, trust on loopback), client TLS, upstream TLS/auth failures."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psycopg
import pytest
import trustme

from poolkit.dev.devstack import DevStack
from poolkit.errors import ConfigError
from poolkit.sidecar.policy.auth import UpstreamAuth, auth_info_from_secret
from poolkit.sidecar.policy.config import load_sidecar_settings

if TYPE_CHECKING:
    from .conftest import SidecarThread

Factory = Callable[..., "SidecarThread"]


def test_scram_login_succeeds_with_the_right_password(sidecar_factory: Factory) -> None:
    sidecar = sidecar_factory(users={"alice": "wonderland"})
    with psycopg.connect(
        sidecar.url(user="alice", password="wonderland"), autocommit=True, prepare_threshold=None
    ) as conn:
        # The client logs in as alice; upstream the sidecar uses the URL's own user.
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    metrics = httpx.get(sidecar.metrics_url).text
    assert 'poolkit_sidecar_client_logins_total{pool="app",result="ok"} 1.0' in metrics


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("mallory", "wonderland")])
def test_scram_login_fails_with_a_wrong_password_or_user(sidecar_factory: Factory, user: str, password: str) -> None:
    sidecar = sidecar_factory(users={"alice": "wonderland"})
    with pytest.raises(psycopg.OperationalError, match=f'password authentication failed for user "{user}"'):
        psycopg.connect(sidecar.url(user=user, password=password))
    metrics = httpx.get(sidecar.metrics_url).text
    assert 'poolkit_sidecar_client_logins_total{pool="app",result="auth_failed"} 1.0' in metrics


def test_scram_accepts_a_postgresql_verifier_instead_of_a_password(sidecar_factory: Factory) -> None:
    salt, stored, server, iterations = auth_info_from_secret("s3cret")
    import base64

    verifier = (
        f"SCRAM-SHA-256${iterations}:{base64.b64encode(salt).decode()}$"
        f"{base64.b64encode(stored).decode()}:{base64.b64encode(server).decode()}"
    )
    sidecar = sidecar_factory(users={"bob": verifier})
    with psycopg.connect(sidecar.url(user="bob", password="s3cret"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(sidecar.url(user="bob", password=verifier))


def test_auth_file_in_pgbouncer_format(sidecar_factory: Factory, tmp_path: Path) -> None:
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('; comment\n"carol" "pa""ss"\n')
    sidecar = sidecar_factory(auth_file=userlist)
    with psycopg.connect(sidecar.url(user="carol", password='pa"ss'), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_trust_is_refused_for_a_non_loopback_listener(stack: DevStack) -> None:
    with pytest.raises(ConfigError, match=r"auth_type.*trust only applies to loopback"):
        load_sidecar_settings(None, direct_url=stack.direct_url, listen_host="0.0.0.0", auth_type="trust")


def test_scram_without_users_is_a_config_error(stack: DevStack) -> None:
    with pytest.raises(ConfigError, match=r"POOLKIT_SIDECAR_USERS"):
        load_sidecar_settings(None, direct_url=stack.direct_url, auth_type="scram-sha-256")


def test_client_tls_required(sidecar_factory: Factory, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    sidecar = sidecar_factory(client_tls="require", tls_cert_file=cert_file, tls_key_file=key_file)
    url = sidecar.url(sslmode="verify-full", sslrootcert=str(ca_file))
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT count(*) FROM generate_series(1, 10000)").fetchone() == (10000,)
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        psycopg.connect(sidecar.url(sslmode="disable"))


def test_upstream_certificate_is_verified(sidecar_factory: Factory, stack: DevStack, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    sidecar = sidecar_factory(sslrootcert=other_ca)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(sidecar.url())
    metrics = httpx.get(sidecar.metrics_url).text
    assert 'poolkit_sidecar_upstream_errors_total{kind="tls",pool="app"} 1.0' in metrics


def test_upstream_wrong_password_is_reported_without_the_password(sidecar_factory: Factory, stack: DevStack) -> None:
    url = stack.url(via="direct", password="not-the-password", sslmode="verify-full")
    sidecar = sidecar_factory(direct_url=url)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar.url())
    assert "password authentication failed" in str(info.value)
    assert "not-the-password" not in str(info.value)
    metrics = httpx.get(sidecar.metrics_url).text
    assert 'poolkit_sidecar_upstream_errors_total{kind="auth",pool="app"} 1.0' in metrics


def test_upstream_md5_answer_matches_postgresql_formula() -> None:
    # The stack's pg_hba only allows SCRAM, so md5 is checked against PostgreSQL's documented
    # formula: "md5" + md5(md5(password + user) + salt).
    auth = UpstreamAuth("app", "pw")
    reply = auth.respond(5, b"\x01\x02\x03\x04")
    assert reply is not None
    inner = hashlib.md5(b"pwapp", usedforsecurity=False).hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + b"\x01\x02\x03\x04", usedforsecurity=False).hexdigest().encode()
    assert reply[5:] == expected + b"\x00"
