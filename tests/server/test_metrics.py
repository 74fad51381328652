"""gam_request_failures_total: every API call answered with an error, by endpoint and TGI error_type, counted in the
engine core whatever answered it (validation, the key check, the body limit, routing, the engine, an error event
ending a stream), and readable in /metrics as soon as the client has its answer."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message

from gam_model.sampling import SamplingParams
from server.app import create_app
from server.protocol import GenerationRequest

from .conftest import app_client

KEY = {"Authorization": "Bearer k"}


def failures(text: str) -> dict[tuple[str, str], float]:
    """{(endpoint, error_type): count} of gam_request_failures_total in a /metrics text."""
    return {
        (s.labels["endpoint"], s.labels["error_type"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "gam_request_failures"
        for s in f.samples
        if s.name == "gam_request_failures_total"
    }


async def test_error_answers_are_counted_by_endpoint_and_type(make_settings) -> None:
    async with app_client(make_settings(api_key="k", max_body_bytes=4096)) as (_, client):

        async def metrics() -> dict[tuple[str, str], float]:
            return failures((await client.get("/metrics")).text)

        assert await metrics() == {}
        expected: dict[tuple[str, str], float] = {}
        calls = [
            # (method, path, body, with the key, status, (endpoint, error_type))
            ("POST", "/generate", {"inputs": "The game", "parameters": {"top_p": 2}}, True, 422, ("generate", "validation")),
            ("POST", "/v1/completions", {"model": "tiny-gam", "prompt": "x", "temperature": -1}, True, 400,
             ("completions", "validation")),
            ("POST", "/generate_stream", {"inputs": "The game"}, False, 401, ("generate_stream", "authentication")),
            ("GET", "/nowhere", None, True, 404, ("other", "not_found")),
            ("POST", "/v1/chat/completions", {"model": "tiny-gam", "messages": []}, True, 404,
             ("chat_completions", "not_found")),
            ("POST", "/tokenize", {"inputs": "word " * 1000}, True, 413, ("tokenize", "validation")),
            ("POST", "/generate", {"inputs": "The game", "parameters": {"max_new_tokens": 2}}, True, 200, None),
            ("GET", "/health", None, False, 200, None),
        ]  # fmt: skip
        for method, path, body, keyed, status, key in calls:
            r = await client.request(method, path, json=body, headers=KEY if keyed else None)
            assert r.status_code == status, (path, r.text)
            if key is not None:
                expected[key] = expected.get(key, 0) + 1
            # read right after the answer: the count is already there (it went to the core before this query)
            assert await metrics() == expected, path
        assert (
            'gam_requests_total{endpoint="generate",finish_reason="length"} 1.0' in (await client.get("/metrics")).text
        )


@pytest.mark.parametrize("stream", [False, True])
async def test_tgi_compat_route_counts_a_call_under_the_endpoint_it_answers_as(make_settings, stream: bool) -> None:
    """POST / (where huggingface_hub's and text-generation's clients post) answers as /generate or, with "stream":
    true, as /generate_stream: its error answers are counted under that endpoint in gam_request_failures_total, as
    its requests are in gam_requests_total (a dashboard divides one by the other per endpoint)."""
    endpoint = "generate_stream" if stream else "generate"
    async with app_client(make_settings(max_batch_size=1, max_queue=0, max_new_tokens=10**6)) as (app, client):
        # the one slot held (running, or about to be): the next call does not fit
        (held,) = await app.state.engine.submit_all([GenerationRequest([5, 6], SamplingParams(), 10**6)])
        try:
            body = {"inputs": "The game", "stream": stream, "parameters": {"max_new_tokens": 2}}
            r = await client.post("/", json=body)
            assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
            text = (await client.get("/metrics")).text
            assert f'gam_requests_total{{endpoint="{endpoint}",finish_reason="rejected"}} 1.0' in text
            assert failures(text) == {(endpoint, "overloaded"): 1.0}
            big = {**body, "parameters": {"max_new_tokens": 10**7}}  # over the limit: refused by the handler
            assert (await client.post("/", json=big)).status_code == 422
            assert failures((await client.get("/metrics")).text) == {
                (endpoint, "overloaded"): 1.0,
                (endpoint, "validation"): 1.0,
            }
        finally:
            held.cancel()


async def test_a_stream_ended_by_an_error_event_is_counted(make_settings) -> None:
    """The 200 went out with the stream's head; the error event that ends it is the failure."""
    async with app_client(make_settings(fault_injection="step:2")) as (_, client):
        r = await client.post("/generate_stream", json={"inputs": "The game", "parameters": {"max_new_tokens": 10}})
        assert r.status_code == 200
        last = json.loads(r.text.strip().split("\n\n")[-1][len("data:") :])
        assert last["error_type"] == "generation"
        assert failures((await client.get("/metrics")).text) == {("generate_stream", "generation"): 1.0}


async def test_an_unexpected_exception_is_counted_as_a_500(make_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a handler: Starlette's outermost middleware answers 500, past the counting middleware."""
    from server.routes import misc

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(misc, "encode_text", broken)
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            r = await client.post("/tokenize", json={"inputs": "The game"})
            assert r.status_code == 500
            assert failures((await client.get("/metrics")).text) == {("tokenize", "generation"): 1.0}


@pytest.mark.parametrize("mid_body", [False, True])
async def test_a_client_that_leaves_before_its_answer_is_not_a_failure(make_settings, mid_body: bool) -> None:
    """A non-streamed call whose client disconnects is cancelled (gam_requests_total's `cancelled`), as a stream
    whose client leaves is: no one gets an error answer, so none is counted (the handler's 499, or FastAPI's 400
    for a body cut short, goes nowhere)."""
    # 4000 tokens: the call is still running when its handler sees the disconnect (seconds later, at the least)
    async with app_client(make_settings(max_new_tokens=4000)) as (app, client):
        raw = json.dumps({"inputs": "The game", "parameters": {"max_new_tokens": 4000}}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/generate", "raw_path": b"/generate", "root_path": "", "query_string": b"",
                 "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                             (b"transfer-encoding", b"chunked")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
        # the whole body, or its first half only; then the client is gone
        body: list[Message] = [
            {"type": "http.request", "body": raw[: len(raw) // 2] if mid_body else raw, "more_body": mid_body}
        ]
        statuses: list[int] = []

        async def receive() -> Message:
            return body.pop() if body else {"type": "http.disconnect"}

        async def send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                statuses.append(msg["status"])

        await app(scope, receive, send)
        assert statuses == [400 if mid_body else 499]  # what the handler answered, to no one
        text = (await client.get("/metrics")).text
        if not mid_body:
            assert 'gam_requests_total{endpoint="generate",finish_reason="cancelled"} 1.0' in text
        assert failures(text) == {}


@pytest.mark.parametrize("fails", [1, 2])
async def test_a_stream_whose_error_event_fails_to_render_is_counted_once(
    make_settings, monkeypatch: pytest.MonkeyPatch, fails: int
) -> None:
    """The error event ending a stream fails to render: the stream ends with the internal error event instead (or,
    if that fails too, with none); still one API call answered with an error."""
    from server.routes import tgi

    real, calls = tgi.error_body, []

    def error_body(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) <= fails:
            raise RuntimeError("a bug")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tgi, "error_body", error_body)
    async with app_client(make_settings(fault_injection="step:2")) as (_, client):
        r = await client.post("/generate_stream", json={"inputs": "The game", "parameters": {"max_new_tokens": 10}})
        assert r.status_code == 200 and len(calls) == 2
        if fails == 1:
            last = json.loads(r.text.strip().split("\n\n")[-1][len("data:") :])
            assert last["error"] == "internal error while rendering the answer"
        assert failures((await client.get("/metrics")).text) == {("generate_stream", "generation"): 1.0}
