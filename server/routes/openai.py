"""OpenAI API: POST /v1/completions (stream and not, n, echo, logprobs, usage) and GET /v1/models."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from gam_model.detokenize import incremental_detokenizer
from gam_model.sampling import SamplingParams
from gam_model.scoring import TokenLogprobs
from server.context import ServerContext, get_context
from server.engine import ErrorEvent, Event, GenerationRequest, RequestHandle, ScoreEvent, TokenEvent
from server.errors import ApiError, error_body
from server.routes.common import (
    Collected,
    check_ids,
    check_max_new_tokens,
    check_params,
    check_sequences,
    check_stop,
    collect,
    encode_prompt,
    json_float,
    sse,
    sse_response,
    submit,
)
from server.routes.stream import EventStream
from server.types import CompletionRequest

router = APIRouter(prefix="/v1", tags=["OpenAI"])
Ctx = Annotated[ServerContext, Depends(get_context)]
DEFAULT_MAX_TOKENS = 16  # OpenAI's default


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def prompts_of(ctx: ServerContext, body: CompletionRequest) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt: a string, a list of strings, a list of ids, or a list of id lists. A call with more
    sequences (prompts x n) than the server can hold is refused before any prompt is read."""
    p = body.prompt
    if isinstance(p, str):
        texts: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        texts = [list(p)]  # type: ignore[arg-type]
    else:
        texts = list(p)  # type: ignore[arg-type]
    if not texts:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    check_sequences(ctx, len(texts) * body.n)
    out = []
    for i, t in enumerate(texts):
        param = "prompt" if len(texts) == 1 else f"prompt[{i}]"
        if isinstance(t, str):
            if not t:
                raise ApiError(400, f"{param} must not be empty", param="prompt")
            out.append((t, await encode_prompt(ctx, t, param, truncatable=False)))
        else:
            ids = check_ids(ctx, list(t), param, truncatable=False)
            out.append((ctx.tokenizer.decode(ids), ids))
    return out


async def requests_of(
    ctx: ServerContext, body: CompletionRequest
) -> tuple[list[tuple[str, list[int]]], list[GenerationRequest]]:
    """Validate a completion body into one engine request per (prompt, n) choice (400 on bad values)."""
    if body.model != ctx.facts.model_id:
        raise ApiError(
            404,
            f"The model `{body.model}` does not exist; this server serves `{ctx.facts.model_id}`",
            param="model",
            code="model_not_found",
        )
    for name, bad in (
        ("suffix", body.suffix is not None),
        ("best_of", body.best_of not in (None, body.n)),
    ):
        if bad:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    if body.stream_options is not None and not body.stream:  # it would be ignored silently
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if body.logprobs is not None and body.logprobs > ctx.settings.max_top_n_tokens:
        raise ApiError(
            400, f"logprobs must be <= {ctx.settings.max_top_n_tokens}, got {body.logprobs}", param="logprobs"
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop = check_stop(ctx, stop)
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400, "max_tokens must be >= 1 (0 is only allowed with echo: score the prompt)", param="max_tokens"
        )
    # max_tokens 0 + echo: the engine scores the prompt if logprobs are asked, and generates nothing
    default = min(DEFAULT_MAX_TOKENS, ctx.settings.max_new_tokens)  # as TGI's default, never over the limit
    max_new = check_max_new_tokens(ctx, default if body.max_tokens is None else body.max_tokens, "max_tokens")
    prompts = await prompts_of(ctx, body)
    bias = logit_bias(ctx, body.logit_bias)
    reqs = []
    for _, ids in prompts:
        for j in range(body.n):
            params = check_params(
                SamplingParams(
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p,
                    top_k=max(body.top_k or 0, 0),  # vLLM: -1 (or 0) disables top-k
                    repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    presence_penalty=body.presence_penalty or 0.0,
                    do_sample=True,
                    seed=None if body.seed is None else (body.seed + j) % (2**63),  # n choices draw differently
                    top_n_tokens=body.logprobs or 0,
                    logit_bias=bias,
                )
            )
            req = GenerationRequest(ids, params, max_new, stop, endpoint="completions")
            if body.echo and body.logprobs is not None:
                req.prompt_logprobs = body.logprobs  # echoed prompt tokens get logprobs too (lm-eval loglikelihood)
            reqs.append(req)
    return prompts, reqs


def logit_bias(ctx: ServerContext, raw: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI `logit_bias` {"token id": bias}: ids must be in the vocabulary (values are checked with the rest)."""
    if not raw:
        return None
    out = {}
    for key, b in raw.items():
        # ASCII digits only: int() also takes "+5", " 5", "5_0" and other scripts' digits ("\u0665"), no token ids
        if not (key.isascii() and key.isdigit()):
            raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        vocab = ctx.model_config.vocab_size
        # more digits than the vocabulary's ids have is out of it, unconverted: int() refuses over 4,300 (a 500)
        digits = key.lstrip("0") or "0"
        tid = int(digits) if len(digits) <= len(str(vocab)) else vocab
        if not 0 <= tid < vocab:
            raise ApiError(
                400,
                f"logit_bias token id {key} is outside the vocabulary [0, {vocab})",
                param="logit_bias",
            )
        out[tid] = b
    return out


class LogprobsBuilder:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset.

    text_offset is each token's character offset in the choice's text (the echoed prompt, then the completion), as
    OpenAI defines it: where the token's own text starts. A generated token's offset advances by its own text, not by
    what the stop checks let out so far, so streamed and whole answers agree; bytes of an unfinished character count
    once the character is complete.
    """

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        # prompt()'s answers by prompt: the n choices of a prompt echo the same entries (the core scores the prompt
        # once for all of them), built once instead of n times on the event loop; keyed by the ids list's identity,
        # which the entry keeps alive
        self._echoed: dict[int, tuple[list[int], TokenLogprobs | None, dict[str, Any]]] = {}

    def prompt(self, ids: list[int], prompt: TokenLogprobs | None, text: str) -> dict[str, Any]:
        """The echoed prompt's entries (the first token has no logprob), offsets from 0 into the echoed `text` (the
        prompt ids' text). Each token is named by the text it adds, as a generated token is (a byte piece of a
        character "", the token completing it the character; the bytes of an unfinished last character are the last
        token's): the same ids get the same `tokens` echoed or generated, and they join to the echoed text when the
        tokenizer round-trips it (byte-level BPE does); where it does not (a Whitespace pre-tokenizer without a
        decoder, [UNK]), the offsets are the tokenizer's own, where each token starts in `text`. Callers do not
        modify the result."""
        seen = self._echoed.get(id(ids))
        if seen is not None and seen[0] is ids and seen[1] == prompt:
            return seen[2]
        out = self._prompt(ids, prompt, text)
        self._echoed[id(ids)] = (ids, prompt, out)
        return out

    def _prompt(self, ids: list[int], prompt: TokenLogprobs | None, ptext: str) -> dict[str, Any]:
        tok = self.ctx.tokenizer
        out = self._empty()
        detok = incremental_detokenizer(tok)
        last = len(ids) - 1
        for j, i in enumerate(ids):
            out["text_offset"].append(detok.chars)
            text = detok.add(i) + (detok.flush() if j == last else "")
            out["tokens"].append(text)
            if prompt is None or j == 0:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                lp = prompt.logprobs[j - 1]
                out["token_logprobs"].append(json_float(lp))
                alternatives = zip(prompt.top_ids[j - 1], prompt.top_logprobs[j - 1], strict=True)
                out["top_logprobs"].append(self._top(alternatives, i, text, lp))
        if detok.chars != len(ptext) or "".join(out["tokens"]) != ptext:  # the texts do not round-trip
            enc = tok.tok.encode(ptext, add_special_tokens=False)
            if enc.ids == ids:
                out["text_offset"] = [start for start, _ in enc.offsets]
        return out

    def generated(self, tokens: list[TokenEvent], offset: int) -> dict[str, Any]:
        """Generated tokens' entries, the first at character `offset` (after the echoed prompt, or 0)."""
        out = self._empty()
        for ev in tokens:
            out["tokens"].append(ev.text)
            out["token_logprobs"].append(json_float(ev.logprob))
            out["top_logprobs"].append(self._top(ev.top, ev.id, ev.text, ev.logprob))
            out["text_offset"].append(offset)
            offset += len(ev.text)
        return out

    def _top(
        self, alternatives: Iterable[tuple[int, float]], tid: int, text: str, logprob: float
    ) -> dict[str, float | None]:
        """One step's alternatives (best first) as {text: logprob}, and the step's own token `tid` under its `tokens`
        entry `text` (OpenAI: the sampled token is always there, so up to logprobs+1 entries, and top_logprobs[i]
        [tokens[i]] is token_logprobs[i]). The other alternatives are named by their text decoded alone; those with
        the same text (byte tokens that decode alone to U+FFFD) share an entry, which keeps the best logprob."""
        out: dict[str, float | None] = {}
        for i, lp in alternatives:
            if i == tid:
                out[text] = json_float(logprob)  # in its place (best first)
            else:
                out.setdefault(self.ctx.tokenizer.token_text(i), json_float(lp))
        out[text] = json_float(logprob)  # last when it is not among the best (or its text is an alternative's)
        return out

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    @staticmethod
    def concat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {k: a[k] + b[k] for k in a}


def _usage(prompts: list[tuple[str, list[int]]], completion_tokens: int) -> dict[str, int]:
    p = sum(len(ids) for _, ids in prompts)
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}


# streamed: `data:` is a chunk's JSON, or [DONE] at the end
@router.post("/completions", summary="Create a completion", responses=sse_response())
async def completions(request: Request, body: CompletionRequest, ctx: Ctx) -> Any:
    """OpenAI legacy completions; `stream` answers Server-Sent Events ending in `data: [DONE]`."""
    prompts, reqs = await requests_of(ctx, body)
    handles = await submit(ctx, reqs, stream=body.stream)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return _stream(ctx, body, prompts, handles, cid, created)
    results: list[Collected] = await collect(request, handles)
    lp = LogprobsBuilder(ctx)
    choices = []
    for k, res in enumerate(results):
        assert res.finish is not None
        ptext, pids = prompts[k // body.n]
        logprobs = None
        if body.logprobs is not None:
            logprobs = lp.generated(res.tokens, len(ptext) if body.echo else 0)
            if body.echo:
                logprobs = lp.concat(lp.prompt(pids, res.prompt, ptext), logprobs)
        choices.append(
            {
                "index": k,
                "text": (ptext if body.echo else "") + res.emitted,
                "logprobs": logprobs,
                "finish_reason": _finish_reason(res.finish.reason),
            }
        )
    usage = _usage(prompts, sum(r.finish.generated_tokens for r in results if r.finish))
    return JSONResponse(
        {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": ctx.facts.model_id,
            "system_fingerprint": None,
            "choices": choices,
            "usage": usage,
        }
    )


def _stream(
    ctx: ServerContext,
    body: CompletionRequest,
    prompts: list[tuple[str, list[int]]],
    handles: list[RequestHandle],
    cid: str,
    created: int,
) -> EventStream:
    """The streamed answer: one chunk per token (as OpenAI streams), an echoed prompt first, the usage chunk (if
    asked) and [DONE] last."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    lp = LogprobsBuilder(ctx)
    offsets = [0] * len(handles)
    generated = 0

    # every chunk of the stream is this frame around its one choice: serialised once, not once per token
    frame: dict[str, Any] = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": ctx.facts.model_id,
        "system_fingerprint": None,
        "choices": [None],
    }
    if include_usage:
        frame["usage"] = None
    before, after = sse(frame).split(b'"choices":[null]')
    before, after = before + b'"choices":[', b"]" + after

    # and a token's chunk without logprobs or finish reason (nearly every chunk) is its text inside fixed bytes,
    # the same bytes as the whole choice serialised (tests/server/test_openai_api.py)
    heads = [before + b'{"index":%d,"text":' % k for k in range(len(handles))]
    plain_tail = b',"logprobs":null,"finish_reason":null}' + after

    def chunk(k: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> bytes:
        if logprobs is None and finish is None:
            return heads[k] + orjson.dumps(text) + plain_tail
        choice = {"index": k, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return before + orjson.dumps(choice) + after

    def echo(k: int, prompt: TokenLogprobs | None) -> bytes:
        ptext, pids = prompts[k // body.n]
        offsets[k] = len(ptext)
        return chunk(k, ptext, lp.prompt(pids, prompt, ptext) if body.logprobs is not None else None, None)

    # with logprobs, a choice's echo waits for its first event, which carries the prompt logprobs
    echo_pending = set(range(len(handles))) if body.echo and body.logprobs is not None else set()

    plain = body.logprobs is None

    def render(k: int, ev: Event, out: list[bytes]) -> bool:
        """Append event ev of choice k's chunks to out; False when the stream ends here (an error)."""
        nonlocal generated
        if plain and type(ev) is TokenEvent and ev.finish is None:  # nearly every event: a token's text, as is
            if ev.emitted:  # else held back (a possible stop string or an unfinished character)
                out.append(chunk(k, ev.emitted, None, None))
            return True  # (offsets: read by logprobs only, which a plain stream has not)
        if k in echo_pending and not isinstance(ev, ErrorEvent):
            echo_pending.discard(k)
            out.append(echo(k, ev.prompt))
        if isinstance(ev, ErrorEvent):
            out.append(sse(error_body("/v1/completions", ev.status, ev.message, error_type=None)))
            return False
        if isinstance(ev, ScoreEvent):  # max_tokens 0: the echoed prompt is the whole answer
            out.append(chunk(k, "", None, "length"))
            return True
        finish = None if ev.finish is None else _finish_reason(ev.finish.reason)
        logprobs = lp.generated([ev], offsets[k]) if body.logprobs is not None else None
        offsets[k] += len(ev.text)
        if ev.finish is not None:
            generated += ev.finish.generated_tokens
        out.append(chunk(k, ev.emitted, logprobs, finish))
        return True

    def tail(ok: bool) -> bytes:
        usage = sse({**frame, "choices": [], "usage": _usage(prompts, generated)}) if ok and include_usage else b""
        return usage + b"data: [DONE]\n\n"

    head = [echo(k, None) for k in range(len(handles))] if body.echo and body.logprobs is None else []
    return EventStream(handles, render, head, tail)


@router.get("/models", summary="List the served model")
async def models(ctx: Ctx) -> dict[str, Any]:
    """OpenAI model list: the one model this server serves."""
    return {
        "object": "list",
        "data": [
            {
                "id": ctx.facts.model_id,
                "object": "model",
                "created": ctx.facts.created,
                "owned_by": "gam-serve",
                "max_model_len": ctx.settings.max_input_tokens,
                "dtype": ctx.facts.dtype,
                "quantization": ctx.facts.quantization,
            }
        ],
    }


@router.post("/chat/completions", summary="Chat completions: not served (a base model has no chat template)")
async def chat_completions() -> None:
    """A clear 404 in OpenAI's shape instead of a bare Not Found: GAM checkpoints are base language models."""
    raise ApiError(
        404,
        "This server serves a base language model without a chat template: /v1/chat/completions is not available."
        " Use /v1/completions with a prompt.",
        code="chat_not_supported",
    )
