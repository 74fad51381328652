"""Shared by both APIs: prompt checks, submitting to the engine with the right errors, consuming events."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from tokenizers import Encoding

from gam_model.sampling import SamplingParams
from gam_model.scoring import TokenLogprobs
from server.context import ServerContext
from server.core import check_sequence_count
from server.engine import (
    EngineUnavailable,
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    QueueFull,
    RequestHandle,
    TokenEvent,
    TooManySequences,
)
from server.errors import ApiError

RETRY_AFTER_S = 1
# scope key: the endpoint a call is answered as, where its path does not say (POST / answers as /generate or
# /generate_stream by its body): its error answer is counted under it (server/app.py FailureCountMiddleware)
ENDPOINT = "gam.endpoint"


def sse_response(data_schema: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entry of a 200 answered as Server-Sent Events; `data_schema` describes each event's JSON.

    The event schema is OpenAPI 3.2's SSE convention (an object with a `data` string), which schemathesis checks.
    """
    data: dict[str, Any] = {"type": "string"}
    if data_schema is not None:
        data.update(contentMediaType="application/json", contentSchema=data_schema)
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"description": "Server-Sent Events", "content": {"text/event-stream": {"schema": event}}}}


def json_float(x: float | None) -> float | None:
    """A float JSON can carry: NaN and infinities become null (a logprob of -inf or NaN comes from degenerate
    sampling parameters, e.g. repetition_penalty 1e-300, and would make JSONResponse raise or SSE carry `NaN`)."""
    return x if x is not None and math.isfinite(x) else None


def check_text(text: str, param: str) -> None:
    """Reject strings that are not valid Unicode text (lone surrogates from JSON `\\ud800` escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, f"{param} is not valid UTF-8 text: {e.reason} at position {e.start}", param=param) from e


# texts longer than this are tokenized in a worker thread that releases the GIL, so a large prompt never stalls the
# event loop (streams, /health); shorter ones cost less than the thread hop; the same for id lists to detokenize
INLINE_TOKENIZE_CHARS = 16_384
INLINE_DECODE_IDS = 16_384


async def encode_text(ctx: ServerContext, text: str, add_special_tokens: bool = False) -> Encoding:
    """Tokenize text with its offsets (TGI /tokenize), off the event loop when it is long (a 1 MiB prompt takes
    seconds)."""
    if len(text) <= INLINE_TOKENIZE_CHARS:
        return ctx.tokenizer.tok.encode(text, add_special_tokens=add_special_tokens)
    return await asyncio.to_thread(ctx.tokenizer.encode_releasing_gil, text, add_special_tokens)


async def encode_ids(ctx: ServerContext, text: str, add_special_tokens: bool = False) -> list[int]:
    """The token ids of text (a prompt): inline without the offsets (cheaper), a long text as encode_text does."""
    if len(text) <= INLINE_TOKENIZE_CHARS:
        return ctx.tokenizer.encode(text, add_special_tokens)
    return (await encode_text(ctx, text, add_special_tokens)).ids


async def decode_ids(ctx: ServerContext, ids: list[int]) -> str:
    """Detokenize off the event loop when there are many ids (500,000 took 0.4 s inline)."""
    if len(ids) <= INLINE_DECODE_IDS:
        return ctx.tokenizer.decode(ids)
    return await asyncio.to_thread(ctx.tokenizer.decode_releasing_gil, ids)


async def encode_prompt(
    ctx: ServerContext, text: str, param: str, truncate: int | None = None, *, truncatable: bool = True
) -> list[int]:
    """Tokenize a prompt; apply TGI `truncate` (keep the last N tokens) and the --max-input-tokens limit. A prompt
    that is certainly too long (by a bound on bytes per token) is refused before it is tokenized. `truncatable`: the
    API has a `truncate` parameter (TGI), so the error suggests it."""
    check_text(text, param)
    limit = ctx.settings.max_input_tokens
    if truncate is None and (at_least := ctx.tokenizer.min_tokens(text)) > limit:
        raise too_long(ctx, param, f"at least {at_least}", truncatable)
    ids = await encode_ids(ctx, text)
    if not ids:
        raise ApiError(422, f"{param} has no tokens after tokenization", param=param)
    return check_ids(ctx, ids, param, truncate, truncatable=truncatable)


def too_long(ctx: ServerContext, param: str, count: str, truncatable: bool) -> ApiError:
    """The error of a prompt over --max-input-tokens; it suggests `truncate` only where the API has it."""
    fix = "shorten it or set truncate" if truncatable else "shorten it"
    limit = ctx.settings.max_input_tokens
    return ApiError(
        422, f"{param} has {count} tokens, more than the limit of {limit} (max input tokens) - {fix}", param=param
    )


def check_ids(
    ctx: ServerContext, ids: list[int], param: str, truncate: int | None = None, *, truncatable: bool = True
) -> list[int]:
    limit = ctx.settings.max_input_tokens
    if truncate is not None:
        if truncate > limit:
            raise ApiError(422, f"truncate must be <= {limit} (max input tokens), got {truncate}", param="truncate")
        ids = ids[-truncate:]
    if not ids:
        raise ApiError(422, f"{param} must not be empty", param=param)
    if len(ids) > limit:
        raise too_long(ctx, param, str(len(ids)), truncatable)
    if max(ids) >= ctx.model_config.vocab_size:
        raise ApiError(422, f"{param} has a token id >= the vocabulary size {ctx.model_config.vocab_size}", param=param)
    return ids


def check_max_new_tokens(ctx: ServerContext, n: int, param: str) -> int:
    limit = ctx.settings.max_new_tokens
    if n > limit:
        raise ApiError(422, f"{param} must be <= {limit}, got {n}", param=param)
    return n


def check_stop(ctx: ServerContext, stop: list[str], param: str = "stop") -> list[str]:
    limit = ctx.settings.max_stop_sequences
    if len(stop) > limit:
        raise ApiError(422, f"{param} has {len(stop)} sequences, the limit is {limit}", param=param)
    for s in stop:
        if not s:
            raise ApiError(422, f"{param} sequences must not be empty strings", param=param)
        check_text(s, param)
    return stop


def check_params(params: SamplingParams) -> SamplingParams:
    try:
        params.validate()
    except ValueError as e:
        raise ApiError(422, str(e), param=str(e).split(" ", 1)[0]) from e
    return params


def check_sequences(ctx: ServerContext, count: int) -> None:
    """400 when a call's `count` sequences (prompts x n) could never be held at once: checked before its prompts are
    tokenized, so a body of many prompts costs no more than its parsing (the core checks again on submission)."""
    try:
        check_sequence_count(count, ctx.settings.max_batch_size, ctx.settings.max_queue)
    except TooManySequences as e:
        raise ApiError(400, str(e), param="n") from e


async def submit(ctx: ServerContext, reqs: list[GenerationRequest], stream: bool) -> list[RequestHandle]:
    """Hand requests (the choices of one call) to the engine, all or none: 429 with Retry-After when they do not
    fit now, 400 when they never could, 503 when the engine is unavailable. `stream`: answered as it comes (else
    the handler wakes only for the last event)."""
    try:
        return await ctx.engine.submit_all(reqs, stream=stream)
    except TooManySequences as e:
        raise ApiError(400, str(e), param="n") from e
    except QueueFull as e:  # counted as rejected by the core
        raise ApiError(
            429,
            f"Model is overloaded: {e}",
            error_type="overloaded",
            code="overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from e
    except EngineUnavailable as e:
        raise ApiError(503, str(e), error_type="unhealthy", headers={"Retry-After": str(RETRY_AFTER_S)}) from e


@dataclass
class Collected:
    """A whole generation, gathered for a non-streaming answer."""

    tokens: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None
    prompt: TokenLogprobs | None = None  # prompt logprobs, when asked

    @property
    def text(self) -> str:
        """Raw token texts (TGI: includes a matched stop sequence)."""
        return "".join(t.text for t in self.tokens if not t.special)

    @property
    def emitted(self) -> str:
        """Stop-checked text (OpenAI: the stop sequence is cut)."""
        return "".join(t.emitted for t in self.tokens)


async def watch_disconnect(request: Request, handles: list[RequestHandle]) -> None:
    """Abort the requests when the client goes away (what StreamingResponse does for streams)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            for h in handles:
                h.abort("client closed the request")
            return


async def _gather(handle: RequestHandle) -> Collected:
    out = Collected()
    async for ev in handle.events():
        if isinstance(ev, ErrorEvent):
            raise ApiError(ev.status, ev.message, error_type=ev.error_type)
        if ev.prompt is not None:
            out.prompt = ev.prompt
        if isinstance(ev, TokenEvent):
            out.tokens.append(ev)
        if ev.finish is not None:
            out.finish = ev.finish
    return out


async def collect(request: Request, handles: list[RequestHandle]) -> list[Collected]:
    """Wait for whole generations, cancelling them if the client disconnects; an error event raises ApiError."""
    watcher = asyncio.create_task(watch_disconnect(request, handles))
    gatherers = [asyncio.ensure_future(_gather(h)) for h in handles]
    try:
        return list(await asyncio.gather(*gatherers))
    finally:
        watcher.cancel()
        for h in handles:
            h.cancel()  # no-op once finished
        # when one choice failed, gather raised its error and left the others waiting for events that no longer
        # come (their requests are cancelled): end them, and take the errors of those that failed too
        for g in gatherers:
            if not g.done():
                g.cancel()
            elif not g.cancelled():
                g.exception()


def sse(data: Any) -> bytes:
    """One Server-Sent Event with a JSON data line (the framing TGI and OpenAI use), serialised by orjson (compact,
    UTF-8 as is: a few times cheaper per token than json.dumps + encode)."""
    return b"data: " + orjson.dumps(data) + b"\n\n"
