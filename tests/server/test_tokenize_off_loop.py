"""Long prompts are tokenized off the event loop (in a worker thread that releases the GIL), and prompts that are
certainly over --max-input-tokens are refused before any tokenization."""

from __future__ import annotations

import threading

import pytest

from gam_model.tokenizer import Tokenizer
from server.routes import common
from tests.server.conftest import app_client

LONG = "The season . In 1998 , the band released their second album 🎉 . " * 300  # ~20k chars, > the inline size


@pytest.fixture
def worker_calls(monkeypatch) -> list[str]:
    """Names of the threads the off-loop encoder ran on (the real encoder, observed)."""
    calls: list[str] = []
    real = Tokenizer.encode_releasing_gil

    def observed(self, text: str, add_special_tokens: bool = False):
        calls.append(threading.current_thread().name)
        return real(self, text, add_special_tokens)

    monkeypatch.setattr(Tokenizer, "encode_releasing_gil", observed)
    return calls


async def test_far_too_long_prompts_are_refused_untokenized(make_settings, worker_calls) -> None:
    async with app_client(make_settings(max_input_tokens=256)) as (app, client):
        huge = "word " * 200_000  # 1 MB
        r = await client.post("/generate", json={"inputs": huge, "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 422 and "at least" in r.json()["error"] and r.json()["error_type"] == "validation"
        r = await client.post("/v1/completions", json={"model": "tiny-gam", "prompt": huge, "max_tokens": 2})
        assert r.status_code == 400 and "max input tokens" in r.json()["error"]["message"]
        assert worker_calls == []  # refused on its byte count alone
        assert app.state.ctx.tokenizer.min_tokens(huge) > 256


async def test_long_prompts_are_tokenized_in_a_worker_with_the_same_ids(make_settings, worker_calls) -> None:
    async with app_client(make_settings(max_input_tokens=256)) as (app, client):
        tok = app.state.ctx.tokenizer
        ids = tok.encode(LONG)
        assert len(ids) > 256 and tok.min_tokens(LONG) <= len(ids)
        body = {"inputs": LONG, "parameters": {"max_new_tokens": 3, "truncate": 100, "details": True, "seed": 1}}
        got = (await client.post("/generate", json=body)).json()
        short = {**body, "inputs": tok.decode(ids[-100:])}  # the same last 100 tokens, tokenized inline
        del short["parameters"]["truncate"]
        ref = (await client.post("/generate", json=short)).json()
        assert got["generated_text"] == ref["generated_text"]
        assert got["details"]["tokens"] == ref["details"]["tokens"]
        tokenized = (await client.post("/tokenize", json={"inputs": LONG})).json()
        assert [t["id"] for t in tokenized] == ids
        vllm = (await client.post("/tokenize", json={"prompt": LONG})).json()
        assert vllm["tokens"] == ids
        assert len(worker_calls) == 3 and threading.main_thread().name not in worker_calls


async def test_long_id_lists_are_detokenized_in_a_worker_with_the_same_text(make_settings, monkeypatch) -> None:
    calls: list[str] = []
    real = Tokenizer.decode_releasing_gil

    def observed(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        calls.append(threading.current_thread().name)
        return real(self, ids, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode_releasing_gil", observed)
    async with app_client(make_settings()) as (app, client):
        tok = app.state.ctx.tokenizer
        ids = tok.encode(LONG * 2)
        assert len(ids) > common.INLINE_DECODE_IDS
        r = await client.post("/detokenize", json={"tokens": ids})
        assert r.status_code == 200 and r.json()["prompt"] == tok.decode(ids)
        assert calls and threading.main_thread().name not in calls
        short = ids[:50]
        assert (await client.post("/detokenize", json={"tokens": short})).json()["prompt"] == tok.decode(short)
        assert len(calls) == 1  # a short list is decoded inline
        r = await client.post("/detokenize", json={"tokens": [*short, 10**6]})
        assert r.status_code == 422 and "vocabulary size" in r.json()["error"]
