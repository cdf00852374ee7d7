"""POST /v1/clips: score a whole video file (JSON, or NDJSON as frames are scored)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from service.clip_scoring import clip_response
from service.deps import AcceptHeader, IncludeMaps, ReadyModel, ServicesDep, StreamFlag
from service.responses import NDJSON_MEDIA_TYPE, wants_ndjson
from service.schemas import EVENT_SOURCE_NAME, ClipResponse, ErrorResponse, ThumbnailMode

router = APIRouter(tags=["scoring"])

ThumbnailsOption = Annotated[ThumbnailMode, Query(
    alias="thumbnails",
    description="Small JPEGs of frames in the response (at most 200): none, the anomalous frames plus an even "
    "sample of the rest, or an even sample of all (every frame of a clip of up to 200). See docs/server.md.",
)]


EventsOption = Annotated[str | None, Query(
    alias="events", pattern=EVENT_SOURCE_NAME,
    description="Record the clip's events (runs of anomalous frames, as for cameras) under this name; "
    "the summary lists their ids. Off by default.",
)]


@router.post(
    "/v1/clips", summary="Score a video clip (multipart field 'file', or the raw body)",
    response_model=ClipResponse, response_class=Response,
    responses={
        200: {"content": {NDJSON_MEDIA_TYPE: {}}, "description": "JSON, or NDJSON lines with Accept: application/x-ndjson"},
        **{code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)},
    },
)
async def score_clip(
    request: Request, services: ServicesDep, model: ReadyModel, maps: IncludeMaps = True,
    stream: StreamFlag = False, accept: AcceptHeader = None, thumbnails: ThumbnailsOption = ThumbnailMode.none,
    events: EventsOption = None,
) -> Response:
    return await clip_response(request, services, model, maps, wants_ndjson(accept, stream), thumbnails, events)
