"""The GAM_* variables the Dockerfile, compose and Kubernetes set are real settings with valid values.

Settings ignores unknown variables (extra="ignore"), so a misspelt GAM_MAX_BATCHSIZE would be dropped silently.
"""

from __future__ import annotations

import os

import pytest
import yaml

from server.settings import Settings
from tests.deploy.manifests import ROOT, dockerfile_env, dockerfile_instructions, k8s_object

PREFIX = "GAM_"


def dockerfile_vars() -> dict[str, str]:
    ins = dockerfile_instructions()
    env_keys = {tok.split("=", 1)[0] for i in ins if i.keyword == "ENV" for tok in i.args.split() if "=" in tok}
    return {k: v for k, v in dockerfile_env(ins).items() if k in env_keys and k.startswith(PREFIX)}


def compose_vars() -> dict[str, str]:
    svc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["gam-serve"]
    return {k: str(v) for k, v in svc.get("environment", {}).items() if k.startswith(PREFIX)}


def k8s_vars() -> dict[str, str | None]:
    (c,) = k8s_object("Deployment")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in c["env"] if e["name"].startswith(PREFIX)}  # None: from a Secret


SOURCES = {"Dockerfile": dockerfile_vars, "docker-compose.yml": compose_vars, "deploy/k8s/deployment.yaml": k8s_vars}


@pytest.mark.parametrize("source", SOURCES)
def test_gam_variables_are_settings_and_parse(source, monkeypatch):
    variables = SOURCES[source]()
    assert variables, f"{source} sets no GAM_* variable"
    fields = {PREFIX + name.upper() for name in Settings.model_fields}
    unknown = set(variables) - fields
    assert not unknown, f"{source}: {sorted(unknown)} are not gam-serve settings"
    for k in list(os.environ):
        if k.startswith(PREFIX):
            monkeypatch.delenv(k)
    for k, v in variables.items():
        monkeypatch.setenv(k, v if v is not None else "secret-from-the-cluster")
    s = Settings()  # raises on a value that does not parse
    for k, v in variables.items():
        value = getattr(s, k[len(PREFIX) :].lower())
        if v is not None and isinstance(value, int | float | str):
            assert value == type(value)(v), f"{source}: {k}={v!r} was read as {value!r}"


def test_entrypoint_flags_parse(monkeypatch):
    """The image's ENTRYPOINT + CMD arguments are flags `gam-serve` accepts, and bind every interface."""
    import json

    from server.cli import parse

    ins = dockerfile_instructions()
    (entry,) = [json.loads(i.args) for i in ins if i.keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(i.args) for i in ins if i.keyword == "CMD"]
    assert entry[0] == "gam-serve"
    for k in list(os.environ):
        if k.startswith(PREFIX):
            monkeypatch.delenv(k)
    for k, v in dockerfile_vars().items():
        monkeypatch.setenv(k, v)
    s = parse(entry[1:] + cmd)
    assert s.host == "0.0.0.0" and s.port == 8000
    assert str(s.model) == dockerfile_vars()["GAM_MODEL"]
