"""Behaviour that needs a real HTTP server: client disconnects, auth, SIGTERM drain of the gam-serve process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.common import listening_port
from tests.server.conftest import NO_EOS, GamServe, LiveServer, app_client

ROOT = Path(__file__).resolve().parents[2]


def wait_for(cond, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", {"inputs": "The game", "parameters": {"max_new_tokens": 10**6}}),
        (
            "/v1/completions",
            {"model": "tiny-gam", "prompt": "The game", "max_tokens": 10**6, "stream": True, "logit_bias": NO_EOS},
        ),
        ("/generate", {"inputs": "The game", "parameters": {"max_new_tokens": 10**6}}),
    ],
)
def test_disconnect_frees_slot(make_settings, path: str, body: dict) -> None:
    with LiveServer(make_settings(max_new_tokens=10**6)) as s:
        endpoint = {"/generate_stream": "generate_stream", "/v1/completions": "completions"}.get(path, "generate")
        with httpx.Client(base_url=s.url, timeout=30) as client:
            if body.get("stream") or path == "/generate_stream":
                with client.stream("POST", path, json=body) as r:
                    lines = r.iter_lines()
                    got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data:")]
                    assert got and s.engine.num_running == 1
            else:
                with pytest.raises(httpx.ReadTimeout):
                    client.post(path, json=body, timeout=0.5)
        # the slot is freed within a step or two of the disconnect being seen
        assert wait_for(lambda: s.engine.num_running == 0)
        assert s.engine.free_slots == 4
        assert wait_for(lambda: metric(s.url, "gam_requests_running") == 0)
        cancelled = f'gam_requests_total{{endpoint="{endpoint}",finish_reason="cancelled"}}'
        assert wait_for(lambda: metric(s.url, cancelled) == 1.0)
        assert httpx.get(f"{s.url}/health").status_code == 200


async def test_api_key(make_settings) -> None:
    async with app_client(make_settings(api_key="s3cret")) as (_, client):
        body = {"inputs": "The game", "parameters": {"max_new_tokens": 2}}
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic s3cret"},
            {"Authorization": "s3cret"},
        ):
            r = await client.post("/generate", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error_type"] == "authentication"
            assert r.headers["WWW-Authenticate"] == "Bearer"
            r = await client.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert (await client.get("/info", headers=headers)).status_code == 401
            assert (await client.get("/docs", headers=headers)).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/generate", json=body, headers=ok)).status_code == 200
        assert (await client.get("/v1/models", headers=ok)).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_drains_then_exits(checkpoint_dir: Path, sig: signal.Signals) -> None:
    """gam-serve (the CLI) on SIGTERM or Ctrl-C sent to its whole process group (systemd, a terminal): refuses new
    work, ends a long stream with the drain's final event (the engine core survives the signal), exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAM_MAX_NEW_TOKENS": "100000", "GAM_DEVICE": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "--model",
        str(checkpoint_dir),
        "--port",
        "0",  # the kernel picks a free port for the server's own socket (no gap in which another process takes it)
        "--shutdown-grace",
        "1",
        "--max-batch-size",
        "2",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        port = listening_port(proc, 240)
        assert port, proc.stdout.read().decode() if proc.poll() is not None else "no start"
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(healthy, 240), proc.stdout.read().decode() if proc.poll() is not None else "no start"
        assert httpx.get(f"{url}/info").json()["max_new_tokens"] == 100000  # GAM_* env reached the settings
        body = {"inputs": "The game", "parameters": {"max_new_tokens": 100000}}
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            os.killpg(proc.pid, sig)  # the whole group: the forkserver and the engine core get it too
            events = [json.loads(ln[5:]) for ln in lines if ln.startswith("data:")]
        assert events[-1]["error_type"] == "unhealthy" and "shutting down" in events[-1]["error"], events[-1]
        assert proc.wait(60) in (0, -sig)  # uvicorn re-raises the signal it handled, after shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_gam_serve_whose_start_fails_is_not_left_running(tmp_path, monkeypatch) -> None:
    """GamServe stops its process whatever ends the wait for its port (here an exception from listening_port, as for
    a process with two listeners; Ctrl-C likewise), not only when the port never comes: a context manager's
    __exit__ does not run when __enter__ raises, and the server would run on after the test session."""
    server = GamServe(tmp_path)
    server.cmd = ["sleep", "60"]  # a server that would run on

    def two_listeners(proc: subprocess.Popen, timeout: float) -> int:
        raise ValueError("too many values to unpack (expected 1)")

    monkeypatch.setattr("tests.server.conftest.listening_port", two_listeners)
    try:
        with pytest.raises(ValueError), server:
            pass
        assert server.proc.poll() is not None
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_a_gam_serve_that_logs_a_lot_keeps_answering(checkpoint_dir: Path) -> None:
    """GamServe reads the server's output as it comes: 1,500 requests' access-log lines (over 100 KB, past a pipe's
    64 KiB) do not block the server in a log write, and all of them are in its log afterwards."""
    server = GamServe(checkpoint_dir)
    with server, httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(600):  # until healthy (bounded)
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.2)
        for _ in range(1500):
            assert client.get("/health").status_code == 200
    assert server.log.count('"GET /health HTTP/1.1" 200') >= 1500
