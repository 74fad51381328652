"""Text Generation Inference API: POST /generate, /generate_stream and / (JSON or SSE by `stream`)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from gam_model.sampling import SamplingParams
from gam_model.scoring import TokenLogprobs
from server.context import ServerContext, get_context
from server.engine import ErrorEvent, Event, FinishEvent, GenerationRequest, TokenEvent
from server.errors import ApiError, error_body
from server.routes.common import (
    ENDPOINT,
    check_max_new_tokens,
    check_params,
    check_stop,
    collect,
    encode_prompt,
    json_float,
    sse,
    sse_response,
    submit,
)
from server.routes.stream import EventStream
from server.types import TGIParameters, TGIRequest

router = APIRouter(tags=["Text Generation Inference"])
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default


async def tgi_request(
    ctx: ServerContext, body: TGIRequest, endpoint: str, stream: bool = False
) -> tuple[GenerationRequest, TGIParameters]:
    """Validate a TGI body into an engine request (422 in TGI's shape on any bad value)."""
    p = body.parameters or TGIParameters.model_validate({})
    if stream and p.decoder_input_details:  # TGI's own rule: prompt details only come with a whole answer
        raise ApiError(
            422, "`decoder_input_details` == true is not supported when streaming tokens", param="decoder_input_details"
        )
    if p.best_of is not None and p.best_of > 1:
        raise ApiError(422, "best_of > 1 is not supported by this server", param="best_of")
    for name, unsupported in (
        ("grammar", p.grammar is not None),
        ("watermark", p.watermark),
        ("adapter_id", p.adapter_id is not None),
    ):
        if unsupported:
            raise ApiError(422, f"{name} is not supported by this server", param=name)
    top_n = p.top_n_tokens or 0
    if top_n > ctx.settings.max_top_n_tokens:
        raise ApiError(
            422, f"top_n_tokens must be <= {ctx.settings.max_top_n_tokens}, got {top_n}", param="top_n_tokens"
        )
    ids = await encode_prompt(ctx, body.inputs, "inputs", p.truncate)
    max_new = check_max_new_tokens(
        ctx, p.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, ctx.settings.max_new_tokens), "max_new_tokens"
    )
    params = check_params(
        SamplingParams(
            temperature=1.0 if p.temperature is None else p.temperature,
            top_k=p.top_k or 0,
            top_p=1.0 if p.top_p is None else p.top_p,
            typical_p=1.0 if p.typical_p is None else p.typical_p,
            repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
            frequency_penalty=p.frequency_penalty or 0.0,
            do_sample=p.do_sample,
            seed=p.seed,
            top_n_tokens=top_n,
        )
    )
    req = GenerationRequest(ids, params, max_new, check_stop(ctx, p.stop or []), endpoint=endpoint)
    if p.details and p.decoder_input_details:
        req.prompt_logprobs = 0  # TGI's prefill tokens carry their own logprob only
    return req, p


# a streamed token's event before the last, without top tokens: index, id, text, logprob, special
PLAIN_EVENT = (
    b'data: {"index":%d,"token":{"id":%d,"text":%s,"logprob":%s,"special":%s},"generated_text":null,"details":null}\n\n'
)


def token_json(ctx: ServerContext, tid: int, text: str, logprob: float | None, special: bool) -> dict[str, Any]:
    return {"id": tid, "text": text, "logprob": json_float(logprob), "special": special}


def top_json(ctx: ServerContext, ev: TokenEvent) -> list[dict[str, Any]]:
    """TGI top_tokens of one step: alternatives with their own decoded text."""
    tok = ctx.tokenizer
    return [token_json(ctx, i, tok.token_text(i), lp, i in ctx.engine.special_ids) for i, lp in ev.top]


def details_json(
    ctx: ServerContext,
    req: GenerationRequest,
    p: TGIParameters,
    tokens: list[TokenEvent],
    fin: FinishEvent,
    prompt: TokenLogprobs | None,
) -> dict[str, Any]:
    """TGI `details` of a non-streamed answer; `prefill` has the prompt tokens' logprobs (the first has none)."""
    tok = ctx.tokenizer
    prefill = []
    if p.decoder_input_details and prompt is not None:
        lps = [None, *prompt.logprobs]
        prefill = [
            {"id": i, "text": tok.token_text(i), "logprob": json_float(lp)}
            for i, lp in zip(req.prompt_ids, lps, strict=True)
        ]
    d: dict[str, Any] = {
        "finish_reason": fin.reason,
        "generated_tokens": fin.generated_tokens,
        "seed": fin.seed,
        "prefill": prefill,
        "tokens": [token_json(ctx, t.id, t.text, t.logprob, t.special) for t in tokens],
    }
    if req.params.top_n_tokens:
        d["top_tokens"] = [top_json(ctx, t) for t in tokens]
    return d


async def generate_json(request: Request, ctx: ServerContext, body: TGIRequest, endpoint: str) -> dict[str, Any]:
    req, p = await tgi_request(ctx, body, endpoint)
    (out,) = await collect(request, await submit(ctx, [req], stream=False))
    assert out.finish is not None
    text = (body.inputs if p.return_full_text else "") + out.text
    res: dict[str, Any] = {"generated_text": text}
    if p.details:
        res["details"] = details_json(ctx, req, p, out.tokens, out.finish, out.prompt)
    return res


async def generate_sse(ctx: ServerContext, body: TGIRequest, endpoint: str) -> EventStream:
    """One SSE event per token, as TGI sends: the last carries generated_text (and details if asked); an error ends
    the stream with an {"error", "error_type"} event."""
    req, p = await tgi_request(ctx, body, endpoint, stream=True)
    handles = await submit(ctx, [req], stream=True)
    parts = [body.inputs] if p.return_full_text else []
    top_n = req.params.top_n_tokens

    def render(k: int, ev: Event, out: list[bytes]) -> bool:
        if type(ev) is TokenEvent and ev.finish is None and not top_n:  # nearly every event: a token, not the last
            if not ev.special:
                parts.append(ev.text)
            # the bytes of the whole event serialised (token_json's fields; tests/server/test_tgi.py), built around
            # its fields instead of from a dict per token
            out.append(PLAIN_EVENT % (ev.index, ev.id, orjson.dumps(ev.text), orjson.dumps(json_float(ev.logprob)),
                                      b"true" if ev.special else b"false"))  # fmt: skip
            return True
        if isinstance(ev, ErrorEvent):
            out.append(sse(error_body("/generate_stream", ev.status, ev.message, error_type=ev.error_type)))
            return False
        assert isinstance(ev, TokenEvent)  # TGI requests generate at least one token
        if not ev.special:
            parts.append(ev.text)
        data: dict[str, Any] = {"index": ev.index, "token": token_json(ctx, ev.id, ev.text, ev.logprob, ev.special)}
        if req.params.top_n_tokens:
            data["top_tokens"] = top_json(ctx, ev)
        data["generated_text"] = None
        data["details"] = None
        if ev.finish is not None:
            data["generated_text"] = "".join(parts)
            if p.details:
                data["details"] = {
                    "finish_reason": ev.finish.reason,
                    "generated_tokens": ev.finish.generated_tokens,
                    "seed": ev.finish.seed,
                    "input_length": ev.finish.prompt_tokens,
                }
        out.append(sse(data))
        return True

    return EventStream(handles, render)


Ctx = Annotated[ServerContext, Depends(get_context)]
_TOKEN = {
    "type": "object",
    "required": ["id", "text", "logprob", "special"],
    "properties": {
        "id": {"type": "integer"},
        "text": {"type": "string"},
        "logprob": {"type": ["number", "null"]},
        "special": {"type": "boolean"},
    },
}
# one TGI stream event: a token (the last one with generated_text and, if asked, details), or an error
SSE_EVENTS = sse_response(
    {
        "anyOf": [
            {
                "type": "object",
                "required": ["index", "token", "generated_text", "details"],
                "properties": {
                    "index": {"type": "integer", "minimum": 0},
                    "token": _TOKEN,
                    "top_tokens": {"type": "array", "items": _TOKEN},
                    "generated_text": {"type": ["string", "null"]},
                    "details": {"type": ["object", "null"]},
                },
            },
            {
                "type": "object",
                "required": ["error", "error_type"],
                "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
            },
        ]
    }
)


@router.post("/generate", summary="Generate text (JSON answer)")
async def generate(request: Request, body: TGIRequest, ctx: Ctx) -> JSONResponse:
    """TGI /generate: `{"generated_text", "details"?}`."""
    return JSONResponse(await generate_json(request, ctx, body, "generate"))


@router.post(
    "/generate_stream",
    summary="Generate text (Server-Sent Events)",
    response_class=EventStream,
    status_code=200,
    responses=SSE_EVENTS,
)
async def generate_stream(body: TGIRequest, ctx: Ctx) -> EventStream:
    """TGI /generate_stream: one `data:` event per token; the last has generated_text and details."""
    return await generate_sse(ctx, body, "generate_stream")


@router.post("/", summary="TGI compat route: JSON list or SSE by `stream`", responses=SSE_EVENTS)
async def compat_generate(request: Request, body: TGIRequest, ctx: Ctx) -> Any:
    """POST / as TGI answers it (huggingface_hub and text-generation post here): a one-element list or a stream."""
    endpoint = request.scope[ENDPOINT] = "generate_stream" if body.stream else "generate"
    if body.stream:
        return await generate_sse(ctx, body, endpoint)
    return JSONResponse([await generate_json(request, ctx, body, endpoint)])
