"""Acceptance: Alembic autogenerate + upgrade work when the app's URL is PgBouncer (poolkit's env.py recipe runs
them on the direct URL); the same commands pointed at the pooler alone fail or hang."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import poolkit
from poolkit.dev.devstack import DevStack

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "tests" / "alembic_project"
RECIPE = ROOT / "examples" / "alembic" / "env.py"
TABLE = "alembic_widgets"
GOOD_TIMEOUT = 120.0  # generous: two interpreter starts on a loaded 2-core machine
NAIVE_TIMEOUT = 30.0  # bounds the hang a pooler can cause


def _drop(stack: DevStack) -> None:
    stack.psql(f"DROP TABLE IF EXISTS {TABLE}; DROP TABLE IF EXISTS alembic_version;")


@pytest.fixture
def clean_db(stack: DevStack) -> Iterator[DevStack]:
    _drop(stack)
    yield stack
    _drop(stack)


def _project(tmp_path: Path, env_py: Path) -> Path:
    project = tmp_path / "migrations"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("__pycache__", "naive_env.py"))
    (project / "versions").mkdir(exist_ok=True)
    shutil.copy(env_py, project / "env.py")
    return project


def _alembic(project: Path, *args: str, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(project / "alembic.ini"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _table_exists(stack: DevStack) -> bool:
    with psycopg.connect(stack.superuser_url, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"public.{TABLE}",)).fetchone()
    return bool(row and row[0])


def test_recipe_autogenerates_and_upgrades_with_the_pgbouncer_url_configured(
    clean_db: DevStack, stack_env: DevStack, tmp_path: Path
) -> None:
    stack = stack_env
    env = dict(os.environ)
    # The app's configured URL is the pooler; the recipe must not use it for migrations.
    assert poolkit.detect_mode(poolkit.Dsn.parse(env["POOLKIT_POOLED_URL"])).mode is poolkit.Mode.TRANSACTION
    project = _project(tmp_path, RECIPE)

    made = _alembic(project, "revision", "--autogenerate", "-m", "create widgets", timeout=GOOD_TIMEOUT, env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    (revision,) = (project / "versions").glob("*.py")
    text = revision.read_text()
    assert f"op.create_table('{TABLE}'" in text or f'op.create_table("{TABLE}"' in text, text

    applied = _alembic(project, "upgrade", "head", timeout=GOOD_TIMEOUT, env=env)
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert _table_exists(stack)
    for output in (made.stdout + made.stderr, applied.stdout + applied.stderr):
        assert stack.app_password not in output

    # Idempotent: nothing left to generate once the table exists.
    again = _alembic(project, "check", timeout=GOOD_TIMEOUT, env=env)
    assert again.returncode == 0, again.stderr[-2000:]


def test_naive_env_on_the_pooler_alone_fails_or_hangs(clean_db: DevStack, tmp_path: Path) -> None:
    """Alembic's async template on the PgBouncer URL with asyncpg's defaults: the same two commands."""
    stack = clean_db
    project = _project(tmp_path, PROJECT / "naive_env.py")
    url = poolkit.Dsn.parse(stack.pooled_url).without_params("sslmode").with_params(ssl="require").to_url()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOLKIT_", "DATABASE_URL"))}
    env["NAIVE_DATABASE_URL"] = url.replace("postgresql://", "postgresql+asyncpg://")

    outcomes: list[str] = []
    for args in (("revision", "--autogenerate", "-m", "create widgets"), ("upgrade", "head")):
        try:
            done = _alembic(project, *args, timeout=NAIVE_TIMEOUT, env=env)
        except subprocess.TimeoutExpired:
            outcomes.append(f"{args[0]}: hung for {NAIVE_TIMEOUT:g}s")
            break
        errors = [line for line in done.stderr.splitlines() if "Error" in line][-1:]
        outcomes.append(f"{args[0]}: exit {done.returncode}: {errors}")
        if done.returncode != 0:
            break
    # Typically `revision` passes and `upgrade` (a new process, the same server, asyncpg's per-process statement
    # names starting over) fails with `prepared statement "__asyncpg_stmt_1__" already exists`.
    assert any("hung" in o or ("exit 0" not in o and "prepared statement" in o) for o in outcomes), outcomes
    assert not _table_exists(stack), outcomes
