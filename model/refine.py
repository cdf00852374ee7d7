"""The paper's answer to contaminated training footage: train, drop what the model rejects, fine-tune.

``drop_rejected`` scores every training frame with the first model (phase two included, calibrated
on the held-out normal frames as a published version would be) and keeps the frames at or below tau;
training then fine-tunes from the first model on what is kept (``refine_config``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from model.calibrate import clip_raw_scores, fit_calibration, frame_peaks
from model.config import CalibrationConfig, ModelConfig, TrainConfig
from model.data import EncodedClip
from model.networks import Detector, Refiner
from model.scoring import PatchScorer, causal_mean

REFINE_EPOCH_SHARE = 3  # fine-tuning runs a third of the first run's epochs (at least one)


def refine_config(train_config: TrainConfig) -> TrainConfig:
    """The fine-tuning run's settings."""
    return replace(train_config, max_epochs=max(1, train_config.max_epochs // REFINE_EPOCH_SHARE))


def drop_rejected(
    refiner: Refiner, detector: Detector, model_config: ModelConfig, calibration_config: CalibrationConfig,
    train_clips: list[EncodedClip], holdout: list[EncodedClip], device: torch.device,
) -> tuple[list[EncodedClip], list[list[Any]]]:
    """The training frames the first model accepts, and the [clip name, frame index] of every
    frame it flags as anomalous (dropped)."""
    scorer = PatchScorer(refiner, detector, model_config, device=device)
    calibration = fit_calibration(scorer, holdout, calibration_config)
    kept, dropped = [], []
    for clip in train_clips:
        raw, _ = clip_raw_scores(scorer, clip.channels)
        scores = causal_mean(frame_peaks(raw, calibration.score_mode, calibration), calibration.smoothing_frames)
        keep = scores <= calibration.threshold
        dropped += [[clip.name, clip.first_frame + int(i)] for i in np.flatnonzero(~keep)]
        if keep.sum() >= 1:
            kept.append(EncodedClip(clip.name, clip.channels[keep]))
    return kept, dropped
