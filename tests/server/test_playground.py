"""The playground at GET /, in a real browser (headless Debian chromium through selenium) against a live gam-serve
on 127.0.0.1: what it shows must be what the API answers for the same request."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from gam_model.state import DecodeState
from server.routes.playground import STATIC_DIR
from tests.server.browser import chrome
from tests.server.conftest import LiveServer, app_client, tiny_settings
from tests.server.test_live import metric, wait_for
from tests.server.test_tgi import sse_events

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The game was played"
KEY = "s3cret-playground"
WAIT_S = 30  # bound on every browser wait (a shared 2-core machine); the conditions themselves are DOM state
MAX_NEW = 20_000  # the server's limit here: greedy, the tiny model falls into a loop without eos, so a stream
# this long runs until its deadline (60 s) unless stopped


@pytest.fixture(scope="module")
def server(checkpoint_dir: Path) -> Iterator[LiveServer]:
    with LiveServer(tiny_settings(checkpoint_dir, max_new_tokens=MAX_NEW)) as s:
        yield s


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    d = chrome()
    try:
        yield d
    finally:
        d.quit()


class Page:
    """The playground open in the browser, with the waits and reads the tests share."""

    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver, self.url = driver, url

    def open(self) -> Page:
        self.driver.get_log("browser")  # drop what earlier tests logged
        self.driver.get(self.url + "/")
        return self

    def wait(self, cond: Any, what: str, timeout: float = WAIT_S) -> Any:
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: cond(), message=what)

    def el(self, id_: str) -> WebElement:
        return self.driver.find_element(By.ID, id_)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait_loaded(self, model_id: str) -> None:
        self.wait(lambda: model_id in self.el("model-info").text, "model info from /info")

    def fill(self, **fields: Any) -> None:
        """Type into the form's fields (ids as the parameters are named), as a person would."""
        for id_, value in fields.items():
            box = self.el(id_)
            box.clear()
            if value != "":
                box.send_keys(str(value))

    def generate(self) -> None:
        self.el("generate").click()

    def wait_finished(self) -> None:
        """Until the (first) generation of this page load has ended: its status is no longer the initial one."""
        self.wait(
            lambda: self.el("status").text not in ("Ready.", "Generating…") and self.el("generate").is_enabled(),
            "the generation to end",
        )

    def output_text(self) -> str:
        return self.js("return document.getElementById('output').textContent")

    def tokens(self) -> list[dict[str, Any]]:
        return self.js(
            "return [...document.querySelectorAll('#output .tok')].map(t => ({"
            "id: Number(t.dataset.id), logprob: t.dataset.logprob === undefined ? null : Number(t.dataset.logprob)}))"
        )

    def curl(self) -> str:
        self.el("copy-curl").click()
        self.wait(lambda: self.el("curl").is_displayed(), "the curl command")
        return self.el("curl").text

    def console_errors(self, *expected_status: int) -> list[dict[str, Any]]:
        """SEVERE browser log entries, less the network errors of answers the test provoked on purpose."""
        allowed = tuple(f"status of {s} " for s in expected_status)
        return [
            e
            for e in self.driver.get_log("browser")
            if e["level"] == "SEVERE" and not (e["source"] == "network" and any(a in e["message"] for a in allowed))
        ]


@pytest.fixture
def page(driver: WebDriver, server: LiveServer) -> Page:
    p = Page(driver, server.url).open()
    p.wait_loaded("tiny-gam")
    return p


def tgi_parameters(**kw: Any) -> dict[str, Any]:
    """The TGI parameters the page sends for a form filled with kw (written out here, not taken from the page)."""
    return {"details": True, **kw}


def run_curl(command: str, **env: str) -> list[dict[str, Any]]:
    """Run a `copy as curl` command in bash and return its stream's events."""
    out = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, env={**os.environ, **env}, check=True
    )
    return sse_events(out.stdout)


# ---- without a browser: the route, auth and packaging ----------------------------------------------------------


async def test_page_and_assets_are_served_without_the_key_and_post_stays_tgi(checkpoint_dir: Path) -> None:
    async with app_client(tiny_settings(checkpoint_dir, api_key=KEY)) as (_, client):
        r = await client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["cache-control"] == "no-cache"
        for asset, kind in (("playground.js", "javascript"), ("playground.css", "text/css"), ("favicon.svg", "svg")):
            a = await client.get(f"/static/{asset}")
            assert a.status_code == 200 and kind in a.headers["content-type"], asset
            assert f'static/{asset}"' in r.text  # the page links it relatively (works behind a path prefix)
        # everything else still needs the key, POST / (TGI) included; /static/ cannot reach outside its folder
        assert (await client.post("/", json={"inputs": "x"})).status_code == 401
        assert (await client.get("/info")).status_code == 401
        # (percent-encoded: the client keeps them, the app sees the path /static/../info, open to GET without the key)
        for sneaky in ("/static/%2e%2e/info", "/static/..%2finfo", "/static/%2e%2e/%2e%2e/pyproject.toml"):
            bad = await client.get(sneaky)
            assert bad.status_code == 404 and set(bad.json()) == {"error", "error_type"}, sneaky
        assert (await client.get("/static/missing.js")).status_code == 404
        ok = await client.post("/", json={"inputs": "x", "parameters": {"max_new_tokens": 1}}, headers=auth())
        assert ok.status_code == 200
        assert "get" not in (await client.get("/openapi.json", headers=auth())).json()["paths"]["/"]  # not an API


async def test_info_has_what_the_page_needs(checkpoint_dir: Path) -> None:
    async with app_client(tiny_settings(checkpoint_dir)) as (app, client):
        info = (await client.get("/info")).json()
        cfg = app.state.ctx.model_config
        assert (info["n_layer"], info["n_embd"], info["dtype_bytes"]) == (cfg.n_layer, cfg.n_embd, 4)
        assert info["state_bytes_per_sequence"] == DecodeState(cfg, 1).bytes_per_sequence()
        assert info["max_top_n_tokens"] == 5


def test_an_installed_wheel_ships_the_page(tmp_path: Path) -> None:
    """The page is package data: a wheel built from what the Dockerfile copies contains every static file."""
    src = tmp_path / "src"  # a copy, so the build leaves nothing (build/, *.egg-info) in the work tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("gam_model", "server"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("gam_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"server/static/{f.name}" for f in STATIC_DIR.iterdir()}
    assert {"server/static/index.html", "server/static/playground.js"} <= shipped <= names


# ---- in the browser ---------------------------------------------------------------------------------------------


def test_page_loads_with_model_info_and_labelled_controls(page: Page, server: LiveServer) -> None:
    info = httpx.get(f"{server.url}/info").json()
    assert page.driver.title == "gam-serve playground"
    text = page.el("model-info").text
    assert "tiny-gam" in text and "float32 on cpu" in text and f"{info['n_layer']} layers × {info['n_embd']}" in text
    assert page.el("stat-state").text == f"{info['state_bytes_per_sequence']} B"
    assert page.el("max_new_tokens").get_attribute("max") == str(MAX_NEW)
    unlabelled = page.js(
        "return [...document.querySelectorAll('input, textarea, select')]"
        ".filter(e => !e.labels || e.labels.length === 0).map(e => e.id)"
    )
    assert unlabelled == []
    roles = page.js("return ['status', 'error', 'output'].map(id => document.getElementById(id).getAttribute('role'))")
    assert roles == ["status", "alert", "log"]
    assert page.console_errors() == []


def test_phone_width_has_no_horizontal_scroll(page: Page, driver: WebDriver, server: LiveServer) -> None:
    phone = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}  # a phone's viewport, emulated
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", phone)
    try:
        page.open().wait_loaded("tiny-gam")
        width = page.js("return window.innerWidth")
        assert width == 390
        assert page.js("return document.documentElement.scrollWidth") <= width
        for id_ in ("prompt", "generate", "stop-button", "copy-curl", "output", "stats", "memory"):
            assert page.js(f"return document.getElementById('{id_}').getBoundingClientRect().right") <= width, id_
        # one column: the output comes below the form
        form_bottom = page.js("return document.getElementById('request-form').getBoundingClientRect().bottom")
        assert page.js("return document.getElementById('output-section').getBoundingClientRect().top") >= form_bottom
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert page.console_errors() == []


def test_seeded_generation_shows_the_apis_text_and_curl_reproduces_it(page: Page, server: LiveServer) -> None:
    form = dict(temperature=0.9, top_p=0.95, top_k=40, typical_p=0.9, repetition_penalty=1.1, max_new_tokens=40)
    page.fill(prompt=PROMPT, seed=1234, stop="zebra\nquagga", **form)
    page.generate()
    page.wait_finished()
    api = httpx.post(
        f"{server.url}/generate",
        json={
            "inputs": PROMPT,
            "parameters": tgi_parameters(do_sample=True, seed=1234, stop=["zebra", "quagga"], top_n_tokens=5, **form),
        },
        timeout=60,
    ).json()
    shown = page.output_text()
    assert shown == api["generated_text"] and shown
    details = api["details"]
    assert page.el("stat-tokens").text == str(details["generated_tokens"])
    assert page.el("stat-seed").text == "1234"
    assert page.el("status").text.startswith("Done:")
    assert page.el("stat-ttft").text.endswith(" ms") and page.el("stat-tps").text != "–"
    length = details["generated_tokens"] + len(httpx.post(f"{server.url}/tokenize", json={"inputs": PROMPT}).json())
    assert page.el("stat-length").text == f"{length} tokens"
    info = httpx.get(f"{server.url}/info").json()
    kv = 2 * info["n_layer"] * info["n_embd"] * info["dtype_bytes"] * length
    assert page.el("stat-kv").get_attribute("title").replace(",", "") == f"{kv} bytes"
    assert page.el("stat-ratio").text == f"{kv / info['state_bytes_per_sequence']:.1f}×"
    # "copy as curl" reproduces the request: run it and get the same text
    command = page.curl()
    assert "Authorization" not in command
    events = run_curl(command)
    assert events[-1]["generated_text"] == shown
    assert page.console_errors() == []


def test_token_probabilities_and_alternatives_match_the_api(page: Page, server: LiveServer) -> None:
    page.fill(prompt=PROMPT, temperature=0.7, seed=99, max_new_tokens=24, top_n_tokens=3)
    page.el("prompt").send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut starts it too
    page.wait_finished()
    params = tgi_parameters(do_sample=True, temperature=0.7, seed=99, max_new_tokens=24, top_n_tokens=3)
    api = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": params}, timeout=60).json()
    want, top = api["details"]["tokens"], api["details"]["top_tokens"]
    shown = page.tokens()
    assert [t["id"] for t in shown] == [t["id"] for t in want]
    for s, w in zip(shown, want, strict=True):
        assert s["logprob"] is not None and math.isclose(s["logprob"], w["logprob"], rel_tol=1e-9, abs_tol=1e-9)

    def check_selected(i: int) -> None:
        page.wait(lambda: page.js("return document.querySelector('.tok.selected')?.dataset.index") == str(i), "select")
        assert close_percent(page.el("token-prob").text, want[i]["logprob"])
        rows = page.driver.find_elements(By.CSS_SELECTOR, "#token-info tbody tr")
        assert [int(r.get_attribute("data-id")) for r in rows] == [t["id"] for t in top[i]]
        for r, t in zip(rows, top[i], strict=True):
            assert close_percent(r.find_element(By.CSS_SELECTOR, ".prob").text, t["logprob"])

    spans = page.driver.find_elements(By.CSS_SELECTOR, "#output .tok")
    last = len(spans) - 1
    spans[last].click()
    check_selected(last)
    # keyboard: Home, then the arrow keys walk the tokens
    page.el("output").send_keys(Keys.HOME)
    check_selected(0)
    page.el("output").send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    check_selected(2)
    assert page.console_errors() == []


def test_stop_cancels_the_stream_and_frees_the_slot(page: Page, server: LiveServer) -> None:
    cancelled = 'gam_requests_total{endpoint="generate_stream",finish_reason="cancelled"}'
    before = metric(server.url, cancelled)
    assert wait_for(lambda: metric(server.url, "gam_requests_running") == 0)
    page.fill(prompt=PROMPT, temperature=0, max_new_tokens=MAX_NEW)  # greedy: minutes of tokens, no early stop
    page.generate()
    page.wait(lambda: len(page.tokens()) >= 5, "tokens to stream in")
    assert metric(server.url, "gam_requests_running") == 1
    page.el("stop-button").click()
    page.wait(lambda: page.el("status").text.startswith("Stopped after"), "the page to show it stopped")
    page.wait_finished()
    assert not page.el("stop-button").is_enabled()
    # the server saw the disconnect and ended the request: the slot is free again
    assert wait_for(lambda: metric(server.url, "gam_requests_running") == 0, timeout=WAIT_S)
    assert wait_for(lambda: metric(server.url, cancelled) == before + 1, timeout=WAIT_S)
    assert wait_for(lambda: server.engine.free_slots == server.engine.max_batch_size, timeout=WAIT_S)
    assert len(page.tokens()) < MAX_NEW
    assert page.console_errors() == []


def test_bad_parameter_shows_the_servers_message(page: Page, server: LiveServer) -> None:
    page.fill(prompt=PROMPT, temperature=-1, max_new_tokens=8)
    page.generate()
    page.wait_finished()
    body = {"inputs": PROMPT, "parameters": tgi_parameters(do_sample=True, temperature=-1, max_new_tokens=8)}
    r = httpx.post(f"{server.url}/generate_stream", json=body)
    assert r.status_code == 422
    page.wait(lambda: page.el("error").is_displayed(), "the error")
    assert page.el("error").text == r.json()["error"]
    assert "temperature" in page.el("error").text
    assert page.el("status").text == "The server refused the request (422)."
    assert page.output_text() == ""
    assert page.console_errors(422) == []


def test_api_key_is_asked_for_and_then_used(driver: WebDriver, checkpoint_dir: Path) -> None:
    with LiveServer(tiny_settings(checkpoint_dir, api_key=KEY)) as s:
        page = Page(driver, s.url).open()

        def dialog_open() -> bool:
            return bool(page.js("return document.getElementById('key-dialog').open"))

        page.wait(dialog_open, "the key dialog")
        assert "needs an API key" in page.el("key-message").text
        page.el("api-key").send_keys(Keys.ESCAPE)  # declined at load: the page says so, and asks again on use
        page.wait(lambda: "unavailable" in page.el("model-info").text, "the page to say it has no model info")
        assert not dialog_open()
        page.fill(prompt=PROMPT, seed=5, max_new_tokens=12)
        page.generate()
        page.wait(dialog_open, "the key dialog on Generate")
        page.el("api-key").send_keys("wrong-key", Keys.ENTER)
        page.wait(lambda: dialog_open() and "not accepted" in page.el("key-message").text, "the key to be refused")
        page.el("api-key").send_keys(KEY, Keys.ENTER)
        page.wait_finished()
        page.wait_loaded("tiny-gam")  # fetched once a key worked
        assert not dialog_open()
        params = tgi_parameters(do_sample=True, temperature=0.8, seed=5, max_new_tokens=12, top_n_tokens=5)
        api = httpx.post(f"{s.url}/generate", json={"inputs": PROMPT, "parameters": params}, headers=auth()).json()
        assert page.output_text() == api["generated_text"] and api["generated_text"]
        assert page.el("error").is_displayed() is False
        command = page.curl()
        assert '"Authorization: Bearer $GAM_API_KEY"' in command and KEY not in command
        assert run_curl(command, GAM_API_KEY=KEY)[-1]["generated_text"] == api["generated_text"]
        assert page.console_errors(401) == []


def test_no_console_errors_through_a_whole_session(page: Page, server: LiveServer) -> None:
    """Load, generate, inspect a token, copy the request, start and stop: the browser logs nothing severe."""
    page.fill(prompt=PROMPT, max_new_tokens=16, seed=3)
    page.generate()
    page.wait_finished()
    page.driver.find_elements(By.CSS_SELECTOR, "#output .tok")[0].click()
    page.curl()
    page.fill(temperature=0, max_new_tokens=MAX_NEW)
    page.generate()
    page.wait(lambda: len(page.tokens()) >= 2, "tokens")
    page.el("output").send_keys(Keys.ESCAPE)  # Escape stops too
    page.wait(lambda: page.el("status").text.startswith("Stopped after"), "the stop")
    entries = page.driver.get_log("browser")
    assert [e for e in entries if e["level"] in ("SEVERE", "WARNING")] == []
    assert wait_for(lambda: metric(server.url, "gam_requests_running") == 0, timeout=WAIT_S)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def close_percent(shown: str, logprob: float) -> bool:
    """A probability the page shows ("41.3 %", "0.0042 %") against exp(logprob) from the API."""
    m = re.fullmatch(r"([0-9.e+-]+) %", shown)
    assert m, shown
    return math.isclose(float(m[1]), 100 * math.exp(logprob), rel_tol=0.01, abs_tol=0.05)
