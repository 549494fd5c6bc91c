"""deploy/kubernetes: core objects against Kubernetes' schemas (kubernetes-validate, offline), the
Prometheus Operator objects against their CRD schemas (vendored in schemas/), and the sidecar's shape."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .prom import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The oldest release the manifests need (preStop `sleep`) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "latest")
CRD_SCHEMAS = {"PodMonitor": "podmonitor-v1.json", "PrometheusRule": "prometheusrule-v1.json"}

try:
    import kubernetes_validate
except ImportError as error:  # pragma: no cover - fails the module loudly, with the fix
    raise ImportError("kubernetes-validate is missing: .venv/bin/pip install kubernetes-validate") from error


def objects() -> dict[str, dict[str, Any]]:
    """Every object of the kustomization, by kind."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    found = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((KUBERNETES / resource).read_text()):
            found[document["kind"]] = document
    return found


def _closed(schema: Any) -> Any:
    """The schema with unknown fields forbidden wherever it lists properties (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = _closed(json.loads((SCHEMAS / CRD_SCHEMAS[kind]).read_text()))
    return jsonschema.Draft7Validator(schema)


def test_the_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert set(objects()) == {"ConfigMap", "Secret", "Deployment", "Service", "PodMonitor", "PrometheusRule"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_are_valid_kubernetes(version: str) -> None:
    desired = kubernetes_validate.latest_version() if version == "latest" else version
    for kind, document in objects().items():
        if kind not in CRD_SCHEMAS:
            kubernetes_validate.validate(document, desired, strict=True)


def test_kubernetes_validate_rejects_a_misspelled_field() -> None:
    deployment = copy.deepcopy(objects()["Deployment"])
    deployment["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicyy"):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_operator_objects_match_their_crd_schema(kind: str) -> None:
    document = objects()[kind]
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    errors = [f"{list(e.path)}: {e.message}" for e in crd_validator(kind).iter_errors(document)]
    assert errors == []


def test_the_crd_check_rejects_a_misspelled_or_mistyped_field() -> None:
    monitor = copy.deepcopy(objects()["PodMonitor"])
    monitor["spec"]["podMetricsEndpoints"][0]["paht"] = "/metrics"
    monitor["spec"]["podMetricsEndpoints"][1]["interval"] = "15 seconds"
    messages = [e.message for e in crd_validator("PodMonitor").iter_errors(monitor)]
    assert any("'paht' was unexpected" in m for m in messages), messages
    assert any("15 seconds" in m for m in messages), messages


def _sidecar_and_app() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    pod = objects()["Deployment"]["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    (app,) = pod["containers"]
    return pod, sidecar, app


def test_poolkit_runs_as_a_native_sidecar_with_probes_on_its_health_endpoints() -> None:
    pod, sidecar, app = _sidecar_and_app()
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "poolkit"  # kustomization's `images` pins the registry and tag
    ports = {port["name"]: port["containerPort"] for port in sidecar["ports"]}
    assert ports == {"postgres": 6432, "poolkit-http": 9930}
    probes = {name: sidecar[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] in {"/healthz", "/readyz"}
    assert {probe["port"] for probe in probes.values()} == {"poolkit-http"}
    env_from = {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in sidecar["envFrom"]}
    assert env_from == {"poolkit-sidecar", "poolkit-database-urls"}
    assert set(objects()["Secret"]["stringData"]) == {"POOLKIT_POOLED_URL", "POOLKIT_DIRECT_URL"}
    assert "127.0.0.1:6432" in next(e["value"] for e in app["env"] if e["name"] == "DATABASE_URL")
    # The drain: the app stops taking traffic first; the sidecar drains on SIGTERM after the app exited.
    assert app["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert pod["terminationGracePeriodSeconds"] > app["lifecycle"]["preStop"]["sleep"]["seconds"] + 30


def test_every_container_is_locked_down_and_has_resources() -> None:
    pod, sidecar, app = _sidecar_and_app()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in (sidecar, app):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert isinstance(context["runAsUser"], int)
        assert context["runAsUser"] > 0
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["resources"]["requests"]["memory"]
        assert container["resources"]["limits"]["memory"]
    # The image's numeric user (Dockerfile USER) is the one Kubernetes runs.
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"USER {sidecar['securityContext']['runAsUser']}:" in dockerfile


def test_the_connection_budget_is_documented_next_to_the_replica_count() -> None:
    text = (KUBERNETES / "deployment.yaml").read_text()
    before_replicas = text[: text.index("  replicas:")].splitlines()[-6:]
    comment = " ".join(before_replicas)
    assert "Connection budget" in comment
    assert "max_size" in comment
    deployment = objects()["Deployment"]
    max_size = int(objects()["ConfigMap"]["data"]["POOLKIT_MAX_SIZE"])
    surge = deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    replicas = deployment["spec"]["replicas"]
    assert f"({replicas} + {surge}) x {max_size} = {(replicas + surge) * max_size}" in comment


def test_the_podmonitor_scrapes_the_sidecar_as_the_job_the_alerts_select() -> None:
    _, sidecar, app = _sidecar_and_app()
    endpoints = objects()["PodMonitor"]["spec"]["podMetricsEndpoints"]
    jobs = {e["port"]: e["relabelings"][0]["replacement"] for e in endpoints}
    assert jobs == {"poolkit-http": "poolkit-sidecar", "http": "poolkit-app"}
    assert {p["name"] for p in sidecar["ports"] + app["ports"]} >= set(jobs)
    selector = objects()["PodMonitor"]["spec"]["selector"]["matchLabels"]
    pod_labels = objects()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    alerts = (REPO / "deploy/prometheus/alerts.yml").read_text()
    assert 'up{job="poolkit-sidecar"}' in alerts


def test_configmap_sidecar_settings_are_real_settings() -> None:
    """Every POOLKIT_SIDECAR_* name in the ConfigMap is a sidecar setting (a typo would be ignored silently)."""
    from poolkit.sidecar.policy.config import SidecarSettings

    data = yaml.safe_load((REPO / "deploy" / "kubernetes" / "configmap.yaml").read_text())["data"]
    names = [k for k in data if k.startswith("POOLKIT_SIDECAR_")]
    assert names
    for name in names:
        assert name.removeprefix("POOLKIT_SIDECAR_").lower() in SidecarSettings.model_fields, name
