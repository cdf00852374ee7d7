"""Re-calibrate a published version on normal footage: same weights, new score mode / tau.

Publishes a new version (parent = the old one) whose networks are the old one's and whose calibration
comes from the held-out tail of each given clip, exactly as at the end of training. Useful when the
camera's normal activity drifts, or to serve another score mode of the same networks.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from model import registry
from model.calibrate import fit_calibration
from model.config import ConfigError, TrainConfig
from model.data import encode_clips, footage_digest, split_holdout
from model.scoring import Scorer
from model.train import _jsonable, load_normal_footage


def recalibrate(
    weights_dir: str | Path, version: str, normal_paths: list[str | Path], **overrides: Any
) -> str:
    """Publish ``version``'s networks with a calibration fitted on ``normal_paths``; returns the new name."""
    loaded = registry.load_version(weights_dir, version)
    train_config = TrainConfig(**{**loaded.manifest.get("train_config", {}), **overrides})
    if train_config.score_mode == "motion" and loaded.config.input_mode == "appearance":
        raise ConfigError("score mode 'motion' needs a motion channel; input mode 'appearance' has none")
    clips = load_normal_footage(list(normal_paths))
    _, holdout = split_holdout(encode_clips(clips, loaded.config), train_config.holdout_fraction)
    scorer = Scorer(loaded.refiner, loaded.detector, loaded.config, device="cpu")
    calibration = fit_calibration(scorer, holdout, train_config)
    manifest = {k: v for k, v in loaded.manifest.items()
                if k not in ("version", "created_at", "package_version", "weights_sha256", "format", "ped2")}
    manifest.update({
        "train_config": _jsonable(asdict(train_config)),
        "calibration": calibration.to_dict(),
        "threshold": calibration.threshold,
        "reject_band": list(calibration.reject_band),
        "parent_version": version,
        "recalibrated_on": {"sha256": footage_digest(clips), "clips": len(clips),
                            "holdout_frames": int(sum(c.frames for c in holdout))},
    })
    return registry.publish(weights_dir, loaded.refiner, loaded.detector, manifest)
