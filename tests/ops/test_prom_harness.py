"""The Prometheus test harness (tests/ops/prom.py) against a real Prometheus scraping itself."""

from __future__ import annotations

import socket

import pytest

from .prom import ALERTS, DEFAULT_VARIABLES, Prometheus, PrometheusError, promql_expressions, substitute


def test_prometheus_scrapes_itself_and_answers_queries() -> None:
    prom = Prometheus(scrape_self=True, rule_files=[ALERTS]).start()
    try:
        up = prom.wait_for('up{job="prometheus"} == 1')
        assert up[0]["metric"]["instance"] == prom.address
        targets = prom.targets()
        assert [(t["labels"]["job"], t["health"]) for t in targets] == [("prometheus", "up")]
        assert targets[0]["scrapeUrl"] == f"http://{prom.address}/metrics"

        # The real server (not only promtool) loads and evaluates every shipped alert rule without error.
        rules = prom.wait_for("prometheus_rule_group_rules > 0")
        assert sum(float(series["value"][1]) for series in rules) == 11
        prom.wait_for("prometheus_rule_evaluations_total > 0")
        groups = prom.rules()
        assert {group["name"] for group in groups} == {"poolkit-pools", "poolkit-sidecar"}
        unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] == "err"]
        assert unhealthy == []
        # With no sidecar scraped, the absent() rule is the one that goes pending: rules really evaluate.
        pending = prom.wait_for('ALERTS{alertname="PoolkitSidecarNotScraped"}')
        assert pending[0]["metric"]["alertstate"] == "pending"

        # Every dashboard and alert expression parses and runs in this Prometheus (data comes from the
        # live-workload test; here an invalid expression would be a bad_data error).
        for promql in promql_expressions():
            prom.query(promql.expr)
        with pytest.raises(PrometheusError, match="bad_data"):
            prom.query("sum by (pool (rate(x[1m]))")
    finally:
        prom.stop()
    assert prom.returncode == 0
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", prom.port)) != 0, "the port is still open after stop()"


def test_a_broken_config_fails_start_with_prometheus_own_message(tmp_path) -> None:
    rules = tmp_path / "broken.yml"
    rules.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum by (\n")
    with pytest.raises(PrometheusError, match=r"broken\.yml"):
        Prometheus(rule_files=[rules]).start()


def test_every_expression_is_collected_with_variables_substituted() -> None:
    expressions = promql_expressions()
    sources = {promql.source for promql in expressions}
    assert sources == {
        "grafana/dashboards/poolkit-pools.json",
        "grafana/dashboards/poolkit-sidecar.json",
        "deploy/prometheus/alerts.yml",
    }
    assert len([p for p in expressions if p.source.endswith("alerts.yml")]) == 11
    for promql in expressions:
        assert "$" not in promql.expr, promql
        assert "[[" not in promql.expr, promql
    variable = next(p for p in expressions if p.name == "variable instance")
    assert variable.expr == 'count by (instance) (poolkit_pool_max_connections{job=~".*"})'
    rate = next(p for p in expressions if p.raw.count("$__rate_interval"))
    assert "[1m]" in rate.expr


def test_substitute_knows_grafana_syntaxes_and_refuses_unknown_variables() -> None:
    assert substitute('a{job=~"$job"}[$__rate_interval] ${pool} ${instance:regex} [[job]]', {"job": "j"}) == (
        'a{job=~"j"}[1m] .* .* j'
    )
    assert DEFAULT_VARIABLES["__range"] == "5m"
    with pytest.raises(KeyError, match=r"\$cluster"):
        substitute('up{cluster="$cluster"}')
