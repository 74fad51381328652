"""Streams written from the engine's reader (server/routes/stream.py): a send that must wait for the client (its
socket buffer full) keeps every event exactly once and in order while other streams go on; a client that leaves
while a send waits frees its slot; `run_now` runs a coroutine on the spot and hands over its rest intact."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from server.routes.stream import run_now
from tests.server.conftest import SlowClient, app_client

PROMPT = "The game was"


# -- run_now ---------------------------------------------------------------------------------------------------
async def test_run_now_finishes_on_the_spot_or_hands_over_the_rest() -> None:
    log: list[str] = []

    async def quick() -> None:
        log.append("quick")

    assert run_now(quick()) is None and log == ["quick"]  # no task, no loop turn

    async def failing() -> None:
        raise OSError("gone")

    with pytest.raises(OSError, match="gone"):
        run_now(failing())

    gate = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        log.append("before")
        log.append(await gate)

    rest = run_now(waits())
    assert rest is not None and log[-1] == "before"
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    assert not task.done()
    gate.set_result("after")
    await task
    assert log[-1] == "after"

    gate2 = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def cancelled() -> None:
        try:
            await gate2
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = asyncio.ensure_future(run_now(cancelled()))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


# -- streams read by an ASGI client whose sends can wait (tests/server/conftest.py SlowClient) ------------------
def tgi_tokens(events: list[str]) -> list[dict]:
    return [json.loads(e)["token"] for e in events]


def openai_choices(events: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for e in events:
        if e != "[DONE]":
            for c in json.loads(e)["choices"]:
                out[c["index"]] = out.get(c["index"], "") + c["text"]
    return out


async def bounded(aw, limit_s: float = 60.0):
    """Await something that must end: a stream that never ends fails the test instead of hanging the suite."""
    return await asyncio.wait_for(aw, limit_s)


async def wait_for(condition, what: str, limit_s: float = 30.0) -> None:
    """Poll a condition that must become true (a bounded wait, never a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


TGI = {"inputs": PROMPT, "parameters": {"max_new_tokens": 24, "details": True}}
OPENAI = {"model": "tiny-gam", "prompt": [PROMPT, "A"], "n": 2, "max_tokens": 24, "temperature": 0.9, "seed": 3,
          "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


async def test_sends_that_wait_keep_every_event_in_order(make_settings) -> None:
    """Writes 2 and 3 wait (the socket buffer full) while tokens keep coming: what queues behind them goes out after,
    in order, once each; the answer is the one an unhindered client gets; another stream is not held up."""
    async with app_client(make_settings(max_batch_size=8, deterministic=True)) as (app, _):  # batch-invariant
        ref_tgi, ref_oai = SlowClient(), SlowClient()
        await bounded(ref_tgi.run(app, "/generate_stream", TGI))
        await bounded(ref_oai.run(app, "/v1/completions", OPENAI))
        assert ref_tgi.ended and ref_oai.events()[-1] == "[DONE]"

        slow, other = SlowClient(hold={2, 3}), SlowClient()
        slow_run = asyncio.create_task(slow.run(app, "/v1/completions", OPENAI))
        await bounded(slow.waiting.wait())
        await bounded(other.run(app, "/generate_stream", TGI))  # completes while the slow stream's send waits
        assert tgi_tokens(other.events()) == tgi_tokens(ref_tgi.events())
        slow.release.set()
        await bounded(slow_run)
        assert slow.status == 200 and slow.ended and slow.events()[-1] == "[DONE]"
        assert openai_choices(slow.events()) == openai_choices(ref_oai.events())
        usage = [json.loads(e)["usage"] for e in slow.events()[:-1] if json.loads(e).get("usage")]
        assert usage == [json.loads(ref_oai.events()[-2])["usage"]]
        assert app.state.engine.idle


async def test_client_leaving_while_a_send_waits_frees_its_slot(make_settings) -> None:
    async with app_client(make_settings(max_batch_size=4, max_new_tokens=4000)) as (app, client):
        engine = app.state.engine
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4000}}
        slow = SlowClient(hold={3}, leave_after=2)  # leaves after its second write; a third may start and wait
        run = asyncio.create_task(slow.run(app, "/generate_stream", body))
        left = asyncio.create_task(slow.left.wait())
        await asyncio.wait(
            [run, left], timeout=60, return_when=asyncio.FIRST_COMPLETED
        )  # a refused request never leaves
        assert slow.status == 200 and slow.left.is_set(), (slow.status, slow.bodies)
        await wait_for(lambda: engine.idle, "the request is dropped once the client left")
        slow.release.set()  # the connection's send gives up, as uvicorn's does once the client is gone
        await bounded(run)
        assert len(tgi_tokens(slow.events())) < 4000
        await wait_for(lambda: engine.num_running == 0, "the core frees the slot")
        r = await client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200


async def test_an_error_while_a_send_waits_ends_the_stream_once(make_settings) -> None:
    """A failed step ends every choice while the stream's first write waits on the client: what queued behind it
    (tokens, then one error event and [DONE], no usage) goes out once, in order, and nothing after; slots free."""
    async with app_client(make_settings(max_batch_size=8, fault_injection="step:3")) as (app, _):
        engine = app.state.engine
        body = {**OPENAI, "echo": True, "logprobs": 2}
        slow = SlowClient(hold={1})
        run = asyncio.create_task(slow.run(app, "/v1/completions", body))
        await bounded(slow.waiting.wait())
        await wait_for(lambda: engine.idle, "the failed step ends the requests")
        slow.release.set()
        await bounded(run)  # a stream whose queued end is lost never returns
        events = slow.events()
        assert slow.status == 200 and slow.ended and events[-1] == "[DONE]"
        assert [i for i, e in enumerate(events) if e != "[DONE]" and "error" in json.loads(e)] == [len(events) - 2]
        chunks = [json.loads(e)["choices"][0] for e in events[:-2]]
        for k in range(4):  # each choice: its echoed prompt first, then its tokens; none finished
            mine = [c for c in chunks if c["index"] == k]
            assert mine and mine[0]["text"] == body["prompt"][k // 2] and all(c["finish_reason"] is None for c in mine)
        await wait_for(lambda: engine.num_running == 0, "the core frees the slots")


async def test_a_render_failure_ends_the_stream_with_the_api_error_event(make_settings, monkeypatch) -> None:
    """A bug while rendering a token's event (here: its logprobs) ends that stream with the API's own error event and
    [DONE] (a client otherwise sees a body that just stops), frees its slots, and other streams go on."""
    from server.routes import openai

    calls = 0
    real = openai.LogprobsBuilder.generated

    def fails_on_the_third(self, tokens, offset):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("a bug")
        return real(self, tokens, offset)

    monkeypatch.setattr(openai.LogprobsBuilder, "generated", fails_on_the_third)
    async with app_client(make_settings(max_batch_size=8)) as (app, client):
        body = {**OPENAI, "prompt": PROMPT, "n": 1, "logprobs": 1}
        r = await bounded(client.post("/v1/completions", json=body))
        events = [b[len("data: ") :] for b in r.text.split("\n\n") if b.strip()]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])
        assert error["error"]["message"] == "internal error while rendering the answer", error
        assert len(events) == 4  # two tokens, the error, [DONE]
        await wait_for(lambda: app.state.engine.num_running == 0, "the core frees the slot")
        plain = {**OPENAI, "prompt": PROMPT, "n": 1}  # no logprobs: not affected
        r = await bounded(client.post("/v1/completions", json=plain))
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text


def test_only_middlewares_that_leave_response_bodies_alone(make_settings) -> None:
    """Stream bodies go straight to the ASGI server's send (server/routes/stream.py BODY_SEND), past the middleware
    stack: a middleware that rewrites or reorders response messages (GZip, an `@app.middleware("http")` function)
    would break every stream, so adding one must be a decision (and then streams must send through it)."""
    from server.app import BodyLimitMiddleware, FailureCountMiddleware, create_app
    from server.auth import ApiKeyMiddleware

    app = create_app(make_settings(api_key="k"))
    assert {m.cls for m in app.user_middleware} == {BodyLimitMiddleware, ApiKeyMiddleware, FailureCountMiddleware}
