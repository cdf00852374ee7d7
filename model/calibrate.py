"""Threshold (tau) and reject band from held-out NORMAL footage only.

tau is the frame score that a share ``false_alarm_rate`` of held-out normal frames exceeds; the reject
band spans the scores exceeded by ``reject_band`` = (low, high) shares of them. Test labels never
enter here: they are used only by model/evaluate.py to report figures.
"""

from __future__ import annotations

import numpy as np
import torch

from model.config import CalibrationConfig
from model.data import EncodedClip
from model.patches import GridShape
from model.scoring import COMPONENTS, Calibration, PatchScorer, causal_mean, patch_scores, sigmoid_width

FRAMES_PER_CHUNK = 32


def clip_raw_scores(scorer: PatchScorer, channels: np.ndarray) -> tuple[torch.Tensor, GridShape]:
    """(T, C, H, W) uint8 channels of one clip -> ((T, patches per frame, 3) components, grid)."""
    parts = []
    grid = GridShape(0, 0)
    for start in range(0, channels.shape[0], FRAMES_PER_CHUNK):
        patches, grid = scorer.frame_patches(channels[start : start + FRAMES_PER_CHUNK])
        parts.append(scorer.raw_scores(patches))
    raw = torch.cat(parts)
    return raw.view(channels.shape[0], grid.rows * grid.cols, len(COMPONENTS)), grid


def frame_peaks(raw: torch.Tensor, mode: str, calibration: Calibration | None) -> np.ndarray:
    """(T, N, 3) components -> (T,) frame scores before smoothing: the most anomalous patch."""
    frames, per_frame, _ = raw.shape
    scores = patch_scores(raw.reshape(-1, len(COMPONENTS)), mode, calibration)
    return scores.view(frames, per_frame).max(1).values.numpy().astype(np.float64)


def component_statistics(raws: list[torch.Tensor]) -> tuple[dict[str, float], dict[str, float]]:
    """Median and standard deviation of each component's frame peaks on held-out normal frames.

    Frame statistics rather than patch statistics: a frame's score is its most anomalous patch, so
    what the fused score must put on one scale is how each component's maximum varies over normal
    frames (most patches are static background and say nothing about that tail).
    """
    center, scale = {}, {}
    for name in COMPONENTS:
        peaks = np.concatenate([frame_peaks(raw, name, None) for raw in raws])
        center[name] = float(np.median(peaks))
        scale[name] = max(float(np.std(peaks)), 1e-6)
    return center, scale


def threshold_from_normal(
    scores: np.ndarray, false_alarm_rate: float, reject_band: tuple[float, float]
) -> tuple[float, tuple[float, float]]:
    """tau exceeded by ``false_alarm_rate`` of normal frame scores; the band between the scores
    exceeded by the band's (high, low) rates."""
    if len(scores) == 0:
        raise ValueError("no normal frame scores to calibrate on")
    low_rate, high_rate = reject_band
    threshold = float(np.quantile(scores, 1 - false_alarm_rate))
    band = (float(np.quantile(scores, 1 - high_rate)), float(np.quantile(scores, 1 - low_rate)))
    return threshold, band


def fit_calibration(
    scorer: PatchScorer, holdout: list[EncodedClip], settings: CalibrationConfig
) -> Calibration:
    """Calibrate ``settings.score_mode`` on held-out normal clips."""
    raws = [clip_raw_scores(scorer, clip.channels)[0] for clip in holdout if clip.frames > 0]
    if not raws:
        raise ValueError("no held-out normal frames to calibrate on")
    center, scale = component_statistics(raws)
    draft = Calibration(
        score_mode=settings.score_mode,
        threshold=0.0,
        reject_band=(0.0, 0.0),
        smoothing_frames=settings.smoothing_frames,
        component_center=center,
        component_scale=scale,
        map_width=1.0,
        false_alarm_rate=settings.false_alarm_rate,
        fusion_weights=dict(settings.fusion_weights),
    )
    per_segment = [causal_mean(frame_peaks(raw, draft.score_mode, draft), draft.smoothing_frames) for raw in raws]
    scores = np.concatenate(per_segment)
    threshold, band = threshold_from_normal(scores, settings.false_alarm_rate, settings.reject_band)
    median = float(np.median(scores))
    return Calibration(
        score_mode=draft.score_mode,
        threshold=threshold,
        reject_band=band,
        smoothing_frames=draft.smoothing_frames,
        component_center=center,
        component_scale=scale,
        map_width=sigmoid_width(threshold, median),
        false_alarm_rate=settings.false_alarm_rate,
        normal_frame_quantiles={
            "q50": median,
            "q90": float(np.quantile(scores, 0.9)),
            "q99": float(np.quantile(scores, 0.99)),
            "frames": float(len(scores)),
        },
        fusion_weights=dict(settings.fusion_weights),
        holdout_check=second_slice_check(per_segment, settings.false_alarm_rate),
    )


def second_slice_check(per_segment: list[np.ndarray], false_alarm_rate: float) -> dict[str, float]:
    """Does a tau hold beyond the frames it was drawn from? The held-out segments are dealt into two
    slices (alternately, so both span the footage); tau drawn from each at ``false_alarm_rate`` is
    applied to the other, and the false-alarm rates measured there are reported."""
    slices = [per_segment[0::2], per_segment[1::2]]
    if not slices[1]:
        return {}
    rates = []
    for fit, check in (slices, slices[::-1]):
        tau = float(np.quantile(np.concatenate(fit), 1 - false_alarm_rate))
        rates.append(float((np.concatenate(check) > tau).mean()))
    return {"asked": false_alarm_rate, "slice_a_tau_on_b": round(rates[0], 4),
            "slice_b_tau_on_a": round(rates[1], 4), "mean": round(float(np.mean(rates)), 4)}
