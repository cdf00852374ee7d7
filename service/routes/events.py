"""Events: list (paged, newest first), one event, its pictures, and the live feed of changes as
Server-Sent Events. Reads only; no API key."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from service.deps import ServicesDep
from service.errors import BadRequest, EventNotFound
from service.events.store import EVENT_ID, HEATMAP, SNAPSHOT, EventQuery, EventRecord
from service.metrics import EVENT_SOURCES
from service.schemas import ErrorResponse

router = APIRouter(prefix="/v1/events", tags=["events"])

DEFAULT_LIMIT, MAX_LIMIT = 50, 500
MAX_NAME = 256  # longest camera name a filter may give
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies and clients from timing the stream out
SSE_RETRY_MS = 3000  # how soon a dropped EventSource reconnects


class EventOut(BaseModel):
    id: str = Field(description="32 hex digits.")
    camera: str = Field(description="The camera's name, a WebSocket stream's name or the clip's file name.")
    source: str = Field(description="camera, stream or clip.")
    state: str = Field(description="open or closed.")
    start: str = Field(description="ISO-8601 UTC time of its first anomalous frame.")
    end: str | None = Field(description="ISO-8601 UTC time of its last frame; null while open.")
    peak_score: float
    peak_frame: int = Field(description="The source's frame index of the highest score.")
    model_version: str = Field(description="The version that scored the peak frame.")
    frames: int = Field(description="Frames from start to end (to the latest frame while open).")
    snapshot_url: str
    heatmap_url: str


class EventPage(BaseModel):
    events: list[EventOut]
    next_cursor: str | None = Field(description="Pass as cursor= for the next (older) page; null on the last.")


# -- query values ---------------------------------------------------------------------------------


def _time(name: str, value: str | None) -> float | None:
    """ISO-8601 (a time without a zone is UTC) or unix seconds."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise BadRequest(f"{name}: {value[:64]!r} is neither an ISO-8601 time nor unix seconds") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(seconds):
        raise BadRequest(f"{name}: must be a finite number of unix seconds")
    return seconds


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        raise BadRequest(f"limit: {value[:32]!r} is not an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit: must be between 1 and {MAX_LIMIT}")
    return limit


def encode_cursor(position: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(f"{position[0]!r}/{position[1]}".encode()).decode().rstrip("=")


def _cursor(value: str | None) -> tuple[float, str] | None:
    if value is None:
        return None
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        start, event_id = text.split("/")
        position = (float(start), event_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("cursor: not a cursor this server returned") from None
    if not EVENT_ID.match(event_id) or not math.isfinite(position[0]):
        raise BadRequest("cursor: not a cursor this server returned")
    return position


def _query(camera: str | None, source: str | None, since: str | None, until: str | None,
           limit: str | None, cursor: str | None) -> EventQuery:
    if camera is not None and not 1 <= len(camera) <= MAX_NAME:
        raise BadRequest(f"camera: must be 1 to {MAX_NAME} characters")
    if source is not None and source not in EVENT_SOURCES:
        raise BadRequest(f"source: must be one of {', '.join(EVENT_SOURCES)}")
    start, end = _time("since", since), _time("until", until)
    if start is not None and end is not None and end <= start:
        raise BadRequest("until: must be later than since")
    return EventQuery(camera=camera, source=source, since=start, until=end, limit=_limit(limit),
                      cursor=_cursor(cursor))


# -- routes ---------------------------------------------------------------------------------------


@router.get("", response_model=EventPage, summary="Events, newest first (by start), paged",
            responses={400: {"model": ErrorResponse}})
async def list_events(
    services: ServicesDep, camera: str | None = None, source: str | None = None, since: str | None = None,
    until: str | None = None, limit: str | None = None, cursor: str | None = None,
) -> dict[str, Any]:
    """``since``/``until``: ISO-8601 (UTC when no zone is given) or unix seconds; an event is listed
    when its start lies in [since, until). ``limit``: 1 to 500 (default 50)."""
    query = _query(camera, source, since, until, limit, cursor)
    records, position = await asyncio.to_thread(services.events.store.list, query)
    return {"events": [record.to_json() for record in records],
            "next_cursor": encode_cursor(position) if position else None}


async def _picture_response(services: ServicesDep, event_id: str, name: str, media_type: str) -> Response:
    record = await _record(services, event_id)
    path = services.events.store.picture(event_id, name)
    try:
        data = await asyncio.to_thread(path.read_bytes) if path else None
    except FileNotFoundError:  # pruned meanwhile
        data = None
    if data is None:
        raise EventNotFound(f"event {event_id} has no {name}")
    # an open event's peak (and so its pictures) may still change
    cache = "no-cache" if record.state == "open" else "max-age=3600"
    return Response(data, media_type=media_type, headers={"Cache-Control": cache})


async def _record(services: ServicesDep, event_id: str) -> EventRecord:
    record = await asyncio.to_thread(services.events.store.get, event_id)
    if record is None:
        raise EventNotFound(f"no event {event_id[:64]!r}")
    return record


@router.get("/stream", summary="Server-Sent Events: every event opened, updated and closed from now on",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "event: opened|updated|closed, id: <event id>, data: <event JSON>"}})
async def event_stream(services: ServicesDep) -> StreamingResponse:
    bus = services.events.bus

    async def changes() -> AsyncIterator[str]:
        async with bus.subscribe() as queue:
            yield f"retry: {SSE_RETRY_MS}\n: subscribed\n\n"
            while True:
                try:
                    change = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield ": heartbeat\n\n"
                    continue
                if change is None:
                    return  # the server is stopping: the stream ends (the client reconnects, retry:)
                kind, event = change
                yield f"event: {kind}\nid: {event['id']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"

    # Starlette cancels the generator when the client disconnects (its listener for http.disconnect)
    return StreamingResponse(changes(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{event_id}", response_model=EventOut, summary="One event",
            responses={404: {"model": ErrorResponse}})
async def get_event(event_id: str, services: ServicesDep) -> dict[str, Any]:
    return (await _record(services, event_id)).to_json()


@router.get("/{event_id}/" + SNAPSHOT, summary="The event's peak frame (JPEG)", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorResponse}})
async def event_snapshot(event_id: str, services: ServicesDep) -> Response:
    return await _picture_response(services, event_id, SNAPSHOT, "image/jpeg")


@router.get("/{event_id}/" + HEATMAP, summary="The peak frame with its anomaly map over it (PNG)",
            response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse}})
async def event_heatmap(event_id: str, services: ServicesDep) -> Response:
    return await _picture_response(services, event_id, HEATMAP, "image/png")
