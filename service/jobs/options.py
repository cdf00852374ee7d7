"""What a training job trains with: the client's ``options`` and ``paths`` form fields checked, and
the effective model, training and calibration configs fixed at submission (``job_config``)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from model import registry
from model.config import ConfigError, InputMode, ModelConfig, split_train_settings
from model.manifest import config_sections
from service.errors import InvalidJobRequest
from service.settings import Settings


class TrainingOptions(BaseModel):
    """The ``options`` form field: every key optional, unknown keys refused."""

    model_config = ConfigDict(extra="forbid")

    input_mode: InputMode | None = None
    epochs: StrictInt | None = Field(None, ge=1, le=10_000, description="TrainConfig.max_epochs")
    time_budget_s: StrictFloat | StrictInt | None = Field(None, gt=0, le=30 * 86_400)
    reject_and_refine: StrictBool = False
    parent_version: str | None = Field(None, pattern=r"^v\d{4,}$")


def _validation_message(prefix: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()))
        problems.append(f"{prefix}.{where}: {error.get('msg', 'invalid')}" if where else f"{prefix}: {error.get('msg')}")
    return "; ".join(problems) or f"{prefix}: invalid"


def parse_options(text: str | None) -> TrainingOptions:
    """The ``options`` field (a JSON object); absent or blank: the defaults."""
    if text is None or not text.strip():
        return TrainingOptions()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJobRequest(f"options: not JSON ({exc.msg})") from exc
    if not isinstance(value, dict):
        raise InvalidJobRequest("options: must be a JSON object")
    try:
        return TrainingOptions.model_validate(value)
    except ValidationError as exc:
        raise InvalidJobRequest(_validation_message("options", exc)) from exc


def parse_paths(text: str | None) -> list[str]:
    """The ``paths`` field (a JSON list of footage-root paths); absent or blank: none."""
    if text is None or not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJobRequest(f"paths: not JSON ({exc.msg})") from exc
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise InvalidJobRequest("paths: must be a JSON list of non-empty strings")
    return value


def job_config(settings: Settings, options: TrainingOptions) -> dict[str, Any]:
    """The configs a job trains with, fixed at submission (so a resumed attempt trains exactly what
    its checkpoint was made with): the `vad train` defaults, then the server's
    VAD_TRAINING_MODEL_CONFIG / VAD_TRAINING_CONFIG, then the job's options. A fine-tune takes its
    parent's model configuration. The worker reads them back with model.manifest.saved_configs."""
    try:
        if options.parent_version:
            try:
                manifest = registry.read_manifest(settings.weights_dir, options.parent_version)
                model_config = ModelConfig.from_saved(manifest["model_config"])
            except (registry.RegistryError, KeyError, TypeError) as exc:
                raise InvalidJobRequest(f"options.parent_version: {exc}") from exc
            if options.input_mode and options.input_mode != model_config.input_mode:
                raise InvalidJobRequest(
                    f"options.input_mode: {options.input_mode} differs from {options.parent_version}'s "
                    f"{model_config.input_mode} (a fine-tune keeps its parent's input)"
                )
        else:
            fields = dict(settings.training_model_config)
            if options.input_mode:
                fields["input_mode"] = options.input_mode
            model_config = ModelConfig.from_dict(fields)
        train_fields = dict(settings.training_config)
        if options.epochs is not None:
            train_fields["max_epochs"] = options.epochs
        if options.time_budget_s is not None:
            train_fields["time_budget_s"] = float(options.time_budget_s)
        train_config, calibration_config = split_train_settings(train_fields)
        calibration_config.check_input(model_config)
    except ConfigError as exc:
        raise InvalidJobRequest(f"options: {exc}") from exc
    return config_sections(model_config, train_config, calibration_config)
