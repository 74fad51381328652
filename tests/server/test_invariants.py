"""Invariants across request forms under concurrency: one OpenAI call with a batch of prompts and n choices gives,
streamed or not, the same choices as the equivalent single TGI requests (choice j of a seeded call draws with seed + j),
with token counts, finish reasons and stop-string cuts that agree."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.server.conftest import app_client, metric_values

MODEL = "tiny-gam"
PROMPTS = ["Valkyria Chronicles III is a tactical role @-@ playing game", "The season . " * 6, "A"]


def sse_data(text: str) -> list[dict]:
    return [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: ") and b != "data: [DONE]"]


async def tgi_choice(client: httpx.AsyncClient, prompt: str, seed: int, n: int, stop: list[str]) -> dict:
    """One seeded TGI /generate: tokens' texts, logprobs, text, finish reason and count."""
    params = {"max_new_tokens": n, "details": True, "do_sample": True, "temperature": 0.9, "seed": seed, "stop": stop}
    r = await client.post("/generate", json={"inputs": prompt, "parameters": params})
    assert r.status_code == 200, r.text
    d = r.json()["details"]
    return {
        "tokens": [t["text"] for t in d["tokens"]],
        "logprobs": [t["logprob"] for t in d["tokens"]],
        "finish": d["finish_reason"],
        "count": d["generated_tokens"],
        "text": r.json()["generated_text"],
    }


async def openai_call(client: httpx.AsyncClient, n_choices: int, seed: int, n: int, stop: list[str], stream: bool):
    body = {
        "model": MODEL,
        "prompt": PROMPTS,
        "n": n_choices,
        "max_tokens": n,
        "temperature": 0.9,
        "seed": seed,
        "logprobs": 0,
        "stop": stop,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        d = r.json()
        return [
            {"text": c["text"], "tokens": c["logprobs"]["tokens"], "logprobs": c["logprobs"]["token_logprobs"],
             "finish": c["finish_reason"]}
            for c in sorted(d["choices"], key=lambda c: c["index"])
        ], d["usage"]  # fmt: skip
    chunks = sse_data(r.text)
    choices = [{"text": "", "tokens": [], "logprobs": [], "finish": None} for _ in range(len(PROMPTS) * n_choices)]
    for ch in chunks[:-1]:
        for c in ch["choices"]:
            x = choices[c["index"]]
            x["text"] += c["text"]
            x["tokens"] += c["logprobs"]["tokens"]
            x["logprobs"] += c["logprobs"]["token_logprobs"]
            if c["finish_reason"] is not None:
                assert x["finish"] is None
                x["finish"] = c["finish_reason"]
    return choices, chunks[-1]["usage"]


@pytest.mark.parametrize("overlap", ["off", "on"])
async def test_batched_openai_choices_equal_single_tgi_requests(make_settings, overlap: str) -> None:
    """Prompts x n choices in one OpenAI call (streamed and not, both in flight together) equal single seeded TGI
    requests token for token (deterministic mode: bit for bit); usage, the generated-tokens counter and finish reasons
    agree; stop strings that span token boundaries cut the OpenAI text at their first match, streamed or not. With the
    overlap scheduler (the CUDA default, forced on here) too."""
    N, SEED, K = 16, 11, 2
    settings = make_settings(max_batch_size=4, max_queue=32, deterministic=True, overlap=overlap)
    async with app_client(settings) as (_, client):
        assert (await client.get("/info")).json()["overlap"] is (overlap == "on")
        plain_refs = {
            (i, j): await tgi_choice(client, p, SEED + j, N, []) for i, p in enumerate(PROMPTS) for j in range(K)
        }
        # stop strings from the last character of each first choice's 4th token to the 2nd of its 5th
        stops = []
        for i in range(len(PROMPTS)):
            t = plain_refs[i, 0]["tokens"]
            a = len("".join(t[:4]))
            stops.append("".join(t)[a - 1 : a + 2])
        for stop in ([], stops):
            refs = plain_refs
            if stop:
                refs = {
                    (i, j): await tgi_choice(client, p, SEED + j, N, stop)
                    for i, p in enumerate(PROMPTS)
                    for j in range(K)
                }
                assert any(r["finish"] == "stop_sequence" for r in refs.values())
            before = metric_values((await client.get("/metrics")).text)
            (plain, u1), (streamed, u2) = await asyncio.gather(
                openai_call(client, K, SEED, N, stop, False), openai_call(client, K, SEED, N, stop, True)
            )
            after = metric_values((await client.get("/metrics")).text)
            total = 0
            for k in range(len(PROMPTS) * K):
                ref = refs[k // K, k % K]
                assert ref["count"] == len(ref["tokens"])
                total += ref["count"]
                full = "".join(ref["tokens"])
                cut = min((full.index(s) for s in stop if s in full), default=len(full))
                assert (ref["finish"] == "stop_sequence") == (cut < len(full))
                for got in (plain[k], streamed[k]):
                    assert got["tokens"] == ref["tokens"], (k, got, ref)
                    assert got["logprobs"] == ref["logprobs"]
                    assert got["finish"] == ("length" if ref["finish"] == "length" else "stop")
                    assert got["text"] == full[:cut]
            assert u1 == u2 and u1["completion_tokens"] == total
            assert after["gam_generated_tokens_total"] - before["gam_generated_tokens_total"] == 2 * total


async def test_prompt_logprobs_agree_across_forms_and_shared_scoring(make_settings) -> None:
    """The prompt's logprobs (and top alternatives) are the same in every form that asks for them, whatever shares
    its scoring: n choices, a batch of prompts, max_tokens 0, streamed or not, TGI decoder_input_details; scored over
    many iterations (small budget) while other requests decode. The generated part still equals a lone request."""
    long = "The season . " * 30  # past the tiny model's block_size (48): head chunks and windows
    small = dict(score_budget_s=0.0, score_windows=3, score_head_chunk=7, deterministic=True)
    async with app_client(make_settings(max_batch_size=4, max_queue=32, **small)) as (_, client):
        n_prompt = len((await client.post("/tokenize", json={"inputs": long})).json())
        base = {"model": MODEL, "echo": True, "logprobs": 2, "temperature": 0.8, "seed": 5}
        r = await client.post("/v1/completions", json={**base, "prompt": long, "max_tokens": 0})
        ref = r.json()["choices"][0]["logprobs"]
        assert len(ref["token_logprobs"]) == n_prompt and ref["token_logprobs"][0] is None
        lone = (await client.post("/v1/completions", json={**base, "prompt": long, "max_tokens": 8})).json()

        async def oai(prompt, n: int, max_tokens: int, stream: bool) -> list[dict]:
            body = {**base, "prompt": prompt, "n": n, "max_tokens": max_tokens, "stream": stream}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            if not stream:
                return [c["logprobs"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
            k = (len(prompt) if isinstance(prompt, list) else 1) * n
            out = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in range(k)]
            for ch in sse_data(r.text):
                assert "choices" in ch, ch
                for c in ch["choices"]:
                    for key in out[c["index"]]:
                        out[c["index"]][key] += (c["logprobs"] or {}).get(key, [])
            return out

        async def tgi() -> list[float | None]:
            params = {"max_new_tokens": 4, "details": True, "decoder_input_details": True}
            r = await client.post("/generate", json={"inputs": long, "parameters": params})
            return [t["logprob"] for t in r.json()["details"]["prefill"]]

        results = await asyncio.gather(
            oai(long, 3, 8, False),
            oai(long, 3, 8, True),
            oai([long, "A", long], 2, 0, False),
            oai([long, "A", long], 2, 0, True),
            oai(long, 1, 4, True),
            tgi(),
        )
        *openai, prefill = results
        assert prefill == ref["token_logprobs"]
        for choices in openai:
            for lp in choices:
                if len(lp["tokens"]) == 1:  # the prompt "A"
                    continue
                for key in ref:
                    assert lp[key][:n_prompt] == ref[key], key
        first = openai[0][0]  # choice 0 of n=3 draws with seed 5: the lone request's tokens
        assert first["tokens"][n_prompt:] == lone["choices"][0]["logprobs"]["tokens"][n_prompt:]
        assert first["token_logprobs"][n_prompt:] == lone["choices"][0]["logprobs"]["token_logprobs"][n_prompt:]
        assert openai[1][0] == first
