"""Frames -> results through the shared batcher: the scoring path of every endpoint.

``BatchedStream`` is a model.scoring.FrameStream whose forward pass is a batcher job. With the OpenCV
encoding, prepare (motion channel + patch grid) runs in a worker thread and the patches are the job;
with the torch encoding the frames are the job, and the batcher's inference thread encodes every
chunk of a batch together on the device and finishes them together (calibrated scores, maps,
smoothing: model.scoring.finish_streams). With OpenCV, finish runs in a worker thread, so the event
loop only coordinates.
It is pinned to one ServingModel for its whole life.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from model.results import FrameResult
from model.scoring import FrameStream
from service.batcher import Batcher
from service.metrics import Metrics
from service.model_store import ServingModel
from service.errors import Undecodable
from service.video import VideoSource, decode_image

SOURCE_CLIP = "clip"
SOURCE_FRAME = "frame"
SOURCE_STREAM = "stream"
DEFAULT_FPS = 10.0  # FrameStream's default, for frames without a clip's fps


class BatchedStream:
    def __init__(
        self, model: ServingModel, batcher: Batcher, metrics: Metrics, source: str, fps: float = DEFAULT_FPS
    ) -> None:
        self.model = model
        self.stream = FrameStream(model.scorer, fps)
        self.batcher = batcher
        self.metrics = metrics
        self.source = source
        self.score_seconds = 0.0

    def carry_motion_from(self, other: "BatchedStream") -> None:
        """Continue ``other``'s motion channel (the same live stream, moved to another version)."""
        self.stream.carry_motion_from(other.stream)

    async def score_frame(self, gray: np.ndarray, index: int, fps: float) -> FrameResult:
        """One (H, W) frame of a live stream, frame ``index`` of a stream at ``fps``."""
        self.stream.seek(index, fps)
        (result,) = await self.score(gray[None])
        return result

    async def score(self, gray: np.ndarray) -> list[FrameResult]:
        """(T, H, W) uint8 frames, in stream order -> one result per frame."""
        started = time.perf_counter()
        if self.model.scorer.encoding == "torch":  # encoded, scored and finished with the batch's other streams
            results = await self.batcher.score_frames(self.model, self.stream, gray)
        else:  # OpenCV on this request's worker thread, in parallel with other requests
            patches, grid, count = await asyncio.to_thread(self.stream.prepare, gray)
            raw = await self.batcher.score(self.model, patches)
            results = await asyncio.to_thread(self.stream.finish, raw, grid, count)
        self.score_seconds += time.perf_counter() - started
        self.metrics.record_frames(self.source, len(results), sum(r.anomalous for r in results))
        return results


@dataclass
class ClipTimings:
    """Seconds spent receiving the upload, decoding (overlaps scoring), scoring, and in total."""

    started: float = field(default_factory=time.perf_counter)
    upload_s: float = 0.0

    def upload_done(self) -> None:
        self.upload_s = time.perf_counter() - self.started

    def as_dict(self, source: VideoSource, scorer: BatchedStream) -> dict[str, float]:
        return {
            "upload_s": round(self.upload_s, 4),
            "decode_s": round(source.decode_seconds, 4),
            "score_s": round(scorer.score_seconds, 4),
            "total_s": round(time.perf_counter() - self.started, 4),
        }


def _swallow(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so an abandoned read's error is not logged as unhandled


async def iter_clip_results(
    source: VideoSource, scorer: BatchedStream, chunk_frames: int, first: np.ndarray
) -> AsyncIterator[tuple[np.ndarray, FrameResult]]:
    """Score a clip chunk by chunk from its ``first`` chunk on, yielding each frame (H, W) with its
    result as its chunk is scored; the next chunk is decoded while the current one is scored. Only
    the current chunk's frames are held."""
    gray: np.ndarray | None = first
    read = asyncio.ensure_future(asyncio.to_thread(source.read, chunk_frames))
    try:
        while gray is not None:
            for frame, result in zip(gray, await scorer.score(gray)):
                yield frame, result
            gray = await read
            if gray is not None:
                read = asyncio.ensure_future(asyncio.to_thread(source.read, chunk_frames))
    finally:
        read.add_done_callback(_swallow)
        if not read.done():
            read.cancel()  # the read thread finishes its chunk; VideoSource.close waits for it


async def decode_frame(data: bytes, max_pixels: int, min_side: int) -> np.ndarray:
    """One encoded image -> (H, W) uint8 grayscale, decoded in a worker thread."""
    return await asyncio.to_thread(decode_image, data, max_pixels, min_side)


async def read_first_chunk(source: VideoSource, chunk_frames: int) -> np.ndarray:
    """The clip's first chunk, read before a response starts so an undecodable clip is a 422."""
    gray = await asyncio.to_thread(source.read, chunk_frames)
    if gray is None:
        raise Undecodable(f"the {source.container} file has no decodable frames")
    return gray
