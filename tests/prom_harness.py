"""Test harness for metrics: scrape-and-parse helpers and a real Prometheus started on loopback.

``scrape(url)``              GET a /metrics page with httpx and parse it into a :class:`Samples`.
``Prometheus(targets)``      Debian's ``prometheus`` with a temp config scraping ``targets`` every second;
                             ``query(promql)`` runs an instant query over its HTTP API. A context manager;
                             a missing binary fails loudly with the install command.

Reused by the dashboards work: ``Prometheus(..., rule_files=[...])`` also loads alerting/recording rules.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from poolkit.dev.devstack import free_port

PROMETHEUS_INSTALL = "apt-get install -y prometheus"


class Samples:
    """Parsed exposition text: look samples up by name and a subset of labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.rows: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.rows.append((s.name, dict(s.labels), float(s.value)))

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (lab, value) for n, lab, value in self.rows if n == name and all(lab.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The one sample matching; fails if there is none or several (a test must name its series)."""
        found = self.find(name, **labels)
        assert len(found) == 1, f"expected one sample {name}{labels}, found {found}"
        return found[0][1]

    def bucket(self, name: str, le: str, **labels: str) -> float:
        return self.value(f"{name}_bucket", le=le, **labels)


def scrape(url: str) -> Samples:
    """Fetch ``url`` with a real HTTP client and parse it."""
    response = httpx.get(url, timeout=10.0)
    response.raise_for_status()
    return Samples(response.text)


async def ascrape(url: str) -> Samples:
    """Async :func:`scrape` (for use while the event loop runs a workload)."""
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(url)
    response.raise_for_status()
    return Samples(response.text)


def find_prometheus() -> str:
    path = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin:/usr/sbin")
    if path is None:
        raise RuntimeError(f"the prometheus binary is missing: install it with `{PROMETHEUS_INSTALL}`")
    return path


class Prometheus:
    """A real Prometheus on loopback scraping ``targets`` (``host:port`` strings) every second."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        job: str = "poolkit",
        scrape_interval: str = "1s",
        rule_files: Iterable[str | Path] = (),
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.targets = list(targets)
        self.job = job
        self.scrape_interval = scrape_interval
        self.rule_files = [str(p) for p in rule_files]
        self.labels = dict(labels or {})
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> str:
        targets = ", ".join(f'"{t}"' for t in self.targets)
        labels = ", ".join(f'{k}: "{v}"' for k, v in self.labels.items())
        rules = "".join(f'\n  - "{p}"' for p in self.rule_files)
        return (
            "global:\n"
            f"  scrape_interval: {self.scrape_interval}\n"
            f"  evaluation_interval: {self.scrape_interval}\n"
            + (f"rule_files:{rules}\n" if rules else "")
            + "scrape_configs:\n"
            f"  - job_name: {self.job}\n"
            f"    static_configs:\n"
            f"      - targets: [{targets}]\n" + (f"        labels: {{{labels}}}\n" if labels else "")
        )

    def start(self) -> Prometheus:
        binary = find_prometheus()
        self.dir = Path(tempfile.mkdtemp(prefix="poolkit-prom-"))
        config = self.dir / "prometheus.yml"
        config.write_text(self._config())
        self.port = free_port()
        log = (self.dir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus did not become ready in 60 s:\n{self.log()}")

    def log(self) -> str:
        if self.dir is None:
            return ""
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; the API's ``data.result`` list (each with ``metric`` and ``value``)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10.0)
        body = response.json()
        assert body.get("status") == "success", f"{promql}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        """The single value of a query that returns one series, or None while it returns none."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, f"{promql} returned {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, expected: float, timeout: float = 60.0) -> float:
        """Poll ``promql`` until it equals ``expected``; fail with the last value and the log."""
        deadline = time.monotonic() + timeout
        last: float | None = None
        while time.monotonic() < deadline:
            last = self.scalar(promql)
            if last == expected:
                return last
            time.sleep(0.5)
        raise AssertionError(f"{promql} = {last}, expected {expected} within {timeout}s\n{self.log()}")

    def targets_health(self) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10.0).json()
        active: list[dict[str, Any]] = body["data"]["activeTargets"]
        return active

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
