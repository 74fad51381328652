"""OpenAI completions wire format through the app in-process."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import orjson
import pytest
import torch

from gam_model.checkpoint import load_checkpoint
from gam_model.scoring import token_logprobs
from server.routes import openai as openai_routes
from tests.server.conftest import app_client

MODEL = "tiny-gam"


def sse_payloads(text: str) -> list[str]:
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks)
    return [b[len("data: ") :] for b in blocks]


async def test_models(client: httpx.AsyncClient) -> None:
    r = (await client.get("/v1/models")).json()
    assert r["object"] == "list" and [m["id"] for m in r["data"]] == [MODEL]


async def test_completion_shape_and_usage(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "The game was", "max_tokens": 6, "temperature": 0}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-") and data["model"] == MODEL
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert data["usage"]["completion_tokens"] == 6
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 6
    tgi = await client.post("/generate", json={"inputs": "The game was", "parameters": {"max_new_tokens": 6}})
    assert choice["text"] == tgi.json()["generated_text"]  # greedy: both APIs agree


async def test_prompt_list_n_echo_logprobs(client: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "prompt": ["The game", "In the city"],
        "n": 2,
        "max_tokens": 4,
        "echo": True,
        "logprobs": 2,
        "seed": 7,
    }
    data = (await client.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert data["choices"][0]["text"].startswith("The game") and data["choices"][2]["text"].startswith("In the city")
    lp = data["choices"][1]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first prompt token has no context
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(1 <= len(alts) <= 3 for alts in lp["top_logprobs"][1:])  # the top 2 and the token itself
    assert data["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("stream", [False, True])
async def test_n_choices_echo_one_prompt_built_once(client: httpx.AsyncClient, monkeypatch, stream: bool) -> None:
    """The n choices of a prompt echo the same logprob entries, built once per prompt (not once per choice on the
    event loop: 0.1 s a choice for an 8,000-token prompt)."""
    built: list[int] = []
    real = openai_routes.LogprobsBuilder._prompt

    def counted(self, ids, prompt, text):
        built.append(len(ids))
        return real(self, ids, prompt, text)

    monkeypatch.setattr(openai_routes.LogprobsBuilder, "_prompt", counted)
    body = {"model": MODEL, "prompt": ["The game was", "In the city of"], "n": 3, "max_tokens": 3, "echo": True,
            "logprobs": 2, "temperature": 1.0, "seed": 5, "stream": stream}  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
        echoes: dict[int, dict] = {}
        for c in chunks:
            for choice in c["choices"]:
                echoes.setdefault(choice["index"], choice["logprobs"])
        prompt_parts = [echoes[k] for k in range(6)]  # each choice's first chunk is its echo
    else:
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        n_prompt = [len(c["logprobs"]["tokens"]) - 3 for c in choices]
        prompt_parts = [
            {key: c["logprobs"][key][:m] for key in c["logprobs"]} for c, m in zip(choices, n_prompt, strict=True)
        ]
    assert len(built) == 2  # one per prompt
    assert prompt_parts[0] == prompt_parts[1] == prompt_parts[2] != prompt_parts[3]
    assert prompt_parts[3] == prompt_parts[4] == prompt_parts[5]
    assert prompt_parts[0]["token_logprobs"][0] is None and prompt_parts[0]["token_logprobs"][1] is not None


async def test_token_id_prompt(client: httpx.AsyncClient) -> None:
    ids = [t["id"] for t in (await client.post("/tokenize", json={"inputs": "The game was"})).json()]
    a = (
        await client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 5, "temperature": 0})
    ).json()
    b = (
        await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "The game was", "max_tokens": 5, "temperature": 0}
        )
    ).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


async def test_stream_with_usage_and_done(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "The game was", "max_tokens": 8, "temperature": 0}
    full = (await client.post("/v1/completions", json=body)).json()
    r = await client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == full["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("usage", [False, True])
async def test_stream_chunks_are_their_json_serialised_compactly(client: httpx.AsyncClient, usage: bool) -> None:
    """Every chunk is exactly `data: ` + its object serialised compactly, keys in OpenAI's order: the byte templates
    of plain token chunks (several choices, sampled text of any characters) equal the whole object serialised."""
    body = {"model": MODEL, "prompt": ["The game", "It \"was\" é"], "n": 2, "max_tokens": 24, "temperature": 1.5,
            "seed": 3, "stream": True, "stream_options": {"include_usage": usage}}  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    blocks = [b for b in r.content.split(b"\n\n") if b]
    assert blocks[-1] == b"data: [DONE]"
    plain = 0
    for block in blocks[:-1]:
        obj = json.loads(block.removeprefix(b"data: "))
        assert block == b"data: " + orjson.dumps(obj)
        assert list(obj) == ["id", "object", "created", "model", "system_fingerprint", "choices"] + (
            ["usage"] if usage else []
        )
        for c in obj["choices"]:
            assert list(c) == ["index", "text", "logprobs", "finish_reason"]
            plain += c["finish_reason"] is None
    assert plain >= 4 * 20  # most chunks are plain token chunks, of every choice index


async def test_stream_stop_string_is_cut(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "The game was", "max_tokens": 20, "temperature": 0}
    text = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    stop = text[8:11]
    r = await client.post("/v1/completions", json={**body, "stop": stop, "stream": True})
    chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == text[: text.index(stop)] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


LONG = "The game was played at the stadium in the city , and the team won the match . " * 3


async def test_echo_logprobs_are_the_prompt_logprobs(client: httpx.AsyncClient, checkpoint_dir: Path) -> None:
    """echo + logprobs scores the prompt exactly (past block_size too), and agrees with the generated tokens."""
    ids = [t["id"] for t in (await client.post("/tokenize", json={"inputs": LONG})).json()]
    model, _, _ = load_checkpoint(checkpoint_dir)
    assert len(ids) > model.config.block_size  # the sliding-window semantics are part of the check
    want = token_logprobs(model, torch.tensor(ids), top_n=1)
    gen = (
        await client.post("/generate", json={"inputs": LONG, "parameters": {"max_new_tokens": 4, "details": True}})
    ).json()["details"]["tokens"]  # greedy
    body = {"model": MODEL, "prompt": ids + [t["id"] for t in gen], "max_tokens": 1, "echo": True, "logprobs": 1}
    choice = (await client.post("/v1/completions", json={**body, "temperature": 0})).json()["choices"][0]
    lp = choice["logprobs"]
    n = len(ids)
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:n] == pytest.approx(want.logprobs, abs=1e-4)
    # the echoed continuation carries the logprobs it was generated with, and each is its position's best (the
    # check lm-evaluation-harness makes for is_greedy)
    assert lp["token_logprobs"][n : n + 4] == pytest.approx([t["logprob"] for t in gen], abs=1e-4)
    assert all(lp["token_logprobs"][j] == max(lp["top_logprobs"][j].values()) for j in range(n, n + 4))
    assert choice["text"].startswith(LONG)


async def test_stream_echo_carries_prompt_logprobs(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "The game was", "max_tokens": 3, "echo": True, "logprobs": 2, "stream": True,
            "temperature": 0}  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
    first = chunks[0]["choices"][0]
    assert first["text"] == "The game was" and first["logprobs"]["token_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in first["logprobs"]["token_logprobs"][1:])
    assert "".join(c["choices"][0]["text"] for c in chunks).startswith("The game was")
    assert len(chunks) == 4  # the echo, then one chunk per generated token


async def test_chat_completions_explains_itself(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post("/v1/chat/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 404 and "/v1/completions" in err["message"] and err["code"] == "chat_not_supported"


async def test_logit_bias_bans_and_forces(client: httpx.AsyncClient, checkpoint_dir: Path) -> None:
    _, tok, _ = load_checkpoint(checkpoint_dir)
    body = {"model": MODEL, "prompt": "The game was", "max_tokens": 4, "temperature": 0, "logprobs": 1}
    plain = (await client.post("/v1/completions", json=body)).json()["choices"][0]["logprobs"]
    first = tok.encode(plain["tokens"][0])
    assert len(first) == 1  # the greedy first token, as an id
    banned = (await client.post("/v1/completions", json={**body, "logit_bias": {str(first[0]): -100}})).json()
    assert banned["choices"][0]["logprobs"]["tokens"][0] != plain["tokens"][0]
    forced = (await client.post("/v1/completions", json={**body, "logit_bias": {"5": 100}})).json()["choices"][0]
    assert forced["logprobs"]["tokens"] == [tok.decode([5])] * 4
    # the reported logprobs are those of the biased distribution (token 5 is then all but certain)
    assert all(lp > -1e-3 for lp in forced["logprobs"]["token_logprobs"])


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_zero_with_echo_scores_the_prompt_only(client: httpx.AsyncClient, stream: bool) -> None:
    """OpenAI's legacy `echo` + `max_tokens: 0` (what older eval clients send): the prompt with its logprobs."""
    body = {"model": MODEL, "prompt": ["The game was", "In the city"], "max_tokens": 0, "echo": True, "logprobs": 1}
    one = {**body, "max_tokens": 1}
    if stream:
        r = await client.post(
            "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
        usage = chunks[-1]["usage"]
        by_choice: dict[int, list] = {0: [], 1: []}
        for c in chunks[:-1]:
            by_choice[c["choices"][0]["index"]].append(c["choices"][0])
        choices = [{"text": "".join(c["text"] for c in cs), "logprobs": cs[0]["logprobs"],
                    "finish_reason": cs[-1]["finish_reason"]} for cs in by_choice.values()]  # fmt: skip
    else:
        data = (await client.post("/v1/completions", json=body)).json()
        choices, usage = data["choices"], data["usage"]
    ref = (await client.post("/v1/completions", json=one)).json()["choices"]  # max_tokens 1: prompt part identical
    assert usage["completion_tokens"] == 0
    for c, r, prompt in zip(choices, ref, body["prompt"], strict=True):
        assert c["text"] == prompt and c["finish_reason"] == "length"
        n = len(c["logprobs"]["tokens"])
        assert c["logprobs"]["token_logprobs"] == r["logprobs"]["token_logprobs"][:n]
        assert len(r["logprobs"]["tokens"]) == n + 1  # the reference has the one generated token beyond them


async def test_text_offset_is_where_each_token_starts(client: httpx.AsyncClient) -> None:
    """text_offset follows OpenAI's definition (each token's start in the choice's text: echoed prompt, then
    completion) and agrees between streamed and whole answers, with multi-byte characters spread over byte tokens
    and a stop string that holds text back without ever matching."""
    for prompt in ("Party 🎉 time , naïve café", "The game was", "日本"):
        for echo in (True, False):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0.9, "seed": 3}
            body |= {"echo": echo, "logprobs": 1, "stop": ["e~", "a~", "s~", "t~"]}  # held back, never matched
            whole = (await client.post("/v1/completions", json=body)).json()["choices"][0]
            r = await client.post("/v1/completions", json={**body, "stream": True})
            chunks = [json.loads(p)["choices"][0] for p in sse_payloads(r.text)[:-1]]
            streamed = [o for c in chunks for o in c["logprobs"]["text_offset"]]
            lp = whole["logprobs"]
            assert streamed == lp["text_offset"]
            assert "".join(c["text"] for c in chunks) == whole["text"]
            offsets, tokens, text = lp["text_offset"], lp["tokens"], whole["text"]
            assert offsets == sorted(offsets) and offsets[0] == 0
            n_prompt = len((await client.post("/tokenize", json={"inputs": prompt})).json()) if echo else 0
            if echo:
                assert offsets[n_prompt] == len(prompt)  # the first generated token starts after the prompt
            for off, tok in zip(offsets, tokens, strict=True):
                if "\ufffd" not in tok:  # a byte piece of a character has no text of its own
                    assert text[off : off + len(tok)] == tok, (prompt, echo, off, tok)


@pytest.mark.parametrize("stream", [False, True])
async def test_top_logprobs_hold_each_token_under_its_tokens_entry(client: httpx.AsyncClient, stream: bool) -> None:
    """OpenAI: "The API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements": top_logprobs[i][tokens[i]] == token_logprobs[i], for sampled tokens outside the top `logprobs` and
    for byte pieces of a character (whose tokens entry is the text they add, "" or the completed character, while
    an alternative decoded alone is U+FFFD), echoed prompt tokens included. The sampled token was missing from its
    top_logprobs when it was not among the best, and a byte piece was keyed by U+FFFD."""
    body = {"model": MODEL, "prompt": "Party 🎉 time , naïve café", "max_tokens": 16, "temperature": 2.0, "seed": 5}
    body |= {"echo": True, "logprobs": 1, "stream": stream}
    r = await client.post("/v1/completions", json=body)
    if stream:
        chunks = [json.loads(p)["choices"][0]["logprobs"] for p in sse_payloads(r.text)[:-1]]
        lp = {k: [x for c in chunks for x in c[k]] for k in ("tokens", "token_logprobs", "top_logprobs")}
    else:
        lp = r.json()["choices"][0]["logprobs"]
    assert lp["top_logprobs"][0] is None  # the first prompt token has no context
    tops = list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True))[1:]
    assert any(lp_ < max(top.values()) for _, lp_, top in tops)  # some tokens are not the best: the check bites
    assert any(tok == "" for tok, _, _ in tops)  # and some are byte pieces
    for tok, lp_, top in tops:
        assert 1 <= len(top) <= 2 and top[tok] == lp_, (tok, lp_, top)


async def test_over_long_prompt_error_suggests_only_what_the_api_has(client: httpx.AsyncClient) -> None:
    """An over-long prompt's 400 says to shorten it; `truncate` (TGI's, which this API lacks and ignores) is not
    suggested, for string and token-id prompts alike, tokenized or refused on its byte count. TGI's 422 suggests it."""
    for prompt in ("word " * 300, "word " * 200_000, [5] * 257):
        r = await client.post("/v1/completions", json={"model": "tiny-gam", "prompt": prompt, "max_tokens": 2})
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "max input tokens" in message and "shorten it" in message
        assert "truncate" not in message
    r = await client.post("/generate", json={"inputs": "word " * 300, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 422 and "set truncate" in r.json()["error"]


async def test_null_n_stream_and_echo_mean_their_defaults(client: httpx.AsyncClient) -> None:
    """OpenAI's spec marks n, stream and echo nullable (clients generated from it send null for an unset field): null
    is the default (1 choice, not streamed, no echo), as for max_tokens; they were a 400."""
    body = {"model": MODEL, "prompt": "The game", "max_tokens": 3, "temperature": 0}
    want = (await client.post("/v1/completions", json=body)).json()["choices"]
    r = await client.post("/v1/completions", json={**body, "n": None, "stream": None, "echo": None})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["choices"] == want and not want[0]["text"].startswith("The game")


async def test_max_tokens_left_out_defaults_within_the_server_limit(make_settings) -> None:
    """OpenAI's default of 16 tokens, capped by --max-new-tokens as TGI's default is: a body without max_tokens is
    never refused for a value the client did not send (it was a 400 "max_tokens must be <= 8, got 16")."""
    async with app_client(make_settings(max_new_tokens=8)) as (_, client):
        for body in ({}, {"max_tokens": None}):
            r = await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "The game", "temperature": 0, **body}
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] <= 8
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "The game", "max_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
async def test_text_offset_with_a_tokenizer_that_does_not_round_trip(tmp_path: Path, stream: bool) -> None:
    """The paper's tokenizer recipe (BPE after a Whitespace pre-tokenizer, no decoder: what gam-import serves for a
    paper checkpoint) decodes " st ad i u m" where the prompt said "stadium", so the echoed tokens' texts do not join
    to the echoed prompt. Their offsets are still where each token starts in the choice's text (from the tokenizer's
    own offsets), and the generated ones follow: the offsets had summed the tokens' texts, running past the prompt
    (the last prompt token after the first generated one)."""
    from gam_model import data
    from gam_model.checkpoint import CheckpointMeta, save_checkpoint
    from tests.conftest import tiny_model
    from tests.server.conftest import FIXTURE_TEXT, tiny_settings

    tok = data.train_tokenizer([FIXTURE_TEXT], "paper", vocab_size=400)
    model = tiny_model(seed=3, vocab_size=tok.vocab_size, block_size=48)
    d = save_checkpoint(tmp_path / "paper", model, tok, CheckpointMeta(model_name="paper", eos_token_id=3))
    prompt = "The game was played at the stadium , and"
    async with app_client(tiny_settings(d)) as (_, client):
        body = {"model": "paper", "prompt": prompt, "max_tokens": 6, "echo": True, "logprobs": 0, "stream": stream}
        body |= {"temperature": 0.9, "seed": 1}
        r = await client.post("/v1/completions", json=body)
        if stream:
            chunks = [json.loads(p)["choices"][0] for p in sse_payloads(r.text)[:-1]]
            text = "".join(c["text"] for c in chunks)
            tokens = [t for c in chunks for t in c["logprobs"]["tokens"]]
            offsets = [o for c in chunks for o in c["logprobs"]["text_offset"]]
        else:
            (choice,) = r.json()["choices"]
            text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    n_prompt = len(tok.encode(prompt))
    assert text.startswith(prompt) and "".join(tokens[:n_prompt]) != prompt  # the tokens' texts do not round-trip
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[n_prompt] == len(prompt)
    for off, t in zip(offsets, tokens, strict=True):
        assert text[off:].lstrip().startswith(t.strip()), (off, t)  # a prompt token's text may add a space
