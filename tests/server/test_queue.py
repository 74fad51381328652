"""Queue accounting on a real server: requests that can never fit, all-or-nothing admission of a call's choices,
and waiters whose clients gave up leaving the queue at once."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx

from tests.server.conftest import LiveServer, app_client, metric_values, tiny_settings

MODEL = "tiny-gam"


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    return metric_values((await client.get("/metrics")).text)


async def wait_for(client: httpx.AsyncClient, cond, what: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until cond(values) holds (bounded: fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        values = await metrics(client)
        if cond(values):
            return values
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {values}"
        await asyncio.sleep(0.02)


def cancelled(values: dict[str, float]) -> float:
    return sum(v for k, v in values.items() if k.startswith("gam_requests_total") and 'reason="cancelled"' in k)


async def test_a_call_that_can_never_fit_is_a_400_and_queues_nothing(make_settings) -> None:
    """max_batch_size 4 + max_queue 16: 21 sequences (prompts x n) can never run or wait at once."""
    async with app_client(make_settings(max_batch_size=4, max_queue=16)) as (_, client):
        for extra in ({"prompt": ["The game"] * 21}, {"prompt": ["The game"] * 3, "n": 7}):
            r = await client.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, **extra})
            assert r.status_code == 400, r.text
            msg = r.json()["error"]["message"]
            assert "at most 20" in msg and "Retry-After" not in r.headers
        r = await client.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, "prompt": ["The game"] * 20})
        assert r.status_code == 200 and len(r.json()["choices"]) == 20
        values = await metrics(client)
        assert cancelled(values) == 0 and values["gam_requests_waiting"] == 0


async def test_a_call_that_can_never_fit_is_refused_before_its_prompts_are_read(make_settings) -> None:
    """The sequence count (prompts x n) is checked before any prompt is tokenized or checked: a 1 MiB body of 100,000
    token-id prompts with n 16 held the event loop (and then the engine core, which got 1.6 M requests to refuse) for
    46 s on the bundled model. Shown by the order of the errors: a call that can never fit is refused as such even
    when its prompts are bad too (before, the first bad prompt was the error)."""
    async with app_client(make_settings(max_batch_size=4, max_queue=16)) as (_, client):
        for extra in ({"prompt": [[10**6]] * 21}, {"prompt": [""] * 3, "n": 7}):
            r = await client.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, **extra})
            assert r.status_code == 400, r.text
            assert "at most 20" in r.json()["error"]["message"] and r.json()["error"]["param"] == "n"


async def test_choices_that_do_not_fit_now_are_refused_whole(checkpoint_dir) -> None:
    """With the slots busy and 1 queue place left, a 2-choice call gets 429 and nothing of it is queued or
    cancelled; a 1-choice call still fits."""
    settings = tiny_settings(checkpoint_dir, max_batch_size=2, max_queue=2, max_new_tokens=10**6)
    with LiveServer(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            long = {"inputs": "The game", "parameters": {"max_new_tokens": 10**6}}
            streams = [asyncio.create_task(client.post("/generate", json=long)) for _ in range(3)]
            try:
                await wait_for(
                    client, lambda v: v["gam_requests_running"] == 2 and v["gam_requests_waiting"] == 1, "2+1"
                )
                two = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 1}
                r = await client.post("/v1/completions", json=two)
                assert r.status_code == 429 and r.headers["Retry-After"] == "1"
                values = await metrics(client)
                assert values["gam_requests_waiting"] == 1 and cancelled(values) == 0
                one = {"model": MODEL, "prompt": "a", "max_tokens": 1, "stream": True}
                async with client.stream("POST", "/v1/completions", json=one) as r:
                    assert r.status_code == 200
                    await wait_for(client, lambda v: v["gam_requests_waiting"] == 2, "the one-choice call queued")
            finally:
                for t in streams:
                    t.cancel()
                await asyncio.gather(*streams, return_exceptions=True)


async def test_waiters_whose_clients_left_free_their_queue_places_at_once(checkpoint_dir) -> None:
    """--max-batch-size 2 --max-queue 2, two endless streams running, two queued requests (one streamed, one not)
    whose clients give up: the waiting gauge drops to 0 while the streams still run, and new requests are accepted."""
    settings = tiny_settings(checkpoint_dir, max_batch_size=2, max_queue=2, max_new_tokens=10**6)
    with LiveServer(settings) as server:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=60) as client,
            httpx.AsyncClient(base_url=server.url, timeout=60) as quitter,
        ):
            running = [
                asyncio.create_task(
                    client.post("/generate", json={"inputs": "The game", "parameters": {"max_new_tokens": 10**6}})
                )
                for _ in range(2)
            ]
            try:
                await wait_for(client, lambda v: v["gam_requests_running"] == 2, "two running streams")
                body = {"model": MODEL, "prompt": "The game", "max_tokens": 4}
                gave_up = [
                    asyncio.create_task(quitter.post("/v1/completions", json=body)),
                    asyncio.create_task(quitter.post("/v1/completions", json={**body, "stream": True})),
                ]
                await wait_for(client, lambda v: v["gam_requests_waiting"] == 2, "two waiting")
                for t in gave_up:
                    t.cancel()
                await asyncio.gather(*gave_up, return_exceptions=True)
                await quitter.aclose()  # the connections close: the server sees the clients leave
                values = await wait_for(client, lambda v: v["gam_requests_waiting"] == 0, "the queue to empty")
                assert values["gam_requests_running"] == 2  # the streams still hold both slots
                assert cancelled(values) == 2
                # two new requests fit in the freed places (their headers arrive while they wait)
                async with contextlib.AsyncExitStack() as stack:
                    for _ in range(2):
                        r = await stack.enter_async_context(
                            client.stream("POST", "/v1/completions", json={**body, "stream": True})
                        )
                        assert r.status_code == 200
                    await wait_for(client, lambda v: v["gam_requests_waiting"] == 2, "the new requests queued")
            finally:
                for t in running:
                    t.cancel()
                await asyncio.gather(*running, return_exceptions=True)
            values = await wait_for(
                client, lambda v: v["gam_requests_running"] == 0 and v["gam_requests_waiting"] == 0, "all freed"
            )
