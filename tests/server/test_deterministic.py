"""--deterministic through the engine: with the bundled model in bf16, a seeded (or greedy) request's text, tokens
and logprobs alone equal those it gets beside other concurrent requests, wherever it lands in the batch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from server.settings import WEIGHTS_DIR
from tests.server.conftest import app_client, tiny_settings

BUNDLED = WEIGHTS_DIR / "gam-wikitext2"

OTHERS = [
    ("In 1998 , the band", dict(temperature=0.8, top_k=40, seed=1, do_sample=True)),
    ("The", dict(do_sample=False)),
    ("After the war , the city was rebuilt and its population grew to", dict(seed=2, do_sample=True)),
    ("Valkyria Chronicles III is a tactical role @-@ playing video game " * 3, dict(do_sample=False)),
    ("He was", dict(temperature=1.3, typical_p=0.9, seed=3, do_sample=True)),
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The engine thread's torch ops on one thread: a shared 2-core machine stalls a second one (see
    tests/gam_model/test_deterministic.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def body(prompt: str, **params: object) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": 16, "details": True, **params}}


def generation(r) -> tuple:
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    return r.json()["generated_text"], [t["id"] for t in d["tokens"]], [t["logprob"] for t in d["tokens"]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [
        body("The history of the city", do_sample=True, seed=7, temperature=1.0, top_p=0.95),
        body("A", do_sample=False),  # one token: even the first token used to depend on the batch in bf16
    ],
    ids=["seeded", "greedy-one-token"],
)
async def test_text_alone_equals_text_beside_others(one_thread, target: dict) -> None:
    settings = tiny_settings(BUNDLED, dtype="bfloat16", deterministic=True, max_batch_size=4)
    async with app_client(settings) as (_, client):
        assert (await client.get("/info")).json()["deterministic"] is True
        alone = generation(await client.post("/generate", json=target))
        assert alone[1], "generated nothing"
        others = [body(p, **kw) for p, kw in OTHERS]
        for place in (0, 4):  # 6 requests on 4 slots: admitted together or later, at different rows
            batch = [*others[:place], target, *others[place:]]
            rs = await asyncio.gather(*(client.post("/generate", json=b) for b in batch))
            assert generation(rs[place]) == alone, f"target at place {place}"
