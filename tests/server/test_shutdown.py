"""Graceful shutdown of a real `gam-serve` process: SIGTERM with 32 open streams (16 decoding, 16 queued) ends
every stream with a final event and the process exits within the grace period; prompts stay out of its logs."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.server.conftest import NO_EOS, GamServe

GRACE_S = 2.0
SECRET = "walrus-obsidian-9013"  # in every prompt; must not reach the process's logs


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def tgi_stream(client: httpx.AsyncClient, i: int, started: asyncio.Event) -> list[dict]:
    body = {"inputs": f"{SECRET} {i} The game", "parameters": {"max_new_tokens": 100_000}}
    events = []
    async with client.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200
        started.set()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


async def openai_stream(client: httpx.AsyncClient, i: int, started: asyncio.Event) -> list[dict | str]:
    # sampled, with eos biased out: a stream that drew eos would end, a waiting one would take its slot, and the
    # 16 running + 16 waiting state the test waits for would never come (the loop spun for good: about 1 run in 1000)
    body = {"model": "tiny-gam", "prompt": f"{SECRET} {i} The game", "max_tokens": 100_000, "stream": True,
            "logit_bias": NO_EOS}  # fmt: skip
    events: list[dict | str] = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        started.set()
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def ended_properly_tgi(events: list[dict]) -> bool:
    """The last TGI event is the final token (generated_text set) or an error event."""
    return bool(events) and (events[-1].get("generated_text") is not None or "error_type" in events[-1])


def ended_properly_openai(events: list[dict | str]) -> bool:
    """`[DONE]` after a chunk with a finish_reason or an error object."""
    if len(events) < 2 or events[-1] != "[DONE]" or not isinstance(events[-2], dict):
        return False
    last = events[-2]
    return "error" in last or any(c.get("finish_reason") for c in last.get("choices", []))


@pytest.mark.slow
async def test_sigterm_with_32_open_streams(checkpoint_dir: Path) -> None:
    args = ("--shutdown-grace", str(GRACE_S), "--max-batch-size", "16", "--max-queue", "32", "--log-level", "debug")
    server = GamServe(checkpoint_dir, *args, GAM_MAX_NEW_TOKENS="100000")
    with server as proc:
        url = server.url
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, connect=5)) as client:
            await server.wait_healthy(client)
            started = [asyncio.Event() for _ in range(32)]
            tasks = [
                asyncio.create_task((tgi_stream if i % 2 else openai_stream)(client, i, started[i])) for i in range(32)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            deadline = time.monotonic() + 60  # a bounded wait for a state that must come
            while True:  # all 32 accepted: 16 decoding, 16 waiting for a slot
                m = (await client.get("/metrics")).text
                running, waiting = metric(m, "gam_requests_running"), metric(m, "gam_requests_waiting")
                if running == 16 and waiting == 16:
                    break
                assert time.monotonic() < deadline, f"never 16 running + 16 waiting: {running} + {waiting}"
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            # while it drains, the socket stays open: probes get 503 (not "connection refused") and new work 503
            async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
                while (await probe.get("/health")).status_code == 200:
                    await asyncio.sleep(0.02)
                assert (await probe.get("/health")).status_code == 503
                r = await probe.post("/generate", json={"inputs": "The game", "parameters": {"max_new_tokens": 2}})
                assert r.status_code == 503 and r.json()["error_type"] == "unhealthy"
            results = await asyncio.wait_for(asyncio.gather(*tasks), GRACE_S + 60)
            exit_code = await asyncio.to_thread(proc.wait, GRACE_S + 60)
    log = server.log
    tgi = [r for i, r in enumerate(results) if i % 2]
    oai = [r for i, r in enumerate(results) if not i % 2]
    assert all(ended_properly_tgi(ev) for ev in tgi), [ev[-1:] for ev in tgi]
    assert all(ended_properly_openai(ev) for ev in oai), [ev[-2:] for ev in oai]
    assert sum(len(ev) > 1 for ev in tgi) >= 4  # decoding streams had tokens before their final event
    assert exit_code == 0, log[-2000:]  # a completed drain exits 0
    # the streams still open at the end of the grace period ended with the drain's error event
    assert any("shutting down" in ev[-1].get("error", "") for ev in tgi)
    assert "draining" in log  # debug logs were on ...
    assert SECRET not in log  # ... and still no prompt text


@pytest.mark.parametrize("frontends", [1, 2])
async def test_a_drained_server_exits_0(checkpoint_dir: Path, frontends: int) -> None:
    """SIGTERM, the drain completes: `gam-serve` exits with status 0, with one frontend as with N (README). Before,
    one frontend died of the SIGTERM that uvicorn re-raised after stopping (status 143, -15 here) while the
    supervisor of 2 exited 0."""
    server = GamServe(checkpoint_dir, "--api-server-count", str(frontends), "--shutdown-grace", str(GRACE_S))
    with server as proc:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            await server.wait_healthy(client)
            r = await client.post("/generate", json={"inputs": "The game", "parameters": {"max_new_tokens": 3}})
            assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(proc.wait, GRACE_S + 60)
    assert exit_code == 0, server.log[-2000:]
    # it ran on --port 0 (GamServe): the log names the port the kernel picked, as operators need it
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log
    assert frontends == 1 or f"{frontends} frontends on 127.0.0.1:{server.port} share" in server.log


async def test_frontends_stop_listening_only_when_the_whole_server_is_drained(checkpoint_dir: Path) -> None:
    """--api-server-count 2, SIGTERM while one stream runs: the frontend with no request of its own keeps answering
    (503) until the core has no request left from either; then both exit and the server exits 0. Before, it stopped
    at once, and a connection it had just accepted was closed unanswered while the other frontend drained."""
    server = GamServe(
        checkpoint_dir, "--api-server-count", "2", "--shutdown-grace", "600", "--max-new-tokens", "100000"
    )
    body = {"model": "tiny-gam", "prompt": "The game", "max_tokens": 100_000, "stream": True, "logit_bias": {"0": -100}}

    def alive(w: psutil.Process) -> bool:
        try:
            return w.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    with server as proc:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            await server.wait_healthy(client)
            workers = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
            assert len(workers) == 2
            await server.wait_frontends(2)
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                lines = r.aiter_lines()
                async for line in lines:
                    if line.startswith("data:"):
                        break
                proc.send_signal(signal.SIGTERM)
                # the stream goes on (eos biased out, a long grace); a frontend that stops early stops within a
                # tick of the signal (0.1 s), long before 1,000 more tokens
                n = 0
                async for line in lines:
                    n += line.startswith("data:")
                    if n >= 1000 or not all(alive(w) for w in workers):
                        break
                assert n >= 1000 and all(alive(w) for w in workers), n
                no_reuse = httpx.Limits(max_keepalive_connections=0)  # each probe a new connection: either worker
                async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=no_reuse) as probe:
                    codes = [(await probe.get("/health")).status_code for _ in range(8)]
                assert codes == [503] * 8
            # the client left: its request is cancelled, the core is drained, both frontends stop
            exit_code = await asyncio.to_thread(proc.wait, 60)
    assert exit_code == 0, server.log[-2000:]
