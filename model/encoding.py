"""Grayscale frames -> the model's input channels, stored as uint8 until a batch is formed.

- appearance: the grayscale intensity (the paper);
- motion: |frame_t - frame_t-1| times ``motion_gain``, clipped (a frame difference: cheap);
- flow: the magnitude of dense optical flow (Farneback) from frame t-1 to t, divided by
  ``flow_scale_px`` and clipped: speed in pixels per frame, insensitive to texture and contrast.

Keeping channels as uint8 holds a training set of thousands of frames in a few hundred MB; the scale
to the networks' [-1, 1] happens per batch in ``to_model_input``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

from model.config import ENCODINGS, ModelConfig


# Farneback settings (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma) and the scale the
# flow is computed at, one entry per ModelConfig.flow_preset. A version is trained and served with
# its own (v0001 with "farneback", newer versions with "farneback-1iter"); speed and Ped2 effect of
# each in docs/speed.md.
FLOW_PRESETS: dict[str, tuple[tuple[float, int, int, int, int, float], float]] = {
    "farneback": ((0.5, 3, 15, 3, 5, 1.2), 1.0),
    "farneback-1iter": ((0.5, 3, 15, 1, 5, 1.2), 1.0),
    "farneback-half": ((0.5, 2, 15, 3, 5, 1.2), 0.5),
}


def flow_magnitude(previous: np.ndarray, current: np.ndarray, preset: str) -> np.ndarray:
    (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma), scale = FLOW_PRESETS[preset]
    if scale != 1.0:
        size = (current.shape[1], current.shape[0])
        previous = cv2.resize(previous, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        current = cv2.resize(current, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    flow = cv2.calcOpticalFlowFarneback(previous, current, None, pyr_scale, levels, winsize, iterations,
                                        poly_n, poly_sigma, 0)
    magnitude = cv2.magnitude(flow[..., 0], flow[..., 1])
    if scale != 1.0:  # back to full resolution, in full-resolution pixels per frame
        magnitude = cv2.resize(magnitude, size, interpolation=cv2.INTER_LINEAR) / scale
    return magnitude


_FLOW_POOL: ThreadPoolExecutor | None = None
_FLOW_POOL_LOCK = threading.Lock()


def _flow_pool() -> ThreadPoolExecutor:
    """Threads computing the flows of a batch's frame pairs side by side (OpenCV releases the GIL).

    Creating it also turns OpenCV's own thread pool off (``cv2.setNumThreads(1)``, process-wide):
    Farneback's internal parallel loops were slower than one thread even for a single frame (19.4 vs
    17.1 ms at 360x240 on 2 cores) and halved the gain of running frames side by side (15.2 vs
    8.7 ms/frame); docs/speed.md."""
    global _FLOW_POOL
    with _FLOW_POOL_LOCK:
        if _FLOW_POOL is None:
            cv2.setNumThreads(1)
            _FLOW_POOL = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="vad-flow")
        return _FLOW_POOL


def resolve_encoding(choice: str, device: torch.device | str) -> str:
    """``auto`` -> ``torch`` on CUDA, ``opencv`` elsewhere; ``opencv`` and ``torch`` as asked."""
    if choice not in ENCODINGS:
        raise ValueError(f"unknown encoding {choice!r} (one of {ENCODINGS})")
    device = torch.device(device)
    if choice == "auto":
        return "torch" if device.type == "cuda" else "opencv"
    if choice == "torch" and device.type == "mps":
        raise ValueError("the torch encoding needs float64 (its Farneback solve), which MPS lacks: use opencv")
    return choice


def processing_size(height: int, width: int, config: ModelConfig) -> tuple[int, int]:
    """(height, width) frames are encoded at: ``config.frame_height`` rows, the aspect ratio kept."""
    if config.frame_height is None or config.frame_height == height:
        return height, width
    return config.frame_height, max(config.patch_size, int(round(width * config.frame_height / height)))


def to_processing_size(gray: np.ndarray, config: ModelConfig) -> np.ndarray:
    """(T, H, W) or (H, W) uint8 frames resized to the processing size (area averaging when shrinking)."""
    height, width = gray.shape[-2:]
    target = processing_size(height, width, config)
    if target == (height, width):
        return gray
    interpolation = cv2.INTER_AREA if target[0] < height else cv2.INTER_LINEAR
    resized = [cv2.resize(frame, (target[1], target[0]), interpolation=interpolation)
               for frame in gray.reshape(-1, height, width)]
    return np.stack(resized).reshape(*gray.shape[:-2], *target)


def motion_rate_factor(config: ModelConfig, fps: float | None) -> float:
    """Motion per frame at ``fps`` -> motion per frame at the footage's ``reference_fps``."""
    if config.reference_fps is None or fps is None or fps <= 0:
        return 1.0
    return fps / config.reference_fps


def encode_frames(
    gray: np.ndarray, config: ModelConfig, previous: np.ndarray | None = None, flow: str | None = None,
    fps: float | None = None,
) -> np.ndarray:
    """(T, H, W) uint8 grayscale -> (T, C, h, w) uint8 channels of ``config.input_mode``, at the
    processing size (``processing_size``).

    ``previous`` is the frame before gray[0] (a stream keeps it, at any size); without it the first
    frame is its own predecessor, so its motion channel is empty. ``flow``: a FLOW_PRESETS name
    overriding ``config.flow_preset`` (appearance+flow; an experiment, since it changes the model's
    input). ``fps``: the stream's frame rate, which scales motion to ``config.reference_fps``.
    """
    preset = flow or config.flow_preset
    if gray.ndim != 3 or gray.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W) uint8 frames, got {gray.dtype} {gray.shape}")
    gray = to_processing_size(gray, config)
    if previous is not None:
        previous = to_processing_size(previous, config)
    channels = [gray]
    if config.input_mode != "appearance":
        first = gray[:1] if previous is None else previous[None]
        before = np.concatenate([first, gray[:-1]])
        if config.input_mode == "appearance+motion":
            diff = np.abs(gray.astype(np.int16) - before.astype(np.int16)).astype(np.float32)
            motion = diff * (config.motion_gain * motion_rate_factor(config, fps))
        else:
            pairs = list(zip(before, gray))
            pool = _flow_pool()
            if len(pairs) > 1 and (os.cpu_count() or 1) > 1:
                flows = list(pool.map(lambda pair: flow_magnitude(pair[0], pair[1], preset), pairs))
            else:
                flows = [flow_magnitude(b, g, preset) for b, g in pairs]
            motion = np.stack(flows)
            motion *= 255.0 * motion_rate_factor(config, fps) / config.flow_scale_px
        channels.append(np.clip(motion, 0, 255).astype(np.uint8))
    return np.stack(channels, axis=1)


def to_model_input(channels: torch.Tensor) -> torch.Tensor:
    """uint8 channels in [0, 255] -> float32 in [-1, 1]."""
    return channels.float().mul_(2.0 / 255.0).sub_(1.0)
