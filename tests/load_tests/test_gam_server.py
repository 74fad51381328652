"""A short real run of the load generator against gam-serve (tiny random GAM checkpoint, uvicorn on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gam_model.checkpoint import CheckpointMeta, save_checkpoint
from gam_model.data import train_tokenizer
from load_tests.metrics import summarize
from load_tests.prompts import DEFAULT_PROMPTS
from load_tests.runner import LoadConfig, run_load
from tests.conftest import tiny_model
from tests.server.conftest import LiveServer, tiny_settings

MAX_NEW = 8


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GAM with the project's byte-level BPE trained on the prompt excerpt (every id decodes)."""
    tok = train_tokenizer([DEFAULT_PROMPTS], "bytelevel", vocab_size=300)
    model = tiny_model(seed=5, vocab_size=tok.vocab_size, block_size=32)
    d = tmp_path_factory.mktemp("ckpt") / "tiny-load"
    return save_checkpoint(d, model, tok, CheckpointMeta(model_name="tiny-load", eos_token_id=tok.eos_token_id))


@pytest.fixture(scope="module")
def gam_server(tiny_checkpoint: Path) -> Iterator[tuple[str, object]]:
    """(base URL, app) of gam-serve on a real uvicorn at a free 127.0.0.1 port."""
    settings = tiny_settings(
        tiny_checkpoint, max_queue=32, max_new_tokens=100_000, max_input_tokens=8192, request_timeout=120.0
    )
    with LiveServer(settings) as server:
        yield server.url, server.app


@pytest.mark.parametrize("client", ["httpx", "raw"])
@pytest.mark.parametrize("api", ["tgi", "openai"])
async def test_load_run_against_gam_serve(gam_server, api: str, client: str) -> None:
    url, _ = gam_server
    cfg = LoadConfig(
        url=url,
        api=api,
        client=client,
        mode="closed",
        concurrency=4,
        num_requests=8,
        input_words=24,
        output_tokens=MAX_NEW,
        duration_s=60,
        model="tiny-load",
    )
    res = await run_load(cfg, progress=False)
    s = summarize(res.records, res.duration_s)
    assert s["errors"] == {} and s["completed"] == 8
    for r in res.records:
        # a random model may hit eos early: the server's own count is used, and it matches what streamed
        assert 1 <= r.n_output <= MAX_NEW and r.ttft > 0 and r.e2el >= r.ttft
        assert len(r.token_times) == r.n_output if api == "tgi" else len(r.token_times) <= r.n_output
    if api == "openai":
        assert all(r.prompt_tokens and r.prompt_tokens >= 24 for r in res.records)  # usage: byte-level BPE >= words
    assert s["output_throughput"] > 0 and s["itl"]["count"] > 0


@pytest.mark.parametrize("client", ["httpx", "raw"])
async def test_disconnects_free_the_servers_slots(gam_server, client: str) -> None:
    url, app = gam_server
    # 100k tokens each would keep the 4 slots busy for minutes: only cancellation frees them within seconds
    cfg = LoadConfig(
        url=url,
        api="tgi",
        client=client,
        mode="closed",
        concurrency=4,
        num_requests=8,
        input_words=24,
        output_tokens=100_000,
        disconnect_fraction=1.0,
        disconnect_within=20,
        duration_s=60,
        seed=2,
    )
    res = await run_load(cfg, progress=False)
    assert sum(r.disconnected for r in res.records) + sum(r.success for r in res.records) == 8  # eos may come first
    assert sum(r.disconnected for r in res.records) >= 4
    engine = app.state.engine
    deadline = time.monotonic() + 60  # bounded wait for a state that must come, not a timing claim
    while engine.num_running or engine.num_waiting:
        assert time.monotonic() < deadline, "cancelled requests still hold slots"
        await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/health")).status_code == 200
