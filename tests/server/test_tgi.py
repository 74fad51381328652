"""TGI API wire format through the app in-process: /generate, /generate_stream, POST /, /tokenize, /info."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import orjson
import pytest
import torch

from gam_model.checkpoint import load_checkpoint
from gam_model.scoring import token_logprobs
from server.routes.common import json_float, sse
from server.routes.tgi import PLAIN_EVENT

PROMPT = "The game was"


def sse_events(text: str) -> list[dict]:
    """The JSON payloads of `data:` lines (TGI framing: `data: {json}` + blank line)."""
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            out.append(json.loads(block[len("data: ") :]))
    return out


async def test_generate_details(client: httpx.AsyncClient) -> None:
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 7, "details": True, "top_n_tokens": 3, "decoder_input_details": True},
    }
    r = await client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    d = data["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 7 and d["seed"] is None  # greedy: no seed
    assert len(d["tokens"]) == 7 and set(d["tokens"][0]) == {"id", "text", "logprob", "special"}
    assert data["generated_text"] == "".join(t["text"] for t in d["tokens"])
    assert all(t["logprob"] <= 0 for t in d["tokens"])
    assert len(d["top_tokens"]) == 7 and all(len(tt) == 3 for tt in d["top_tokens"])
    # greedy: the chosen token is the most likely alternative
    assert all(t["id"] == tt[0]["id"] for t, tt in zip(d["tokens"], d["top_tokens"], strict=True))
    assert [p["text"] for p in d["prefill"]] and "".join(p["text"] for p in d["prefill"]) == PROMPT


async def test_generate_without_details_has_only_text(client: httpx.AsyncClient) -> None:
    r = await client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and set(r.json()) == {"generated_text"}


async def test_stream_matches_generate(client: httpx.AsyncClient) -> None:
    params = {"max_new_tokens": 9, "details": True}
    full = (await client.post("/generate", json={"inputs": PROMPT, "parameters": params})).json()
    r = await client.post("/generate_stream", json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [e["index"] for e in events] == list(range(9))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == full["generated_text"]
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 9
    assert [e["token"]["id"] for e in events] == [t["id"] for t in full["details"]["tokens"]]


async def test_stream_events_are_their_json_serialised_compactly(client: httpx.AsyncClient) -> None:
    """Every event is exactly `data: ` + its object serialised compactly, keys in TGI's order: the byte template of a
    token's event (all but the last) equals the whole object serialised, for sampled text of any characters."""
    for params in ({"max_new_tokens": 24, "temperature": 1.5, "seed": 3, "do_sample": True},
                   {"max_new_tokens": 6, "details": True, "top_n_tokens": 2}):  # fmt: skip
        r = await client.post("/generate_stream", json={"inputs": 'It "was" é', "parameters": params})
        assert r.status_code == 200, r.text
        blocks = [b for b in r.content.split(b"\n\n") if b]
        assert len(blocks) == params["max_new_tokens"]
        for block in blocks:
            obj = json.loads(block.removeprefix(b"data: "))
            assert block == b"data: " + orjson.dumps(obj)
            top = ["top_tokens"] if "top_n_tokens" in params else []
            assert list(obj) == ["index", "token", *top, "generated_text", "details"]
            assert list(obj["token"]) == ["id", "text", "logprob", "special"]


@pytest.mark.parametrize("text", ["", "a", ' "q" \\ \n é 😀 \u2028 \x00'])
@pytest.mark.parametrize("logprob", [-0.25, 0.0, -1e-300, float("-inf"), float("nan")])
@pytest.mark.parametrize("special", [False, True])
def test_a_token_events_template_is_the_object_serialised(text: str, logprob: float, special: bool) -> None:
    ev = {"index": 7, "token": {"id": 123, "text": text, "logprob": json_float(logprob), "special": special},
          "generated_text": None, "details": None}  # fmt: skip
    got = PLAIN_EVENT % (
        7,
        123,
        orjson.dumps(text),
        orjson.dumps(json_float(logprob)),
        b"true" if special else b"false",
    )
    assert got == sse(ev)


async def test_compat_route_returns_list_or_stream(client: httpx.AsyncClient) -> None:
    r = await client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200 and isinstance(r.json(), list) and set(r.json()[0]) == {"generated_text"}
    r = await client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}, "stream": True})
    assert r.status_code == 200 and len(sse_events(r.text)) == 4


async def test_return_full_text_and_seed(client: httpx.AsyncClient) -> None:
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 6, "return_full_text": True, "do_sample": True, "seed": 42, "details": True},
    }
    a = (await client.post("/generate", json=body)).json()
    b = (await client.post("/generate", json=body)).json()
    assert a == b and a["generated_text"].startswith(PROMPT) and a["details"]["seed"] == 42


async def test_stop_sequence_ends_generation(client: httpx.AsyncClient) -> None:
    free = (await client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 20}})).json()
    text = free["generated_text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 20, "stop": [stop], "details": True}}
    r = (await client.post("/generate", json=body)).json()
    assert r["details"]["finish_reason"] == "stop_sequence"
    assert stop in r["generated_text"] and text.startswith(r["generated_text"])  # TGI keeps the stop string
    assert r["details"]["generated_tokens"] < 20


async def test_truncate_keeps_last_tokens(client: httpx.AsyncClient) -> None:
    long = "The game was played at the stadium in the city . " * 10
    tok = (await client.post("/tokenize", json={"inputs": long})).json()
    assert len(tok) > 40
    body = {
        "inputs": long,
        "parameters": {"max_new_tokens": 5, "truncate": 12, "details": True, "decoder_input_details": True},
    }
    r = (await client.post("/generate", json=body)).json()
    assert [p["id"] for p in r["details"]["prefill"]] == [t["id"] for t in tok[-12:]]


async def test_tokenize_offsets(client: httpx.AsyncClient) -> None:
    text = "Héllo wörld 🚀"
    toks = (await client.post("/tokenize", json={"inputs": text})).json()
    assert toks[0]["start"] == 0 and toks[-1]["stop"] == len(text)
    assert all(text[t["start"] : t["stop"]] == t["text"] for t in toks)
    assert all(set(t) == {"id", "text", "start", "stop"} for t in toks)


async def test_tokenize_applies_truncate(client: httpx.AsyncClient) -> None:
    """TGI's /tokenize keeps the last `truncate` tokens, the ones /generate gives the model (it was ignored)."""
    text = "The game 's story takes place during the Second Europan War"
    whole = (await client.post("/tokenize", json={"inputs": text})).json()
    cut = (await client.post("/tokenize", json={"inputs": text, "parameters": {"truncate": 3}})).json()
    assert len(whole) > 3 and cut == whole[-3:]
    body = {
        "inputs": text,
        "parameters": {"truncate": 3, "max_new_tokens": 1, "details": True, "decoder_input_details": True},
    }
    prefill = (await client.post("/generate", json=body)).json()["details"]["prefill"]
    assert [t["id"] for t in prefill] == [t["id"] for t in cut]
    assert (await client.post("/tokenize", json={"inputs": text, "parameters": {"truncate": 99}})).json() == whole


async def test_vllm_tokenize_detokenize_and_tokenizer_info(client: httpx.AsyncClient) -> None:
    """The vLLM forms lm-evaluation-harness's remote tokenizer uses: /tokenizer_info, /tokenize, /detokenize."""
    info = (await client.get("/tokenizer_info")).json()
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"] is None
    text = "Héllo wörld 🚀 The game"
    r = (await client.post("/tokenize", json={"prompt": text, "add_special_tokens": False})).json()
    tgi = (await client.post("/tokenize", json={"inputs": text})).json()
    assert r["tokens"] == [t["id"] for t in tgi] and r["count"] == len(tgi) and r["max_model_len"] == 256
    assert (await client.post("/detokenize", json={"tokens": r["tokens"]})).json() == {"prompt": text}
    eos = (await client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})).json()
    assert eos["tokens"] == [0]  # the special token's own id (conftest: id 0)
    for path, body in [
        ("/detokenize", {"tokens": [10**6]}),
        ("/detokenize", {"tokens": [-1]}),
        ("/detokenize", {"tokens": "abc"}),
        ("/tokenize", {"prompt": 5}),
        ("/tokenize", {}),
    ]:
        bad = await client.post(path, json=body)
        assert bad.status_code == 422 and set(bad.json()) == {"error", "error_type"}, (path, body, bad.text)


async def test_info_and_health(client: httpx.AsyncClient) -> None:
    info = (await client.get("/info")).json()
    for key in (
        "model_id",
        "model_dtype",
        "model_device_type",
        "max_input_tokens",
        "max_total_tokens",
        "max_batch_size",
        "max_concurrent_requests",
        "version",
    ):
        assert key in info
    assert info["model_id"] == "tiny-gam" and info["model_dtype"] == "torch.float32"
    head = await client.head("/health")  # probes and load balancers that send HEAD
    assert head.status_code == 200 and head.content == b""
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/openapi.json")).json()["paths"]["/generate"]


async def test_generation_past_block_size(client: httpx.AsyncClient) -> None:
    """block_size is 48: a long prompt plus 40 tokens runs in the sliding-window regime, streamed and not."""
    long = "The game was played at the stadium in the city . " * 8
    body = {"inputs": long, "parameters": {"max_new_tokens": 40, "details": True}}
    a = (await client.post("/generate", json=body)).json()
    events = sse_events((await client.post("/generate_stream", json=body)).text)
    assert a["details"]["generated_tokens"] == 40 == len(events)
    assert events[-1]["generated_text"] == a["generated_text"]


async def test_decoder_input_details_are_the_prompt_logprobs(client: httpx.AsyncClient, checkpoint_dir: Path) -> None:
    long = "The game was played at the stadium in the city , and the team won the match . " * 3
    params = {"max_new_tokens": 2, "details": True, "decoder_input_details": True}
    pre = (await client.post("/generate", json={"inputs": long, "parameters": params})).json()["details"]["prefill"]
    model, tok, _ = load_checkpoint(checkpoint_dir)
    ids = tok.encode(long)
    assert len(ids) > model.config.block_size and [p["id"] for p in pre] == ids
    assert pre[0]["logprob"] is None  # TGI: the first prompt token has no logprob
    assert [p["logprob"] for p in pre[1:]] == pytest.approx(token_logprobs(model, torch.tensor(ids)).logprobs, abs=1e-4)


async def test_decoder_input_details_need_a_whole_answer(client: httpx.AsyncClient) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    for r in (await client.post("/generate_stream", json=body), await client.post("/", json={**body, "stream": True})):
        assert r.status_code == 422 and "decoder_input_details" in r.json()["error"], r.text
        assert r.json()["error_type"] == "validation"
