"""The web page at ``/``: static HTML/CSS/JS modules from ``service/static`` (no build step, nothing
fetched from elsewhere at runtime). The page and its files carry a strict Content-Security-Policy: only
this origin's scripts and styles, API calls, the WebSocket and the event feed (SSE) to this origin,
images from this origin (camera and event pictures) and ``data:`` URLs (clip thumbnails), images and
video from local ``blob:`` URLs (the user's own file is decoded in the browser, never uploaded twice)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().with_name("static")

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' blob: data:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _PageFiles(StaticFiles):
    """StaticFiles with the page's security headers on every file."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def mount_ui(app: FastAPI) -> None:
    """``GET /`` -> index.html and ``/static/*``; no authentication (the page holds no secrets; the API
    key a user types stays in the browser's sessionStorage and is only sent on activation)."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.mount("/static", _PageFiles(directory=STATIC_DIR), name="static")
