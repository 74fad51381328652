"""End to end with the bundled model under weights/ (skipped until it is committed)."""

from __future__ import annotations

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
