"""Render deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yml (one source of rules).

Run `.venv/bin/python deploy/render.py` after editing alerts.yml; `--check` exits 1 when the
PrometheusRule is stale (tests/ops runs it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = DEPLOY / "kubernetes" / "prometheusrule.yaml"
HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by `.venv/bin/python deploy/render.py`: edit alerts.yml.
# Prometheus Operator: poolkit's alert rules. The label below must match your Prometheus resource's
# ruleSelector (kube-prometheus-stack: its release name).
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL, descriptions) as literal blocks so the output stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule() -> dict[str, Any]:
    """The PrometheusRule object whose spec.groups are alerts.yml's groups."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "poolkit",
            "labels": {"app.kubernetes.io/name": "poolkit", "release": "prometheus"},
        },
        "spec": {"groups": groups},
    }


def render() -> str:
    """The PrometheusRule manifest text."""
    return HEADER + yaml.dump(prometheus_rule(), Dumper=_Dumper, sort_keys=False, width=10_000)


def main() -> int:
    """Write the PrometheusRule, or with --check report whether it is stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if prometheusrule.yaml is out of date")
    args = parser.parse_args()
    text = render()
    if not args.check:
        PROMETHEUS_RULE.write_text(text)
        return 0
    if PROMETHEUS_RULE.is_file() and PROMETHEUS_RULE.read_text() == text:
        return 0
    sys.stderr.write(f"{PROMETHEUS_RULE} is stale: run `.venv/bin/python deploy/render.py`\n")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
