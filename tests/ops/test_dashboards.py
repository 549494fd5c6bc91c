"""Grafana dashboards: provisionable as they are, every panel described and with a unit, and every metric
and label they query is in ARCHITECTURE.md's contract (a renamed metric fails here)."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from .contract import contract, scan, violations
from .prom import REPO, dashboards, promql_expressions

PANELS_REQUIRED = {
    "poolkit-pools": [
        "Queries/s",
        "Query latency p50 / p95 / p99",
        "Slow queries/s",
        "Pool utilisation (in use / max)",
        "Waiting requests",
        "Acquire wait p95 / p99",
        "Acquire timeouts (exhaustion) and waits/s",
        "Connections opened / closed per second",
        "Query errors by SQLSTATE class",
    ],
    "poolkit-sidecar": [
        "Clients: active / waiting / idle",
        "Servers: active / idle / connecting",
        "Transactions/s and queries/s",
        "Client wait p50 / p95 / p99",
        "Prepared-statement cache hit ratio",
        "Pinned clients",
        "Pins/s and routed/s",
    ],
}


def test_dashboard_files_are_rendered_from_grafana_render_py() -> None:
    result = subprocess.run(
        [sys.executable, "grafana/render.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_dashboards_are_provisionable_with_a_datasource_variable_and_the_three_filters() -> None:
    found = dashboards()
    assert {d["uid"] for d in found.values()} == set(PANELS_REQUIRED)
    for path, dashboard in found.items():
        assert "__inputs" not in dashboard, f"{path}: provisioning cannot fill __inputs"
        assert dashboard.get("id") is None, f"{path}: a fixed id clashes with other dashboards on import"
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert list(variables) == ["datasource", "job", "instance", "pool"], path
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for name in ("job", "instance", "pool"):
            variable = variables[name]
            assert variable["type"] == "query"
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert variable["query"]["query"].startswith("label_values("), (path, name)
            assert variable["query"]["query"].endswith(f", {name})"), (path, name)
        titles = [panel["title"] for panel in dashboard["panels"]]
        assert set(PANELS_REQUIRED[dashboard["uid"]]) <= set(titles), (path, titles)
        assert len(set(titles)) == len(titles), f"{path}: duplicate panel titles"
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(set(ids)) == len(ids), f"{path}: duplicate panel ids"


def test_every_panel_has_a_unit_a_description_and_uses_the_datasource_variable() -> None:
    for path, dashboard in dashboards().items():
        for panel in dashboard["panels"]:
            where = f"{path}: panel {panel['title']!r}"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
            assert len(panel.get("description", "")) >= 20, f"{where} has no description"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["targets"], f"{where} has no query"
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
                assert target["expr"], where
                assert target["legendFormat"], where
            gp = panel["gridPos"]
            assert gp["x"] >= 0, where
            assert gp["x"] + gp["w"] <= 24, where


def test_every_series_query_is_filtered_by_job_instance_and_pool() -> None:
    for promql in promql_expressions():
        if promql.source.endswith(".json") and not promql.name.startswith("variable"):
            names, labels = scan(promql.raw)
            assert {"job", "instance"} <= labels, promql
            if names != {"up"}:
                assert "pool" in labels, promql
            assert '=~"$job"' in promql.raw, promql
            assert '=~"$instance"' in promql.raw, promql


def test_histogram_quantiles_sum_rates_of_buckets_by_le() -> None:
    quantiles = [p for p in promql_expressions() if "histogram_quantile" in p.raw]
    assert len(quantiles) >= 10
    for promql in quantiles:
        assert "sum by (le, " in promql.raw, promql
        assert "_bucket{" in promql.raw, promql
        assert "[$__rate_interval]" in promql.raw, promql


def test_every_metric_and_label_queried_is_in_architecture_md() -> None:
    allowed = contract()
    problems = [
        f"{p.source}: {p.name}: {problem}" for p in promql_expressions() for problem in violations(p.expr, allowed)
    ]
    for path, dashboard in dashboards().items():
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]):
                    if label not in allowed.labels | {"job", "instance"}:
                        problems.append(f"{path}: {panel['title']}: legend label {label!r} is not in the contract")
    assert problems == []


def test_every_contract_metric_is_on_a_dashboard() -> None:
    allowed = contract()
    series = allowed.series_names()
    used = {
        series[name]
        for p in promql_expressions()
        if p.source.endswith(".json")
        for name in scan(p.expr)[0]
        if name in series
    }
    assert sorted(set(allowed.metrics) - used) == []


def test_the_contract_check_catches_a_renamed_metric_or_label() -> None:
    allowed = contract()
    good = 'sum by (pool) (rate(poolkit_pool_acquire_timeouts_total{job=~".*"}[1m]))'
    assert violations(good, allowed) == []
    assert violations(good.replace("acquire_timeouts", "acquire_timeout"), allowed) == [
        "metric 'poolkit_pool_acquire_timeout_total' is not in ARCHITECTURE.md"
    ]
    assert violations('sum by (sqlstate) (poolkit_query_errors_total{job=~".*"})', allowed) == [
        "label 'sqlstate' is not in ARCHITECTURE.md"
    ]
    # Histogram series are allowed only for histograms.
    assert violations("poolkit_pool_acquire_duration_seconds_bucket", allowed) == []
    assert violations("poolkit_slow_queries_total_bucket", allowed) != []


def test_provisioning_files_point_grafana_at_the_dashboards() -> None:
    provider = yaml.safe_load((REPO / "grafana/provisioning/dashboards/poolkit.yaml").read_text())
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    mount = entry["options"]["path"]
    text = (REPO / "grafana/provisioning/dashboards/poolkit.yaml").read_text()
    assert f"grafana/dashboards   -> {mount}" in text, "the comment documents where to mount grafana/dashboards"
    datasources = yaml.safe_load((REPO / "grafana/provisioning/datasources/poolkit.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["access"] == "proxy"
    assert source["url"] == "${POOLKIT_PROMETHEUS_URL}"
