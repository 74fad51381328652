"""What the handlers share: settings, the engine client, the tokenizer and model facts (the model is in the core)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from gam_model.config import GAMConfig
from gam_model.tokenizer import Tokenizer
from server.engine import Engine
from server.protocol import Facts
from server.settings import Settings


@dataclass
class ServerContext:
    """Built by the app's lifespan; handlers read it through `get_context`."""

    settings: Settings
    engine: Engine
    tokenizer: Tokenizer
    model_config: GAMConfig
    facts: Facts  # what the engine core reported once it had loaded the model


async def get_context(request: Request) -> ServerContext:
    """FastAPI dependency: the running server's context (async: a sync dependency costs a thread-pool hop per request)."""
    ctx: ServerContext | None = getattr(request.app.state, "ctx", None)
    if ctx is None:
        from server.errors import ApiError

        raise ApiError(503, "the model is not loaded yet", error_type="unhealthy")
    return ctx
