"""deploy/k8s: schema validation (offline) and the cross-references between the manifests."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from worker.observability import Metrics

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# Oldest and newest Kubernetes minor versions the manifests must be valid for.
K8S_VERSIONS = ("1.30", "latest")
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh_v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.keda.sh_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com_v1.json",
}
POD_LABELS = {"app.kubernetes.io/name": "signal-worker"}


def _obj(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for (k, _), doc in objects.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    containers = _obj(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def _config(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = _obj(objects, "ConfigMap")["data"]
    return data


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


# -- the kustomization -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_only_existing_ones(kustomization: dict[str, Any]) -> None:
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert kustomization["namespace"]


# -- schemas -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_kinds_validate_against_the_kubernetes_schemas(
    k8s_objects: dict[tuple[str, str], dict[str, Any]], version: str
) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="dev extra kubernetes-validate not installed")
    if version == "latest":
        version = kv.latest_version()
    checked = 0
    for (kind, name), doc in k8s_objects.items():
        if (doc["apiVersion"], kind) in CRD_KINDS:
            continue
        try:
            kv.validate(doc, version, strict=True)  # strict: unknown fields are errors
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{kind}/{name} invalid for Kubernetes {version}: {path}: {exc.message}")
        checked += 1
    assert checked >= 8


def test_custom_resources_validate_against_our_crd_subset_schemas(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """kubernetes-validate ships no CRD schemas; tests/deploy/schemas/ holds the fields we use,
    taken from the KEDA and Prometheus Operator CRDs, with unknown fields rejected."""
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    common = json.loads((SCHEMAS / "_common.json").read_text())
    registry = referencing.Registry().with_resource(common["$id"], referencing.Resource.from_contents(common))
    seen = set()
    for (kind, name), doc in k8s_objects.items():
        schema_file = CRD_KINDS.get((doc["apiVersion"], kind))
        if schema_file is None:
            continue
        schema = json.loads((SCHEMAS / schema_file).read_text())
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{kind}/{name}: {errors}"
        seen.add(kind)
    assert seen == {kind for _, kind in CRD_KINDS}


def test_crd_schemas_reject_unknown_fields(k8s_objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    common = json.loads((SCHEMAS / "_common.json").read_text())
    registry = referencing.Registry().with_resource(common["$id"], referencing.Resource.from_contents(common))
    doc = json.loads(json.dumps(_obj(k8s_objects, "ScaledObject")))
    doc["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 500  # KEDA wants strings
    doc["spec"]["maxReplicas"] = 3  # typo of maxReplicaCount
    schema = json.loads((SCHEMAS / CRD_KINDS[("keda.sh/v1alpha1", "ScaledObject")]).read_text())
    errors = list(jsonschema.Draft202012Validator(schema, registry=registry).iter_errors(doc))
    assert len(errors) == 2


# -- the Deployment ----------------------------------------------------------------------------


def test_deployment_requests_one_gpu_and_bounded_resources(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    resources = _container(k8s_objects)["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert str(resources["requests"]["nvidia.com/gpu"]) == "1"
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_probes_use_the_health_endpoints_on_the_metrics_port(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    container = _container(k8s_objects)
    port = int(_config(k8s_objects)["SIGNAL_WORKER_SERVICE__METRICS_PORT"])
    (metrics_port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert metrics_port["containerPort"] == port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_grace_period_exceeds_the_workers_drain_budget(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    grace = _obj(k8s_objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = float(_config(k8s_objects)["SIGNAL_WORKER_SERVICE__SHUTDOWN_GRACE_S"])
    # The worker must hit its own forced exit (no commit) well before the kubelet's SIGKILL.
    assert grace >= drain + 15, (grace, drain)


def test_pod_is_locked_down_with_writable_tmp_only(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pod = _obj(k8s_objects, "Deployment")["spec"]["template"]["spec"]
    container = _container(k8s_objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert pod["automountServiceAccountToken"] is False


def test_settings_come_from_the_configmap_and_credentials_from_the_secret(
    k8s_objects: dict[tuple[str, str], dict[str, Any]], env_names: set[str]
) -> None:
    container = _container(k8s_objects)
    configmap = _obj(k8s_objects, "ConfigMap")
    secret = _obj(k8s_objects, "Secret")
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    assert set(configmap["data"]) <= env_names, set(configmap["data"]) - env_names
    assert not [k for k in configmap["data"] if "PASSWORD" in k], "passwords belong in the Secret"

    secret_env = {}
    for var in container["env"]:
        assert var["name"] in env_names, var["name"]
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret["stringData"], ref["key"]
            secret_env[var["name"]] = ref["key"]
    assert {"SIGNAL_WORKER_KAFKA__SASL_PASSWORD", "SIGNAL_WORKER_REDIS__PASSWORD"} <= set(secret_env)


def test_configmap_plus_secret_is_a_valid_configuration(
    k8s_objects: dict[tuple[str, str], dict[str, Any]], isolated_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.settings import load_settings

    container = _container(k8s_objects)
    secret = _obj(k8s_objects, "Secret")["stringData"]
    for name, value in _config(k8s_objects).items():
        monkeypatch.setenv(name, value)
    for var in container["env"]:
        ref = var["valueFrom"].get("secretKeyRef")
        monkeypatch.setenv(var["name"], secret[ref["key"]] if ref else "pod-0")
    settings = load_settings()
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.redis.url.startswith("rediss://"), "Redis traffic (windows, credentials) goes over TLS"
    assert settings.service.worker_id == "pod-0"
    assert os.environ["SIGNAL_WORKER_SERVICE__METRICS_PORT"] == str(settings.service.metrics_port)


# -- selectors and references ------------------------------------------------------------------


def test_selectors_match_the_pods(k8s_objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = _obj(k8s_objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"], pod_labels)
    assert _selects(_obj(k8s_objects, "PodDisruptionBudget")["spec"]["selector"], pod_labels)
    assert _selects(_obj(k8s_objects, "NetworkPolicy")["spec"]["podSelector"], pod_labels)
    service = _obj(k8s_objects, "Service")
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    monitor = _obj(k8s_objects, "ServiceMonitor")
    assert _selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] in {
        name for kind, name in k8s_objects if kind == "ServiceAccount"
    }


def test_keda_scales_the_deployment_on_the_input_topic_lag(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    scaled = _obj(k8s_objects, "ScaledObject")["spec"]
    config = _config(k8s_objects)
    assert scaled["scaleTargetRef"]["name"] == _obj(k8s_objects, "Deployment")["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["consumerGroup"] == config["SIGNAL_WORKER_KAFKA__CONSUMER_GROUP"]
    assert meta["topic"] == config["SIGNAL_WORKER_KAFKA__INPUT_TOPIC"]
    assert meta["bootstrapServers"] == config["SIGNAL_WORKER_KAFKA__BOOTSTRAP_SERVERS"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    # maxReplicaCount must be documented as the input topic's partition count.
    text = (K8S / "scaledobject.yaml").read_text()
    assert re.search(r"#.*partitions", text, re.IGNORECASE)
    auth = _obj(k8s_objects, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret = _obj(k8s_objects, "Secret")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert "replicas" not in _obj(k8s_objects, "Deployment")["spec"], "KEDA owns the replica count"


def test_network_policy_allows_only_dns_kafka_and_redis_egress(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    policy = _obj(k8s_objects, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ports = {(p["port"], p.get("protocol", "TCP")) for rule in policy["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (9092, "TCP"), (6379, "TCP")} <= ports
    assert all(rule.get("to") for rule in policy["egress"]), "every egress rule names its peers"
    assert all(rule.get("ports") for rule in policy["egress"]), "every egress rule names its ports"
    metrics_port = int(_config(k8s_objects)["SIGNAL_WORKER_SERVICE__METRICS_PORT"])
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [metrics_port]


def test_alert_rules_only_use_metrics_the_worker_exports(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    exported = {family.name for family in Metrics().registry.collect()}
    series = set()
    for name in exported:
        series |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_info"}
    rules = _obj(k8s_objects, "PrometheusRule")["spec"]["groups"][0]["rules"]
    for rule in rules:
        for used in re.findall(r"\bsignal_worker_[a-z0-9_]+", rule["expr"]):
            assert used in series, f"{rule['alert']} uses unknown metric {used}"
