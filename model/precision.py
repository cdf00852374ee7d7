"""The check every CPU precision other than float32 passes at load, and the footage it is checked on.

The check scores a probe of real-like patches with the float32 networks and with the candidate, turns
both into the version's patch scores (its score mode and calibration, as served) and takes the largest
difference over the probe, relative to the score spread: tau minus the median normal frame score (the
way from a typical normal frame to an alarm). A frame's score is its worst patch averaged over a
window, so it moves by at most that much. Over ``TOLERANCE`` the engine runs float32 and logs why.

The probe is a synthetic scene encoded with the version's own encoding (motion channel included): a
textured static background with people-sized shapes walking across it, and, for the probe only, a
few fast large objects (anomaly-like motion), since anomalous patches are the ones a precision must
not flatten. The same generator at another seed, walkers only, is the int8 calibration's default
footage (model/quantize.py): normal by construction, deterministic, and stored nowhere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from model.config import ModelConfig
from model.encoding import encode_frames, to_model_input
from model.patches import to_patches

# Largest patch-score difference from float32, as a share of (tau - median normal frame score).
# 0.15: a frame then moves by under a sixth of the way from a typical normal frame to tau. Measured on
# v0003 over Ped2 test clip 04 (120 frames, 90 anomalous): bf16 autocast 0.06, int8 (normal calibration
# with stretched motion) 0.11, int8 calibrated on normal footage without the stretch 1.49 (anomalous
# patches clipped); Ped2 figures per precision: docs/speed.md, CPU precisions.
TOLERANCE = 0.15
PROBE_SEED, CALIBRATION_SEED = 1, 2
SCENE_HEIGHT, SCENE_WIDTH = 240, 360  # Ped2's size; encode_frames brings it to the version's processing size


def synthetic_scene(frames: int, seed: int, fast_objects: bool) -> np.ndarray:
    """(frames, 240, 360) uint8: a blurred textured background, walkers (10x24, 1-3 px per frame) and,
    with ``fast_objects``, bright 28x40 boxes moving 9-14 px per frame."""
    import cv2

    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(50, 200, (SCENE_HEIGHT, SCENE_WIDTH)).astype(np.uint8), (7, 7), 0)
    walkers = [(rng.uniform(0, SCENE_HEIGHT - 24), rng.uniform(0, SCENE_WIDTH - 10), rng.uniform(-2, 2),
                rng.uniform(-3, 3), rng.integers(10, 60)) for _ in range(10)]
    boxes = [(rng.uniform(0, SCENE_HEIGHT - 40), rng.uniform(0, SCENE_WIDTH - 28), rng.uniform(-5, 5),
              rng.choice([-1, 1]) * rng.uniform(9, 14), rng.integers(200, 255)) for _ in range(3)] if fast_objects else []
    out = []
    for t in range(frames):
        frame = background.astype(np.float32)
        for shapes, (h, w) in ((walkers, (24, 10)), (boxes, (40, 28))):
            for y, x, vy, vx, level in shapes:
                top = int((y + vy * t) % (SCENE_HEIGHT - h))
                left = int((x + vx * t) % (SCENE_WIDTH - w))
                frame[top : top + h, left : left + w] = level
        frame += rng.normal(0, 2, frame.shape)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(out)


def scene_patches(config: ModelConfig, frames: int, seed: int, fast_objects: bool) -> torch.Tensor:
    """The synthetic scene as the model's input: (N, C, P, P) float patches in [-1, 1], non-overlapping,
    the first frame (no predecessor, so no motion) left out."""
    channels = encode_frames(synthetic_scene(frames + 1, seed, fast_objects), config)[1:]
    return to_patches(to_model_input(torch.from_numpy(channels)), config.patch_size, config.patch_size)[0].contiguous()


def probe_patches(config: ModelConfig) -> torch.Tensor:
    """The check's probe: 6 frames of walkers and fast objects."""
    return scene_patches(config, 6, PROBE_SEED, fast_objects=True)


def _served_scores(raw: torch.Tensor, calibration: Any) -> torch.Tensor:
    """(N, 3) network components -> (N,) patch scores of the version's score mode. The motion component
    (not from the networks) is the same under every precision; zero stands in for it."""
    from model.scoring import patch_scores  # model.scoring builds engines: imported here, not at the top

    full = torch.cat([raw.float(), torch.zeros(raw.shape[0], 1)], 1)
    return patch_scores(full, calibration.score_mode, calibration)


def score_spread(calibration: Any) -> float:
    """tau minus the median normal frame score: ``map_width`` is that distance / ln 99 (model.scoring.sigmoid_width)."""
    return float(calibration.map_width) * math.log(99.0)


def score_difference(reference: torch.Tensor, candidate: torch.Tensor, calibration: Any | None) -> float:
    """Largest |patch score difference| / spread between two (N, 3) component tensors. Without a
    calibration (a scorer outside serving): the largest component difference over that component's
    standard deviation on the probe."""
    if calibration is None:
        spread = reference.float().std(0).clamp_min(1e-6)
        return float(((candidate.float() - reference.float()).abs() / spread).max())
    difference = (_served_scores(candidate, calibration) - _served_scores(reference, calibration)).abs().max()
    return float(difference) / max(score_spread(calibration), 1e-6)
