"""End to end with the bundled model under weights/ (skipped until it is committed)."""

from __future__ import annotations

import asyncio
import json
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
        tgi, chosen = r.json()["details"]["top_tokens"], [t["id"] for t in r.json()["details"]["tokens"]]
        body = {"model": "gam-wikitext2", "prompt": SPLIT_CHARS, "max_tokens": 12, "temperature": 0, "logprobs": 5}
        r = await client.post("/v1/completions", json=body)
        lp = r.json()["choices"][0]["logprobs"]
        tops = lp["top_logprobs"]
        assert len(tops) == len(tgi) == 12
        assert any(len(top) < 5 for top in tops)  # texts do collide here
        for top, alts, tid, tok, tok_lp in zip(tops, tgi, chosen, lp["tokens"], lp["token_logprobs"], strict=True):
            # the token itself is named by its tokens entry (a byte piece's is "" or the character it completes)
            assert top.pop(tok) == tok_lp
            best: dict[str, float] = {}
            for a in alts:
                if a["id"] != tid:
                    best[a["text"]] = max(best.get(a["text"], -math.inf), a["logprob"])
            assert top == {k: v for k, v in best.items() if k != tok}


def sse_events(text: str) -> list[dict]:
    return [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: ") and b != "data: [DONE]"]


@pytest.mark.slow
@pytest.mark.skipif(len(BUNDLED) != 1, reason="no single bundled model under weights/ yet")
async def test_stop_strings_on_characters_split_over_byte_tokens_agree_in_every_form() -> None:
    """Stop strings on the bundled model's real output of 3-byte characters, each spread over byte tokens (text
    held back until it is complete): TGI and OpenAI, streamed (--stream-interval 4) or not, n 2, all in flight
    together, agree; a matched stop cuts the OpenAI text once, at its first match, and TGI keeps the tokens through
    the one that completed it; a stop that only starts to match holds text back and then releases it whole."""
    settings = Settings(device="cpu", max_batch_size=8, deterministic=True, stream_interval=4)
    async with app_client(settings) as (_, client):
        params = {"max_new_tokens": 9, "details": True}
        r = await client.post("/generate", json={"inputs": SPLIT_CHARS, "parameters": params})
        toks = [t["text"] for t in r.json()["details"]["tokens"]]
        full = "".join(toks)
        assert "" in toks and any(ord(c) > 127 for c in full)  # characters split over tokens
        for stop in (full[1:3], full[1] + "\x00"):  # two characters over tokens (the last one's), a partial match
            cut = full.find(stop)
            through = next(k for k in range(len(toks) + 1) if len("".join(toks[:k])) >= cut + len(stop))
            tgi_text = "".join(toks[:through]) if cut >= 0 else full
            p = {**params, "stop": [stop]}
            body = {"model": "gam-wikitext2", "prompt": SPLIT_CHARS, "max_tokens": 9, "temperature": 0, "stop": [stop]}
            plain, streamed, oai, oai_streamed = await asyncio.gather(
                client.post("/generate", json={"inputs": SPLIT_CHARS, "parameters": p}),
                client.post("/generate_stream", json={"inputs": SPLIT_CHARS, "parameters": p}),
                client.post("/v1/completions", json={**body, "n": 2}),
                client.post("/v1/completions", json={**body, "n": 2, "stream": True}),
            )
            finish = "stop_sequence" if cut >= 0 else "length"
            assert plain.json()["generated_text"] == tgi_text and plain.json()["details"]["finish_reason"] == finish
            events = sse_events(streamed.text)
            assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"] == tgi_text
            want = [full[:cut] if cut >= 0 else full, "stop" if cut >= 0 else "length"]
            assert [[c["text"], c["finish_reason"]] for c in oai.json()["choices"]] == [want, want]
            got = [["", None], ["", None]]
            for e in sse_events(oai_streamed.text):
                for c in e["choices"]:
                    got[c["index"]][0] += c["text"]
                    if c["finish_reason"] is not None:
                        assert got[c["index"]][1] is None  # one finish per choice
                        got[c["index"]][1] = c["finish_reason"]
            assert got == [want, want], stop


@pytest.mark.slow
@pytest.mark.skipif(len(BUNDLED) != 1, reason="no single bundled model under weights/ yet")
async def test_echoed_tokens_are_named_as_generated_ones() -> None:
    """The same token ids get the same OpenAI `logprobs.tokens` whether they were generated or are echoed as the
    prompt: a byte piece of a character is "" and the token that completes it carries the character, so the tokens
    join to the choice's text (the echo named each prompt token by its lone decode, U+FFFD for every byte piece)."""
    async with app_client(Settings(device="cpu", max_batch_size=2, deterministic=True)) as (_, client):
        ids = [t["id"] for t in (await client.post("/tokenize", json={"inputs": SPLIT_CHARS})).json()]
        body = {"model": "gam-wikitext2", "temperature": 0, "logprobs": 1, "echo": True}
        r = await client.post("/v1/completions", json={**body, "prompt": ids, "max_tokens": 12})
        generated = r.json()["choices"][0]
        params = {"max_new_tokens": 12, "details": True}
        r = await client.post("/generate", json={"inputs": SPLIT_CHARS, "parameters": params})
        gen_ids = [t["id"] for t in r.json()["details"]["tokens"]]
        for stream in (False, True):
            whole = {**body, "prompt": ids + gen_ids, "max_tokens": 0, "stream": stream}
            r = await client.post("/v1/completions", json=whole)
            if stream:
                (choice,) = sse_events(r.text)[0]["choices"]  # the echo, then the finish chunk
            else:
                (choice,) = r.json()["choices"]
            lp, want = choice["logprobs"], generated["logprobs"]
            assert "" in want["tokens"] and any(ord(c) > 127 for c in generated["text"])  # split characters
            assert choice["text"] == generated["text"]
            assert lp["tokens"] == want["tokens"] and lp["text_offset"] == want["text_offset"]
            assert "".join(lp["tokens"]) == choice["text"]
    # a prompt that ends inside a character: the held-back bytes are the last token's text, as in the echoed text
    async with app_client(Settings(device="cpu", max_batch_size=2)) as (_, client):
        cut = ids + gen_ids[:1]
        r = await client.post("/v1/completions", json={**body, "prompt": cut, "max_tokens": 0})
        (choice,) = r.json()["choices"]
        assert choice["text"].endswith("\ufffd") and "".join(choice["logprobs"]["tokens"]) == choice["text"]
