"""Request bodies of both APIs as pydantic models (wire names as TGI and OpenAI spell them).

Strict types (no "0.5" -> 0.5 coercion), no NaN or infinities, unknown fields ignored as TGI's router and the
OpenAI API do. Ranges the engine cannot know (token limits) are checked in server/routes/common.py.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_SEED = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


# -- TGI ----------------------------------------------------------------------------------------------------
class TGIParameters(_Body):
    """TGI `parameters`; null means the default everywhere, as clients send every field."""

    best_of: int | None = Field(None, gt=0, description="only 1 is supported")
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    grammar: Any = Field(None, description="not supported (422 when set)")
    max_new_tokens: int | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    return_full_text: bool | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] | None = None
    temperature: float | None = Field(None, gt=0.0, le=100.0)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    truncate: int | None = Field(None, gt=0)
    typical_p: float | None = Field(None, gt=0.0, le=1.0)
    watermark: bool = Field(False, description="not supported (422 when true)")
    adapter_id: str | None = Field(None, description="not supported (422 when set)")


class TGIRequest(_Body):
    """Body of POST /generate, /generate_stream and / (`stream` picks SSE on /)."""

    inputs: str = Field(min_length=1, examples=["The meaning of life is"])
    parameters: TGIParameters | None = None
    stream: bool = False


class TokenizeRequest(_Body):
    """Body of POST /tokenize."""

    inputs: str = Field(min_length=1)
    parameters: TGIParameters | None = None


class VLLMTokenizeRequest(_Body):
    """Body of POST /tokenize in vLLM's form (what lm-evaluation-harness's remote tokenizer sends)."""

    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(_Body):
    """Body of POST /detokenize (vLLM)."""

    tokens: list[Annotated[int, Field(ge=0)]]
    model: str | None = None


# -- OpenAI -------------------------------------------------------------------------------------------------
class StreamOptions(_Body):
    include_usage: bool = False


def _nullable(schema: dict[str, Any]) -> None:
    """JSON schema of a field that also takes null, which means its default (OpenAI's spec marks it nullable)."""
    schema["anyOf"] = [{k: schema.pop(k) for k in ("type", "minimum", "maximum") if k in schema}, {"type": "null"}]


Prompt = str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]


class CompletionRequest(_Body):
    """Body of POST /v1/completions (legacy completions API)."""

    model: str
    prompt: Prompt = Field(examples=["The meaning of life is"])
    # default: OpenAI's 16, at most --max-new-tokens; 0 only with echo: score the prompt, generate nothing
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, json_schema_extra=_nullable)
    stream: bool = Field(False, json_schema_extra=_nullable)
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0)
    echo: bool = Field(False, json_schema_extra=_nullable)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None
    # extensions vLLM also accepts
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: no top-k (vLLM)")
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)

    @field_validator("n", "stream", "echo", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """null, as clients generated from OpenAI's spec send for a field left unset, is the field's default."""
        return cls.model_fields[info.field_name or ""].default if value is None else value
