"""The same request gives the same answer whatever form it takes: TGI or OpenAI, streamed or not, with or without
prompt logprobs (which are scored before the prefill, over one or many engine iterations)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import app_client, metric_values

MODEL = "tiny-gam"
PROMPTS = [
    "A",
    "The game was",
    "Valkyria Chronicles III is a tactical role @-@ playing game",
    "The season . " * 12,  # past R, and several scoring chunks when the budget is small
    "In 1998 , the band released their second album , which reached number",
]


def sse_data(text: str) -> list[str]:
    return [b[len("data: ") :] for b in text.split("\n\n") if b.startswith("data: ")]


async def generated_tokens(client: httpx.AsyncClient, form: str, prompt: str, n: int) -> list[str]:
    """The greedy tokens' own texts for `prompt` through one request form."""
    if form.startswith("tgi"):
        params: dict = {"max_new_tokens": n, "details": True}
        if form == "tgi+prefill":
            params["decoder_input_details"] = True
        r = await client.post("/generate", json={"inputs": prompt, "parameters": params})
        assert r.status_code == 200, r.text
        d = r.json()["details"]
        if form == "tgi+prefill":
            assert len(d["prefill"]) > 0 and d["prefill"][0]["logprob"] is None
        return [t["text"] for t in d["tokens"]]
    if form == "tgi-stream":
        r = await client.post("/generate_stream", json={"inputs": prompt, "parameters": {"max_new_tokens": n}})
        return [json.loads(d)["token"]["text"] for d in sse_data(r.text)]
    body: dict = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 0}
    if form in ("oai+echo", "oai+echo-stream"):
        body["echo"] = True
    if form.endswith("stream"):
        r = await client.post("/v1/completions", json={**body, "stream": True})
        chunks = [json.loads(d) for d in sse_data(r.text) if d != "[DONE]"]
        lps = [c["choices"][0]["logprobs"] for c in chunks]
        if form == "oai+echo-stream":
            lps = lps[1:]  # the echoed prompt comes first
        tokens = [t for lp in lps for t in lp["tokens"]]
    else:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        tokens = r.json()["choices"][0]["logprobs"]["tokens"]
        if form == "oai+echo":
            n_prompt = len((await client.post("/tokenize", json={"inputs": prompt})).json())
            tokens = tokens[n_prompt:]
    return tokens


FORMS = ["tgi", "tgi+prefill", "tgi-stream", "oai", "oai-stream", "oai+echo", "oai+echo-stream"]


@pytest.mark.parametrize("budget", ["default", "one-chunk-per-iteration"])
async def test_every_request_form_generates_the_same_tokens(make_settings, budget: str) -> None:
    """Greedy tokens agree across the 7 forms for every prompt; asking for prompt logprobs never prefills or samples a
    sequence twice (it did when the prompt was scored in the iteration that admitted it)."""
    small = dict(score_budget_s=0.0, score_windows=4, score_head_chunk=8) if budget != "default" else {}
    async with app_client(make_settings(max_batch_size=4, **small)) as (_, client):
        for prompt in PROMPTS:
            ref = await generated_tokens(client, "tgi", prompt, 6)
            assert len(ref) == 6
            for form in FORMS[1:]:
                assert await generated_tokens(client, form, prompt, 6) == ref, (form, prompt)
        values = metric_values((await client.get("/metrics")).text)
        errors = sum(v for k, v in values.items() if k.startswith("gam_requests_total") and 'reason="error"' in k)
        assert errors == 0


async def test_one_token_loglikelihood_requests_finish_once(make_settings) -> None:
    """lm-eval's loglikelihood request (echo + logprobs + max_tokens 1): one token, counted once as `length`."""
    async with app_client(make_settings()) as (_, client):
        for prompt in PROMPTS:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 1
        values = metric_values((await client.get("/metrics")).text)
        assert values['gam_requests_total{endpoint="completions",finish_reason="length"}'] == len(PROMPTS)
        assert not any('reason="error"' in k for k in values if k.startswith("gam_requests_total"))
        assert values["gam_generated_tokens_total"] == len(PROMPTS)


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_zero_with_echo_generates_nothing(make_settings, stream: bool) -> None:
    """Scoring a prompt (or echoing it) spends no decode step and counts no generated token."""
    async with app_client(make_settings()) as (_, client):
        for logprobs in (None, 2):
            before = metric_values((await client.get("/metrics")).text)
            body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 0, "echo": True, "stream": stream}
            if logprobs is not None:
                body["logprobs"] = logprobs
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            after = metric_values((await client.get("/metrics")).text)
            assert after["gam_generated_tokens_total"] == before.get("gam_generated_tokens_total", 0)
            assert after["gam_request_generated_tokens_sum"] == before.get("gam_request_generated_tokens_sum", 0)
            assert after["gam_step_duration_seconds_count"] == before.get("gam_step_duration_seconds_count", 0)
            key = 'gam_requests_total{endpoint="completions",finish_reason="length"}'
            assert after[key] == before.get(key, 0) + 1
            if stream:
                chunks = [json.loads(d) for d in sse_data(r.text) if d != "[DONE]"]
                text = "".join(c["choices"][0]["text"] for c in chunks)
                finish = chunks[-1]["choices"][0]["finish_reason"]
            else:
                choice = r.json()["choices"][0]
                text, finish = choice["text"], choice["finish_reason"]
                assert r.json()["usage"]["completion_tokens"] == 0
            assert text == PROMPTS[2] and finish == "length"
