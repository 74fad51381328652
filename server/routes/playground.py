"""GET /: the playground page; its CSS, JS and icon under /static/ (server/static, shipped in the wheel)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate (ETag) so an upgraded server never pairs new HTML with old JS

router = APIRouter(include_in_schema=False)


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(NO_CACHE)
        return response


@router.get("/")
async def playground() -> FileResponse:
    """The playground: a prompt, sampling parameters, streamed tokens with their probabilities, live stats."""
    return FileResponse(STATIC_DIR / "index.html", headers=NO_CACHE)


def mount_static(app: FastAPI) -> None:
    """Serve server/static/ under /static/ (the page's relative links resolve there)."""
    app.mount("/static", _Static(directory=STATIC_DIR), name="static")
