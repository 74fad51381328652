"""Engine behaviour through the app: batch invariance, queue bound, faults, deadlines, drain, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
import zmq

from gam_model.sampling import SamplingParams
from gam_model.tokenizer import Tokenizer
from server import protocol as p
from server.engine import Engine, EngineUnavailable, GenerationRequest, TokenEvent
from tests.server.conftest import EOS_ID, app_client, metric_values

PROMPTS = [
    "The game was",
    "In the city",
    "He played",
    "The season . " * 12,
    "A",
    "Valkyria Chronicles III is",
    "The music",
    "After the war",
]


def tgi_body(prompt: str, n: int, **params) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True, **params}}


def assert_same_generation(a: dict, b: dict) -> None:
    """Same text, tokens, finish reason and seed; logprobs equal up to fp32 GEMM reassociation across batch sizes."""
    da, db = a["details"], b["details"]
    assert a["generated_text"] == b["generated_text"]
    assert [t["id"] for t in da["tokens"]] == [t["id"] for t in db["tokens"]]
    assert (da["finish_reason"], da["seed"]) == (db["finish_reason"], db["seed"])
    assert [t["logprob"] for t in da["tokens"]] == pytest.approx([t["logprob"] for t in db["tokens"]], abs=1e-4)


async def test_concurrent_greedy_equals_alone(make_settings) -> None:
    """8 requests on 4 slots (admissions between steps, one prompt past block_size) == each run alone."""
    async with app_client(make_settings(max_batch_size=4)) as (_, client):
        lengths = [30, 5, 17, 40, 9, 33, 1, 24]
        alone = [
            (await client.post("/generate", json=tgi_body(p, n))).json() for p, n in zip(PROMPTS, lengths, strict=True)
        ]
        together = await asyncio.gather(
            *(client.post("/generate", json=tgi_body(p, n)) for p, n in zip(PROMPTS, lengths, strict=True))
        )
        for r, a in zip(together, alone, strict=True):
            assert_same_generation(r.json(), a)


async def test_concurrent_seeded_sampling_equals_alone(make_settings) -> None:
    async with app_client(make_settings(max_batch_size=4)) as (_, client):

        def body(i: int, p: str) -> dict:
            return tgi_body(
                p, 20, do_sample=True, seed=1000 + i, temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2
            )

        alone = [(await client.post("/generate", json=body(i, p))).json() for i, p in enumerate(PROMPTS)]
        together = await asyncio.gather(*(client.post("/generate", json=body(i, p)) for i, p in enumerate(PROMPTS)))
        for r, a in zip(together, alone, strict=True):
            assert_same_generation(r.json(), a)
        oa = {"model": "tiny-gam", "prompt": PROMPTS[:3], "max_tokens": 12, "seed": 5, "temperature": 0.8}
        first = (await client.post("/v1/completions", json=oa)).json()
        again = await asyncio.gather(*(client.post("/v1/completions", json=oa) for _ in range(3)))
        assert all([c["text"] for c in r.json()["choices"]] == [c["text"] for c in first["choices"]] for r in again)


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
async def test_queue_overflow_gives_429_with_retry_after(make_settings, path: str) -> None:
    """Rejected calls get 429 + Retry-After; the metric counts their sequences (OpenAI: n of them per call), as every
    other finish reason does."""
    async with app_client(make_settings(max_batch_size=1, max_queue=1, max_new_tokens=64)) as (app, client):
        per_call = 1 if path == "/generate" else 2
        body = (
            tgi_body("The game", 64)
            if path == "/generate"
            else {"model": "tiny-gam", "prompt": "The game", "max_tokens": 64, "n": per_call}
        )
        rs = await asyncio.gather(*(client.post(path, json=body) for _ in range(6)))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 1 and codes.count(429) >= 1 and set(codes) == {200, 429}, codes
        rejected = next(r for r in rs if r.status_code == 429)
        assert rejected.headers["Retry-After"] == "1"
        if path == "/generate":
            assert rejected.json()["error_type"] == "overloaded"
        else:
            assert rejected.json()["error"]["type"] == "rate_limit_error"
        metrics = (await client.get("/metrics")).text
        endpoint = "generate" if path == "/generate" else "completions"
        rejected_seqs = float(per_call * codes.count(429))
        line = f'gam_requests_total{{endpoint="{endpoint}",finish_reason="rejected"}} {rejected_seqs}'
        assert line in metrics
        assert app.state.engine.num_running == 0 and (await client.get("/health")).status_code == 200


async def test_step_failure_fails_only_that_steps_requests(make_settings) -> None:
    async with app_client(make_settings(fault_injection="step:3")) as (app, client):
        r = await client.post("/generate", json=tgi_body("The game", 10))
        assert r.status_code == 500 and r.json()["error_type"] == "generation"
        assert "injected" in r.json()["error"]
        assert app.state.engine.num_running == 0
        assert (await client.get("/health")).status_code == 200
        ok = await client.post("/generate", json=tgi_body("The game", 10))  # steps 4.. are fine
        assert ok.status_code == 200 and ok.json()["details"]["generated_tokens"] == 10
        metrics = (await client.get("/metrics")).text
        assert 'gam_requests_total{endpoint="generate",finish_reason="error"} 1.0' in metrics
        assert 'gam_requests_total{endpoint="generate",finish_reason="length"} 1.0' in metrics


async def test_step_failure_mid_stream_sends_error_event(make_settings) -> None:
    async with app_client(make_settings(fault_injection="step:2")) as (_, client):
        r = await client.post("/generate_stream", json=tgi_body("The game", 10))
        events = [json.loads(b[len("data: ") :]) for b in r.text.split("\n\n") if b.strip()]
        assert [e["index"] for e in events[:-1]] == [0, 1]  # prefill token, step 1; step 2 fails
        assert events[-1]["error_type"] == "generation" and "injected" in events[-1]["error"]


async def test_engine_crash_turns_health_503(make_settings) -> None:
    async with app_client(make_settings(fault_injection="crash:3")) as (app, client):
        assert (await client.get("/health")).status_code == 200
        r = await client.post("/generate", json=tgi_body("The game", 10))
        assert r.status_code == 503 and r.json()["error_type"] == "unhealthy"
        h = await client.get("/health")
        assert h.status_code == 503 and "engine" in h.json()["error"]
        r = await client.post("/v1/completions", json={"model": "tiny-gam", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert not app.state.engine.alive


async def test_request_timeout(make_settings) -> None:
    async with app_client(make_settings(request_timeout=0.3, max_new_tokens=10**6)) as (app, client):
        r = await client.post("/generate", json=tgi_body("The game", 10**6))  # cannot finish in 0.3 s
        assert r.status_code == 504 and r.json()["error_type"] == "timeout"
        assert app.state.engine.num_running == 0


async def test_drain_finishes_short_and_ends_long_requests(make_settings) -> None:
    async with app_client(make_settings(max_new_tokens=10**6)) as (app, client):
        long = asyncio.create_task(client.post("/generate_stream", json=tgi_body("The game", 10**6)))
        short = asyncio.create_task(client.post("/generate", json=tgi_body("The game", 3)))
        while app.state.engine.num_running < 2 and not short.done():
            await asyncio.sleep(0.005)
        app.state.engine.drain(grace=600)  # long enough for the short request on any machine
        refused = await client.post("/generate", json=tgi_body("The game", 3))
        assert refused.status_code == 503 and (await client.get("/health")).status_code == 503
        assert (await short).status_code == 200
        app.state.engine.drain(grace=0)  # the grace ends now: the long stream is ended
        events = [json.loads(b[len("data: ") :]) for b in (await long).text.split("\n\n") if b.strip()]
        assert events[-1]["error_type"] == "unhealthy" and "shutting down" in events[-1]["error"]
        assert app.state.engine.num_running == 0


async def test_metrics_move(make_settings) -> None:
    async with app_client(make_settings()) as (_, client):
        await client.post("/generate", json=tgi_body("The game", 5))
        await client.post("/generate_stream", json=tgi_body("The game", 4))
        await client.post(
            "/v1/completions", json={"model": "tiny-gam", "prompt": "x", "max_tokens": 3, "temperature": 0}
        )
        text = (await client.get("/metrics")).text
        values = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert values['gam_requests_total{endpoint="generate",finish_reason="length"}'] == 1
        assert values['gam_requests_total{endpoint="generate_stream",finish_reason="length"}'] == 1
        assert values['gam_requests_total{endpoint="completions",finish_reason="length"}'] == 1
        assert values["gam_generated_tokens_total"] == 12
        assert values["gam_request_generated_tokens_sum"] == 12
        assert values["gam_request_duration_seconds_count"] == 3
        assert values["gam_time_to_first_token_seconds_count"] == 3
        assert values["gam_time_per_output_token_seconds_count"] == 4 + 3 + 2
        assert values["gam_request_queue_duration_seconds_count"] == 3
        assert values["gam_request_prompt_tokens_count"] == 3
        assert values["gam_prompt_tokens_total"] > 0
        assert values["gam_step_duration_seconds_count"] >= 5
        assert values["gam_batch_size_count"] >= 5
        assert values["gam_requests_running"] == 0 and values["gam_requests_waiting"] == 0
        assert values["gam_generated_tokens_per_second"] > 0
        assert (
            values['gam_model_info{device="cpu",dtype="float32",model="tiny-gam",quantization="none",version="0.1.0"}']
            == 1
        )
        assert values["gam_prompt_logprob_tokens_total"] == 0
        steps = values["gam_step_duration_seconds_count"]
        ids = [t["id"] for t in (await client.post("/tokenize", json={"inputs": "The season . " * 30})).json()]
        body = {"model": "tiny-gam", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0}
        assert (await client.post("/v1/completions", json=body)).status_code == 200
        text = (await client.get("/metrics")).text
        values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln[:1] != "#" and ln}
        assert values["gam_prompt_logprob_tokens_total"] == len(ids) - 1
        assert values["gam_step_duration_seconds_count"] == steps + 1  # scoring-only iterations are not steps


async def test_prompt_logprobs_are_scored_between_steps(make_settings) -> None:
    """A long prompt's logprobs take several iterations; the running streams keep stepping meanwhile."""
    from gam_model.sampling import SamplingParams
    from server.engine import GenerationRequest

    # one chunk per iteration
    settings = make_settings(max_batch_size=2, score_budget_s=0.0, score_windows=8, score_head_chunk=16)
    async with app_client(settings) as (app, client):
        engine = app.state.engine
        ids = [t["id"] for t in (await client.post("/tokenize", json={"inputs": "The season . " * 40})).json()]
        assert len(ids) > 150  # block_size 48: about (len - 48) / 8 iterations of scoring
        order: list[str] = []

        async def consume(name: str, req: GenerationRequest) -> list:
            events = []
            (handle,) = await engine.submit_all([req])
            async for ev in handle.events():
                order.append(name)
                events.append(ev)
            return events

        # greedy with eos biased out: all 60 tokens come (sampled, it could draw eos: about 1 run in 2500)
        never_ends = SamplingParams(do_sample=False, logit_bias={EOS_ID: -100.0})
        running = asyncio.create_task(consume("run", GenerationRequest(ids[:5], never_ends, 60)))
        while "run" not in order:
            await asyncio.sleep(0.001)
        scored = await consume("score", GenerationRequest(ids, SamplingParams(), 1, prompt_logprobs=2))
        events = await running
        assert order.index("score") >= order.index("run") + 5  # several tokens streamed while the prompt was scored
        prompt = scored[0].prompt
        assert len(prompt.logprobs) == len(ids) - 1 and all(len(t) == 2 for t in prompt.top_ids)
        assert len(events) == 60 and all(ev.prompt is None for ev in events)
        assert engine.num_running == 0 and engine.free_slots == 2


async def test_cancel_while_scoring_the_prompt_frees_the_slot(make_settings) -> None:
    from gam_model.sampling import SamplingParams
    from server.engine import GenerationRequest

    # one window per iteration
    async with app_client(make_settings(max_batch_size=1, score_budget_s=0.0, score_windows=1)) as (app, client):
        engine = app.state.engine
        ids = [t["id"] for t in (await client.post("/tokenize", json={"inputs": "The season . " * 40})).json()]
        (h,) = await engine.submit_all([GenerationRequest(ids, SamplingParams(), 4, prompt_logprobs=0)])
        while engine.num_running == 0:
            await asyncio.sleep(0.001)
        h.cancel()  # a client gone while its prompt is being scored (about 150 iterations of one window each)
        deadline = time.monotonic() + 60  # the slot is freed at the next iteration: bounded, not timed
        while engine.num_running and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        assert engine.num_running == 0 and engine.free_slots == 1
        r = await client.post("/generate", json=tgi_body("The game", 3))  # the slot serves the next request
        assert r.status_code == 200


async def test_choices_of_one_request_score_their_prompt_once(make_settings) -> None:
    async def scored_tokens(client) -> float:
        return metric_values((await client.get("/metrics")).text)["gam_prompt_logprob_tokens_total"]

    async with app_client(make_settings(max_batch_size=4)) as (_, client):
        prompt = "The season . " * 10
        n_ids = len((await client.post("/tokenize", json={"inputs": prompt})).json())
        body = {"model": "tiny-gam", "prompt": prompt, "n": 3, "max_tokens": 2, "echo": True, "logprobs": 1, "seed": 1}
        choices = (await client.post("/v1/completions", json=body)).json()["choices"]
        assert await scored_tokens(client) == n_ids - 1  # one scorer for the three choices
        n = len(choices[0]["logprobs"]["tokens"]) - 2
        assert all(c["logprobs"]["token_logprobs"][:n] == choices[0]["logprobs"]["token_logprobs"][:n] for c in choices)
        assert choices[0]["logprobs"]["token_logprobs"][1] is not None
        body["prompt"] = ["The season .", "The game was"]  # different prompts: one scorer each
        body["n"] = 1
        before = await scored_tokens(client)
        assert (await client.post("/v1/completions", json=body)).status_code == 200
        lengths = [len((await client.post("/tokenize", json={"inputs": q})).json()) for q in body["prompt"]]
        assert await scored_tokens(client) - before == sum(n - 1 for n in lengths)  # one scorer each


async def until_sent(core: zmq.Socket) -> None:
    """Let the event loop run until the frontend's next message reaches the stand-in core (it goes at the end of a loop
    turn); bounded, never timed."""
    for _ in range(1000):
        if core.poll(0):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the frontend sent nothing")


async def attach_to_stand_in(engine: Engine, core: zmq.Socket, address: str, pid: int) -> asyncio.Task[p.Facts]:
    """Start engine.attach(address, pid) and answer its Hello with Ready (the task, for the caller to await)."""
    connecting = asyncio.create_task(engine.attach(address, pid))
    await until_sent(core)  # the Hello
    ident, _ = core.recv_multipart()  # Hello
    core.send_multipart([ident, p.encode(p.Ready(p.Facts("m", "float32", "none", "cpu", 1, 4, 1, False, False, 0)))])
    return connecting


@contextlib.asynccontextmanager
async def stand_in_core(settings, tmp_path, attach: bool = True) -> AsyncIterator[tuple[Engine, zmq.Socket, str]]:
    """A frontend Engine and a stand-in engine core (a ROUTER socket this test drives by hand) at an address;
    attach: the engine attached to it (watching this process as the core's)."""
    address = f"ipc://{tmp_path}/core"
    zctx = zmq.Context()
    core = zctx.socket(zmq.ROUTER)
    core.bind(address)
    engine = Engine(settings, Tokenizer.from_file(settings.model / "tokenizer.json"))
    try:
        if attach:
            await asyncio.wait_for(await attach_to_stand_in(engine, core, address, os.getpid()), 10)
        yield engine, core, address
    finally:
        await engine.shutdown()
        core.close(linger=0)
        zctx.term()


async def test_a_core_that_exits_with_its_ready_is_not_taken_for_alive(make_settings, tmp_path) -> None:
    """The core's Ready and its exit handled in the same loop turn (the exit first, while there are no facts yet to
    mark as crashed): attaching fails instead of reporting a live engine. (If the Ready came too late for that
    turn, attaching fails on the exit alone: the test cannot flake.)"""
    stand_in = subprocess.Popen(["sleep", "60"])  # the core's process: its pid is watched
    async with stand_in_core(make_settings(), tmp_path, attach=False) as (engine, core, address):
        connecting = await attach_to_stand_in(engine, core, address, stand_in.pid)
        stand_in.kill()
        stand_in.wait()
        time.sleep(0.3)  # the loop is blocked: Ready arrives and the exit happens before it looks at either
        with pytest.raises(RuntimeError, match="exited"):
            await asyncio.wait_for(connecting, 10)
        assert not engine.alive


async def test_core_message_hidden_by_a_send_is_still_read(make_settings, tmp_path) -> None:
    """A zmq socket's descriptor is edge-triggered and a send consumes the edge of messages that came meanwhile: the
    frontend must look again after each send, or such a message waits for the next one (here: forever). The frontend
    sends at the end of a loop turn, so the answer must come in that turn, after the loop last polled and before the
    send: a callback queued ahead of the send has a stand-in core answer a metrics query while the loop is blocked.
    (Were the answer not delivered before the send, the test still passes: it can miss, never flake.)"""
    async with stand_in_core(make_settings(), tmp_path) as (engine, core, _):
        query = asyncio.create_task(engine.metrics_text())
        await until_sent(core)  # the query
        ident, raw = core.recv_multipart()
        [msg] = p.decode_to_core(raw)
        assert isinstance(msg, p.MetricsQuery)

        def answer() -> None:  # the loop is blocked from here to the send: the answer reaches the frontend's socket
            core.send_multipart([ident, p.encode(p.MetricsText(msg.token, b"answer"))])
            time.sleep(0.3)

        asyncio.get_running_loop().call_soon(answer)
        engine.drain(0.0)  # queues a Drain: its send runs right after answer(), in the same turn, before a poll
        assert await asyncio.wait_for(query, 10) == b"answer"


async def test_a_message_that_cannot_be_sent_fails_at_once(make_settings, tmp_path) -> None:
    """A submission or query whose message cannot reach the core raises EngineUnavailable (a 503) instead of
    waiting for an answer that can never come."""
    async with stand_in_core(make_settings(), tmp_path) as (engine, _, _):
        assert engine._loop is not None and engine._sock is not None and engine._sock_fd is not None
        engine._loop.remove_reader(engine._sock_fd)
        engine._sock.close(linger=0)  # the fault: every send now fails
        with pytest.raises(EngineUnavailable, match="could not reach"):
            await asyncio.wait_for(engine.metrics_text(), 10)
        request = GenerationRequest([1, 2, 3], SamplingParams(), 4)
        with pytest.raises(EngineUnavailable, match="could not reach"):
            await asyncio.wait_for(engine.submit_all([request]), 10)
        assert not engine._pending and not engine._handles


async def test_what_one_loop_turn_queues_goes_to_the_core_as_one_message(make_settings, tmp_path) -> None:
    """Submissions, cancellations and queries made in one turn of the event loop reach the core as one message, in
    order (a burst of requests costs one zmq message, not one each); the core answers each."""
    async with stand_in_core(make_settings(), tmp_path) as (engine, core, _):
        request = GenerationRequest([1, 2, 3], SamplingParams(), 4)
        submits = [asyncio.ensure_future(engine.submit_all([request])) for _ in range(3)]
        query = asyncio.ensure_future(engine.metrics_text())
        await until_sent(core)
        ident, raw = core.recv_multipart()
        msgs = p.decode_to_core(raw)
        assert [type(m) for m in msgs] == [p.Submit, p.Submit, p.Submit, p.MetricsQuery]
        assert not core.poll(0)  # nothing else came
        replies = [p.Reply(0, m.token) for m in msgs if isinstance(m, p.Submit)]
        out = p.CoreOutput(replies=replies, running=0, waiting=3, free_slots=4)
        core.send_multipart([ident, p.encode(out)])
        core.send_multipart([ident, p.encode(p.MetricsText(msgs[-1].token, b"answer"))])
        assert [len(h) for h in await asyncio.wait_for(asyncio.gather(*submits), 10)] == [1, 1, 1]
        assert await asyncio.wait_for(query, 10) == b"answer"


async def test_a_drain_from_a_signal_handler_inside_a_send_still_goes(make_settings, tmp_path) -> None:
    """uvicorn runs DrainingServer.handle_exit (-> Engine.drain) as a plain signal handler: between any two bytecodes
    of the loop's thread, so also inside another send, between its message being queued and the turn's send being
    scheduled. Both messages still go, in one message (were the send left unscheduled, nothing would ever reach the
    core again: the Drain lost and every later request waiting forever)."""
    async with stand_in_core(make_settings(), tmp_path) as (engine, core, _):

        class SignalAfterAppend(list[p.ToCore]):
            def append(self, msg: p.ToCore) -> None:
                super().append(msg)
                if isinstance(msg, p.MetricsQuery):
                    engine.drain(0.0)  # the SIGTERM lands here

        engine._outbox = SignalAfterAppend()
        query = asyncio.create_task(engine.metrics_text())
        await until_sent(core)
        ident, raw = core.recv_multipart()
        msgs = p.decode_to_core(raw)
        assert [type(m) for m in msgs] == [p.MetricsQuery, p.Drain] and isinstance(msgs[0], p.MetricsQuery)
        core.send_multipart([ident, p.encode(p.MetricsText(msgs[0].token, b"answer"))])
        assert await asyncio.wait_for(query, 10) == b"answer"


async def test_a_message_that_cannot_be_encoded_fails_alone(make_settings, tmp_path) -> None:
    """A submission that cannot be encoded (an id past 64 bits: the APIs bound every integer, so only a bug could
    make one) fails its own call; the messages queued in the same loop turn still reach the core."""
    async with stand_in_core(make_settings(), tmp_path) as (engine, core, _):
        bad = asyncio.ensure_future(engine.submit_all([GenerationRequest([2**70], SamplingParams(), 4)]))
        query = asyncio.ensure_future(engine.metrics_text())
        await until_sent(core)
        ident, raw = core.recv_multipart()
        [msg] = p.decode_to_core(raw)
        assert isinstance(msg, p.MetricsQuery)
        core.send_multipart([ident, p.encode(p.MetricsText(msg.token, b"answer"))])
        with pytest.raises(EngineUnavailable, match="could not be sent"):
            await asyncio.wait_for(bad, 10)
        assert await asyncio.wait_for(query, 10) == b"answer"
        assert not engine._pending and not engine._handles


class RecordingSink:
    """A stream's writer that records the token indices of each write (server/routes/stream.py's EventStream takes
    its handles' due events the same way); the error events that end the streams at the engine's shutdown, by name."""

    def __init__(self, handle) -> None:
        self.handle, self.writes = handle, []

    def deliver(self) -> None:
        self.writes.append([ev.index if isinstance(ev, TokenEvent) else type(ev).__name__ for ev in self.handle.take()])


def step_output(rids: list[int], token: int, finished: dict[int, p.Finish] | None = None) -> bytes:
    """The core's message for one step that gave every request in rids a token (finished: row -> how it ended)."""
    n = len(rids)
    return p.encode(
        p.CoreOutput(
            ids=np.array(rids, np.int64).tobytes(),
            tokens=np.full(n, token, np.int64).tobytes(),
            logprobs=np.zeros(n, np.float32).tobytes(),
            finished=finished or {},
            running=n - len(finished or {}),
        )
    )


async def streams_on_stand_in(engine: Engine, core: zmq.Socket, n: int) -> list[RecordingSink]:
    """n streamed requests submitted to the stand-in core (which accepts them), each written to a RecordingSink."""
    submitting = asyncio.ensure_future(engine.submit_all([GenerationRequest([1, 2, 3], SamplingParams(), 8)] * n))
    await until_sent(core)
    ident, raw = core.recv_multipart()
    [submit] = p.decode_to_core(raw)
    assert isinstance(submit, p.Submit)
    core.send_multipart([ident, p.encode(p.CoreOutput(replies=[p.Reply(0, submit.token)], running=n))])
    sinks = [RecordingSink(h) for h in await asyncio.wait_for(submitting, 10)]
    for s in sinks:
        s.handle.attach(s)
    return sinks


class StalledClock:
    """time for the engine on a stalled machine: 10 ms pass between any two readings of the clock."""

    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        self.t += 0.01
        return self.t


async def test_steps_read_together_go_out_in_one_write_per_stream(make_settings, tmp_path, monkeypatch) -> None:
    """A frontend that falls behind the core finds several steps waiting: each stream writes the tokens of all of
    them at once (one write per stream per turn of the loop, not per step), every token still its own event. (No
    budget here, and a clock that says each message took 10 ms: a machine that stalls while the test runs must not
    split the turn; the budget has a test of its own.)"""
    async with stand_in_core(make_settings(), tmp_path) as (engine, core, _):
        sinks = await streams_on_stand_in(engine, core, 2)
        rids = [s.handle.id for s in sinks]
        engine._inbox.extend(step_output(rids, tok) for tok in (5, 6, 7))  # three steps read in one turn
        with monkeypatch.context() as m:
            m.setattr("server.engine.READ_BUDGET_S", math.inf)
            m.setattr("server.engine.time", StalledClock())
            engine._handle_inbox()
        assert [s.writes for s in sinks] == [[[0, 1, 2]], [[0, 1, 2]]]


async def test_a_turn_handles_the_core_for_at_most_its_budget(make_settings, tmp_path, monkeypatch) -> None:
    """Past READ_BUDGET_S a turn stops handling the core's messages: the streams write what it handled, the rest
    waits for the loop's next turn (other callbacks run between), in order, nothing lost."""
    monkeypatch.setattr("server.engine.READ_BUDGET_S", 0.0)  # every message is over budget
    async with stand_in_core(make_settings(), tmp_path) as (engine, core, _):
        [sink] = await streams_on_stand_in(engine, core, 1)
        engine._inbox.extend(step_output([sink.handle.id], tok) for tok in (5, 6, 7))
        engine._handle_inbox()
        assert sink.writes == [[0]] and len(engine._inbox) == 2
        for _ in range(1000):  # bounded: the rest is handled on later turns
            if not engine._inbox and len(sink.writes) == 3:
                break
            await asyncio.sleep(0)
        assert sink.writes == [[0], [1], [2]]


async def test_what_the_core_sent_before_it_exited_is_handled_before_its_exit(
    make_settings, tmp_path, monkeypatch
) -> None:
    """The core's exit noticed while messages it sent wait in the inbox for a later turn (the frontend is behind, past
    its budget): those are handled first. A stream that finished gets its last tokens and its finish, not a 503, one
    still running gets its tokens and then the error, and the engine's reason is the core's own Failed message."""
    monkeypatch.setattr("server.engine.READ_BUDGET_S", 0.0)  # one message per turn: the rest waits in the inbox
    async with stand_in_core(make_settings(), tmp_path) as (engine, core, _):
        done, running = await streams_on_stand_in(engine, core, 2)
        rids = [done.handle.id, running.handle.id]
        last = step_output(rids, 7, finished={0: p.Finish("length", 3, None)})
        failed = p.Failed("the engine loop died: RuntimeError('boom')")
        engine._inbox.extend([step_output(rids, 5), step_output(rids, 6), last, p.encode(failed)])
        engine._handle_inbox()  # the first step; the rest waits for the loop's next turn
        engine._on_exit()  # ... and the core's exit comes first
        assert done.writes == [[0], [1, 2]] and done.handle.take(waiting=True) == []
        assert running.writes == [[0], [1, 2, "ErrorEvent"]]
        assert engine.crashed == "the engine loop died: RuntimeError('boom')"
