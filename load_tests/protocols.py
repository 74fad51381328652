"""Request bodies and SSE event parsing for the two streaming APIs: TGI `/generate_stream` and OpenAI completions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

APIS = {"tgi": "/generate_stream", "openai": "/v1/completions"}


@dataclass
class Event:
    """One parsed SSE data line."""

    kind: str  # "token" (carries output text), "empty" (a chunk without text), "final", "done", "error"
    text: str = ""
    output_tokens: int | None = None  # server's count of generated tokens, when it sends one
    prompt_tokens: int | None = None
    error: str | None = None


def body(
    api: str,
    prompt: str,
    max_tokens: int,
    *,
    model: str | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    ignore_eos: bool = False,
) -> dict[str, Any]:
    """The JSON body of one streaming request."""
    if api == "tgi":
        params: dict[str, Any] = {"max_new_tokens": max_tokens, "details": True}
        if temperature > 0:
            params.update(do_sample=True, temperature=temperature, seed=seed)
        return {"inputs": prompt, "parameters": params, "stream": True}
    if api == "openai":
        b: dict[str, Any] = {
            "model": model or "gam",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if seed is not None and temperature > 0:
            b["seed"] = seed
        if ignore_eos:
            b["ignore_eos"] = True  # vLLM's extension to the OpenAI API; servers without it may reject or ignore it
        return b
    raise ValueError(f"unknown api {api!r}: expected one of {', '.join(APIS)}")


def parse_line(api: str, line: str) -> Event | None:
    """Parse one SSE line; None for blank lines, comments (pings) and non-data fields."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if api == "openai" and data == "[DONE]":
        return Event("done")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses but Python's json takes (NaN, -Infinity, "\\ud800" from a server in Python)
            obj = json.loads(data)
        except (ValueError, RecursionError):
            return Event("error", error="stream:bad_json")
    if not isinstance(obj, dict):
        return Event("error", error="stream:bad_json")
    if "error" in obj:
        err = obj["error"]
        kind = obj.get("error_type") or (err.get("type") if isinstance(err, dict) else None) or "error"
        return Event("error", error=f"stream:{kind}")
    return _parse_tgi(obj) if api == "tgi" else _parse_openai(obj)


def _parse_tgi(obj: dict[str, Any]) -> Event:
    # TGI: every event carries `token`; the last one also `generated_text` (and `details` when asked for, as body()
    # does: generated_tokens and the prompt's input_length)
    tok = obj.get("token") or {}
    text = tok.get("text", "")
    if obj.get("generated_text") is not None:
        details = obj.get("details") or {}
        return Event(
            "final", text=text, output_tokens=details.get("generated_tokens"), prompt_tokens=details.get("input_length")
        )
    return Event("token", text=text)


def _parse_openai(obj: dict[str, Any]) -> Event:
    # OpenAI: chunks with choices[0].text; with include_usage a last chunk with empty choices and `usage`.
    usage = obj.get("usage") or {}
    choices = obj.get("choices") or []
    text = (choices[0].get("text") or "") if choices else ""
    ev = Event("token" if text else "empty", text=text)
    if usage:
        ev.output_tokens = usage.get("completion_tokens")
        ev.prompt_tokens = usage.get("prompt_tokens")
    return ev
