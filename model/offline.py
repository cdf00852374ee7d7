"""Offline clip scoring: `vad detect` and `vad eval` score whole clips through the same FrameStream as the
server (model/results.py owns the JSON they produce)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from model import registry
from model.data import read_footage
from model.results import FrameResult, clip_summary
from model.scoring import FrameStream, PatchScorer

FRAMES_PER_BATCH = 16


def scorer_for(loaded: registry.LoadedVersion, device: str | torch.device = "cpu", **options: Any) -> PatchScorer:
    """A PatchScorer for a loaded version; ``options``: PatchScorer keyword arguments (fused, skip, precision, cuda_graphs)."""
    return PatchScorer(loaded.refiner, loaded.detector, loaded.config, loaded.calibration, device, **options)


def iter_frame_results(scorer: PatchScorer, gray: np.ndarray, fps: float) -> Iterator[FrameResult]:
    """Score a clip in chunks, yielding each frame's result as soon as its chunk is done."""
    return FrameStream(scorer, fps).score_clip(gray, FRAMES_PER_BATCH)


def detect_file(
    path: str | Path, weights_dir: str | Path, version: str | None = None, device: str = "cpu",
    include_maps: bool = True, max_frames: int | None = None,
) -> dict[str, Any]:
    """Score one clip (video file or frame folder) with a version (default: the active one)."""
    started = time.perf_counter()
    version = version or registry.active_version(weights_dir)
    if version is None:
        raise registry.VersionNotFound(f"no published version in {weights_dir}")
    loaded = registry.load_version(weights_dir, version, device)
    clip = read_footage(path, max_frames)
    decoded = time.perf_counter()
    results = list(iter_frame_results(scorer_for(loaded, device), clip.gray, clip.fps))
    scored = time.perf_counter()
    timings = {
        "decode_s": round(decoded - started, 4),
        "score_s": round(scored - decoded, 4),
        "total_s": round(scored - started, 4),
    }
    return clip_summary(version, loaded.calibration.threshold, clip.fps, results, include_maps, timings)
