"""--stream-interval k: a stream's handler wakes for its first token, then once k events wait, and for the last; the
events that waited go out in one HTTP write. The events themselves (TGI's per-token shape, OpenAI's per-token chunks)
are exactly those of k = 1."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.types import ASGIApp

from tests.server.conftest import app_client

PROMPT = "The game was"
N = 13


async def sse_writes(app: ASGIApp, path: str, body: dict) -> list[list[str]]:
    """The `data:` payloads of a stream, grouped by the ASGI send that carried them (the app called directly: httpx's
    in-process transport joins a response's sends)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    done = asyncio.Event()
    writes: list[list[str]] = []
    status = []

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await done.wait()  # the client stays until the response is complete
        return {"type": "http.disconnect"}

    async def send(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            status.append(msg["status"])
        elif msg["type"] == "http.response.body":
            if msg.get("body"):
                blocks = [b for b in msg["body"].decode().split("\n\n") if b]
                assert all(b.startswith("data: ") for b in blocks), msg["body"]
                writes.append([b[len("data: ") :] for b in blocks])
            if not msg.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    assert status == [200]
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
