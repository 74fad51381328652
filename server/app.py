"""create_app(settings): the FastAPI app, its lifespan (load model, start/stop engine), middleware, errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gam_model.checkpoint import load_tokenizer, read_config
from server.auth import ApiKeyMiddleware
from server.context import ServerContext
from server.engine import Engine
from server.errors import (
    OPENAI_ERROR_RESPONSES,
    TGI_ERROR_RESPONSES,
    ApiError,
    error_response,
    install_error_handlers,
    tgi_error_type,
)
from server.routes import misc, openai, playground, tgi
from server.routes.common import ENDPOINT
from server.routes.stream import BODY_SEND
from server.settings import Settings
from server.version import VERSION

log = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """413 in the API's shape for bodies over the limit, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = ApiError(413, f"request body is larger than {self.limit} bytes")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(scope["path"], err)(scope, receive, send)
                return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    # an HTTPException passes through FastAPI's body parsing to the API-shaped error handler
                    raise StarletteHTTPException(413, err.message)
            return msg

        await self.app(scope, counting_receive, send)


# the endpoint label of gam_request_failures_total, by path (the names gam_requests_total uses where they overlap);
# any other path (a 404) is "other": the label's values stay a fixed set whatever clients send
FAILURE_ENDPOINTS = {
    "/generate": "generate",
    "/generate_stream": "generate_stream",
    "/": "generate",  # "generate_stream" for a streamed call: the route says so in the scope (ENDPOINT)
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat_completions",
    "/v1/models": "models",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/tokenizer_info": "tokenizer_info",
    "/info": "info",
}
NOT_COUNTED = frozenset({"/health", "/metrics"})  # probes and scrapes: a 503 there is the server's state, not a call


class FailureCountMiddleware:
    """Counts every API call answered with an HTTP error status (gam_request_failures_total in the engine core,
    label error_type = TGI's name for the status), whatever answered it: validation, auth, body limit, routing, the
    engine. A stream that ends with an error event after its 200 is counted where the event is written
    (server/routes/stream.py). A call whose client disconnected before its answer started is not: no one gets it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in NOT_COUNTED:
            await self.app(scope, receive, send)
            return

        started = False
        # the client went away before its answer started: what the app answers then (a non-streamed call's 499, FastAPI's
        # 400 for a body cut short) reaches no one; the call is cancelled, as a stream whose client leaves is
        gone = False

        def count(status: int) -> None:
            engine = getattr(scope["app"].state, "engine", None)
            if engine is not None and not gone:
                endpoint = scope.get(ENDPOINT) or FAILURE_ENDPOINTS.get(path, "other")
                engine.count_failure(endpoint, tgi_error_type(status))

        async def watching_receive() -> Message:
            nonlocal gone
            msg = await receive()
            if msg["type"] == "http.disconnect" and not started:
                gone = True
            return msg

        async def counting_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                if msg["status"] >= 400:
                    count(msg["status"])
            await send(msg)

        try:
            await self.app(scope, watching_receive, counting_send)
        except Exception:
            if not started:  # Starlette's outermost error middleware answers it with a 500, past this one
                count(500)
            raise


class GamApp(FastAPI):
    """FastAPI that hands the ASGI server's own `send` down in the scope, for a stream's body chunks
    (server/routes/stream.py): the middleware stack wraps `send` in two coroutines per message."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope[BODY_SEND] = send
        try:
            await super().__call__(scope, receive, send)
        finally:
            # the server's send is a method of its request cycle, which holds this scope: left here, the scope, the
            # cycle and everything the request's handling put in the scope would wait for the garbage collector
            del scope[BODY_SEND]


@dataclass(frozen=True)
class Attach:
    """Where a frontend worker finds the engine core another process started (--api-server-count > 1)."""

    address: str
    core_pid: int
    frontend: int


async def start_context(settings: Settings, attach: Attach | None = None) -> ServerContext:
    """Read the checkpoint's config and tokenizer; start the engine core process (which loads the weights), or
    attach to a running one, and wait until it is ready."""
    model_dir = settings.resolved_model_dir()
    config, meta = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir, config, meta)
    if attach is None:
        engine = Engine(settings, tokenizer)
        started = engine.start()
    else:
        engine = Engine(settings, tokenizer, frontend=attach.frontend)
        started = engine.attach(attach.address, attach.core_pid)
    # the detokenizer's table (Tokenizer.byte_pieces: a decode per id, ~0.3 s for a 50k vocabulary, ~0.7 s for 150k)
    # is built now, in a worker thread while the core loads the model, not on the event loop at the first token
    facts, _ = await asyncio.gather(started, asyncio.to_thread(tokenizer.byte_pieces))
    log.info(
        "serving %s from %s: %d parameters, %s on %s",
        facts.model_id,
        model_dir,
        facts.num_params,
        facts.dtype,
        facts.device,
    )
    return ServerContext(
        settings=settings,
        engine=engine,
        tokenizer=tokenizer,
        model_config=config,
        facts=facts,
    )


def create_app(settings: Settings, attach: Attach | None = None) -> FastAPI:
    """The gam-serve ASGI app; its lifespan starts the engine core (or attaches to one) and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = await start_context(settings, attach)
        app.state.ctx, app.state.engine = ctx, ctx.engine
        try:
            yield
        finally:
            await ctx.engine.shutdown()
            log.info("engine stopped")

    app = GamApp(
        title="gam-serve",
        version=VERSION,
        lifespan=lifespan,
        description="GAM language models behind the Text Generation Inference and OpenAI APIs.",
    )
    install_error_handlers(app)
    app.include_router(tgi.router, responses=TGI_ERROR_RESPONSES)
    app.include_router(openai.router, responses=OPENAI_ERROR_RESPONSES)
    app.include_router(misc.router, responses=TGI_ERROR_RESPONSES)
    app.include_router(playground.router)
    playground.mount_static(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(FailureCountMiddleware)  # the outermost: it sees the key check's 401s too
    return app
