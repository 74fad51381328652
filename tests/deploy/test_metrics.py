"""Every metric the Grafana dashboard, the alert rules and the KEDA trigger query is one the server exports."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.settings import Settings
from tests.deploy.manifests import ROOT, all_queries, dashboard_queries, promql_selectors

# DESIGN.md 2.3 / issue #8: the metric names (and types) the server promises
DOCUMENTED = {
    "gam_request_duration_seconds": "histogram",
    "gam_request_queue_duration_seconds": "histogram",
    "gam_time_to_first_token_seconds": "histogram",
    "gam_time_per_output_token_seconds": "histogram",
    "gam_request_prompt_tokens": "histogram",
    "gam_request_generated_tokens": "histogram",
    "gam_batch_size": "histogram",
    "gam_step_duration_seconds": "histogram",
    "gam_requests": "counter",
    "gam_request_failures": "counter",
    "gam_prompt_tokens": "counter",
    "gam_generated_tokens": "counter",
    "gam_prompt_logprob_tokens": "counter",
    "gam_engine_busy_seconds": "counter",
    "gam_requests_running": "gauge",
    "gam_requests_waiting": "gauge",
    "gam_generated_tokens_per_second": "gauge",
    "gam_model_info": "gauge",
}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
NOT_OURS = {"up"}  # series Prometheus makes itself
DASHBOARD = ROOT / "deploy/grafana/dashboards/gam-serve.json"


def series_names(families: dict[str, str]) -> set[str]:
    """Queryable series names of metric families {name: type} (a histogram is queried by _bucket/_sum/_count)."""
    return {name + s for name, kind in families.items() for s in SUFFIXES.get(kind, ("",))}


QUERIES = all_queries()


@pytest.mark.parametrize("where,expr", QUERIES, ids=[w for w, _ in QUERIES])
def test_query_parses_and_uses_documented_metrics(where, expr):
    names = promql_selectors(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = {n for n in names if n not in NOT_OURS} - series_names(DOCUMENTED)
    assert not unknown, f"{where}: {sorted(unknown)} are not gam-serve metrics (or lack the _bucket/_total suffix)"


def test_dashboard_shows_what_operators_need():
    dash = json.loads(DASHBOARD.read_text())
    used = {n for _, e in dashboard_queries(DASHBOARD) for n in promql_selectors(e)}
    for needed in [
        "gam_time_to_first_token_seconds_bucket",
        "gam_time_per_output_token_seconds_bucket",
        "gam_request_duration_seconds_bucket",
        "gam_generated_tokens_total",
        "gam_requests_running",
        "gam_requests_waiting",
        "gam_batch_size_bucket",
        "gam_requests_total",
    ]:
        assert needed in used, f"dashboard does not chart {needed}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    quantile_exprs = [e for _, e in dashboard_queries(DASHBOARD) if "histogram_quantile" in e]
    assert all("by (le)" in e and "_bucket" in e for e in quantile_exprs)


async def test_every_queried_metric_is_exported_by_the_server(checkpoint):
    import httpx

    settings = Settings.model_validate(dict(model=checkpoint, device="cpu", dtype="float32", max_batch_size=2))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            r = await client.post("/generate", json={"inputs": "the a of", "parameters": {"max_new_tokens": 3}})
            assert r.status_code == 200, r.text
            r = await client.get("/metrics")
            assert r.status_code == 200
    exported: set[str] = set()
    families: dict[str, str] = {}
    for fam in text_string_to_metric_families(r.text):
        families[fam.name] = fam.type
        exported |= {s.name for s in fam.samples}
    # a labelled family with no child yet (e.g. no request rejected so far) still counts as exported
    exported |= series_names(families)
    assert {n for n in families if n.startswith("gam_")} >= set(DOCUMENTED)
    for name, kind in DOCUMENTED.items():
        assert families[name] == kind, f"{name} is a {families[name]}, the dashboards expect a {kind}"
    for where, expr in QUERIES:
        missing = {n for n in promql_selectors(expr) if n not in NOT_OURS} - exported
        assert not missing, f"{where} queries {sorted(missing)}, which /metrics does not export"
