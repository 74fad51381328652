"""deploy/k8s validated offline: core kinds by kubernetes-validate (strict), CRDs by schemas in tests/deploy/schemas."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from server.settings import Settings
from tests.deploy.manifests import K8S, K8S_VERSION, ROOT, k8s_object, k8s_objects, schema_validator, yaml_docs

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_prometheusrule.json",
}
OBJECTS = list(k8s_objects())


def validate(obj: dict) -> None:
    """kubernetes-validate (strict: unknown fields fail) for built-in kinds, our JSON schema for CRDs."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        schema_validator(CRD_SCHEMAS[key]).validate(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("obj", [o for _, o in OBJECTS], ids=[f"{f.name}:{o['kind']}" for f, o in OBJECTS])
def test_manifest_is_valid(obj):
    validate(obj)


def test_validation_rejects_typos():
    # each validator must catch a misspelt field, or the test above proves nothing
    dep = copy.deepcopy(k8s_object("Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    for kind, path in [
        ("ScaledObject", ["spec"]),
        ("ServiceMonitor", ["spec", "endpoints", 0]),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0]),
    ]:
        obj = copy.deepcopy(k8s_object(kind))
        node = obj
        for p in path:
            node = node[p]
        node["tpyo"] = 1
        with pytest.raises(Exception, match="tpyo"):
            validate(obj)
    so = copy.deepcopy(k8s_object("ScaledObject"))
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 24  # KEDA trigger metadata values are strings
    with pytest.raises(Exception, match="24"):
        validate(so)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    files = sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files
    assert [i["name"] for i in kust["images"]] == [c["image"].split(":")[0] for c in containers()]
    ns = k8s_object("Namespace")["metadata"]["name"]
    assert kust["namespace"] == ns


def containers() -> list[dict]:
    return k8s_object("Deployment")["spec"]["template"]["spec"]["containers"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_deployment_serves_on_gpu_with_health_probes():
    dep = k8s_object("Deployment")
    (c,) = containers()
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(env_of(c).get("GAM_PORT", Settings.model_fields["port"].default))}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # liveness must not kill a pod that is still loading: the startup probe covers model load
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 120


def test_deployment_runs_as_non_root_with_a_read_only_root():
    pod = k8s_object("Deployment")["spec"]["template"]["spec"]
    (c,) = containers()
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile_uid = next(
        line.split()[1].split(":")[0]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("USER ")
    )
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_uid
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), "read-only root needs a writable /tmp"


def test_termination_grace_covers_prestop_and_drain():
    """terminationGracePeriodSeconds >= preStop sleep + the server's drain grace + 10 s (uvicorn's close + margin)."""
    pod = k8s_object("Deployment")["spec"]["template"]["spec"]
    (c,) = containers()
    grace = float(env_of(c).get("GAM_SHUTDOWN_GRACE", Settings.model_fields["shutdown_grace"].default))
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop = float(cmd[1])
    tgps = pod["terminationGracePeriodSeconds"]
    assert pre_stop + grace + 10 <= tgps <= pre_stop + grace + 60, (pre_stop, grace, tgps)


def test_service_monitor_and_autoscaler_point_at_the_deployment():
    dep, svc = k8s_object("Deployment"), k8s_object("Service")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in containers()[0]["ports"]}
    sm = k8s_object("ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [port["name"]]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    so = k8s_object("ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] >= 1 and so["spec"]["maxReplicaCount"] > so["spec"]["minReplicaCount"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "gam_requests_waiting" in trigger["metadata"]["query"]
    # the per-replica target must be reachable: at most the batch a replica runs at once
    batch = int(env_of(containers()[0]).get("GAM_MAX_BATCH_SIZE", Settings.model_fields["max_batch_size"].default))
    assert 0 < float(trigger["metadata"]["threshold"]) <= batch


def test_prometheus_rule_is_the_compose_alert_file():
    rule = k8s_object("PrometheusRule")
    (alerts,) = yaml_docs(ROOT / "deploy/prometheus/alerts.yml")
    assert rule["spec"] == alerts
    schema_validator("monitoring.coreos.com_v1_prometheusrule.json", "/$defs/groups").validate(alerts["groups"])
