"""Invariants across request forms under concurrency: one OpenAI call with a batch of prompts and n choices gives,
streamed or not, the same choices as the equivalent single TGI requests (choice j of a seeded call draws with seed + j),
with token counts, finish reasons and stop-string cuts that agree."""

from __future__ import annotations

import asyncio
import json

import httpx

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


async def test_batched_openai_choices_equal_single_tgi_requests(make_settings) -> None:
    """Prompts x n choices in one OpenAI call (streamed and not, both in flight together) equal single seeded TGI
    requests token for token (deterministic mode: bit for bit); usage, the generated-tokens counter and finish reasons
    agree; stop strings that span token boundaries cut the OpenAI text at their first match, streamed or not."""
    N, SEED, K = 16, 11, 2
    async with app_client(make_settings(max_batch_size=4, max_queue=32, deterministic=True)) as (_, client):
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
