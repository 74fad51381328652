"""--stream-interval k: a stream is written for its first token, then once k events wait, and for the last; the
events that waited go out in one HTTP write. The events themselves (TGI's per-token shape, OpenAI's per-token chunks)
are exactly those of k = 1."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.types import ASGIApp

from gam_model.sampling import SamplingParams
from server.engine import Engine, GenerationRequest, RequestHandle, TokenEvent
from tests.gam_model.tokenizers_for_tests import byte_bpe
from tests.server.conftest import SlowClient, app_client

PROMPT = "The game was"
N = 13


async def sse_writes(app: ASGIApp, path: str, body: dict) -> list[list[str]]:
    """The `data:` payloads of a stream, grouped by the ASGI send that carried them."""
    client = SlowClient()
    await client.run(app, path, body)
    assert client.status == 200 and client.ended
    writes = []
    for raw in client.bodies:
        if raw:
            blocks = [b for b in raw.decode().split("\n\n") if b]
            assert all(b.startswith("data: ") for b in blocks), raw
            writes.append([b[len("data: ") :] for b in blocks])
    return writes


def tgi(writes: list[list[str]]) -> list[dict]:
    return [json.loads(d) for w in writes for d in w]


def openai(writes: list[list[str]]) -> list[dict]:
    out = []
    for d in (d for w in writes for d in w):
        if d != "[DONE]":
            c = json.loads(d)
            del c["id"], c["created"]  # per call
            out.append(c)
    return out


TGI_BODY = {"inputs": PROMPT, "parameters": {"max_new_tokens": N, "details": True, "top_n_tokens": 2}}
OPENAI_BODY = {"model": "tiny-gam", "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stream": True, "logprobs": 1}


@pytest.mark.parametrize("k", [4, 5])
async def test_interval_groups_writes_and_keeps_every_event(make_settings, k: int) -> None:
    async with app_client(make_settings()) as (app, client):
        ref_tgi = tgi(await sse_writes(app, "/generate_stream", TGI_BODY))
        ref_oai = openai(await sse_writes(app, "/v1/completions", OPENAI_BODY))
        assert (await client.get("/info")).json()["stream_interval"] == 1
    assert len(ref_tgi) == N
    async with app_client(make_settings(stream_interval=k)) as (app, client):
        assert (await client.get("/info")).json()["stream_interval"] == k
        writes = await sse_writes(app, "/generate_stream", TGI_BODY)
        assert tgi(writes) == ref_tgi
        # the first token at once, then groups of at least k; the last write ends with the final event
        assert json.loads(writes[0][0])["index"] == 0
        assert all(len(w) >= k for w in writes[1:-1]), [len(w) for w in writes]
        assert len(writes) <= 2 + (N - 1) // k
        writes = await sse_writes(app, "/v1/completions", OPENAI_BODY)
        assert openai(writes) == ref_oai
        assert writes[-1][-1] == "[DONE]"  # in the write of the last token
        assert all(len(w) >= k for w in writes[1:-1]), [len(w) for w in writes]
        # a whole answer is unchanged by the interval
        r = await client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": N}})
        assert r.json()["generated_text"] == "".join(e["token"]["text"] for e in ref_tgi)


async def test_an_error_mid_stream_keeps_every_choices_tokens_before_it(make_settings) -> None:
    """Two choices, and the 4th decode step fails (both end with the error event): with k = 4 the tokens each choice
    had waiting for its next write (fewer than k) still go out before the error, as they did one by one at k = 1.
    (Before, the first choice's error ended the stream and the other's waiting tokens were dropped.)"""
    body = {"model": "tiny-gam", "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stream": True, "n": 2}

    def texts(chunks: list[dict]) -> list[tuple[int, str]]:
        return sorted((c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks if "choices" in c)

    out = {}
    for k in (1, 4):
        async with app_client(make_settings(stream_interval=k, fault_injection="step:4")) as (app, _):
            writes = await sse_writes(app, "/v1/completions", body)
        chunks = [json.loads(d) for w in writes for d in w if d != "[DONE]"]
        assert "injected" in chunks[-1]["error"]["message"]
        out[k] = texts(chunks), [c["choices"][0]["index"] for c in chunks[:-1]].count(1)
    assert out[1][1] == 4  # the prefill token and 3 steps of choice 1 came before the error
    assert out[4] == out[1]


async def test_interval_ms_writes_once_the_oldest_waiting_token_has_waited_that_long(make_settings) -> None:
    """--stream-interval 1024 --stream-interval-ms 50: the first token at once; later ones once the oldest waiting
    one has waited 50 ms as of a later step's arrival (the engine's clock per core message, set here by hand), or
    at the last event; without the ms setting the same tokens wait for the count. (On the loop, with no await in
    between: the engine's timer for a stall, the next test, does not run here.)"""

    def due_after_each(wake_after: float) -> list[list[int]]:
        engine = Engine(make_settings(), byte_bpe())
        h = RequestHandle(1, GenerationRequest([1], SamplingParams(), 100), engine, 1024, wake_after)
        taken = []
        for i, now in enumerate([10.0, 10.01, 10.04, 10.0601, 10.07, 10.08]):
            engine.now = now
            h._generated = i + 1  # as the text step counts them
            h._put(TokenEvent(i, 5, "a", "a", -1.0, False, []))
            taken.append([ev.index for ev in h.take() if isinstance(ev, TokenEvent)])
        return taken

    assert due_after_each(0.05) == [[0], [], [], [1, 2, 3], [], []]
    assert due_after_each(0.0) == [[0], [], [], [], [], []]


async def test_interval_ms_keeps_every_event(make_settings) -> None:
    async with app_client(make_settings()) as (app, client):
        ref_tgi = tgi(await sse_writes(app, "/generate_stream", TGI_BODY))
        ref_oai = openai(await sse_writes(app, "/v1/completions", OPENAI_BODY))
    async with app_client(make_settings(stream_interval=1024, stream_interval_ms=1.0)) as (app, client):
        info = (await client.get("/info")).json()
        assert (info["stream_interval"], info["stream_interval_ms"]) == (1024, 1.0)
        assert tgi(await sse_writes(app, "/generate_stream", TGI_BODY)) == ref_tgi
        writes = await sse_writes(app, "/v1/completions", OPENAI_BODY)
        assert openai(writes) == ref_oai and writes[-1][-1] == "[DONE]"


async def test_interval_ms_writes_waiting_tokens_though_no_later_step_comes(make_settings) -> None:
    """A stall (a slow step: another request's long prefill, a step slower than t): the token that waits goes out
    once it has waited t ms, not only when the next step's tokens arrive (then a token waited a whole step, however
    small t, and through a stall as long as the stall lasted)."""
    engine = Engine(make_settings(), byte_bpe())
    h = RequestHandle(1, GenerationRequest([1], SamplingParams(), 100), engine, 1024, 0.01)
    delivered = asyncio.get_running_loop().create_future()

    class Sink:
        def deliver(self) -> None:
            batch = h.take()
            if batch and not delivered.done():
                delivered.set_result([ev.index for ev in batch if isinstance(ev, TokenEvent)])

    h.attach(Sink())
    for i in range(2):  # the first token (at once), then one that waits; no step comes after it
        engine.now = time.monotonic()
        h._generated = i + 1
        h._put(TokenEvent(i, 5, "a", "a", -1.0, False, []))
        if i == 0:
            assert [ev.index for ev in h.take() if isinstance(ev, TokenEvent)] == [0]
    assert not h._ready  # waiting for the count or the time
    assert await asyncio.wait_for(delivered, 30) == [1]  # a guard against a hang, not a timing bound
