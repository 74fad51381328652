"""Optional bearer-token auth (--api-key) on every path but /health, /metrics and the playground page (GET / and
/static/), compared in constant time."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import ApiError, error_response

OPEN_PATHS = frozenset({"/health", "/metrics"})


def is_open(scope: Scope) -> bool:
    """Paths served without the key; the playground loads without it and asks for it (POST / stays TGI's, keyed)."""
    path = scope["path"]
    page = scope["method"] in ("GET", "HEAD") and (path == "/" or path.startswith("/static/"))
    return page or path in OPEN_PATHS


class ApiKeyMiddleware:
    """Pure ASGI middleware: 401 in the API's error shape unless `Authorization: Bearer <key>` matches."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    def authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        err = ApiError(
            401,
            "missing or invalid API key (send `Authorization: Bearer <key>`)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error_response(scope["path"], err)(scope, receive, send)
