"""docker-compose.yml (gam-serve + Prometheus + Grafana) checked offline against the files it mounts."""

from __future__ import annotations

import json
import re

import yaml

from tests.deploy.manifests import ROOT, schema_validator, yaml_docs

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def mounts(service: str) -> dict[str, str]:
    """container path -> host path (relative to the repo) of a service's bind mounts."""
    out = {}
    for v in SERVICES[service].get("volumes", []):
        host, container = v.split(":")[:2]
        if host.startswith("./"):
            out[container] = host[2:]
    return out


def test_compose_file_is_valid():
    schema_validator("compose-subset.json").validate(COMPOSE)


def test_compose_schema_rejects_typos():
    bad = json.loads(json.dumps(COMPOSE))
    bad["services"]["gam-serve"]["deploy"]["resources"]["reservation"] = {}
    errors = list(schema_validator("compose-subset.json").iter_errors(bad))
    assert any("reservation" in e.message for e in errors)


def test_images_are_pinned_and_bind_mounts_exist():
    for name, svc in SERVICES.items():
        if "build" not in svc:
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", svc["image"]), f"{name}: pin an exact image tag"
        for container, host in mounts(name).items():
            assert (ROOT / host).exists(), f"{name}: {host} (mounted at {container}) does not exist"


def test_gam_serve_gets_a_gpu_and_time_to_drain():
    svc = SERVICES["gam-serve"]
    assert svc["build"] == "." and svc["ports"] == ["8000:8000"]
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    # docker's default stop timeout (10 s) would cut the server's SIGTERM drain short
    assert int(svc["stop_grace_period"].removesuffix("s")) >= 20


def test_prometheus_scrapes_gam_serve_and_loads_the_alerts():
    m = mounts("prometheus")
    cfg = yaml.safe_load((ROOT / m["/etc/prometheus/prometheus.yml"]).read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "gam-serve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["gam-serve:8000"]  # compose service name : container port
    for rule_file in cfg["rule_files"]:
        assert rule_file in m, f"rule file {rule_file} is not mounted into the prometheus container"
        (alerts,) = yaml_docs(ROOT / m[rule_file])
        schema_validator("monitoring.coreos.com_v1_prometheusrule.json", "/$defs/groups").validate(alerts["groups"])


def test_grafana_provisioning_wires_datasource_and_dashboard():
    m = mounts("grafana")
    prov = ROOT / m["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["isDefault"]
    (provider,) = yaml.safe_load((prov / "dashboards/gam-serve.yml").read_text())["providers"]
    dash_dir = ROOT / m[provider["options"]["path"]]
    dashboards = sorted(dash_dir.glob("*.json"))
    assert [d.name for d in dashboards] == ["gam-serve.json"]
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/gam-serve.json"
