"""What the model sees must not depend on a camera's resolution and frame rate by accident.

From the normal footage a version is trained on, this chooses:
- ``frame_height``, the processing scale: frames are resized so that moving things (people, on the
  cameras this is for) are about as tall as on UCSD Ped2, where the networks were designed: a median
  moving blob of ``TARGET_OBJECT_PX`` rows, about one patch. Never upscaled; at most
  ``MAX_FRAME_HEIGHT`` rows (a 4K camera is scored at a tenth of the cost, losing nothing a 30x30
  patch could see). A camera on which nothing moves keeps its size up to that cap.
- ``flow_scale_px``, the optical-flow speed that is full scale on the motion channel:
  ``FLOW_HEADROOM`` times the 99.9th percentile of the normal footage's flow, so the fastest normal
  movement sits well below saturation and faster things still rank above it (a fixed 4 px/frame
  saturated on ordinary walkers of a 768x576 street camera).
- ``reference_fps``, the footage's frame rate: a stream at another rate has its motion channel scaled
  to it (model/encoding.py), so a camera recording at half the rate does not look twice as fast.

On Ped2 the rule gives what the versions before it used by hand (240 rows, about 4 px/frame).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import cv2
import numpy as np

from model.config import ModelConfig
from model.encoding import flow_magnitude, processing_size, to_processing_size

TARGET_OBJECT_PX = 28.0  # Ped2's median moving-blob height at its native 240 rows (measured)
MAX_FRAME_HEIGHT = 480
KEEP_NATIVE_WITHIN = 1.25
FLOW_HEADROOM = 1.7
FLOW_QUANTILE = 0.999
SAMPLED_PAIRS = 120  # frame pairs measured (spread over the footage): a few seconds of flow
DIFFERENCE_LEVEL = 20  # grey levels of frame difference that count as movement
MIN_BLOB_AREA = 30  # pixels at native resolution; smaller blobs are noise


def _sampled_pairs(clips: list[np.ndarray], count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = [(clip, t) for clip in clips for t in range(1, clip.shape[0])]
    if not pairs:
        return []
    picks = np.unique(np.linspace(0, len(pairs) - 1, min(count, len(pairs))).round().astype(int))
    return [(pairs[i][0][pairs[i][1] - 1], pairs[i][0][pairs[i][1]]) for i in picks]


def moving_blob_heights(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Heights (rows) of the connected regions that change between consecutive frames."""
    heights: list[int] = []
    kernel = np.ones((5, 5), np.uint8)
    for before, after in pairs:
        moving = (cv2.absdiff(before, after) > DIFFERENCE_LEVEL).astype(np.uint8)
        moving = cv2.morphologyEx(moving, cv2.MORPH_CLOSE, kernel)
        _, _, stats, _ = cv2.connectedComponentsWithStats(moving)
        heights += [int(row[cv2.CC_STAT_HEIGHT]) for row in stats[1:] if row[cv2.CC_STAT_AREA] >= MIN_BLOB_AREA]
    return np.asarray(heights, dtype=np.float64)


def choose_frame_height(height: int, blob_heights: np.ndarray, patch_size: int) -> int:
    """The processing height for frames of ``height`` rows (module docstring). A scale within
    ``KEEP_NATIVE_WITHIN`` of 1 keeps the native size: resampling by a few percent changes nothing a
    patch can see, and the median blob height of a sample varies by that much."""
    scale = 1.0 if len(blob_heights) == 0 else min(1.0, TARGET_OBJECT_PX / float(np.median(blob_heights)))
    if scale >= 1 / KEEP_NATIVE_WITHIN:
        scale = 1.0
    chosen = min(int(round(height * scale)), MAX_FRAME_HEIGHT)
    return max(chosen, min(height, 2 * patch_size))


def fit_input_to_footage(
    config: ModelConfig, clips: list[np.ndarray], fps: float, frame_height: int | None = None
) -> tuple[ModelConfig, dict[str, Any]]:
    """``config`` with frame_height (unless given), reference_fps and, for flow input, flow_scale_px
    chosen from the normal footage ``clips`` ((T, H, W) uint8 each); and the figures behind them."""
    height = clips[0].shape[1]
    pairs = _sampled_pairs(clips, SAMPLED_PAIRS)
    blobs = moving_blob_heights(pairs)
    chosen_height = frame_height or choose_frame_height(height, blobs, config.patch_size)
    fitted = replace(config, frame_height=chosen_height, reference_fps=float(fps))
    report: dict[str, Any] = {
        "native_size": [int(clips[0].shape[2]), int(height)],
        "processing_size": list(processing_size(height, clips[0].shape[2], fitted))[::-1],
        "moving_blob_height_median_px": float(np.median(blobs)) if len(blobs) else None,
        "frame_height_chosen": "given" if frame_height else "from footage",
        "reference_fps": float(fps),
    }
    if config.input_mode == "appearance+flow" and pairs:
        speeds = np.concatenate([
            flow_magnitude(to_processing_size(a, fitted), to_processing_size(b, fitted), config.flow_preset).ravel()
            for a, b in pairs
        ])
        scale = FLOW_HEADROOM * float(np.quantile(speeds, FLOW_QUANTILE))
        fitted = replace(fitted, flow_scale_px=round(max(scale, 0.5), 3))
        report["flow_q999_px_per_frame"] = round(float(np.quantile(speeds, FLOW_QUANTILE)), 3)
        report["flow_scale_px"] = fitted.flow_scale_px
    return fitted, report


class MotionSaturation:
    """Share of moving values (>= 16 of 255) of the motion channel that sit at full scale (255), over
    the clips added one at a time (so a caller need not keep them); None without a motion channel."""

    def __init__(self) -> None:
        self.moving = self.saturated = 0
        self.has_motion = True

    def add(self, channels: np.ndarray) -> None:
        """(T, C, H, W) uint8 channels of one clip."""
        if channels.shape[1] < 2:
            self.has_motion = False
            return
        motion = channels[:, 1]
        self.moving += int(np.count_nonzero(motion >= 16))
        self.saturated += int(np.count_nonzero(motion == 255))

    @property
    def share(self) -> float | None:
        if not self.has_motion:
            return None
        return round(self.saturated / self.moving, 5) if self.moving else 0.0
