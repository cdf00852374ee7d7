"""Grayscale frames -> the model's input channels, stored as uint8 until a batch is formed.

- appearance: the grayscale intensity (the paper);
- motion: |frame_t - frame_t-1| times ``motion_gain``, clipped (a frame difference: cheap);
- flow: the magnitude of dense optical flow (Farneback) from frame t-1 to t, divided by
  ``flow_scale_px`` and clipped: speed in pixels per frame, insensitive to texture and contrast.

Keeping channels as uint8 holds a training set of thousands of frames in a few hundred MB; the scale
to the networks' [-1, 1] happens per batch in ``to_model_input``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from model.config import ModelConfig


def _flow_magnitude(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    flow = cv2.calcOpticalFlowFarneback(previous, current, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return cv2.magnitude(flow[..., 0], flow[..., 1])


def encode_frames(
    gray: np.ndarray, config: ModelConfig, previous: np.ndarray | None = None
) -> np.ndarray:
    """(T, H, W) uint8 grayscale -> (T, C, H, W) uint8 channels of ``config.input_mode``.

    ``previous`` is the frame before gray[0] (a stream keeps it); without it the first frame is its
    own predecessor, so its motion channel is empty.
    """
    if gray.ndim != 3 or gray.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W) uint8 frames, got {gray.dtype} {gray.shape}")
    channels = [gray]
    if config.input_mode != "appearance":
        first = gray[:1] if previous is None else previous[None]
        before = np.concatenate([first, gray[:-1]])
        if config.input_mode == "appearance+motion":
            diff = np.abs(gray.astype(np.int16) - before.astype(np.int16)).astype(np.float32)
            motion = diff * config.motion_gain
        else:
            motion = np.stack([_flow_magnitude(b, g) for b, g in zip(before, gray)])
            motion *= 255.0 / config.flow_scale_px
        channels.append(np.clip(motion, 0, 255).astype(np.uint8))
    return np.stack(channels, axis=1)


def to_model_input(channels: torch.Tensor) -> torch.Tensor:
    """uint8 channels in [0, 255] -> float32 in [-1, 1]."""
    return channels.float().mul_(2.0 / 255.0).sub_(1.0)
