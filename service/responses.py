"""Response helpers: large JSON rendered off the event loop, NDJSON streams that always clean up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

JSON_MEDIA_TYPE = "application/json"
NDJSON_MEDIA_TYPE = "application/x-ndjson"


def dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def ndjson_line(body: Any) -> bytes:
    return dumps(body) + b"\n"


async def json_response(body: Any, status_code: int = 200) -> Response:
    """A JSON response serialised in a worker thread (a clip with maps is megabytes of JSON)."""
    return Response(await asyncio.to_thread(dumps, body), status_code, media_type=JSON_MEDIA_TYPE)


def wants_ndjson(accept: str | None, stream: bool) -> bool:
    if stream:
        return True
    media_types = (part.split(";")[0].strip().lower() for part in (accept or "").split(","))
    return NDJSON_MEDIA_TYPE in media_types


class ManagedStreamingResponse(StreamingResponse):
    """A StreamingResponse whose ``on_close`` runs exactly once however the response ends (finished,
    client gone, or never started), so admissions and decoders are always released."""

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], media_type: str = NDJSON_MEDIA_TYPE
    ) -> None:
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-store"})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self._content, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                await self._on_close()
