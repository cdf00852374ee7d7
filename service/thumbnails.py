"""Clip thumbnails (``POST /v1/clips?thumbnails=``): small JPEGs of a clip's frames, for a client
that cannot decode the clip itself (the web page and an MJPG AVI) to show what was flagged.

Frames are picked one by one as their chunk is scored, so only the encoded thumbnails are kept,
never the frames. At most MAX_THUMBNAILS in all:

- ``all``: every frame of a clip of up to MAX_THUMBNAILS frames; a longer one every s-th frame
  (s = ceil(expected frames / MAX_THUMBNAILS)), so the sample spans the whole clip.
- ``anomalous``: an even sample of up to MAX_THUMBNAILS / 2 frames (every s-th, as above) plus the
  anomalous frames off that sample, the first MAX_THUMBNAILS / 2 of them.

The expected frame count is the container's declared count (an estimate outside AVI/MP4/MOV, so
with the decoder's slack added), or VAD_MAX_FRAMES when it declares none. A clip longer than its
estimate stops getting thumbnails at the bound; a client shows a frame without one with the
nearest one that came (the web page does).
"""

from __future__ import annotations

import asyncio
import base64
import math

import numpy as np

from model.encoding import processing_size
from model.results import FrameResult
from service.model_store import ServingModel
from service.rendering import frame_jpeg
from service.schemas import ThumbnailMode
from service.video import DECLARED_FRAMES_SLACK, EXACT_COUNT_CONTAINERS, VideoSource

MAX_THUMBNAILS = 200
THUMBNAIL_SIDE = 240  # the longer side, in pixels (a Ped2 frame, 360 x 240, becomes 240 x 160)
THUMBNAIL_QUALITY = 80


def expected_frames(source: VideoSource) -> int:
    """How many frames the clip will have, as far as its container says (never over the limit)."""
    declared = source.declared_frames
    if declared <= 0:
        return source.limits.max_frames
    if source.container not in EXACT_COUNT_CONTAINERS:
        declared = math.ceil(declared * (1 + DECLARED_FRAMES_SLACK)) + 1
    return min(declared, source.limits.max_frames)


class ThumbnailPicker:
    """Decides, frame by frame in clip order, which frames get a thumbnail (see the module doc)."""

    def __init__(self, mode: ThumbnailMode, expected: int, limit: int = MAX_THUMBNAILS) -> None:
        self.mode = mode
        self.limit = limit if mode is not ThumbnailMode.none else 0
        self.sample_quota = self.limit if mode is ThumbnailMode.all else self.limit // 2
        self.anomalous_quota = self.limit - self.sample_quota
        self.stride = max(1, math.ceil(expected / max(1, self.sample_quota)))
        self.sampled = 0
        self.anomalous = 0

    @property
    def count(self) -> int:
        return self.sampled + self.anomalous

    def wants(self, result: FrameResult) -> bool:
        if self.count >= self.limit:
            return False
        if result.index % self.stride == 0 and self.sampled < self.sample_quota:
            self.sampled += 1
            return True
        if result.anomalous and self.anomalous < self.anomalous_quota:
            self.anomalous += 1
            return True
        return False


class ClipThumbnails:
    """The thumbnails of one clip upload: ``take`` each scored frame; the chosen ones are encoded (in a
    worker thread) and returned as ``{"index", "jpeg"}`` (base64), and kept in ``items`` when asked to."""

    def __init__(self, mode: ThumbnailMode, source: VideoSource, model: ServingModel, keep: bool) -> None:
        self.picker = ThumbnailPicker(mode, expected_frames(source))
        self.model = model
        self.keep = keep
        self.items: list[dict[str, object]] = []
        self.frame_size: tuple[int, int] | None = None  # (height, width) as decoded

    @property
    def enabled(self) -> bool:
        return self.picker.limit > 0

    async def take(self, gray: np.ndarray, result: FrameResult) -> dict[str, object] | None:
        self.frame_size = self.frame_size or (gray.shape[0], gray.shape[1])
        if not self.picker.wants(result):
            return None
        jpeg = await asyncio.to_thread(frame_jpeg, gray, THUMBNAIL_SIDE, THUMBNAIL_QUALITY)
        item: dict[str, object] = {"index": result.index, "jpeg": base64.b64encode(jpeg).decode("ascii")}
        if self.keep:
            self.items.append(item)
        return item

    def summary(self) -> dict[str, object]:
        """What the response's summary says about them: the count, and ``processed_size``, the frame
        size the maps' patch grid lies on (a thumbnail stretched to it lies under its map)."""
        body: dict[str, object] = {"thumbnail_count": self.picker.count}
        if self.frame_size is not None:
            height, width = processing_size(*self.frame_size, self.model.scorer.config)
            body["processed_size"] = {"width": width, "height": height}
        if self.keep:
            body["thumbnails"] = self.items
        return body
