"""End to end with the bundled model under weights/ (skipped until it is committed)."""

from __future__ import annotations

import math

import pytest

from server.settings import WEIGHTS_DIR, Settings
from tests.server.conftest import app_client

BUNDLED = sorted(p.parent for p in WEIGHTS_DIR.glob("*/model.safetensors"))


@pytest.mark.slow
@pytest.mark.skipif(len(BUNDLED) != 1, reason="no single bundled model under weights/ yet")
async def test_bundled_model_serves_both_apis() -> None:
    settings = Settings(device="cpu", max_batch_size=2, max_new_tokens=32)  # default model: the bundled one
    async with app_client(settings) as (_, client):
        assert (await client.get("/health")).status_code == 200
        info = (await client.get("/info")).json()
        r = await client.post(
            "/generate",
            json={"inputs": "The history of the city", "parameters": {"max_new_tokens": 24, "details": True}},
        )
        assert r.status_code == 200 and r.json()["details"]["generated_tokens"] >= 1
        assert r.json()["generated_text"].strip()
        r = await client.post(
            "/v1/completions",
            json={"model": info["model_id"], "prompt": "The history of", "max_tokens": 16, "temperature": 0},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"]


# the bundled model's greedy continuation of this prompt is Thai script: 3-byte characters split over byte tokens,
# whose alternatives are more byte tokens that decode alone to the same U+FFFD
SPLIT_CHARS = "and weighing up to 5 – 6 kilograms ( 11 "


@pytest.mark.slow
@pytest.mark.skipif(len(BUNDLED) != 1, reason="no single bundled model under weights/ yet")
async def test_top_logprobs_keep_the_best_of_tokens_with_the_same_text() -> None:
    """OpenAI top_logprobs map a token's text to its logprob: where several alternatives have the same text (byte
    tokens that decode alone to U+FFFD), the text keeps the best of them (it kept the worst, so a greedy token looked
    less likely than another alternative). TGI's top_tokens of the same request list every alternative."""
    async with app_client(Settings(device="cpu", max_batch_size=2, deterministic=True)) as (_, client):
        params = {"max_new_tokens": 12, "details": True, "top_n_tokens": 5}
        r = await client.post("/generate", json={"inputs": SPLIT_CHARS, "parameters": params})
        tgi = r.json()["details"]["top_tokens"]
        body = {"model": "gam-wikitext2", "prompt": SPLIT_CHARS, "max_tokens": 12, "temperature": 0, "logprobs": 5}
        r = await client.post("/v1/completions", json=body)
        tops = r.json()["choices"][0]["logprobs"]["top_logprobs"]
        assert len(tops) == len(tgi) == 12
        assert any(len(top) < 5 for top in tops)  # texts do collide here
        for top, alts in zip(tops, tgi, strict=True):
            best: dict[str, float] = {}
            for a in alts:
                best[a["text"]] = max(best.get(a["text"], -math.inf), a["logprob"])
            assert top == best
