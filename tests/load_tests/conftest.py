"""A scripted SSE server with known timings (Starlette on a real uvicorn, 127.0.0.1) for the load generator tests."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from load_tests.runner import sleep_until

TTFT_S = 0.10  # sleep before the first token
GAP_S = 0.03  # sleep between tokens
REJECT_EVERY = 4  # every 4th request gets a 429


@dataclass
class Script:
    """What the scripted server saw."""

    requests: int = 0
    rejected: int = 0
    completed: int = 0
    aborted: int = 0  # streams that ended before their last token (client went away)
    bodies: list[dict] = field(default_factory=list)
    reject: bool = False


def scripted_app(script: Script) -> Starlette:
    """TGI /generate_stream and OpenAI /v1/completions that stream max tokens with TTFT_S then GAP_S sleeps."""

    async def tokens(n: int, fmt) -> object:
        done = False
        t0 = time.perf_counter()
        try:
            for i in range(n):
                # an absolute schedule on the clock the load generator reads: token i is sent no earlier than
                # TTFT_S + i * GAP_S after the request arrived, so the tests' lower bounds hold exactly
                await sleep_until(t0 + TTFT_S + i * GAP_S)
                for chunk in fmt(i, n):
                    yield chunk
            done = True
        finally:
            if done:
                script.completed += 1
            else:
                script.aborted += 1

    def admit(body: dict) -> JSONResponse | None:
        script.requests += 1
        script.bodies.append(body)
        if script.reject and script.requests % REJECT_EVERY == 0:
            script.rejected += 1
            return JSONResponse(
                {"error": "overloaded", "error_type": "overloaded"}, status_code=429, headers={"Retry-After": "1"}
            )
        return None

    async def generate_stream(request: Request):
        body = await request.json()
        if (r := admit(body)) is not None:
            return r
        n = body["parameters"]["max_new_tokens"]

        def fmt(i: int, n: int):
            ev = {
                "index": i,
                "token": {"id": i, "text": f" t{i}", "logprob": -1.0, "special": False},
                "generated_text": None,
                "details": None,
            }
            if i == n - 1:
                ev["generated_text"] = "".join(f" t{j}" for j in range(n))
                ev["details"] = {"finish_reason": "length", "generated_tokens": n, "seed": None}
            yield f"data:{json.dumps(ev)}\n\n"

        return StreamingResponse(tokens(n, fmt), media_type="text/event-stream")

    async def completions(request: Request):
        body = await request.json()
        if (r := admit(body)) is not None:
            return r
        n = body["max_tokens"]

        def fmt(i: int, n: int):
            ch = {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "text": f" t{i}", "logprobs": None, "finish_reason": None}],
            }
            yield f"data: {json.dumps(ch)}\n\n"
            if i == n - 1:
                usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n, "total_tokens": 0}
                yield f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

        return StreamingResponse(tokens(n, fmt), media_type="text/event-stream")

    async def health(request: Request):
        return JSONResponse({})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    return Starlette(
        routes=[
            Route("/generate_stream", generate_stream, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
        ]
    )


@pytest.fixture
def scripted() -> Iterator[tuple[str, Script]]:
    """(base URL, Script) of a scripted server running on 127.0.0.1 in a thread."""
    script = Script()
    # uvicorn serves on this socket, so the port is never released; no SO_REUSEADDR, with which another socket could
    # bind the same port until uvicorn listens
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(scripted_app(script), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "scripted server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", script
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
