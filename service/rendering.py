"""Pictures of scored frames: the JPEG of a frame and its anomaly map drawn over it (PNG).

One drawing for every picture the server makes: event snapshots and heatmaps, and the thumbnails a
clip upload may ask for. The map is placed as the web page places it (service/static/js/heatmap.js):
cell (r, c) is centred on its patch, ``stride`` pixels wide, in the frame as the model saw it (the
processing size), which is scaled back to the frame's own size here.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from model.config import ModelConfig
from model.encoding import processing_size

JPEG_QUALITY = 85
OVERLAY_OPACITY = 0.55  # the map's weight over the frame where it is fully anomalous


@dataclass(frozen=True)
class MapGeometry:
    """Where a version's patch map lies on a frame of ``height`` x ``width`` pixels."""

    patch: int
    stride: int
    scale: float  # processing size / frame size

    @classmethod
    def of(cls, config: ModelConfig, height: int, width: int) -> "MapGeometry":
        processed_height, _ = processing_size(height, width, config)
        return cls(config.patch_size, config.stride, processed_height / height)


def _fitted(image: np.ndarray, max_side: int | None) -> np.ndarray:
    if max_side is None or max(image.shape[:2]) <= max_side:
        return image
    factor = max_side / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def frame_jpeg(gray: np.ndarray, max_side: int | None = None, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W) uint8 -> JPEG bytes, shrunk so its longer side is at most ``max_side``."""
    ok, data = cv2.imencode(".jpg", _fitted(gray, max_side), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("the frame could not be encoded as JPEG")
    return data.tobytes()


def map_overlay(gray: np.ndarray, patch_map: np.ndarray, geometry: MapGeometry) -> np.ndarray:
    """(H, W) grey frame and (rows, cols) map in [0, 1] -> (H, W, 3) BGR: the frame in grey with the
    map as a heat haze over it (transparent where the map is 0)."""
    height, width = gray.shape
    rows, cols = patch_map.shape
    cells = np.clip(patch_map, 0.0, 1.0).astype(np.float32)
    # the map in frame pixels: cell (r, c) covers [r*stride, (r+1)*stride) shifted by (patch-stride)/2
    cell = geometry.stride / geometry.scale
    offset = (geometry.patch - geometry.stride) / 2 / geometry.scale
    covered = (max(1, round(cols * cell)), max(1, round(rows * cell)))
    heat = cv2.resize(cells, covered, interpolation=cv2.INTER_LINEAR)
    canvas = np.zeros((height, width), np.float32)
    top, left = round(offset), round(offset)
    bottom, right = min(height, top + heat.shape[0]), min(width, left + heat.shape[1])
    canvas[top:bottom, left:right] = heat[: bottom - top, : right - left]
    colours = cv2.applyColorMap(np.round(canvas * 255).astype(np.uint8), cv2.COLORMAP_JET).astype(np.float32)
    weight = (canvas * OVERLAY_OPACITY)[..., None]
    frame = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR).astype(np.float32)
    return np.round(frame * (1 - weight) + colours * weight).astype(np.uint8)


def heatmap_png(gray: np.ndarray, patch_map: np.ndarray, geometry: MapGeometry, max_side: int | None = None) -> bytes:
    """The anomaly map drawn over its frame, as PNG bytes."""
    ok, data = cv2.imencode(".png", _fitted(map_overlay(gray, patch_map, geometry), max_side))
    if not ok:
        raise ValueError("the heatmap could not be encoded as PNG")
    return data.tobytes()
