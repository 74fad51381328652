"""The monitoring stack for real: promtool checks deploy/prometheus/, then a real Prometheus (Debian's) scrapes a
live gam-serve on 127.0.0.1 under a short load; every dashboard, alert and KEDA query returns data, and three
alerts are made to fire on purpose and are seen firing through Prometheus' API."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml

from bench.common import listening_port
from tests.deploy.manifests import GRAFANA_VARS, ROOT, alert_rules, all_queries, k8s_object
from tests.server.conftest import LiveServer, tiny_settings

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
INSTALL_HINT = "run `make test` (it installs it) or `apt-get install -y prometheus`"
DEADLINE_S = 60.0  # bound on every wait for Prometheus (scrape and evaluation every second here)
# The production rules hold a condition for minutes (`for: 2m` .. `10m`) before firing. The live test's copy of the
# rules holds it for FOR instead, so an alert goes inactive -> pending -> firing within seconds; every expression,
# label and annotation is the production one.
FOR = "2s"
# Grafana's template variables as a dashboard with "All" selected sends them
DASHBOARD_VARS = {'"$job"': '".*"', '"$instance"': '".*"', **GRAFANA_VARS}
BANNED_EOS = {"0": -100}  # the tiny model's eos (id 0) never sampled: generations run to their length
# alerts made to fire below, and why the others are exempt from firing (their operands must still return data)
FIRED = {"GamServeDown", "GamServeErrors", "GamServeRejecting"}
EXEMPT = {
    "GamServeQueueBacklog": "needs requests waiting while none runs, i.e. a hung engine: a live engine admits "
    "whenever a slot is free, and a crashed loop fails its waiting requests (and /health turns 503)",
    "GamServeSlowFirstToken": "needs a p95 time to first token above 2 s; the tiny model answers in milliseconds",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}", pytrace=False)
    return path


def promtool(*args: str | Path) -> None:
    r = subprocess.run([tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{r.stdout}{r.stderr}"


def data_operands(expr: str) -> list[str]:
    """The parts of an alert expression that must return data whether or not it fires: each side of `and`/`or`/
    `unless`, and the left side of a comparison with a number (`X > 0.01` -> X)."""
    out: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.BinaryExpr):
            op = str(node.op)
            if op in ("and", "or", "unless"):
                visit(node.lhs)
                visit(node.rhs)
                return
            if op in ("==", "!=", ">", "<", ">=", "<=") and isinstance(node.rhs, promql_parser.NumberLiteral):
                visit(node.lhs)
                return
        out.append(str(node))

    visit(promql_parser.parse(expr))
    return out


# ---- offline: promtool on the files as shipped ----------------------------------------------------------------


def test_promtool_checks_the_shipped_config_and_rules(tmp_path: Path) -> None:
    # the compose config names its rule file by its path inside the container: check its syntax here, and the full
    # config (rule files loaded) on the live test's copy below
    promtool("check", "config", "--syntax-only", PROMETHEUS_DIR / "prometheus.yml")
    promtool("check", "rules", PROMETHEUS_DIR / "alerts.yml")
    k8s_rules = tmp_path / "prometheusrule.yml"  # the PrometheusRule's spec is a rule file too
    k8s_rules.write_text(yaml.safe_dump(k8s_object("PrometheusRule")["spec"]))
    promtool("check", "rules", k8s_rules)


# ---- live: gam-serve + Prometheus on 127.0.0.1 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[LiveServer]:
    """Two slots and a queue of one (so held-open streams fill it); decode steps 3 and 50 fail (fault injection)."""
    settings = tiny_settings(
        checkpoint, max_batch_size=2, max_queue=1, max_new_tokens=20_000, fault_injection="step:3,step:50"
    )
    with LiveServer(settings) as s:
        yield s


@dataclass
class Prometheus:
    url: str
    dead_target: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        assert r.status_code == 200, f"{expr}: {r.text}"
        return r.json()["data"]["result"]

    def wait(self, what: str, cond: Any, timeout: float = DEADLINE_S) -> Any:
        """Poll until cond() is truthy (a bounded deadline; scrapes and rule evaluations run every second)."""
        deadline = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus: {what} did not happen within {timeout:.0f}s", pytrace=False)
            time.sleep(0.2)

    def wait_data(self, expr: str) -> list[dict[str, Any]]:
        return self.wait(f"data for {expr}", lambda: self.query(expr))

    def alerts(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """A port nobody listens on while the module runs: bound here and never listened on, so connections to it are
    refused and no other process can take it (a port picked free and closed could be taken and answer)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(server: LiveServer, dead_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Debian's prometheus with the compose config and rules, rewritten only where a test must: targets (the live
    server, plus a port nobody listens on: a replica that is down), 1 s intervals, the rule file path, `for:`."""
    tmp = tmp_path_factory.mktemp("prometheus")
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = FOR
    (tmp / "alerts.yml").write_text(yaml.safe_dump(rules))
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    config["rule_files"] = [str(tmp / "alerts.yml")]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "gam-serve"  # the alerts select job="gam-serve"
    dead = f"127.0.0.1:{dead_port}"
    # namespace: the label a prometheus-operator scrape adds in Kubernetes, which the KEDA trigger selects on
    targets = {"targets": [f"127.0.0.1:{server.port}", dead], "labels": {"namespace": k8s_namespace()}}
    job["static_configs"] = [targets]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool("check", "config", tmp / "prometheus.yml")  # the full check: rule files loaded and checked too

    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            "--web.listen-address=127.0.0.1:0",  # its own listener on a port the kernel picks (never released)
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        port = listening_port(proc, DEADLINE_S)
        assert port, f"prometheus did not listen: {(tmp / 'prometheus.log').read_text()}"
        prom = Prometheus(f"http://127.0.0.1:{port}", dead)

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited: {(tmp / 'prometheus.log').read_text()}"
            try:
                return httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        prom.wait("readiness", ready)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def k8s_namespace() -> str:
    return yaml.safe_load((ROOT / "deploy/k8s/kustomization.yaml").read_text())["namespace"]


def completion(client: httpx.Client, max_tokens: int, **kw: Any) -> httpx.Response:
    body = {"model": "tiny-deploy", "prompt": "the a of", "max_tokens": max_tokens, "temperature": 0}
    return client.post("/v1/completions", json=body | {"logit_bias": BANNED_EOS} | kw)


def seen(prom: Prometheus, finish_reason: str, value: float) -> None:
    """Wait until Prometheus has scraped the requests counter of a finish reason at `value` (a counter's first
    sample is its baseline: rate() only sees increases after it)."""
    expr = f'sum(gam_requests_total{{job="gam-serve", finish_reason="{finish_reason}"}})'
    prom.wait(f"{expr} == {value}", lambda: any(float(r["value"][1]) == value for r in prom.query(expr)))


@pytest.fixture(scope="module")
def loaded(server: LiveServer, prometheus: Prometheus) -> Prometheus:
    """A short load that produces every series the dashboard and alerts read: TGI and OpenAI traffic, streamed and
    not, prompt logprobs, errors (fault injection), a full queue, 429 rejections and cancelled streams."""
    prometheus.wait_data('up{job="gam-serve"} == 1')
    with httpx.Client(base_url=server.url, timeout=60) as c:
        # 1. decode step 3 fails: the first request ends in an error (500); Prometheus sees that counter at 1
        assert completion(c, 8).status_code == 500
        seen(prometheus, "error", 1)
        # 2. ordinary traffic: TGI and OpenAI, streamed and not, sampled with seeds, prompt logprobs
        for i in range(4):
            params = {
                "max_new_tokens": 6,
                "do_sample": True,
                "seed": i,
                "details": True,
                "decoder_input_details": i == 0,
            }
            assert c.post("/generate", json={"inputs": "the a of", "parameters": params}).status_code == 200
        assert (
            c.post("/generate_stream", json={"inputs": "the", "parameters": {"max_new_tokens": 5}}).status_code == 200
        )
        assert completion(c, 5, stream=True).status_code == 200
        assert completion(c, 0, echo=True, logprobs=1).status_code == 200  # prompt scoring only
        # 3. a request still running at decode step 50 fails too: the error counter rises after its baseline
        assert completion(c, 100).status_code == 500
        # 4. two held-open streams fill both slots, a third waits (queue of one), the next ones get 429
        with (
            c.stream("POST", "/v1/completions", json=long_stream()) as s1,
            c.stream("POST", "/v1/completions", json=long_stream()) as s2,
        ):
            lines = [s.iter_lines() for s in (s1, s2)]  # kept: a dropped line iterator closes its stream
            for s, it in zip((s1, s2), lines, strict=True):
                assert s.status_code == 200 and next(it).startswith("data:")
            with c.stream("POST", "/v1/completions", json=long_stream()) as s3:
                assert s3.status_code == 200
                prometheus.wait_data('gam_requests_waiting{job="gam-serve"} == 1')
                assert completion(c, 4).status_code == 429
                seen(prometheus, "rejected", 1)
                r = completion(c, 4)  # the same series again: rate() sees the increase
                assert r.status_code == 429 and r.headers["Retry-After"]
        # leaving the blocks closed the three streams: the server cancels them
    seen(prometheus, "cancelled", 3)
    return prometheus


def long_stream() -> dict[str, Any]:
    return {
        "model": "tiny-deploy",
        "prompt": "the",
        "max_tokens": 20_000,
        "temperature": 0,
        "stream": True,
        "logit_bias": BANNED_EOS,
    }


QUERIES = all_queries()


def live_expr(expr: str) -> str:
    for var, value in DASHBOARD_VARS.items():
        expr = expr.replace(var, value)
    return expr


def test_every_dashboard_and_keda_query_returns_data(loaded: Prometheus) -> None:
    queries = [(w, e) for w, e in QUERIES if not w.startswith("alert ")]
    assert len(queries) > 30
    for where, expr in queries:
        result = loaded.wait_data(live_expr(expr))
        values = [float(r["value"][1]) for r in result]
        # numbers, not NaN: every histogram the panels read got observations within the rate window
        assert all(math.isfinite(v) for v in values), (where, result)


@pytest.mark.parametrize("name", sorted(FIRED | set(EXEMPT)))
def test_alert_expressions_return_data(loaded: Prometheus, name: str) -> None:
    (rule,) = [r for r in alert_rules(PROMETHEUS_DIR / "alerts.yml") if r["alert"] == name]
    for operand in data_operands(rule["expr"]):
        assert loaded.wait_data(operand), operand
    if name in FIRED:  # the whole condition holds
        assert loaded.wait_data(rule["expr"])


def test_alerts_fire_on_purpose(loaded: Prometheus) -> None:
    """Errors (fault injection), 429s (a full queue) and a scrape target that is down fire their alerts."""
    assert {r["alert"] for r in alert_rules(PROMETHEUS_DIR / "alerts.yml")} == FIRED | set(EXEMPT)

    def firing() -> dict[str, dict[str, Any]]:
        # by name; GamServeDown fires once per target that is down: the dead target's is the one that must fire (the
        # live server can miss a scrape on a loaded machine too, and its alert must not stand in for it)
        now = {
            a["labels"]["alertname"]: a
            for a in loaded.alerts()
            if a["state"] == "firing"
            and (a["labels"]["alertname"] != "GamServeDown" or a["labels"].get("instance") == loaded.dead_target)
        }
        return now if set(now) >= FIRED else {}

    alerts = loaded.wait("alerts firing: " + ", ".join(sorted(FIRED)), firing)
    for name in FIRED:
        a = alerts[name]
        assert a["labels"]["severity"] in ("warning", "critical")
        for text in a["annotations"].values():
            assert "error expanding template" not in text and "<no value>" not in text, (name, text)
    assert float(alerts["GamServeErrors"]["value"]) > 0.01
    # the same through the ALERTS series the rule manager writes
    series = loaded.wait_data('ALERTS{alertstate="firing"}')
    assert {s["metric"]["alertname"] for s in series} >= FIRED
