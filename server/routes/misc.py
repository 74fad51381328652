"""GET /health, GET /info, POST /tokenize (TGI or vLLM form), POST /detokenize, GET /tokenizer_info, GET /metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.context import ServerContext, get_context
from server.core import EngineUnavailable
from server.errors import ApiError
from server.metrics import frontend_registry
from server.routes.common import check_text, decode_ids, encode_ids, encode_text
from server.types import DetokenizeRequest, TokenizeRequest, VLLMTokenizeRequest
from server.version import VERSION

router = APIRouter(tags=["Server"])
Ctx = Annotated[ServerContext, Depends(get_context)]


@router.get("/health", summary="Liveness and readiness", response_class=Response)
@router.head("/health", include_in_schema=False)  # probes that send HEAD; one operation in the OpenAPI schema
async def health(request: Request) -> Response:
    """200 when the model is loaded and the engine loop is alive, else 503 (TGI's shape)."""
    ctx: ServerContext | None = getattr(request.app.state, "ctx", None)
    if ctx is None:
        raise ApiError(503, "the model is not loaded", error_type="unhealthy")
    if not ctx.engine.alive:
        raise ApiError(503, ctx.engine.down_reason, error_type="unhealthy")
    if ctx.engine.draining:
        raise ApiError(503, "the server is shutting down", error_type="unhealthy")
    return Response(status_code=200)


@router.get("/info", summary="Model and server facts (TGI /info)")
async def info(ctx: Ctx) -> dict[str, Any]:
    """TGI-like /info: model id, dtype, device, limits, version; plus GAM's own shape facts."""
    s, cfg = ctx.settings, ctx.model_config
    return {
        "model_id": ctx.facts.model_id,
        "model_sha": None,
        "model_dtype": f"torch.{ctx.facts.dtype}",
        "quantization": ctx.facts.quantization,
        "model_device_type": ctx.facts.device,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": s.max_batch_size + s.max_queue,
        "max_best_of": 1,
        "max_stop_sequences": s.max_stop_sequences,
        "max_input_tokens": s.max_input_tokens,
        "max_input_length": s.max_input_tokens,
        "max_total_tokens": s.max_input_tokens + s.max_new_tokens,
        "max_new_tokens": s.max_new_tokens,
        "max_batch_size": s.max_batch_size,
        "max_queue": s.max_queue,
        "deterministic": s.deterministic,
        "overlap": ctx.facts.overlap,
        "stream_interval": s.stream_interval,
        "stream_interval_ms": s.stream_interval_ms,
        "max_client_batch_size": 1,
        "validation_workers": 1,
        "router": "gam-serve",
        "version": VERSION,
        "sha": None,
        "docker_label": None,
        "block_size": cfg.block_size,
        "receptive_field": cfg.receptive_field,
        "vocab_size": cfg.vocab_size,
        "max_top_n_tokens": s.max_top_n_tokens,
        # what the playground needs to set GAM's constant state beside a same-size Transformer's KV cache
        # (2 * n_layer * n_embd * dtype_bytes per token)
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "dtype_bytes": ctx.facts.dtype_bytes,
        "state_bytes_per_sequence": ctx.facts.state_bytes_per_sequence,
    }


@router.post("/tokenize", summary="Tokenize text (TGI `inputs` or vLLM `prompt` form)")
async def tokenize(body: TokenizeRequest | VLLMTokenizeRequest, ctx: Ctx) -> Any:
    """TGI form `{"inputs", "parameters"}`: `[{"id", "text", "start", "stop"}]` with character offsets into `inputs`,
    the last `parameters.truncate` tokens when it is set (as TGI).
    vLLM form `{"prompt", "add_special_tokens"}`: `{"count", "max_model_len", "tokens"}`."""
    if isinstance(body, VLLMTokenizeRequest):
        check_text(body.prompt, "prompt")
        ids = await encode_ids(ctx, body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": ctx.settings.max_input_tokens, "tokens": ids}
    check_text(body.inputs, "inputs")
    enc = await encode_text(ctx, body.inputs)
    tokens = list(zip(enc.ids, enc.offsets, strict=True))
    if body.parameters is not None and body.parameters.truncate is not None:  # as TGI: what /generate would keep
        tokens = tokens[-body.parameters.truncate :]
    return [{"id": i, "text": body.inputs[a:b], "start": a, "stop": b} for i, (a, b) in tokens]


@router.post("/detokenize", summary="Token ids to text (vLLM /detokenize)")
async def detokenize(body: DetokenizeRequest, ctx: Ctx) -> dict[str, str]:
    """vLLM /detokenize: `{"prompt": text}`; ids outside the vocabulary are a 422."""
    vocab = ctx.model_config.vocab_size
    if body.tokens and max(body.tokens) >= vocab:
        raise ApiError(422, f"tokens has an id >= the vocabulary size {vocab}", param="tokens")
    return {"prompt": await decode_ids(ctx, body.tokens)}


@router.get("/tokenizer_info", summary="Tokenizer facts (vLLM /tokenizer_info)")
async def tokenizer_info(ctx: Ctx) -> dict[str, Any]:
    """vLLM /tokenizer_info: special tokens and limits, so clients can tokenize through this server
    (lm-evaluation-harness's remote tokenizer checks it). A base model: no chat template."""
    tok = ctx.tokenizer
    eos, bos = tok.eos_token_id, tok.bos_token_id
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": None if eos is None else tok.id_to_token(eos),
        "bos_token": None if bos is None else tok.id_to_token(bos),
        "pad_token": None,
        "model_max_length": ctx.settings.max_input_tokens,
        "vocab_size": tok.vocab_size,
        "chat_template": None,
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(ctx: Ctx) -> Response:
    """Prometheus text exposition: the engine core's registry (every gam_* metric), then this frontend process's."""
    try:
        core = await ctx.engine.metrics_text()
    except EngineUnavailable as e:
        raise ApiError(503, str(e), error_type="unhealthy") from e
    return Response(core + generate_latest(frontend_registry(ctx.engine.frontend)), media_type=CONTENT_TYPE_LATEST)
