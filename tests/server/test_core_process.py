"""The engine core runs in its own process: a real `gam-serve` whose core is killed (as the OOM killer would) fails its
open streams with a clear error, answers /health 503, and exits with status 1 so the orchestrator restarts it."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
import pytest

from server import app as server_app
from server import protocol as p
from server.core_process import MAX_INPUTS_PER_STEP, CoreServer
from tests.server.conftest import GamServe, app_client

CORE_NAME = "gam-engine-core"
FAILURES = 'gam_request_failures_total{endpoint="generate",error_type="validation"}'


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
            await server.wait_frontends(2)
            alone = [await ask(c, q, False) for q in prompts]
            together = await asyncio.gather(*(ask(c, q, k % 2 == 1) for k in range(4) for q in prompts))
            assert list(together) == alone * 4
            metrics = (await c.get("/metrics")).text
            done = sum(
                float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines() if ln.startswith("gam_requests_total{")
            )
            assert done == len(prompts) * 5
            # error answers of both workers are counted in the one core: the count reaches 6 (a worker's count
            # goes to the core as it answers; a scrape through the other worker may come first, so poll, bounded)
            bad = {"inputs": "The game", "parameters": {"top_p": 2}}
            assert all([(await c.post("/generate", json=bad)).status_code == 422 for _ in range(6)])

            async def failed() -> float:
                text = (await c.get("/metrics")).text
                return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(FAILURES))

            deadline = time.monotonic() + 30
            while (n := await failed()) < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert n == 6
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, server.log[-3000:]


class _Inbox:
    """The core's socket, as CoreServer._inputs uses it: zmq messages waiting, in order (no I/O thread, no timing)."""

    def __init__(self, batches: list[list[p.ToCore]]) -> None:
        self.waiting = collections.deque([b"frontend", p.encode(b)] for b in batches)

    def poll(self, timeout: int) -> bool:
        return bool(self.waiting)

    def recv_multipart(self) -> list[bytes]:
        return self.waiting.popleft()


class _Core:
    """An EngineCore that only counts the cancellations it is given, in order."""

    has_work = False

    def __init__(self) -> None:
        self.cancelled: list[int] = []

    def cancel(self, ids: list[int], reason: str) -> None:
        self.cancelled += ids

    def take_output(self, always: bool = False) -> None:
        return None


def test_inputs_between_two_steps_are_bounded_per_message_not_per_batch() -> None:
    """A frontend sends what one loop turn queued as one zmq message (a batch): the bound on the inputs handled
    between two steps (a flood cannot hold the step back) counts the messages in it, and what is past the bound waits,
    in order, for the next gap; otherwise MAX_INPUTS_PER_STEP batches of any size go before a step."""
    n = MAX_INPUTS_PER_STEP
    ids = iter(range(3 * n))
    batches: list[list[p.ToCore]] = [[p.Cancel([next(ids)]) for _ in range(k)] for k in (n + 1, n - 1, n)]
    core = _Core()
    server = CoreServer(cast(Any, _Inbox(batches)), cast(Any, core), cast(Any, None), cast(Any, None), os.getpid())
    for step in range(1, 4):
        server._inputs(block=False)
        assert core.cancelled == list(range(step * n))
    server._inputs(block=False)
    assert core.cancelled == list(range(3 * n))


async def test_every_frontend_reports_the_model_created_when_the_core_loaded_it(
    make_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/v1/models' `created` (OpenAI: when the model was made available) is the engine core's load time, the same
    through every frontend: a worker that starts later (--api-server-count N; its clock a minute on) reports the
    model its core loaded then, not its own start."""
    settings = make_settings()
    async with app_client(settings) as (app, first):
        created = (await first.get("/v1/models")).json()["data"][0]["created"]
        assert abs(created - time.time()) < 60
        core = app.state.engine._core
        later = time.time() + 60
        monkeypatch.setattr(time, "time", lambda: later)  # this process (the frontends), a minute on
        second = server_app.create_app(settings, server_app.Attach(core.address, core.process.pid, 1))
        async with second.router.lifespan_context(second):
            transport = httpx.ASGITransport(app=second)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
                assert (await c.get("/v1/models")).json()["data"][0]["created"] == created
