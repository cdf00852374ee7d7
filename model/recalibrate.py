"""Re-calibrate a published version on normal footage: same weights, new score mode / tau.

Publishes a new version (parent = the old one) whose networks are the old one's and whose calibration
comes from the held-out blocks of each given clip, exactly as at the end of training. Useful when the
camera's normal activity drifts, or to serve another score mode of the same networks.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from model import registry
from model.calibrate import fit_calibration
from model.data import encode_clips, footage_digest, load_normal_footage, split_holdout
from model.scoring import PatchScorer


def recalibrate(
    weights_dir: str | Path, version: str, normal_paths: list[str | Path], **overrides: Any
) -> str:
    """Publish ``version``'s networks with a calibration fitted on ``normal_paths``; returns the new
    name. ``overrides``: CalibrationConfig fields (score_mode, smoothing_frames, false_alarm_rate)."""
    loaded = registry.load_version(weights_dir, version)
    manifest = loaded.parsed_manifest
    settings = replace(manifest.calibration_config, **overrides)
    settings.check_input(loaded.config)
    clips = load_normal_footage(list(normal_paths))
    _, holdout = split_holdout(encode_clips(clips, loaded.config), manifest.train_config.holdout_fraction)
    scorer = PatchScorer(loaded.refiner, loaded.detector, loaded.config, device="cpu")
    calibration = fit_calibration(scorer, holdout, settings)
    recalibrated_on = {"sha256": footage_digest(clips), "clips": len(clips),
                       "holdout_frames": int(sum(c.frames for c in holdout))}
    return registry.publish(weights_dir, loaded.refiner, loaded.detector,
                            manifest.recalibrated(version, settings, calibration, recalibrated_on))
