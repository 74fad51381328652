"""Errors in each API's own shape: TGI `{"error", "error_type"}`, OpenAI `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

# TGI error_type per status (validation is what its router answers for bad input)
TGI_TYPES = {
    400: "validation",
    401: "authentication",
    404: "not_found",
    413: "validation",
    422: "validation",
    429: "overloaded",
    500: "generation",
    503: "unhealthy",
    504: "timeout",
}
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout",
}


class TGIErrorBody(BaseModel):
    """TGI's error JSON (OpenAPI documentation of every non-OpenAI 4xx/5xx answer)."""

    error: str
    error_type: str


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error JSON (OpenAPI documentation of every /v1 4xx/5xx answer)."""

    error: OpenAIErrorDetail


# `responses=` for include_router: documents the error shape on every status class (it also replaces FastAPI's
# default 422 `{"detail": [...]}` schema, which this server never sends)
TGI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": TGIErrorBody, "description": "Bad request, auth, body too large, overloaded (TGI error shape)"},
    "5XX": {"model": TGIErrorBody, "description": "Generation failed, unhealthy or timed out (TGI error shape)"},
}
OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": OpenAIErrorBody, "description": "Bad request, auth, unknown model, overloaded (OpenAI shape)"},
    "5XX": {"model": OpenAIErrorBody, "description": "Generation failed, unhealthy or timed out (OpenAI shape)"},
}


class ApiError(Exception):
    """An error answered to the client with `status` in the API's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type, self.headers = error_type, headers


def tgi_error_type(status: int) -> str:
    """TGI's error_type for an HTTP status (the answer's own for TGI routes; the metrics' label on every route)."""
    return TGI_TYPES.get(status, "validation" if status < 500 else "generation")


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(
    path: str,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    error_type: str | None = None,
) -> dict[str, Any]:
    """The error JSON for `path`'s API. A lone surrogate the message or param quotes from the client's JSON
    ("\\ud800" is a valid escape there) is written as that escape: it cannot be encoded as UTF-8."""
    message = _printable(message)
    param = None if param is None else _printable(param)
    if is_openai_path(path):
        t = OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")  # error_type is TGI's
        return {"error": {"message": message, "type": t, "param": param, "code": code}}
    return {
        "error": message,
        "error_type": error_type or tgi_error_type(status),
    }


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(path: str, err: ApiError) -> JSONResponse:
    """The JSON error response; OpenAI answers bad input with 400 where TGI uses 422."""
    status = 400 if err.status == 422 and is_openai_path(path) else err.status
    body = error_body(path, status, err.message, param=err.param, code=err.code, error_type=err.error_type)
    return JSONResponse(body, status_code=status, headers=err.headers)


def _loc_param(loc: tuple[Any, ...] | list[Any]) -> str:
    """('body', 'parameters', 'top_p') -> 'parameters.top_p'."""
    return ".".join(str(p) for p in loc if p != "body") or "body"


def _safe(v: Any) -> str:
    try:
        s = json.dumps(v, allow_nan=True)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line per pydantic error; the first error's field as `param`."""
    parts, first = [], None
    for e in exc.errors():
        loc = e.get("loc", ())
        msg = str(e.get("msg", "invalid value"))
        if e.get("type") == "json_invalid":  # loc is ("body", character position): no parameter is to blame
            at = f" at character {loc[-1]}" if len(loc) > 1 and isinstance(loc[-1], int) else ""
            parts.append(f"request body is not valid JSON{at}: {e.get('ctx', {}).get('error', msg)}")
            continue
        param = _loc_param(loc)
        first = first or param
        inp = e.get("input")
        shown = (
            ""
            if inp is None or isinstance(inp, dict) or (isinstance(inp, float) and math.isnan(inp))
            else f" (got {_safe(inp)})"
        )
        parts.append(f"{param}: {msg}{shown}")
    return "; ".join(parts) or "invalid request", first


def install_error_handlers(app: FastAPI) -> None:
    """Map every error onto the API's shape: validation -> 422 (TGI) / 400 (OpenAI), HTTP errors keep status."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = validation_message(exc)
        return error_response(request.url.path, ApiError(422, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and "parsing the body" in msg:
            msg = "request body could not be parsed (is it UTF-8 JSON?)"
        return error_response(request.url.path, ApiError(exc.status_code, msg, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, ApiError(500, f"internal error: {type(exc).__name__}"))
