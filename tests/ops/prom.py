"""A real Prometheus (Debian's package) on loopback for tests, and every PromQL expression poolkit ships.

`Prometheus` starts `/usr/bin/prometheus` on a free 127.0.0.1 port with a temporary configuration (given
scrape targets and rule files, 1 s scrape and evaluation interval), waits until it is ready and answers
queries through the HTTP API. `promql_expressions()` collects every expression from the Grafana dashboards
(panels and template variables) and the alert rules, with Grafana's template variables substituted, so a test
can evaluate each one against live data.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

from poolkit.dev.devstack import free_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "grafana" / "dashboards"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DEPLOY_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
INSTALL_HINT = "install it with `apt-get install prometheus` (Debian), or run `bash scripts/setup`"

# What Grafana would put in place of its variables; "All" is ".*" in poolkit's dashboards.
DEFAULT_VARIABLES: dict[str, str] = {
    "datasource": "prometheus",
    "job": ".*",
    "instance": ".*",
    "pool": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),\s*)?(\w+)\)\s*$", re.DOTALL)


class PrometheusError(RuntimeError):
    """Prometheus could not be started, or answered a query with an error."""


def binary(name: str = "prometheus") -> str:
    """Path of a Prometheus tool (`prometheus`, `promtool`); fails loudly with the install command."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if path is None:
        raise PrometheusError(f"`{name}` not found: {INSTALL_HINT}")
    return path


def deploy_scrape_configs(targets: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """deploy/prometheus/prometheus.yml's scrape configs with each job's targets replaced.

    `targets` maps a job name of that file (`poolkit-sidecar`, `poolkit-app`) to host:port targets, so a test
    scrapes its own processes with the shipped job names, paths and relabelings. An unknown job name is an
    error: the test and the shipped config must agree.
    """
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    unknown = set(targets) - set(jobs)
    if unknown:
        raise PrometheusError(f"jobs {sorted(unknown)} are not in {DEPLOY_CONFIG}; it has {sorted(jobs)}")
    scrape_configs = []
    for name, job in jobs.items():
        if name in targets:
            scrape_configs.append({**job, "static_configs": [{"targets": list(targets[name])}]})
    return scrape_configs


class Prometheus:
    """A Prometheus server started for a test: `with Prometheus(jobs={...}) as prom: prom.query("up")`.

    `jobs` maps a job name to host:port targets scraped at `/metrics`; `scrape_configs` adds complete
    scrape configs (e.g. from `deploy_scrape_configs`); `scrape_self` adds a `prometheus` job scraping this
    server. Rule files are loaded as given. Everything lives in a temporary directory removed on `stop()`.
    """

    def __init__(
        self,
        jobs: Mapping[str, Sequence[str]] | None = None,
        *,
        scrape_configs: Sequence[Mapping[str, Any]] = (),
        rule_files: Sequence[Path | str] = (),
        scrape_self: bool = False,
        interval: str = "1s",
        ready_timeout: float = 60.0,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self._ready_timeout = ready_timeout
        configs: list[dict[str, Any]] = [dict(config) for config in scrape_configs]
        for name, targets in (jobs or {}).items():
            configs.append({"job_name": name, "static_configs": [{"targets": list(targets)}]})
        if scrape_self:
            configs.append({"job_name": "prometheus", "static_configs": [{"targets": [self.address]}]})
        self.config: dict[str, Any] = {
            "global": {
                "scrape_interval": interval,
                "evaluation_interval": interval,
                "scrape_timeout": interval,
            },
            "rule_files": [str(Path(path).resolve()) for path in rule_files],
            "scrape_configs": configs,
        }
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(base_url=self.url, timeout=10.0)

    @property
    def log_path(self) -> Path:
        """Prometheus's own log (stdout and stderr), for failure messages."""
        if self._dir is None:
            raise PrometheusError("Prometheus is not started")
        return Path(self._dir.name) / "prometheus.log"

    def start(self) -> Prometheus:
        """Write the configuration, start the server and wait until /-/ready answers 200."""
        executable = binary("prometheus")
        self._dir = tempfile.TemporaryDirectory(prefix="poolkit-prometheus-")
        workdir = Path(self._dir.name)
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    executable,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.address}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        deadline = time.monotonic() + self._ready_timeout
        while True:
            if self._process.poll() is not None:
                log_text = self.log_path.read_text(errors="replace")[-4000:]
                self.stop()
                raise PrometheusError(f"prometheus exited with {self._process.returncode}:\n{log_text}")
            try:
                if self._client.get("/-/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus on {self.address} not ready after {self._ready_timeout:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s) and remove its directory."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._client.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    @property
    def returncode(self) -> int | None:
        """The process's exit status once it has stopped, else None."""
        return None if self._process is None else self._process.poll()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        response = self._client.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {dict(params or {})}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Evaluate an instant query; the result's series (vector) or one scalar/string as a 1-item list."""
        params = {"query": promql}
        if at is not None:
            params["time"] = str(at)
        data = self._api("query", params)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        return list(result)

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """Evaluate a range query (what a Grafana time-series panel sends); each series with its `values`."""
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        data = self._api("query_range", params)
        return list(data["result"])

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll `query` until it returns at least one series; fail with the query after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"no data after {timeout:.0f} s for: {promql}")
            time.sleep(0.5)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, each with labels, scrapeUrl, health and lastError."""
        return list(self._api("targets", {"state": "active"})["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rule groups, each with its rules' health, lastError and state."""
        return list(self._api("rules")["groups"])

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Prometheus holds right now (pending or firing), each with labels and state."""
        return list(self._api("alerts")["alerts"])

    def reload(self, scrape_configs: Sequence[Mapping[str, Any]]) -> None:
        """Replace the scrape configs and reload (SIGHUP, as an operator would); returns once the active
        targets are exactly those of the new configs."""
        if self._process is None or self._dir is None:
            raise PrometheusError("Prometheus is not started")
        self.config["scrape_configs"] = [dict(config) for config in scrape_configs]
        (Path(self._dir.name) / "prometheus.yml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._process.send_signal(signal.SIGHUP)
        wanted = {config["job_name"] for config in scrape_configs}
        deadline = time.monotonic() + 30
        while {target["labels"]["job"] for target in self.targets()} != wanted:
            if time.monotonic() > deadline:
                log_text = self.log_path.read_text(errors="replace")[-4000:]
                raise PrometheusError(f"reload did not switch the targets to jobs {sorted(wanted)}:\n{log_text}")
            time.sleep(0.2)


@dataclass(frozen=True)
class PromQL:
    """One PromQL expression shipped in poolkit's ops files."""

    source: str  # file, relative to the repository
    name: str  # panel title / variable name / alert name
    raw: str  # as written, with template variables
    expr: str  # with template variables substituted


def substitute(text: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]); an unknown variable is an error."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"no substitution for Grafana variable ${name} in: {text}")
        return values[name]

    return _VARIABLE.sub(replace, text)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard under grafana/dashboards, by path relative to the repository."""
    return {str(path.relative_to(REPO)): json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promql_expressions(variables: Mapping[str, str] | None = None) -> list[PromQL]:
    """Every PromQL expression in the dashboards (panel targets and template variable queries, a
    `label_values(m, l)` turned into `count by (l) (m)`) and in the alert rules, substituted."""
    found: list[PromQL] = []
    for source, dashboard in dashboards().items():
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = _LABEL_VALUES.match(text)
            raw = f"count by ({match.group(2)}) ({match.group(1) or 'up'})" if match else text
            found.append(PromQL(source, f"variable {variable['name']}", text, substitute(raw, variables)))
        for panel in _panels(dashboard.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    name = f"{panel['title']} [{target.get('refId', '?')}]"
                    found.append(PromQL(source, name, target["expr"], substitute(target["expr"], variables)))
    source = str(ALERTS.relative_to(REPO))
    for rule in alert_rules():
        expr = str(rule["expr"])
        found.append(PromQL(source, rule.get("alert") or rule.get("record", "?"), expr, expr))
    return found
