"""POST /v1/clips: upload -> temp file -> decoder thread -> batched scoring -> JSON or NDJSON.

Bad input is refused as early as it can be seen: an over-size body while it streams in (413), an
unknown container from its first bytes (415), frame size and declared frame count from the container
header (422), then an undecodable first chunk (422) - all before the response starts. A clip that
goes wrong after an NDJSON response has started ends with an ``{"type": "error", ...}`` line.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from model.results import FrameResult, clip_frame_line, clip_summary
from service.deps import Services
from service.errors import ServiceError, error_body
from service.events.recorder import SourceEvents
from service.model_store import ServingModel
from service.pipeline import SOURCE_CLIP, ClipTimings, BatchedStream, iter_clip_results, read_first_chunk
from service.responses import ManagedStreamingResponse, json_response, ndjson_line
from service.schemas import ThumbnailMode
from service.thumbnails import ClipThumbnails
from service.uploads import SavedUpload, receive_file
from service.video import VideoLimits, VideoSource, sniff_video


def damage_report(source: VideoSource) -> dict[str, object]:
    """A clip whose container declares more frames than decoded (damaged or truncated data) is
    still scored as far as it decodes; the summary says so."""
    errors = source.decode_errors
    return {"damaged": errors > 0, "decode_errors": errors}


async def _open_upload(upload: SavedUpload, container: str, suffix: str, limits: VideoLimits) -> VideoSource:
    """Open the saved upload with OpenCV (in a thread); the temp file is gone afterwards either way."""
    path = upload.path.with_suffix(suffix)  # FFmpeg probes by content, the suffix only breaks ties
    try:
        os.replace(upload.path, path)
        return await asyncio.to_thread(VideoSource.open, path, container, limits)
    finally:
        upload.path.unlink(missing_ok=True)
        path.unlink(missing_ok=True)


class ClipEvents:
    """A clip upload's events, when it asked for them (``events=NAME``): each scored frame is observed
    at the upload's wall-clock time plus the frame's time in the clip."""

    def __init__(self, services: Services, name: str | None, model: ServingModel) -> None:
        self.source: SourceEvents | None = services.events.source("clip", name) if name else None
        self.model = model
        self.started_at = time.time()

    async def observe(self, gray: np.ndarray, result: FrameResult) -> None:
        if self.source is not None:
            await self.source.observe(gray, result, self.model, self.started_at + result.timestamp_s)

    async def finish(self) -> dict[str, list[str]]:
        """The clip ended: an open event closes; the summary's ``events`` field (none when not asked)."""
        if self.source is None:
            return {}
        await self.source.finish()
        return {"events": list(self.source.opened)}


async def _ndjson(
    results: AsyncIterator[tuple[np.ndarray, FrameResult]], model: ServingModel, source: VideoSource,
    scorer: BatchedStream, include_maps: bool, timings: ClipTimings, thumbnails: ClipThumbnails, events: ClipEvents,
) -> AsyncIterator[bytes]:
    done: list[FrameResult] = []
    try:
        async for gray, result in results:
            done.append(result)
            await events.observe(gray, result)
            yield ndjson_line(clip_frame_line(result, include_maps))
            if thumbnails.enabled and (thumbnail := await thumbnails.take(gray, result)) is not None:
                yield ndjson_line({"type": "thumbnail", **thumbnail})
    except ServiceError as exc:
        await events.finish()
        yield ndjson_line({"type": "error", **error_body(exc.code, exc.message)})
        return
    recorded = await events.finish()
    summary = clip_summary(model.version, model.threshold, source.fps, done, False, timings.as_dict(source, scorer),
                           include_frames=False)
    extra = thumbnails.summary() if thumbnails.enabled else {}
    yield ndjson_line({"type": "summary", **summary, **damage_report(source), **extra, **recorded})


async def clip_response(
    request: Request, services: Services, model: ServingModel, include_maps: bool, ndjson: bool,
    thumbnail_mode: ThumbnailMode = ThumbnailMode.none, events_name: str | None = None,
) -> Response:
    settings, batcher = services.settings, services.batcher
    assert services.upload_dir is not None
    timings = ClipTimings()
    upload = await receive_file(request, settings.max_upload_bytes, services.upload_dir)
    timings.upload_done()
    try:
        container, suffix = sniff_video(upload.head)
        admission = batcher.admit(SOURCE_CLIP)
    except BaseException:
        upload.path.unlink(missing_ok=True)
        raise
    try:
        limits = VideoLimits(settings.max_pixels, settings.max_frames, model.patch_size)
        source = await _open_upload(upload, container, suffix, limits)
    except BaseException:
        admission.release()
        raise

    async def release() -> None:
        admission.release()
        await asyncio.to_thread(source.close)

    try:
        first = await read_first_chunk(source, settings.clip_chunk_frames)
    except BaseException:
        await release()
        raise
    scorer = BatchedStream(model, batcher, services.metrics, SOURCE_CLIP, source.fps)
    results = iter_clip_results(source, scorer, settings.clip_chunk_frames, first)
    thumbnails = ClipThumbnails(thumbnail_mode, source, model, keep=not ndjson)
    events = ClipEvents(services, events_name, model)
    if ndjson:
        return ManagedStreamingResponse(
            _ndjson(results, model, source, scorer, include_maps, timings, thumbnails, events), release
        )
    frames: list[FrameResult] = []
    try:
        async for gray, result in results:
            frames.append(result)
            await events.observe(gray, result)
            if thumbnails.enabled:
                await thumbnails.take(gray, result)
    finally:
        recorded = await events.finish()
        await results.aclose()
        await release()
    summary = await asyncio.to_thread(  # maps of thousands of frames: built off the event loop
        clip_summary, model.version, model.threshold, source.fps, frames, include_maps, timings.as_dict(source, scorer)
    )
    extra = thumbnails.summary() if thumbnails.enabled else {}
    return await json_response({**summary, **damage_report(source), **extra, **recorded})
