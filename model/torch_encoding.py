"""model/encoding.py's encoding in torch, on any device: grey frames -> the model's uint8 channels.

The same numerical definition as ``encode_frames`` (OpenCV), so a version trained on one is served
with the other: resizing to the processing size by OpenCV's area / bilinear rules, the frame
difference, and Farneback flow ported from OpenCV (model/flow_torch.py), then the same scale, clip
and truncation to uint8. Measured agreement (tests/model/test_torch_encoding.py): appearance and
frame difference equal, resized frames within 1 grey level, the flow channel within 1 grey level on
all but a few pixels in a million.

A chunk's frame pairs run as one batch, and ``encode_stack`` takes several streams' chunks of one
size together; on CUDA the frames go to the device once and the channels stay there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from model.config import ModelConfig
from model.encoding import FLOW_PRESETS, motion_rate_factor, processing_size, to_processing_size
from model.flow_torch import farneback_flow_sequences


def pairs_per_pass(device: torch.device) -> int:
    """Frame pairs per flow pass: bounds the memory of a long clip or many streams (~20 MB per
    360x240 pair at the finest level: float64 box sums of 5 terms per pixel among others)."""
    return 256 if device.type == "cuda" else 16


@lru_cache(maxsize=32)
def area_weights(source: int, target: int, scale: float) -> np.ndarray:
    """(target, source) float64 weights of OpenCV's INTER_AREA along one axis (computeResizeAreaTab):
    each output cell averages the ``scale`` source pixels it covers, partial pixels by their share."""
    weights = np.zeros((target, source))
    for d in range(target):
        start = d * scale
        end = start + scale
        first, last = math.ceil(start), math.floor(end)
        cell = min(scale, source - start)
        if first - start > 1e-3:
            weights[d, first - 1] = (first - start) / cell
        for s in range(first, min(last, source)):
            weights[d, s] = 1.0 / cell
        if end - last > 1e-3 and last < source:
            weights[d, last] = min(min(end - last, 1.0), cell) / cell
    return weights


@lru_cache(maxsize=32)
def _device_area_weights(source: int, target: int, scale: float, device: torch.device) -> torch.Tensor:
    """``area_weights`` as a float32 tensor on ``device``, made once (not one host-to-device copy per
    call); read-only."""
    return torch.from_numpy(area_weights(source, target, scale)).float().to(device)


def enlarged_on_host(gray: np.ndarray | torch.Tensor, config: ModelConfig) -> np.ndarray | torch.Tensor:
    """(..., H, W) frames that the processing size enlarges, enlarged by OpenCV on the host; frames it
    shrinks or keeps, and tensors, as they are.

    The device's bilinear resize matches OpenCV's only within 1 grey level (OpenCV rounds its bilinear
    weights to fixed point, and its SIMD and scalar paths round differently), and Farneback turns
    that into a flow channel several levels apart: 200x300 frames enlarged to 240x360 had 10% of their
    pixels 1 level apart and the flow channel up to 12. Shrinking (area averaging) matches OpenCV's
    and stays on the device, where it saves the host a large frame's work."""
    if isinstance(gray, torch.Tensor) or processing_size(*gray.shape[-2:], config)[0] <= gray.shape[-2]:
        return gray
    return to_processing_size(gray, config)


def resize_frames(frames: torch.Tensor, height: int, width: int, factor: float | None = None) -> torch.Tensor:
    """(..., H, W) uint8 -> (..., height, width) uint8 as cv2.resize does it in ``to_processing_size``:
    area averaging when shrinking, bilinear when enlarging (within 1 grey level: OpenCV rounds its
    bilinear weights to fixed point). ``factor``: the scale cv2.resize was given (fx = fy), which it
    then uses instead of the ratio of the sizes."""
    source_height, source_width = frames.shape[-2:]
    if (height, width) == (source_height, source_width):
        return frames
    lead = frames.shape[:-2]
    x = frames.reshape(-1, 1, source_height, source_width).float()
    if height < source_height:
        scale_y, scale_x = (1 / factor, 1 / factor) if factor else (source_height / height, source_width / width)
        rows = _device_area_weights(source_height, height, scale_y, frames.device)
        cols = _device_area_weights(source_width, width, scale_x, frames.device)
        x = rows @ x @ cols.T
        if scale_y == scale_x == 2:
            # OpenCV's 2x2 fast path rounds halves up, (a + b + c + d + 2) >> 2; elsewhere to even
            return x.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).reshape(*lead, height, width)
    else:
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).reshape(*lead, height, width)


def flow_magnitude(frames: torch.Tensor, preset: str) -> torch.Tensor:
    """(S, T + 1, H, W) uint8 sequences -> (S, T, H, W) float32 speed in pixels per frame between
    consecutive frames, as model.encoding.flow_magnitude computes each pair."""
    (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma), scale = FLOW_PRESETS[preset]
    height, width = frames.shape[-2:]
    if scale != 1.0:
        frames = resize_frames(frames, int(round(height * scale)), int(round(width * scale)), factor=scale)
    pairs, limit = frames.shape[1] - 1, pairs_per_pass(frames.device)

    def run(piece: torch.Tensor) -> torch.Tensor:
        return farneback_flow_sequences(piece, pyr_scale, levels, winsize, iterations, poly_n, poly_sigma)

    if pairs > limit:  # long clips: each stream on its own, in pieces along time overlapping by one frame
        flow = torch.cat([torch.cat([run(frames[s : s + 1, t : t + limit + 1]) for t in range(0, pairs, limit)], 1)
                          for s in range(frames.shape[0])])
    else:  # whole sequences, as many per pass as fit
        step = limit // pairs
        flow = torch.cat([run(frames[s : s + step]) for s in range(0, frames.shape[0], step)])
    magnitude = (flow[:, :, 0] * flow[:, :, 0] + flow[:, :, 1] * flow[:, :, 1]).sqrt_()
    if scale != 1.0:  # back to full resolution, in full-resolution pixels per frame
        magnitude = F.interpolate(magnitude, size=(height, width), mode="bilinear", align_corners=False) / scale
    return magnitude


def encode_stack(
    gray: torch.Tensor, config: ModelConfig, previous: torch.Tensor | None = None, flow: str | None = None,
    fps: float | Sequence[float | None] | None = None,
) -> torch.Tensor:
    """(S, T, H, W) uint8 frames of S streams (one chunk each, one size) -> (S, T, C, h, w) uint8
    channels, on the frames' device. ``previous``: (S, H, W), each stream's frame before its chunk
    (None: the first frame is its own predecessor). ``fps``: one rate for all, or one per stream.
    All S * T frame pairs run as one batch."""
    if gray.dim() != 4 or gray.dtype != torch.uint8:
        raise ValueError(f"expected (S, T, H, W) uint8 frames, got {gray.dtype} {tuple(gray.shape)}")
    height, width = gray.shape[-2:]
    target = processing_size(height, width, config)
    gray = resize_frames(gray, *target)
    channels = [gray]
    if config.input_mode != "appearance":
        first = gray[:, :1] if previous is None else resize_frames(previous.to(gray.device), *target)[:, None]
        sequence = torch.cat([first, gray], 1)  # (S, T + 1, h, w)
        if config.input_mode == "appearance+motion":
            difference = (sequence[:, 1:].to(torch.int16) - sequence[:, :-1].to(torch.int16)).abs_().float()
            motion = difference * _per_stream(fps, lambda rate: config.motion_gain * rate, config, gray.device)
        else:
            motion = flow_magnitude(sequence, flow or config.flow_preset)
            motion = motion * _per_stream(fps, lambda rate: 255.0 * rate / config.flow_scale_px, config, gray.device)
        channels.append(motion.clamp_(0, 255).to(torch.uint8))
    return torch.stack(channels, 2)


def _per_stream(
    fps: float | Sequence[float | None] | None, factor: Callable[[float], float], config: ModelConfig,
    device: torch.device,
) -> float | torch.Tensor:
    """The motion scale ``factor(rate)`` for one fps, or an (S, 1, 1, 1) tensor of each stream's; each
    computed in Python floats first, so one stream's channel is the same alone or in a stack. Streams
    that all have one scale get it as a float (the same product, and no tensor made per batch)."""
    if fps is None or isinstance(fps, (int, float)):
        return factor(motion_rate_factor(config, fps))
    scales = [factor(motion_rate_factor(config, rate)) for rate in fps]
    if len(set(scales)) == 1:
        return scales[0]
    return torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1, 1)


def encode_frames_torch(
    gray: torch.Tensor | np.ndarray, config: ModelConfig, previous: torch.Tensor | np.ndarray | None = None,
    flow: str | None = None, fps: float | None = None, device: str | torch.device | None = None,
) -> torch.Tensor:
    """``encode_frames`` in torch: (T, H, W) uint8 frames -> (T, C, h, w) uint8 channels on ``device``
    (default: the frames' own device); numpy frames are moved there once."""
    gray = torch.as_tensor(enlarged_on_host(gray, config))
    if device is not None:
        gray = gray.to(device)
    if gray.dim() != 3 or gray.dtype != torch.uint8:
        raise ValueError(f"expected (T, H, W) uint8 frames, got {gray.dtype} {tuple(gray.shape)}")
    before = None if previous is None else torch.as_tensor(enlarged_on_host(previous, config)).to(gray.device)[None]
    return encode_stack(gray[None], config, before, flow=flow, fps=fps)[0]
