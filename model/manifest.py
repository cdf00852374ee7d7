"""A version's manifest.json, typed: the one builder training and recalibration publish through, and
the one reader of the configs a manifest (or a queued training job, which stores them the same way)
was saved with.

model/registry.py adds the fields only publishing knows (format, version, created_at,
package_version, weights_sha256). tau lives once, in ``calibration``; manifests up to v0003 also
carried it at the top level (``threshold``, ``reject_band``) and kept the calibration settings inside
``train_config``: both still load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from model.config import CALIBRATION_FIELDS, CalibrationConfig, ModelConfig, TrainConfig, split_train_settings
from model.scoring import Calibration

# Top-level keys of manifests up to v0003 that repeated the calibration's tau and band.
LEGACY_DUPLICATE_KEYS = ("threshold", "reject_band")


def _jsonable(data: Any) -> Any:
    """Tuples -> lists, as json writes them (so a manifest compares equal to what is read back)."""
    return json.loads(json.dumps(data, default=list))


@dataclass(frozen=True)
class VersionManifest:
    """What a published version is: its configs, its calibration and the record of how it was made."""

    model_config: ModelConfig
    train_config: TrainConfig
    calibration_config: CalibrationConfig
    calibration: Calibration
    parent_version: str | None = None
    input: dict[str, Any] = field(default_factory=dict)  # what was chosen from the footage (footage_scale)
    training_footage: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    phase_two: dict[str, Any] | None = None
    reject_and_refine: dict[str, Any] | None = None
    recalibrated_on: dict[str, Any] | None = None
    training_job: dict[str, Any] | None = None  # the service's job that trained it (id, attempts, worker)

    def to_dict(self) -> dict[str, Any]:
        """The fields registry.publish writes (it adds the publishing fields)."""
        data: dict[str, Any] = {
            **config_sections(self.model_config, self.train_config, self.calibration_config),
            "input_mode": self.model_config.input_mode,
            "calibration": self.calibration.to_dict(),
            "parent_version": self.parent_version,
            "input": _jsonable(self.input),
            "history": _jsonable(self.history),
        }
        for name in ("training_footage", "validation", "phase_two", "reject_and_refine", "recalibrated_on", "training_job"):
            value = getattr(self, name)
            if value is not None or name in ("phase_two", "reject_and_refine"):
                data[name] = _jsonable(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VersionManifest":
        """Read a published manifest (any format-1 version). Raises KeyError, TypeError or
        ValueError (ConfigError) when its configs or calibration are missing or invalid."""
        model_config, train_config, calibration_config = saved_configs(data)
        return cls(
            model_config=model_config,
            train_config=train_config,
            calibration_config=calibration_config,
            calibration=Calibration.from_dict(data["calibration"]),
            parent_version=data.get("parent_version"),
            input=data.get("input") or {},
            training_footage=data.get("training_footage"),
            validation=data.get("validation"),
            history=data.get("history") or [],
            phase_two=data.get("phase_two"),
            reject_and_refine=data.get("reject_and_refine"),
            recalibrated_on=data.get("recalibrated_on"),
            training_job=data.get("training_job"),
        )

    def recalibrated(self, parent: str, calibration_config: CalibrationConfig, calibration: Calibration,
                     recalibrated_on: dict[str, Any]) -> "VersionManifest":
        """The manifest of a new version with these networks and another calibration (made by no
        training job, so a retried job never mistakes it for its own)."""
        return replace(self, calibration_config=calibration_config, calibration=calibration, parent_version=parent,
                       recalibrated_on=recalibrated_on, training_job=None)


def config_sections(model_config: ModelConfig, train_config: TrainConfig,
                    calibration_config: CalibrationConfig) -> dict[str, Any]:
    """The three config sections as JSON, as a manifest and a queued training job both store them."""
    return {
        "model_config": model_config.to_dict(),
        "train_config": _jsonable(asdict(train_config)),
        "calibration_config": _jsonable(asdict(calibration_config)),
    }


def saved_configs(data: dict[str, Any]) -> tuple[ModelConfig, TrainConfig, CalibrationConfig]:
    """The configs a manifest or a queued job was saved with (``config_sections``). Saved before the
    calibration settings had a section of their own (manifests up to v0003, older jobs), they are
    read from ``train_config``. Settings a newer package added take their defaults; settings it
    removed are ignored. Raises KeyError, TypeError or ConfigError for a missing or invalid config."""
    saved = dict(data.get("train_config") or {})
    saved.update(data.get("calibration_config") or {})
    known = {f.name for f in fields(TrainConfig)} | CALIBRATION_FIELDS
    train_config, calibration_config = split_train_settings({k: v for k, v in saved.items() if k in known})
    return ModelConfig.from_saved(data["model_config"]), train_config, calibration_config
