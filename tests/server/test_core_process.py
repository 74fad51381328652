"""The engine core runs in its own process: a real `gam-serve` whose core is killed (as the OOM killer would) fails its
open streams with a clear error, answers /health 503, and exits with status 1 so the orchestrator restarts it."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
import psutil

from tests.server.conftest import GamServe

CORE_NAME = "gam-engine-core"


async def test_killed_core_fails_streams_turns_unhealthy_and_exits_1(checkpoint_dir: Path) -> None:
    server = GamServe(checkpoint_dir, GAM_MAX_NEW_TOKENS="1000000")
    with server as proc:
        async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(60, connect=5)) as c:
            await server.wait_healthy(c)
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
    assert code == 1, server.log[-3000:]
    assert "exited with code -9" in server.log and "stopping the server" in server.log


async def test_two_frontends_share_one_core(checkpoint_dir: Path) -> None:
    """--api-server-count 2: two HTTP processes on one port, one engine core; concurrent requests through both get
    what each gets alone (greedy, batch-invariant mode), every output reaches the connection that asked for it,
    metrics count them all, and SIGTERM drains and exits 0."""
    # --deterministic: a row's tokens do not depend on which requests share its steps (the batches here depend on
    # timing), so "what each gets alone" is exact, not subject to a near-tie in the logits
    args = ("--api-server-count", "2", "--max-batch-size", "8", "--deterministic")
    server = GamServe(checkpoint_dir, *args, GAM_DTYPE="float32")
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

    limits = httpx.Limits(max_keepalive_connections=0)  # a new connection per request: both workers get some
    with server as proc:
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            await server.wait_healthy(c)
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
    assert code == 0, server.log[-3000:]
