"""The one settings object of the server: CLI flags, `GAM_*` env vars and defaults share this source."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gam_model.checkpoint import find_single_checkpoint
from gam_model.quant import DTYPE_NAMES, default_dtype

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


class Settings(BaseSettings):
    """gam-serve configuration; every field is a `--kebab-case` flag and a `GAM_UPPER_CASE` env var."""

    model_config = SettingsConfigDict(env_prefix="GAM_", extra="ignore")

    model: Path | None = Field(None, description="checkpoint directory (default: the single model under weights/)")
    model_id: str | None = Field(None, description="name served in /info and /v1/models (default: the checkpoint's)")
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: a free one the kernel picks; the log names it)")
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto = bfloat16 on cuda or with quantized weights, float32 on cpu (exact reference logits; "
        "small models are overhead-bound on CPU, so bf16 buys little there)",
    )
    quantize: Literal["auto", "none", "int8", "fp8"] = Field(
        "auto",
        description="weight quantization: int8 (per-channel weight-only, CPU and CUDA), fp8 (e4m3, CUDA sm_89+), "
        "none; auto = as the checkpoint is (gam-quantize writes pre-quantized ones)",
    )
    api_server_count: int = Field(
        1,
        ge=1,
        le=64,
        description="HTTP frontend processes sharing one engine core and the port (each with its own event loop, "
        "GIL, detokenization and SSE work); 1 = the engine core is started by the one HTTP process",
    )
    max_batch_size: int = Field(32, ge=1, le=4096, description="sequences decoded together (slot pool size)")
    max_queue: int = Field(128, ge=0, description="waiting requests beyond the running batch; past it: 429")
    max_new_tokens: int = Field(1024, ge=1, description="upper limit on max_new_tokens / max_tokens per request")
    max_input_tokens: int = Field(8192, ge=1, description="longest accepted prompt in tokens (TGI truncate cuts it)")
    max_stop_sequences: int = Field(4, ge=0, description="most stop strings per request")
    max_top_n_tokens: int = Field(5, ge=0, description="most alternatives per token (top_n_tokens, logprobs)")
    # vLLM's --stream-interval: on a busy server each stream's wake-up and HTTP write, not the step, is what a token
    # costs the frontend; k > 1 spends them once per k tokens (each token keeps its own SSE event)
    stream_interval: int = Field(
        1, ge=1, le=1024, description="streamed tokens per write after the first (1: each token as it is made)"
    )
    stream_interval_ms: float = Field(
        0.0,
        ge=0,
        le=60_000,
        description="with --stream-interval > 1: also write a stream's waiting tokens once the oldest has waited this"
        " many ms (0: by count only)",
    )
    request_timeout: float = Field(300.0, gt=0, description="seconds from arrival until a request is ended")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest accepted request body; past it: 413")
    api_key: SecretStr | None = Field(None, description="bearer token required on all but /health and /metrics")
    cuda_graphs: bool = Field(True, description="capture the decode step in CUDA graphs (cuda only)")
    deterministic: bool = Field(
        False,
        description="batch-invariant mode: a request's logits, and so its greedy or seeded text, are bit-identical "
        "whatever else is in the batch, at a throughput cost (README)",
    )
    # SGLang's overlap scheduler: the host's per-step work (finish checks, output, admission) runs while the device
    # computes the next step (gam_model/batch.py); on CPU the forward runs on the host's own cores, so it gains nothing
    overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="launch step t+1 before reading step t's results; auto = on for cuda, off on cpu (where it only "
        "delays each token by one step)",
    )
    # prompt logprobs (decoder_input_details, echo + logprobs) are O(prompt) work: the engine core scores a long prompt
    # in slices between decode steps, so running streams keep flowing (bench/prompt_logprobs.py)
    score_budget_s: float = Field(
        0.03, ge=0, description="seconds of prompt-logprob scoring per engine iteration (at least one chunk)"
    )
    score_windows: int = Field(32, ge=1, description="prompt-logprob chunk past block_size: R-token windows")
    score_head_chunk: int = Field(128, ge=1, description="prompt-logprob chunk below block_size: positions")
    shutdown_grace: float = Field(10.0, ge=0, description="seconds in-flight requests get to finish on SIGTERM")
    # uvicorn's default (5 s) equals httpx's pool expiry (openai, huggingface_hub clients): a client reusing a
    # connection the server is closing gets a reset (ReadError), seen 17 times in a 10,000-request soak. Longer than
    # the clients' expiry and nginx's 60 s, as vLLM's VLLM_TIMEOUT_KEEP_ALIVE (vllm-project/vllm#18472)
    timeout_keep_alive: int = Field(75, ge=1, description="seconds an idle keep-alive connection is kept open")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    fault_injection: str | None = Field(
        None,
        description="TEST ONLY: 'step:N' makes the N-th decode step raise, 'crash:N' kills the engine loop "
        "at its N-th busy iteration",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto":
            try:
                torch.device(v)
            except RuntimeError as e:
                raise ValueError(f"unknown device {v!r}: {e}") from e
        return v

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: SecretStr | None) -> SecretStr | None:
        """A key a request can send: an HTTP header value has no leading or trailing whitespace and no control
        characters (RFC 9110 5.5), so such a key could never match (a key file's newline, kept by a Kubernetes Secret
        made with --from-file, answered every call 401), and an empty one would let in any empty bearer token."""
        if v is None:
            return v
        key = v.get_secret_value()
        if not key.strip(" \t"):
            raise ValueError("api_key must not be empty (leave it unset to serve without a key)")
        if key != key.strip(" \t") or any(c != "\t" and (c < " " or c == "\x7f") for c in key):
            raise ValueError(
                "api_key has leading or trailing whitespace or a control character (a key file's newline?): "
                "no Authorization header can carry it"
            )
        return v

    @model_validator(mode="after")
    def _interval(self) -> Settings:
        if self.stream_interval_ms and self.stream_interval == 1:  # k = 1 writes every token at once: t does nothing
            raise ValueError(
                "--stream-interval-ms needs --stream-interval > 1 (for a time-based interval: --stream-interval 1024)"
            )
        return self

    def resolved_device(self) -> torch.device:
        """The device to run on (auto = cuda when available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        """The model dtype (auto = bf16 on cuda or when quantizing, fp32 on cpu; a pre-quantized checkpoint's
        auto is its own dtype: the loader decides with `requested_dtype`)."""
        return self.requested_dtype() or default_dtype(self.resolved_device(), self.quantize)

    def requested_dtype(self) -> torch.dtype | None:
        """--dtype as given; None for auto."""
        return None if self.dtype == "auto" else DTYPE_NAMES[self.dtype]

    def resolved_overlap(self) -> bool | None:
        """--overlap as the batch core takes it (None: auto, decided by the decoder's device)."""
        return None if self.overlap == "auto" else self.overlap == "on"

    def resolved_model_dir(self) -> Path:
        """--model, or else the single subdirectory of weights/ holding a config.json."""
        if self.model is not None:
            return self.model
        return find_single_checkpoint(WEIGHTS_DIR, "pass --model DIR (or GAM_MODEL)")  # a ValueError
