"""Dense Farneback optical flow in torch, ported from OpenCV's ``cv::calcOpticalFlowFarneback``
(modules/video/src/optflowgf.cpp, the CPU path without ``OPTFLOW_FARNEBACK_GAUSSIAN`` and without
an initial flow), batched: many frame pairs in one pass, on any torch device.

The steps are OpenCV's, in its order and with its border rules:
- pyramid: level k is the full-resolution frame blurred with OpenCV's Gaussian for that level
  (sigma = (1/scale - 1) / 2, kernel cvRound(5 sigma) | 1, at least 3; reflect-101 border) and
  resized bilinearly to cvRound(size * scale); levels stop before a side gets under 32 pixels;
- ``FarnebackPolyExp``: the quadratic polynomial expansion by separable Gaussian-weighted moments
  (poly_n, poly_sigma), replicated border;
- ``FarnebackUpdateMatrices``: the 5 per-pixel terms from both expansions at the displaced position
  (bilinear, falling back to the first frame's expansion outside), damped on a 5-pixel border;
- ``FarnebackUpdateFlow_Blur``: a (2 * (winsize // 2) + 1)^2 box filter (replicated border, scaled by
  1 / winsize^2) of those terms, solved per pixel for the flow; ``iterations`` times per level,
  the terms refreshed from the new flow between iterations;
- the coarser level's flow, resized bilinearly and divided by pyr_scale, starts the next level.

As in OpenCV, the box sums and the 2x2 solve run in float64, the rest in float32. The uint8 flow channel this feeds agrees with OpenCV's within the bounds
tests/model/test_torch_encoding.py states.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

MIN_LEVEL_SIDE = 32  # OpenCV: a pyramid level stops before a side gets under this
_BORDER = (0.14, 0.14, 0.4472, 0.4472, 0.4472)  # FarnebackUpdateMatrices' edge damping


def cv_round(value: float) -> int:
    """cvRound: to nearest, ties to even (Python's round does the same)."""
    return int(round(value))


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """cv::getGaussianKernel(size, sigma, CV_32F): OpenCV's fixed small kernels when sigma <= 0."""
    fixed = {1: [1.0], 3: [0.25, 0.5, 0.25], 5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
             7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125]}
    if sigma <= 0 and size in fixed:
        return np.asarray(fixed[size], dtype=np.float32)
    sigma = sigma if sigma > 0 else ((size - 1) * 0.5 - 1) * 0.3 + 0.8
    x = np.arange(size, dtype=np.float64) - (size - 1) * 0.5
    kernel = np.exp(-x * x / (2 * sigma * sigma))
    return (kernel / kernel.sum()).astype(np.float32)


@lru_cache(maxsize=16)
def poly_expansion_terms(n: int, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """FarnebackPrepareGaussian: the float32 taps g, x g, x^2 g and (ig11, ig03, ig33, ig55) of the
    inverse moment matrix, computed in double from the float taps as OpenCV does."""
    if sigma < np.finfo(np.float32).eps:
        sigma = n * 0.3
    x = np.arange(-n, n + 1)
    g = np.exp(-(x * x) / (2 * sigma * sigma)).astype(np.float32)
    g = (g.astype(np.float64) / float(np.sum(g.astype(np.float64)))).astype(np.float32)
    xg = (x * g.astype(np.float64)).astype(np.float32)
    xxg = (x * x * g.astype(np.float64)).astype(np.float32)
    gd = g.astype(np.float64)
    outer = np.outer(gd, gd)
    xx = np.broadcast_to((x * x).astype(np.float64), outer.shape)
    yy = xx.T
    G = np.zeros((6, 6))
    G[0, 0] = outer.sum()
    G[1, 1] = (outer * xx).sum()
    G[3, 3] = (outer * xx * xx).sum()
    G[5, 5] = (outer * xx * yy).sum()
    G[2, 2] = G[0, 3] = G[0, 4] = G[3, 0] = G[4, 0] = G[1, 1]
    G[4, 4] = G[3, 3]
    G[3, 4] = G[4, 3] = G[5, 5]
    inverse = np.linalg.inv(G)
    return g, xg, xxg, (inverse[1, 1], inverse[0, 3], inverse[3, 3], inverse[5, 5])


def _separable(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, 1, H, W) filtered by a 1-D ``kernel`` vertically, then horizontally, border ``mode``."""
    half = kernel.shape[-1] // 2
    x = F.pad(x, (0, 0, half, half), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = F.pad(x, (half, half, 0, 0), mode=mode)
    return F.conv2d(x, kernel.view(1, 1, 1, -1))


@lru_cache(maxsize=64)
def _device_taps(device: torch.device, *taps: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Filter taps as float32 tensors on ``device``, made once (not one host-to-device copy per call)."""
    return tuple(torch.tensor(t, dtype=torch.float32, device=device) for t in taps)


def pyramid_level(frames: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, 1, H, W) float32 frames -> OpenCV's pyramid image at ``scale``: blurred at full size, then resized."""
    sigma = (1.0 / scale - 1) * 0.5
    size = max(cv_round(sigma * 5) | 1, 3)
    (kernel,) = _device_taps(frames.device, tuple(gaussian_kernel(size, sigma).tolist()))
    blurred = _separable(frames, kernel, "reflect")  # reflect = OpenCV's BORDER_REFLECT_101
    height, width = cv_round(frames.shape[-2] * scale), cv_round(frames.shape[-1] * scale)
    if (height, width) == tuple(frames.shape[-2:]):
        return blurred
    return F.interpolate(blurred, size=(height, width), mode="bilinear", align_corners=False)


def poly_expansion(image: torch.Tensor, n: int, sigma: float) -> torch.Tensor:
    """FarnebackPolyExp: (N, 1, H, W) -> (N, 5, H, W), OpenCV's channel order (r2 .. r6 of the paper's
    quadratic fit: y and x gradient terms, then the xx/yy/xy terms, as its UpdateMatrices reads them)."""
    g, xg, xxg, (ig11, ig03, ig33, ig55) = poly_expansion_terms(n, sigma)
    g, xg, xxg = (tuple(t.tolist()) for t in (g, xg, xxg))
    # columns: v0 = sum g I, v1 = sum (k g) I, v2 = sum (k^2 g) I (k: the row offset), each then
    # filtered along rows with the kernels its moments need
    vertical, horizontal = _device_taps(image.device, (g, g, g, xg, xg, xxg), (g, xg, xxg, g, xg, g))
    x = F.pad(image, (0, 0, n, n), mode="replicate")
    x = F.conv2d(x, vertical.view(6, 1, -1, 1))
    x = F.pad(x, (n, n, 0, 0), mode="replicate")
    b1, b2, b4, b3, b6, b5 = F.conv2d(x, horizontal.view(6, 1, 1, -1), groups=6).unbind(1)
    return torch.stack([b3 * ig11, b2 * ig11, b1 * ig03 + b5 * ig33, b1 * ig03 + b4 * ig33, b6 * ig55], 1)


@lru_cache(maxsize=32)
def _border_scale(height: int, width: int, device: torch.device) -> torch.Tensor:
    def axis(length: int) -> torch.Tensor:
        scale = torch.ones(length)
        for i, value in enumerate(_BORDER[: min(len(_BORDER), length)]):
            scale[i] *= value
            scale[length - 1 - i] *= value
        return scale

    return (axis(height)[:, None] * axis(width)[None, :]).to(device)


def update_matrices(r0: torch.Tensor, r1: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """FarnebackUpdateMatrices: expansions (N, 5, H, W) of both frames and the flow (N, 2, H, W) ->
    the (N, 5, H, W) terms [G11, G12, G22, h1, h2] the flow is solved from."""
    count, _, height, width = r0.shape
    device = r0.device
    dx, dy = flow[:, 0], flow[:, 1]
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, -1)
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, -1, 1)
    fx, fy = xs + dx, ys + dy
    x1, y1 = torch.floor(fx), torch.floor(fy)
    fx, fy = fx - x1, fy - y1
    x1, y1 = x1.long(), y1.long()
    inside = (x1 >= 0) & (x1 < width - 1) & (y1 >= 0) & (y1 < height - 1)
    base = (y1.clamp(0, height - 2) * width + x1.clamp(0, width - 2)).view(count, 1, -1).expand(-1, 5, -1)
    flat = r1.reshape(count, 5, -1)

    def corner(offset: int) -> torch.Tensor:
        return flat.gather(2, base + offset).view(count, 5, height, width)

    a00, a01 = ((1 - fx) * (1 - fy)).unsqueeze(1), (fx * (1 - fy)).unsqueeze(1)
    a10, a11 = ((1 - fx) * fy).unsqueeze(1), (fx * fy).unsqueeze(1)
    sampled = a00 * corner(0) + a01 * corner(1) + a10 * corner(width) + a11 * corner(width + 1)
    # outside: OpenCV takes the first frame's own expansion (and no displacement term)
    r2 = torch.where(inside, sampled[:, 0], 0.0)
    r3 = torch.where(inside, sampled[:, 1], 0.0)
    r4 = torch.where(inside, (r0[:, 2] + sampled[:, 2]) * 0.5, r0[:, 2])
    r5 = torch.where(inside, (r0[:, 3] + sampled[:, 3]) * 0.5, r0[:, 3])
    r6 = torch.where(inside, (r0[:, 4] + sampled[:, 4]) * 0.25, r0[:, 4] * 0.5)
    r2 = (r0[:, 0] - r2) * 0.5
    r3 = (r0[:, 1] - r3) * 0.5
    r2 = r2 + r4 * dy + r6 * dx
    r3 = r3 + r6 * dy + r5 * dx
    scale = _border_scale(height, width, device)
    r2, r3, r4, r5, r6 = (r * scale for r in (r2, r3, r4, r5, r6))
    return torch.stack([r4 * r4 + r6 * r6, (r4 + r5) * r6, r5 * r5 + r6 * r6, r4 * r2 + r6 * r3, r6 * r2 + r5 * r3], 1)


def box_sum(x: torch.Tensor, half: int) -> torch.Tensor:
    """Sums over (2 half + 1)^2 windows of (N, C, H, W), replicated border, in float64: OpenCV's
    running double sums (cumulative sums, so the cost does not grow with the window)."""
    side = 2 * half + 1
    x = F.pad(x, (half, half, half, half), mode="replicate").double()
    x = F.pad(x.cumsum(2), (0, 0, 1, 0))
    x = x[:, :, side:] - x[:, :, :-side]
    x = F.pad(x.cumsum(3), (1, 0))
    return x[..., side:] - x[..., :-side]


def solve_flow(matrices: torch.Tensor, block_size: int) -> torch.Tensor:
    """FarnebackUpdateFlow_Blur's solve: the terms (N, 5, H, W), box-filtered -> flow (N, 2, H, W)."""
    # OpenCV sums a (2 (block_size // 2) + 1)^2 window and scales by 1 / block_size^2
    g11, g12, g22, h1, h2 = (box_sum(matrices, block_size // 2) / (block_size * block_size)).unbind(1)
    inverse = 1.0 / (g11 * g22 - g12 * g12 + 1e-3)
    return torch.stack([(g11 * h2 - g12 * h1) * inverse, (g22 * h1 - g12 * h2) * inverse], 1).float()


def farneback_flow(
    previous: torch.Tensor, current: torch.Tensor, pyr_scale: float, levels: int, winsize: int,
    iterations: int, poly_n: int, poly_sigma: float,
) -> torch.Tensor:
    """Flow from ``previous`` to ``current``, (N, H, W) frames (any dtype; values 0..255) -> (N, 2, H, W)
    float32 (x, y) in pixels, as ``cv2.calcOpticalFlowFarneback(prev, next, None, pyr_scale, levels,
    winsize, iterations, poly_n, poly_sigma, 0)`` computes it for each pair."""
    if previous.shape != current.shape or previous.dim() != 3:
        raise ValueError(f"expected two (N, H, W) stacks of one shape, got {tuple(previous.shape)} and {tuple(current.shape)}")
    return farneback_flow_sequences(torch.stack([previous, current], 1), pyr_scale, levels, winsize, iterations,
                                    poly_n, poly_sigma).squeeze(1)


def farneback_flow_sequences(
    frames: torch.Tensor, pyr_scale: float, levels: int, winsize: int, iterations: int, poly_n: int, poly_sigma: float,
) -> torch.Tensor:
    """Flows between consecutive frames of S sequences, (S, T + 1, H, W) -> (S, T, 2, H, W), all S * T
    pairs in one batch; each frame's pyramid and expansion is computed once for the two pairs it is in."""
    if frames.dim() != 4 or frames.shape[1] < 2:
        raise ValueError(f"expected (S, T + 1, H, W) frames with T >= 1, got {tuple(frames.shape)}")
    if not 0 < pyr_scale < 1:
        raise ValueError(f"pyr_scale must be within (0, 1), got {pyr_scale}")
    if frames.device.type == "cuda":
        # float32 means float32: with cuDNN's TF32 convolutions (torch's default) the uint8 flow
        # channel differed from OpenCV's by up to 21 grey levels on Ped2 (H200), against 1 without.
        # Process-wide, as InferenceEngine sets it for float32 networks.
        torch.backends.cudnn.allow_tf32 = False
    streams, length, height, width = frames.shape
    stack = frames.reshape(-1, 1, height, width).float()
    # rows of the stack that start a pair (t, t + 1) within one sequence
    index = torch.arange(streams * length, device=frames.device).view(streams, length)
    first, second = index[:, :-1].flatten(), index[:, 1:].flatten()
    scale, usable = 1.0, 0
    for usable in range(levels):
        scale *= pyr_scale
        if width * scale < MIN_LEVEL_SIDE or height * scale < MIN_LEVEL_SIDE:
            break
    else:
        usable = levels
    flow: torch.Tensor | None = None
    for level in range(usable, -1, -1):
        scale = math.prod([pyr_scale] * level)  # multiplied step by step as OpenCV does: the same float
        expansion = poly_expansion(pyramid_level(stack, scale), poly_n, poly_sigma)
        r0, r1 = expansion[first], expansion[second]
        level_size = tuple(expansion.shape[-2:])
        if flow is None:
            flow = expansion.new_zeros(r0.shape[0], 2, *level_size)
        else:
            flow = F.interpolate(flow, size=level_size, mode="bilinear", align_corners=False) * (1.0 / pyr_scale)
        matrices = update_matrices(r0, r1, flow)
        for iteration in range(iterations):
            flow = solve_flow(matrices, winsize)
            if iteration < iterations - 1:
                matrices = update_matrices(r0, r1, flow)
    assert flow is not None
    return flow.view(streams, length - 1, 2, *flow.shape[-2:])
