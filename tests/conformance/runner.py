"""Conformance runner: asyncpg's own test suite, direct, through the sidecar and through PgBouncer, compared.

The suite is not copied into this repository: it is fetched at run time from PyPI, from the sdist of the
asyncpg version installed here (asyncpg ships ``tests/`` in its sdist; psycopg 3's sdist ships none), and
cached (``POOLKIT_CONFORMANCE_CACHE``, default ``~/.cache/poolkit/conformance``). asyncpg's test harness
uses an already running server when ``PGHOST`` is set, so each run points it at one of three targets, each
on a fresh DevStack (a test that fails half-way leaves tables and roles behind; a fresh cluster keeps one
mode's leftovers out of the next):

``direct``     PostgreSQL itself (TLS, SCRAM).
``sidecar``    ``python -m poolkit.sidecar`` as in a deployment: upstream the stack's PgBouncer in transaction
               mode (``POOLKIT_SIDECAR_UPSTREAM=pooled``), the direct URL for pinned clients and DDL.
``pgbouncer``  the stack's PgBouncer 1.18 in transaction mode, the reference for what transaction pooling
               itself breaks.

A test that passes direct and fails through the sidecar is either listed in ``known_failures.toml`` with the
reason (it must fail through PgBouncer too: the failure comes from transaction pooling), or it fails the run.

Run it: ``scripts/conformance`` (``--pgbouncer failures`` runs only the sidecar's failures through PgBouncer,
``-k`` narrows the selection).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

from poolkit.dev.devstack import DevStack, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KNOWN_FILE = HERE / "known_failures.toml"
MODES = ("direct", "sidecar", "pgbouncer")
CACHE_ENV = "POOLKIT_CONFORMANCE_CACHE"
PEER = "asyncpg"

# The selection: asyncpg's test modules minus what cannot run against a server the harness does not manage,
# and minus the slowest tests (the three modes must stay within a few minutes on a loaded 2-core machine).
IGNORED_FILES = {
    # Imports `distro` (a test-only dependency) and edits pg_hba.conf / restarts a cluster it manages.
    "tests/test_connect.py": "needs a cluster the harness manages (pg_hba edits, restarts) and `distro`",
    # Lints asyncpg's own source tree (flake8, mypy), which is not part of the sdist's tests.
    "tests/test__sourcecode.py": "lints asyncpg's source with flake8/mypy",
    # Starts subinterpreters importing asyncpg: nothing to do with a server.
    "tests/test_subinterpreters.py": "no server involved",
}
# Deselected by node id: slow ones (each has a faster sibling that stays selected) and one that is timing.
DESELECTED = {
    # 6 s direct: introspection over 1,000 types; test_introspection_* keep the cache paths covered.
    "tests/test_introspection.py::TestIntrospection::test_introspection_on_large_db": "slow (6 s direct)",
    # 4 s direct, longer through a pooler: 100 MB of COPY; the other COPY tests stay.
    "tests/test_copy.py::TestCopyTo::test_copy_to_table_large_rows": "slow (100 MB COPY)",
    "tests/test_copy.py::TestCopyFrom::test_copy_from_table_large_rows": "slow (100 MB COPY)",
    # Whether asyncpg sees the server's error before it has written all 128 rows of 32 kB depends on socket
    # buffers: it failed direct in one run of four, and more often through any proxy (sidecar and PgBouncer
    # alike), whose buffers take the rows in. A comparison cannot rely on it.
    "tests/test_execute.py::TestExecuteMany::test_executemany_server_failure_during_writes": "timing (buffers)",
}
# A peer test that hangs is a failure, not a reason to wait for the session timeout.
TEST_TIMEOUT = 15
MAX_BOUNCER_CRASHES = 5

# A pytest plugin written next to the fetched suite: one JSON line per test with its outcome and the first
# line of its error, so the comparison does not depend on parsing pytest's terminal output.
_PLUGIN = """
import json, os

_results = {}

def pytest_runtest_logreport(report):
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "message": "", "seconds": 0.0})
    entry["seconds"] += getattr(report, "duration", 0.0)
    if report.failed and entry["outcome"] != "failed":
        entry["outcome"] = "failed"
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1:]
        entry["message"] = (text if isinstance(text, str) else " ".join(text))[:400]
    elif report.skipped and report.when in ("setup", "call") and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"

def pytest_sessionfinish(session):
    with open(os.environ["POOLKIT_CONFORMANCE_RESULTS"], "w") as f:
        json.dump(_results, f, indent=0, sort_keys=True)
"""


class ConformanceError(RuntimeError):
    """The runner could not run (fetch, start or collection failed): not a test result."""


class TargetDied(ConformanceError):
    """PostgreSQL, PgBouncer or the sidecar was not running any more when the peer's run ended."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One peer test's result in one mode."""

    outcome: str  # passed | failed | skipped | missing
    message: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class Comparison:
    """What one run found; ``ok`` is the verdict."""

    results: dict[str, dict[str, Outcome]]  # mode -> test id -> outcome
    known: dict[str, str]  # test id -> reason
    modes: tuple[str, ...]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    bouncer_crashes: int = 0

    def passed(self, mode: str) -> set[str]:
        return {t for t, o in self.results[mode].items() if o.outcome == "passed"}

    def failed(self, mode: str) -> set[str]:
        return {t for t, o in self.results[mode].items() if o.outcome not in {"passed", "skipped"}}

    @property
    def sidecar_regressions(self) -> set[str]:
        """Tests that pass direct and do not pass through the sidecar."""
        return self.passed("direct") - self.passed("sidecar")

    @property
    def unexpected(self) -> list[str]:
        """Sidecar failures not in the known file: each fails the run."""
        return sorted(self.sidecar_regressions - self.known.keys())

    @property
    def known_but_passing_bouncer(self) -> list[str]:
        """Known entries that PgBouncer passes: then the failure is not transaction pooling's."""
        if "pgbouncer" not in self.modes:
            return []
        return sorted(t for t in self.known if t in self.passed("pgbouncer"))

    @property
    def known_now_passing(self) -> list[str]:
        """Known entries that passed through the sidecar this time (reported, not fatal: timing varies)."""
        return sorted(t for t in self.known if t in self.passed("sidecar"))

    @property
    def ok(self) -> bool:
        # A known entry that PgBouncer passes this time is reported, not fatal: PgBouncer's own failures
        # through prepared statements depend on which server connection a transaction lands on.
        return not self.unexpected

    def counts(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for mode in self.modes:
            row = {"passed": 0, "failed": 0, "skipped": 0}
            for outcome in self.results[mode].values():
                row[outcome.outcome if outcome.outcome in row else "failed"] += 1
            table[mode] = row
        return table

    def report(self) -> str:
        lines = [f"{PEER} {peer_version()} test suite, {len(self.results['direct'])} tests selected"]
        for mode, row in self.counts().items():
            if mode == "pgbouncer" and len(self.results[mode]) < len(self.results["direct"]):
                lines.append(f"  pgbouncer: only the {len(self.results[mode])} tests that fail through the sidecar")
            lines.append(
                f"  {mode:<10} passed {row['passed']:>4}  failed {row['failed']:>4}  skipped {row['skipped']:>3}"
                f"  ({self.seconds.get(mode, 0.0):.0f} s)"
            )
        if self.bouncer_crashes:
            lines.append(
                f"  PgBouncer crashed {self.bouncer_crashes}x; the tests it refused were run again on a new one"
            )
        regressions = self.sidecar_regressions
        both = regressions & self.failed("pgbouncer") if "pgbouncer" in self.modes else set()
        lines.append(
            f"  pass direct, fail through the sidecar: {len(regressions)}"
            + (f" (of which PgBouncer fails too: {len(both)})" if "pgbouncer" in self.modes else "")
            + f"; listed in {KNOWN_FILE.name}: {len(regressions & self.known.keys())}"
        )
        if self.unexpected:
            lines.append(f"UNEXPECTED sidecar failures ({len(self.unexpected)}), not in {KNOWN_FILE.name}:")
            for test in self.unexpected:
                bouncer = self.results.get("pgbouncer", {}).get(test)
                also = f" [PgBouncer: {bouncer.outcome}]" if bouncer is not None else ""
                first = (self.results["sidecar"][test].message.splitlines() or [""])[0]
                lines.append(f"  {test}{also}\n      {first}")
        if self.known_but_passing_bouncer:
            lines.append(f"listed in {KNOWN_FILE.name} but passed through PgBouncer this time (check the reason):")
            lines.extend(f"  {t}" for t in self.known_but_passing_bouncer)
        unselected = sorted(self.known.keys() - self.results["direct"].keys())
        if unselected:
            lines.append(f"listed in {KNOWN_FILE.name} but not in the selection:")
            lines.extend(f"  {t}" for t in unselected)
        if self.known_now_passing:
            lines.append(f"listed in {KNOWN_FILE.name} but passed through the sidecar this time:")
            lines.extend(f"  {t}" for t in self.known_now_passing)
        lines.append("verdict: " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


def load_known(path: Path = KNOWN_FILE) -> dict[str, str]:
    """``known_failures.toml``: ``[[failure]]`` tables with ``test`` and ``reason``; duplicates refused."""
    data = tomllib.loads(path.read_text())
    known: dict[str, str] = {}
    for entry in data.get("failure", []):
        test, reason = entry.get("test"), entry.get("reason")
        if not test or not reason or not reason.strip():
            raise ConformanceError(f"{path}: every [[failure]] needs a test id and a reason: {entry!r}")
        if test in known:
            raise ConformanceError(f"{path}: {test} is listed twice")
        known[test] = reason
    return known


# ------------------------------------------------------------------------------------------------ the suite


def peer_version() -> str:
    return importlib.metadata.version(PEER)


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    return Path(explicit) if explicit else Path.home() / ".cache" / "poolkit" / "conformance"


def fetch_suite(version: str | None = None) -> Path:
    """The directory holding asyncpg's ``tests/`` for ``version`` (the installed one), fetched once from PyPI.

    pip is the registry's own client: ``pip download --no-binary asyncpg`` fetches the sdist (its build
    dependencies may come as wheels, which keeps a cold fetch to seconds). Only ``tests/`` is kept.
    """
    version = version or peer_version()
    root = cache_dir() / f"{PEER}-{version}"
    if not (root / "tests" / "__init__.py").exists():
        _download(version, root)
    # Written on every run, so a cached suite always runs with this runner's plugin and configuration: our
    # pytest, not asyncpg's own configuration (its addopts need options and plugins we do not install).
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "_conformance_plugin.py").write_text(_PLUGIN)
    return root


def _download(version: str, root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="conformance-", dir=root.parent) as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PEER, "--dest", tmp]
        done = subprocess.run([*argv, f"{PEER}=={version}"], capture_output=True, text=True, timeout=600, check=False)
        sdists = list(Path(tmp).glob(f"{PEER}-{version}.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise ConformanceError(
                f"could not fetch the {PEER} {version} sdist from the package index (pip exit {done.returncode}):\n"
                f"{done.stderr.strip()[-2000:]}\nThe conformance run needs PyPI once; or unpack the sdist's "
                f"tests/ into {root} (set {CACHE_ENV} to use another cache directory)."
            )
        staging = Path(tmp) / "suite"
        prefix = f"{PEER}-{version}/tests/"
        with tarfile.open(sdists[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            archive.extractall(staging, members=members, filter="data")
        # Another run may have unpacked it meanwhile: then its copy is used.
        with contextlib.suppress(OSError):
            (staging / f"{PEER}-{version}").rename(root)
    if not (root / "tests" / "__init__.py").exists():
        raise ConformanceError(f"{root} has no tests/ after fetching the {PEER} {version} sdist")


# ------------------------------------------------------------------------------------------------ targets


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConformanceError(f"the sidecar exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ConformanceError(f"the sidecar did not listen on {port} within {timeout:.0f} s")


@contextlib.contextmanager
def sidecar_process(stack: DevStack, log: Path, database: str) -> Iterator[int]:
    """``python -m poolkit.sidecar`` in front of ``stack``'s PgBouncer (transaction mode); yields its port."""
    port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOLKIT_", "PG")) and k != "DATABASE_URL"}
    env.update(
        POOLKIT_POOLED_URL=stack.url(via="pgbouncer", user=stack.superuser, database=database, sslmode="verify-full"),
        POOLKIT_DIRECT_URL=stack.url(via="direct", user=stack.superuser, database=database, sslmode="verify-full"),
        POOLKIT_SSLROOTCERT=str(stack.ca_file),
        POOLKIT_SIDECAR_UPSTREAM="pooled",
        POOLKIT_SIDECAR_AUTH_TYPE="trust",
        POOLKIT_SIDECAR_LISTEN_PORT=str(port),
        POOLKIT_SIDECAR_HTTP_PORT=str(http_port),
        PYTHONUNBUFFERED="1",
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "poolkit.sidecar"], env=env, cwd=REPO, stdout=out, stderr=out)
    try:
        _wait_listening(port, proc, log)
        yield port
        if proc.poll() is not None:
            raise ConformanceError(f"the sidecar exited with {proc.returncode} during the run: see {log}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    # The sidecar's whole output is kept for the report; it must never show the upstream password.
    if stack.superuser_password in log.read_text(errors="replace"):
        raise ConformanceError(f"the sidecar's output ({log}) contains the upstream password")


@contextlib.contextmanager
def _keep_logs(stack: DevStack, workdir: Path, mode: str) -> Iterator[None]:
    """Copy the stack's PostgreSQL and PgBouncer logs into ``workdir`` before the stack is removed."""
    try:
        yield
    finally:
        assert stack.pgbouncer is not None
        for source, name in ((stack.pg_log_file, "postgresql"), (stack.pgbouncer.log_file, "pgbouncer")):
            with contextlib.suppress(OSError):
                shutil.copyfile(source, workdir / f"{mode}-{name}-server.log")


@contextlib.contextmanager
def target(mode: str, workdir: Path, database: str = "postgres", label: str | None = None) -> Iterator[dict[str, str]]:
    """A fresh DevStack and the PG* environment that points asyncpg's harness at ``mode``'s endpoint."""
    if mode not in MODES:
        raise ConformanceError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    # The tests run as the superuser on the `postgres` database, as asyncpg's own harness does (several create
    # roles, extensions and databases, and pools name database "postgres" explicitly).
    with (
        DevStack(max_connections=100, password=f"conf-{secrets.token_hex(8)}") as stack,
        _keep_logs(stack, workdir, label or mode),
    ):
        env = {"PGHOST": "127.0.0.1", "PGUSER": stack.superuser, "PGDATABASE": database}
        if mode == "direct":
            env.update(PGPORT=str(stack.pg_port), PGPASSWORD=stack.superuser_password, PGSSLMODE="require")
            yield env
        elif mode == "pgbouncer":
            env.update(PGPORT=str(stack.pgbouncer_port), PGPASSWORD=stack.superuser_password, PGSSLMODE="disable")
            yield env
        else:
            with sidecar_process(stack, workdir / "sidecar-process.log", database) as port:
                env.update(PGPORT=str(port), PGSSLMODE="disable")
                yield env
        # Results from a target that died half-way would compare the peer's suite with a dead port.
        assert stack.pgbouncer is not None
        if not stack.pgbouncer.running or stack.postmaster_pid is None:
            raise TargetDied(f"PostgreSQL or PgBouncer stopped during the {label or mode} run: see {workdir}")


def run_suite(
    suite: Path,
    env: dict[str, str],
    workdir: Path,
    mode: str,
    *,
    keyword: str | None = None,
    tests: Sequence[str] = ("tests",),
    label: str | None = None,
) -> dict[str, Outcome]:
    """Run the selection (or ``tests``, node ids) with this project's pytest in a child process; outcomes by id."""
    results_file = workdir / f"{label or mode}.json"
    log_file = workdir / f"{label or mode}.log"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        *tests,
        "-p",
        "_conformance_plugin",
        # The project's plugins stay out of the peer's run: its suite is unittest-based.
        "-p",
        "no:cacheprovider",
        "-p",
        "no:asyncio",
        "-p",
        "no:hypothesispytest",
        # Native tracebacks: pytest's source-annotated ones crash on some of asyncpg's frames (Python 3.11).
        "--tb=native",
        "-q",
        f"--timeout={TEST_TIMEOUT}",
        *(f"--ignore={path}" for path in IGNORED_FILES),
        *(f"--deselect={test}" for test in DESELECTED),
    ]
    if keyword:
        argv += ["-k", keyword]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "POOLKIT_", "PYTEST_"))}
    child_env.update(env)
    child_env["POOLKIT_CONFORMANCE_RESULTS"] = str(results_file)
    child_env["PYTHONPATH"] = str(suite)
    results_file.unlink(missing_ok=True)
    with open(log_file, "wb") as out:
        done = subprocess.run(
            argv, check=False, cwd=suite, env=child_env, stdout=out, stderr=subprocess.STDOUT, timeout=1200
        )
    if done.returncode not in (0, 1) or not results_file.exists():
        raise ConformanceError(f"{PEER}'s suite did not run in mode {mode} (exit {done.returncode}); see {log_file}")
    raw = json.loads(results_file.read_text())
    return {test: Outcome(**entry) for test, entry in raw.items()}


def run(
    *,
    workdir: Path,
    pgbouncer: str = "all",
    keyword: str | None = None,
    known_file: Path = KNOWN_FILE,
) -> Comparison:
    """Fetch the suite, run the selection direct and through the sidecar, then through PgBouncer; compare.

    ``pgbouncer``: ``all`` runs the whole selection through PgBouncer too; ``failures`` only the tests that
    pass direct and fail through the sidecar (what the comparison needs, in a fraction of the time);
    ``none`` skips it.
    """
    if pgbouncer not in ("all", "failures", "none"):
        raise ConformanceError(f"pgbouncer={pgbouncer!r}: use all, failures or none")
    known = load_known(known_file)
    suite = fetch_suite()
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Outcome]] = {}
    seconds: dict[str, float] = {}

    def one(mode: str, tests: Sequence[str] = ("tests",)) -> None:
        began = time.monotonic()
        with target(mode, workdir) as env:
            results[mode] = run_suite(suite, env, workdir, mode, keyword=keyword, tests=tests)
        seconds[mode] = time.monotonic() - began

    def bouncer(tests: Sequence[str]) -> None:
        # PgBouncer 1.18 can crash under this suite (`FATAL ... disconnect_client(): bad client state: 0`
        # after a cancel); every test after that fails to connect. Those are run again on a new stack.
        began, pending, merged = time.monotonic(), list(tests), {}
        for attempt in range(1, MAX_BOUNCER_CRASHES + 2):
            label = "pgbouncer" if attempt == 1 else f"pgbouncer-{attempt}"
            try:
                with target("pgbouncer", workdir, label=label) as env:
                    got = run_suite(suite, env, workdir, "pgbouncer", keyword=keyword, tests=pending, label=label)
                merged.update(got)
                break
            except TargetDied:
                got = json.loads((workdir / f"{label}.json").read_text())
                got = {t: Outcome(**o) for t, o in got.items()}
                refused = sorted(t for t, o in got.items() if "Connect call failed" in o.message)
                merged.update({t: o for t, o in got.items() if t not in refused})
                crashes.append(label)
                if not refused:
                    break
                pending = refused
        results["pgbouncer"] = merged
        seconds["pgbouncer"] = time.monotonic() - began

    crashes: list[str] = []

    one("direct")
    one("sidecar")
    for test in results["direct"].keys() - results["sidecar"].keys():
        results["sidecar"][test] = Outcome("missing")
    modes: tuple[str, ...] = ("direct", "sidecar")
    if pgbouncer == "all":
        bouncer(["tests"])
        modes += ("pgbouncer",)
    elif pgbouncer == "failures":
        passed = sorted(t for t, o in results["direct"].items() if o.outcome == "passed")
        regressions = [t for t in passed if results["sidecar"][t].outcome != "passed"]
        if regressions:
            bouncer(regressions)
        else:
            results["pgbouncer"], seconds["pgbouncer"] = {}, 0.0
        modes += ("pgbouncer",)
    return Comparison(results=results, known=known, modes=modes, seconds=seconds, bouncer_crashes=len(crashes))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pgbouncer",
        choices=("all", "failures", "none"),
        default="all",
        help="run the whole selection through PgBouncer (all), only the sidecar's failures, or not at all",
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression to narrow the selection")
    parser.add_argument("--workdir", type=Path, help="where logs and results go (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="write every test's outcome per mode to this file")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="poolkit-conformance-"))
    try:
        comparison = run(workdir=workdir, pgbouncer=args.pgbouncer, keyword=args.keyword)
    except ConformanceError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    print(comparison.report())
    print(f"logs: {workdir}")
    if args.json:
        data = {m: {t: dataclasses.asdict(o) for t, o in sorted(r.items())} for m, r in comparison.results.items()}
        args.json.write_text(json.dumps(data, indent=1))
    return 0 if comparison.ok else 1


if __name__ == "__main__":
    sys.exit(main())
