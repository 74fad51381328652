"""The engine core runs in its own process: a real `gam-serve` whose core is killed (as the OOM killer would) fails its
open streams with a clear error, answers /health 503, and exits with status 1 so the orchestrator restarts it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.server.test_shutdown import ROOT, free_port

CORE_NAME = "gam-engine-core"


async def wait_healthy(client: httpx.AsyncClient, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "gam-serve did not start"
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)


async def test_killed_core_fails_streams_turns_unhealthy_and_exits_1(checkpoint_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAM_MAX_NEW_TOKENS": "1000000", "GAM_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "server.cli", "--model", str(checkpoint_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=httpx.Timeout(60, connect=5)) as c:
            await wait_healthy(c, proc)
            (core,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == CORE_NAME]
            body = {"inputs": "The game", "parameters": {"max_new_tokens": 10**6}}
            events: list[dict] = []
            async with c.stream("POST", "/generate_stream", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
                        if len(events) == 3:  # streaming: now the core dies
                            core.send_signal(signal.SIGKILL)
            assert len(events) > 3 and "index" in events[-2]
            assert events[-1]["error_type"] == "unhealthy" and "engine core process" in events[-1]["error"]
            try:  # the server may already be closing its socket; if it answers, it answers 503
                h = await c.get("/health")
                assert h.status_code == 503 and "engine" in h.json()["error"]
            except httpx.TransportError:
                pass
            code = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    assert code == 1, log[-3000:]
    assert "exited with code -9" in log and "stopping the server" in log


async def test_two_frontends_share_one_core(checkpoint_dir: Path) -> None:
    """--api-server-count 2: two HTTP processes on one port, one engine core; concurrent requests through both get
    what each gets alone (greedy, batch-invariant mode), every output reaches the connection that asked for it,
    metrics count them all, and SIGTERM drains and exits 0."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAM_DEVICE": "cpu", "GAM_DTYPE": "float32"}
    cmd = [sys.executable, "-m", "server.cli", "--model", str(checkpoint_dir), "--port", str(port)]
    # --deterministic: a row's tokens do not depend on which requests share its steps (the batches here depend on
    # timing), so "what each gets alone" is exact, not subject to a near-tie in the logits
    cmd += ["--api-server-count", "2", "--max-batch-size", "8", "--deterministic"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    prompts = [f"The {w} of the" for w in ("game", "season", "war", "album", "river", "city", "film", "song")]

    async def ask(c: httpx.AsyncClient, prompt: str, stream: bool) -> str:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "do_sample": False}}
        if not stream:
            r = await c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()["generated_text"]
        r = await c.post("/generate_stream", json=body)
        events = [json.loads(b[len("data:") :]) for b in r.text.split("\n\n") if b.strip()]
        return events[-1]["generated_text"]

    try:
        limits = httpx.Limits(max_keepalive_connections=0)  # a new connection per request: both workers get some
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as c:
            await wait_healthy(c, proc)
            tree = psutil.Process(proc.pid).children(recursive=True)
            assert sum(p.name() == CORE_NAME for p in tree) == 1
            workers = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
            assert len(workers) == 2
            alone = [await ask(c, q, False) for q in prompts]
            together = await asyncio.gather(*(ask(c, q, k % 2 == 1) for k in range(4) for q in prompts))
            assert list(together) == alone * 4
            metrics = (await c.get("/metrics")).text
            done = sum(
                float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines() if ln.startswith("gam_requests_total{")
            )
            assert done == len(prompts) * 5
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    assert code == 0, log[-3000:]
