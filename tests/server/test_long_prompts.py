"""Size and position with the bundled model through a real uvicorn: the input limit at its boundary in both APIs'
shapes, and served tokens, logprobs and prompt logprobs equal to the reference forward across block_size."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from gam_model.checkpoint import load_checkpoint
from server.settings import WEIGHTS_DIR, Settings
from tests.server.conftest import FIXTURE_TEXT, LiveServer

BUNDLED = sorted(p.parent for p in WEIGHTS_DIR.glob("*/model.safetensors"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(len(BUNDLED) != 1, reason="no single bundled model under weights/ yet"),
]


@pytest.fixture(scope="module")
def bundled():
    model, tok, _ = load_checkpoint(BUNDLED[0])
    return model.float().eval(), tok


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids) by the reference forward over the last min(N, block_size) tokens (DESIGN 1.3)."""
    with torch.no_grad():
        return model(torch.tensor(ids[-model.config.block_size :]).unsqueeze(0))[0, -1].log_softmax(-1)


def test_input_limit_at_its_boundary_in_each_api_shape(bundled) -> None:
    """A prompt of limit-1 or limit tokens is served; limit+1 is a 4xx in the API's shape (TGI 422, OpenAI 400, as
    text or as ids); TGI `truncate` up to the limit serves the last tokens, past it is a 422; max_new_tokens over its
    limit is refused whatever the prompt."""
    _, tok = bundled
    ids = tok.encode(FIXTURE_TEXT.read_text()[:2000])
    # a limit whose prompts of limit-1, limit and limit+1 tokens are texts of exactly that many tokens
    limit = next(
        n for n in range(40, 300) if all(tok.encode(tok.decode(ids[:m])) == ids[:m] for m in (n - 1, n, n + 1))
    )
    settings = Settings(device="cpu", max_batch_size=2, max_new_tokens=8, max_input_tokens=limit)
    with LiveServer(settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        for n in (limit - 1, limit, limit + 1):
            text = tok.decode(ids[:n])
            tgi = c.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": 8, "details": True}})
            # greedy, as the TGI request: all 8 tokens come (OpenAI's default temperature 1 could draw eos early)
            oai = {"model": "gam-wikitext2", "max_tokens": 8, "temperature": 0}
            oai_text = c.post("/v1/completions", json={**oai, "prompt": text})
            oai_ids = c.post("/v1/completions", json={**oai, "prompt": ids[:n]})
            if n <= limit:
                assert tgi.status_code == 200 and tgi.json()["details"]["generated_tokens"] == 8
                assert oai_text.status_code == oai_ids.status_code == 200
                assert oai_text.json()["usage"] == {"prompt_tokens": n, "completion_tokens": 8, "total_tokens": n + 8}
            else:
                assert tgi.status_code == 422 and tgi.json()["error_type"] == "validation"
                assert f"{limit + 1} tokens" in tgi.json()["error"] and "truncate" in tgi.json()["error"]
                for r in (oai_text, oai_ids):
                    assert r.status_code == 400
                    err = r.json()["error"]
                    assert set(err) == {"message", "type", "param", "code"} and err["param"] == "prompt"
                    assert err["type"] == "invalid_request_error" and f"{limit + 1} tokens" in err["message"]
            over = c.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": 9}})
            assert over.status_code == 422 and over.json()["error_type"] == "validation"
        long_text = tok.decode(ids[:300])
        for t in (limit - 1, limit):
            body = {"inputs": long_text, "parameters": {"truncate": t, "max_new_tokens": 1, "details": True,
                                                         "decoder_input_details": True}}  # fmt: skip
            r = c.post("/generate", json=body)
            assert r.status_code == 200
            assert [p["id"] for p in r.json()["details"]["prefill"]] == ids[:300][-t:]
        r = c.post("/generate", json={"inputs": long_text, "parameters": {"truncate": limit + 1}})
        assert r.status_code == 422 and r.json()["error_type"] == "validation"


async def test_tokens_and_logprobs_across_block_size_equal_the_reference(bundled) -> None:
    """A prompt a few tokens short of block_size generates across it (cached step, then the sliding window) and a
    prompt past it generates in the window, beside each other: every generated token is the reference's greedy
    token with its logprob; the prompt logprobs (decoder_input_details) past block_size, and the echo + logprobs +
    max_tokens 0 scoring of prompt + generated text (what lm-eval sends), equal the reference and the generated
    logprobs."""
    model, tok = bundled
    bs = model.config.block_size
    ids = tok.encode(FIXTURE_TEXT.read_text())
    assert len(ids) > bs + 40
    settings = Settings(device="cpu", max_batch_size=4, max_new_tokens=16)
    prompts = [ids[: bs - 3], ids[: bs + 30]]
    with LiveServer(settings) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            params = {"max_new_tokens": 8, "details": True, "decoder_input_details": True}
            answers = await asyncio.gather(
                *(c.post("/generate", json={"inputs": tok.decode(p), "parameters": params}) for p in prompts)
            )
            for p, r in zip(prompts, answers, strict=True):
                d = r.json()["details"]
                assert [t["id"] for t in d["prefill"]] == p
                assert d["finish_reason"] == "length" and d["generated_tokens"] == 8
                seq = list(p)
                generated = []
                for t in d["tokens"]:
                    ref = reference_logprobs(model, seq)
                    assert t["id"] == int(ref.argmax())
                    assert t["logprob"] == pytest.approx(float(ref[t["id"]]), abs=1e-4)
                    seq.append(t["id"])
                    generated.append(t["logprob"])
                for i in (1, bs - 4, len(p) - 1):  # prompt logprobs, in the cached and (past bs) the window regime
                    ref = reference_logprobs(model, p[:i])
                    assert d["prefill"][i]["logprob"] == pytest.approx(float(ref[p[i]]), abs=1e-4)
                body = {"model": "gam-wikitext2", "prompt": seq, "max_tokens": 0, "echo": True, "logprobs": 0}
                scored = (await c.post("/v1/completions", json=body)).json()
                assert scored["usage"]["prompt_tokens"] == len(seq)
                echoed = scored["choices"][0]["logprobs"]["token_logprobs"][len(p) :]
                assert echoed == pytest.approx(generated, abs=1e-4)
