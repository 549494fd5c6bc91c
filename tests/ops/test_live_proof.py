"""The dashboards and alerts work on live data: a real Prometheus, with deploy/'s scrape config and alert rules,
scrapes a running sidecar and an app process using poolkit pools while a workload runs (slow queries, errors,
exhaustion on both sides, churn, connect errors, prepared statements, pins and routing); then every PromQL
expression of every dashboard panel, template variable and alert rule is evaluated through the HTTP API, the
way Grafana asks (a range query over the run), and must show something."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sidecar.conftest import sidecar_argv, stop_child

from poolkit.dev.devstack import DevStack

from .prom import ALERTS, REPO, Prometheus, PromQL, deploy_scrape_configs, free_port, promql_expressions

APP = Path(__file__).with_name("live_app.py")
SCREENSHOT = REPO / "docs" / "dashboard.png"
# Set to regenerate docs/dashboard.png from this run: POOLKIT_SCREENSHOT=1 .venv/bin/pytest tests/ops/test_live_proof.py
SCREENSHOT_ENV = "POOLKIT_SCREENSHOT"
# Variables poolkit's own settings read; none may leak from the shell into the processes started here.
_FOREIGN_ENV = ("POOLKIT_", "PROMETHEUS_", "PG", "DATABASE_URL", "DIRECT_", "POSTGRES_", "SUPABASE_")
# Alerts the workload must bring to pending or firing in Prometheus itself (not only their expressions).
ALERTS_EXPECTED = (
    "PoolkitPoolExhausted",
    "PoolkitSidecarQueryWaitTimeouts",
    "PoolkitSlowQueries",
    "PoolkitSidecarSlowQueries",
)
# Expressions whose data only the sidecar's prepared-statement and session (pin/route) support produce.
PREPARED_OR_SESSION = (
    "poolkit_sidecar_prepared_statements",
    "poolkit_sidecar_pinned",
    "poolkit_sidecar_pins",
    "poolkit_sidecar_routed",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
    env.update(extra, PYTHONUNBUFFERED="1")
    return env


class Sidecar:
    """`python -m poolkit.sidecar` as a child process, configured through the environment."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.http_port = free_port()
        argv = sidecar_argv(self.port, self.http_port)
        # A file, not a pipe: a full pipe would block the sidecar's logging mid-workload.
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def url(self) -> str:
        return f"postgresql://app@127.0.0.1:{self.port}/app?sslmode=disable"

    def stop(self) -> int:
        """SIGTERM (the image's STOPSIGNAL) and the exit status."""
        code = stop_child(self.proc)
        self.log.close()
        return code


def read_json_line(proc: subprocess.Popen[str], key: str, log: Path) -> Any:
    """The value of `key` in the first JSON line the app prints that has it."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            message = json.loads(line)
            if key in message:
                return message[key]
    tail = log.read_text(errors="replace")[-4000:]
    raise AssertionError(f"the app exited ({proc.wait()}) before printing {key!r}:\n{tail}")


def shows_something(series: list[dict[str, Any]]) -> bool:
    """Any finite, non-zero value anywhere in the result: a panel of only gaps or only zeros shows nothing."""
    for one in series:
        for _, value in one.get("values", []):
            number = float(value)
            if math.isfinite(number) and number != 0:
                return True
    return False


@pytest.fixture
def live(stack: DevStack, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The stack with its own PgBouncer, two sidecars (one whose upstream is down), the app process."""
    bouncer = stack.start_pgbouncer(pool_size=10)
    direct = stack.url(via="direct", sslmode="verify-full")
    dead_port = free_port()  # nothing listens here
    good = Sidecar(
        clean_env(
            POOLKIT_POOLED_URL=direct,
            POOLKIT_DIRECT_URL=direct,
            POOLKIT_SSLROOTCERT=str(stack.ca_file),
            POOLKIT_SIDECAR_POOL_NAME="app",
            POOLKIT_SIDECAR_MAX_SIZE="3",
            POOLKIT_SIDECAR_QUERY_WAIT_TIMEOUT="1.5",
            POOLKIT_SIDECAR_SLOW_QUERY_SECONDS="0.1",
        ),
        tmp_path / "sidecar.log",
    )
    broken = Sidecar(
        clean_env(
            POOLKIT_DIRECT_URL=f"postgresql://app@127.0.0.1:{dead_port}/app?sslmode=disable",
            POOLKIT_SIDECAR_UPSTREAM="direct",
            POOLKIT_SIDECAR_POOL_NAME="replica",
            POOLKIT_SIDECAR_CONNECT_TIMEOUT="1",
        ),
        tmp_path / "broken-sidecar.log",
    )
    config = {
        "sidecar_url": good.url(),
        "broken_sidecar_url": broken.url(),
        "dead_url": f"postgresql://app@127.0.0.1:{dead_port}/app?sslmode=disable",
    }
    app_log = (tmp_path / "app.log").open("w")
    app = subprocess.Popen(
        [sys.executable, str(APP)],
        env=clean_env(
            POOLKIT_POOLED_URL=bouncer.url(pgbouncer="true"),
            POOLKIT_DIRECT_URL=stack.direct_url,
            POOLKIT_SSLROOTCERT=str(stack.ca_file),
            POOLKIT_LIVE=json.dumps(config),
        ),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=app_log,
        text=True,
    )
    try:
        port = read_json_line(app, "metrics_port", tmp_path / "app.log")
        yield {"app": app, "app_target": f"127.0.0.1:{port}", "good": good, "broken": broken}
    finally:
        if app.poll() is None:
            app.communicate(input="", timeout=60)
        app_log.close()
        for sidecar in (good, broken):
            sidecar.stop()
        bouncer.stop()


def test_every_dashboard_panel_and_alert_shows_live_data(live: dict[str, Any], tmp_path: Path) -> None:
    app: subprocess.Popen[str] = live["app"]
    good: Sidecar = live["good"]
    broken: Sidecar = live["broken"]
    app_job = deploy_scrape_configs({"poolkit-app": [live["app_target"]]})
    with Prometheus(scrape_configs=app_job, rule_files=[ALERTS], interval="1s") as prom:
        start = time.time() - 1
        # First no sidecar is scraped at all (PoolkitSidecarNotScraped's case), then the config selects both.
        prom.wait_for('ALERTS{alertname="PoolkitSidecarNotScraped"}')
        jobs = {"poolkit-sidecar": [good.target, broken.target], "poolkit-app": [live["app_target"]]}
        prom.reload(deploy_scrape_configs(jobs))
        # Every counter must have been scraped at zero before the workload moves it, or increase() sees nothing.
        prom.wait_for('count(up{job="poolkit-sidecar"} == 1) == 2')
        prom.wait_for('up{job="poolkit-app"} == 1')
        prom.wait_for('poolkit_pool_acquire_timeouts_total{pool="orders"}')
        prom.wait_for('poolkit_sidecar_upstream_errors_total{pool="replica", kind="connect"}')

        assert app.stdin is not None
        app.stdin.write("go\n")
        app.stdin.flush()
        result = read_json_line(app, "result", tmp_path / "app.log")
        counts: dict[str, int] = result["counts"]
        problems = workload_problems(counts, result["messages"])

        # Alerts: the exhaustion ones fire at once (no `for:`), the slow-query ones go pending (for: 10m).
        states = wait_for_alerts(prom, ALERTS_EXPECTED)
        problems += [f"alert {name} never pending or firing" for name in ALERTS_EXPECTED if name not in states]

        # The sidecar whose upstream is down goes away: SIGTERM drains and exits 0; `up` drops to 0.
        assert broken.stop() == 0
        prom.wait_for('up{job="poolkit-sidecar"} == 0')
        end = time.time() + 1

        expressions = promql_expressions()
        for promql in expressions:
            series = prom.query_range(promql.expr, start, end, step=1.0)
            # An alert's expression is a filter: any sample means its condition held. A panel must show more
            # than gaps or a flat zero line.
            if not (series if promql.source.endswith("alerts.yml") else shows_something(series)):
                problems.append(describe_empty(promql, series))
            if promql.name.startswith("Sidecar up"):
                # Both sidecars, the stopped one included, and no other job's targets.
                shown = {(one["metric"]["job"], one["metric"]["instance"]) for one in series}
                wanted = {("poolkit-sidecar", good.target), ("poolkit-sidecar", broken.target)}
                if shown != wanted:
                    problems.append(f"'Sidecar up' shows {sorted(shown)}, expected {sorted(wanted)}")
        # The checks bite: a bare `up` (the panel's old query) lists the app too, and a misspelt metric
        # shows nothing.
        bare_up = prom.query_range('up{job=~".*", instance=~".*"}', start, end)
        assert "poolkit-app" in {one["metric"]["job"] for one in bare_up}
        typo = next(p.expr for p in expressions if "poolkit_pool_acquire_timeouts_total" in p.expr)
        assert not shows_something(prom.query_range(typo.replace("acquire_timeouts", "acquire_timeout"), start, end))

        out = tmp_path / "dashboard.png"
        draw(prom.url, start, end, out)
        if os.environ.get(SCREENSHOT_ENV):
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(out.read_bytes())

    print(f"\nevaluated {len(expressions)} expressions over {end - start:.0f} s; alerts: {states}")
    print(f"workload ({result['seconds']:.1f} s): {dict(sorted(counts.items()))}")
    assert not problems, "\n".join(problems)


def describe_empty(promql: PromQL, series: list[dict[str, Any]]) -> str:
    what = "only zeros or NaN" if series else "no data"
    note = ""
    if any(name in promql.expr for name in PREPARED_OR_SESSION):
        note = " (needs the sidecar's prepared-statement / session pin and route metrics)"
    return f"{promql.source}: {promql.name!r} shows {what}{note}: {promql.expr}"


def workload_problems(counts: dict[str, int], messages: dict[str, str]) -> list[str]:
    """What the app saw must be what the workload was built to cause (the panels depend on it)."""
    problems = []
    expected_at_least = {
        "orders slow": 24,
        "sidecar slow": 24,
        "orders timeout": 2,
        "orders served after waiting": 1,
        "sidecar wait timeout": 2,
        "replica:error": 3,
        "broken sidecar:error": 3,
        "steady introspection": 10,
        "churn query": 4,
        "sidecar login": 10,
        "sidecar prepared": 40,
    }
    for name, least in expected_at_least.items():
        if counts.get(name, 0) < least:
            problems.append(f"workload: {name!r} happened {counts.get(name, 0)} times, expected >= {least}")
    for kind in ("orders", "billing", "reports", "sidecar"):
        for sqlstate_class in ("22", "42"):
            if not counts.get(f"{kind} error {sqlstate_class}"):
                problems.append(f"workload: no class {sqlstate_class} error on {kind}")
    # Errors other than the ones provoked on purpose: a broken feature (prepared statements, pins).
    expected_errors = {"replica:error", "broken sidecar:error"}
    for name, message in messages.items():
        if name.endswith(":error") and name not in expected_errors:
            problems.append(f"workload: {counts[name]} x {name}: {message}")
    return problems


def wait_for_alerts(prom: Prometheus, names: tuple[str, ...], timeout: float = 20.0) -> dict[str, str]:
    """alertname -> state for the alerts of `names` that are pending or firing, polled until all are."""
    deadline = time.monotonic() + timeout
    while True:
        states = {a["labels"]["alertname"]: a["state"] for a in prom.alerts() if a["labels"]["alertname"] in names}
        if set(states) == set(names) or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def draw(prometheus_url: str, start: float, end: float, out: Path) -> None:
    """grafana/screenshot.py on this run's data."""
    subprocess.run(
        [
            sys.executable,
            str(REPO / "grafana" / "screenshot.py"),
            "--prometheus",
            prometheus_url,
            "--start",
            f"{start:.0f}",
            "--end",
            f"{end:.0f}",
            "--out",
            str(out),
        ],
        check=True,
        timeout=120,
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
