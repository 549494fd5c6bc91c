"""deploy/prometheus: promtool check config / check rules / test rules, and the alert rules' annotations."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .prom import ALERTS, DEPLOY_CONFIG, REPO, alert_rules, binary

RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yml"
README = REPO / "README.md"


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *map(str, args)], capture_output=True, text=True, check=False)


def test_promtool_check_config_accepts_the_example_scrape_config() -> None:
    result = promtool("check", "config", DEPLOY_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["poolkit-sidecar"] == ["127.0.0.1:9930"]
    assert "poolkit-app" in targets
    assert config["rule_files"] == ["alerts.yml"]


def test_promtool_check_rules_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_promtool_unit_tests_pass_and_cover_firing_and_quiet_for_every_alert() -> None:
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert firing == names
    assert quiet == names


def test_the_unit_tests_catch_a_loosened_rule(tmp_path: Path) -> None:
    # Without the `for: 5m`, saturation fires after 3 minutes: the unit tests must notice.
    shutil.copy(RULE_TESTS, tmp_path / "alerts.test.yml")
    text = ALERTS.read_text()
    loosened = text.replace("> 0.9\n        for: 5m\n", "> 0.9\n", 1)
    assert loosened != text
    (tmp_path / "alerts.yml").write_text(loosened)
    result = promtool("test", "rules", tmp_path / "alerts.test.yml")
    assert result.returncode == 1
    assert "alertname: PoolkitPoolSaturated, time: 4m" in result.stdout + result.stderr


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-") for heading in headings}


def test_every_alert_has_summary_description_severity_and_a_runbook_section() -> None:
    readme = README.read_text()
    assert "## Runbook" in readme
    runbook = readme
    anchors = _anchors(runbook)
    for rule in alert_rules():
        name = rule["alert"]
        annotations = rule["annotations"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert len(annotations["summary"]) > 10, name
        if not str(rule["expr"]).startswith("absent("):  # absent() has no instance to name
            assert "{{ $labels.instance }}" in annotations["description"], name
        assert annotations["runbook_url"] == f"README.md#{name.lower()}", name
        assert name.lower() in anchors, f"no runbook section '### {name}'"


def test_prometheusrule_is_rendered_from_alerts_yml_and_embeds_the_same_rules() -> None:
    result = subprocess.run(
        [sys.executable, "deploy/render.py", "--check"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    rule = yaml.safe_load((REPO / "deploy/kubernetes/prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
