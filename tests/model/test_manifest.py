"""The typed manifest and the configs it carries: one builder, tau stored once, old manifests load."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from model import registry
from model.checkpoints import BestParameters, load_checkpoint, read_checkpoint_meta, remove_checkpoints, save_checkpoint
from model.config import (
    DEFAULT_INPUT_MODE, CalibrationConfig, ConfigError, ModelConfig, TrainConfig, split_train_settings,
)
from model.manifest import LEGACY_DUPLICATE_KEYS, VersionManifest, saved_configs
from tests.model.test_registry import _manifest_fields
from tests.conftest import tiny_model_config

BUNDLED = registry.BUNDLED_WEIGHTS_DIR


@pytest.mark.parametrize("version", ["v0001", "v0002", "v0003"])
def test_bundled_manifests_read_back_typed(version: str) -> None:
    """Manifests published before the calibration settings left train_config still give both configs."""
    data = registry.read_manifest(BUNDLED, version)
    assert "calibration_config" not in data and "score_mode" in data["train_config"]  # the old layout
    parsed = VersionManifest.from_dict(data)
    assert parsed.calibration_config.score_mode == data["train_config"]["score_mode"]
    assert parsed.calibration_config.smoothing_frames == data["train_config"]["smoothing_frames"]
    assert parsed.calibration.threshold == data["calibration"]["threshold"] == data["threshold"]
    assert parsed.train_config.holdout_fraction == data["train_config"]["holdout_fraction"]


def test_a_new_manifest_stores_tau_once_and_splits_the_configs(tmp_path: Path) -> None:
    config = tiny_model_config()
    version = registry.publish(tmp_path, *_networks(config), _manifest_fields(config))
    data = registry.read_manifest(tmp_path, version)
    assert not set(LEGACY_DUPLICATE_KEYS) & set(data)  # tau only in "calibration"
    assert set(data["calibration_config"]) == {"score_mode", "smoothing_frames", "false_alarm_rate", "reject_band",
                                               "fusion_weights"}
    assert not {"score_mode", "smoothing_frames", "false_alarm_rate"} & set(data["train_config"])
    assert data["input_mode"] == config.input_mode
    parsed = registry.load_version(tmp_path, version).parsed_manifest
    assert parsed.calibration_config == CalibrationConfig(score_mode="d_r_x", smoothing_frames=1)
    assert parsed.train_config == TrainConfig()
    assert VersionManifest.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed  # round trip


def test_recalibrated_manifest_keeps_the_record_and_names_its_parent() -> None:
    parsed = dataclasses.replace(VersionManifest.from_dict(registry.read_manifest(BUNDLED, "v0003")),
                                 training_job={"id": "a" * 32})
    assert parsed.to_dict()["training_job"] == {"id": "a" * 32}
    settings = CalibrationConfig(score_mode="d_r_x", smoothing_frames=3)
    new = parsed.recalibrated("v0003", settings, parsed.calibration, {"clips": 1})
    data = new.to_dict()
    assert data["parent_version"] == "v0003" and data["recalibrated_on"] == {"clips": 1}
    assert data["calibration_config"]["smoothing_frames"] == 3
    assert data["history"] == parsed.to_dict()["history"] and data["phase_two"] == parsed.phase_two
    assert "ped2" not in data  # figures belong to the version they were measured on
    assert "training_job" not in data  # no job made it: a retried job must not take it for its own


def test_combined_training_settings_split_and_unknown_ones_are_named() -> None:
    train, calibration = split_train_settings({"max_epochs": 3, "score_mode": "d_r_x", "reject_band": [0.01, 0.1]})
    assert train.max_epochs == 3 and calibration.score_mode == "d_r_x" and calibration.reject_band == (0.01, 0.1)
    with pytest.raises(ConfigError, match="unknown training settings: \\['epochz'\\]"):
        split_train_settings({"epochz": 3})
    # saved settings a newer package dropped are ignored when reading a manifest
    _, train, _ = saved_configs({"model_config": {}, "train_config": {"max_epochs": 4, "retired_setting": 1}})
    assert train.max_epochs == 4


@pytest.mark.parametrize("fields, message", [
    ({"score_mode": "loudness"}, "score_mode must be one of"),
    ({"false_alarm_rate": 0.7}, "false_alarm_rate must be within"),
    ({"false_alarm_rate": 0.1, "reject_band": (0.005, 0.05)}, "reject_band must be two false-alarm rates"),
    ({"smoothing_frames": 0}, "smoothing_frames must be at least 1"),
    ({"fusion_weights": {"colour": 1.0}}, "fusion_weights must name scores"),
])
def test_calibration_settings_are_checked(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CalibrationConfig(**fields)


def test_one_default_input_mode_and_one_motion_check() -> None:
    assert ModelConfig().input_mode == DEFAULT_INPUT_MODE == "appearance+flow"
    CalibrationConfig(score_mode="motion").check_input(ModelConfig(input_mode="appearance+motion"))
    with pytest.raises(ConfigError, match="needs a motion channel"):
        CalibrationConfig(score_mode="motion").check_input(ModelConfig(input_mode="appearance"))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    config = tiny_model_config()
    refiner, detector = _networks(config)
    optimizer = torch.optim.Adam(refiner.parameters())
    refiner(torch.zeros(2, config.channels, config.patch_size, config.patch_size))[0].sum().backward()
    optimizer.step()
    best = BestParameters(refiner.state_dict(), detector.state_dict(), None)
    save_checkpoint(tmp_path / "c", {"refiner": refiner, "detector": detector}, {"refiner": optimizer},
                    {"epoch": 2, "step": 7, "history": []}, best)
    assert read_checkpoint_meta(tmp_path / "c") == {"epoch": 2, "step": 7, "history": []}
    # one file: a kill between two writes cannot leave a loop state without its kept parameters
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["checkpoint.safetensors"]
    fresh_r, fresh_d = _networks(config)
    fresh_optimizer = torch.optim.Adam(fresh_r.parameters())
    meta, kept = load_checkpoint(tmp_path / "c", {"refiner": fresh_r, "detector": fresh_d}, {"refiner": fresh_optimizer})
    assert meta["step"] == 7 and kept.refiner_old is None
    for name, value in refiner.state_dict().items():
        assert torch.equal(fresh_r.state_dict()[name], value) and torch.equal(kept.refiner[name], value)
    moments = fresh_optimizer.state_dict()["state"]
    assert moments and torch.equal(moments[0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    remove_checkpoints(tmp_path / "c")
    assert not (tmp_path / "c").exists() and read_checkpoint_meta(tmp_path / "c") is None
    assert load_checkpoint(tmp_path / "c", {}, {}) is None


def test_a_checkpoint_with_its_kept_parameters_in_a_second_file_still_resumes(tmp_path: Path) -> None:
    """Checkpoints written before the kept parameters moved into checkpoint.safetensors (a job
    interrupted across an upgrade) kept them in best.safetensors."""
    import safetensors.torch

    config = tiny_model_config()
    refiner, detector = _networks(config)
    save_checkpoint(tmp_path, {"refiner": refiner}, {}, {"epoch": 1}, BestParameters({}, {}, None))
    safetensors.torch.save_file({f"refiner/{k}": v.contiguous() for k, v in refiner.state_dict().items()},
                                str(tmp_path / "best.safetensors"))
    _, kept = load_checkpoint(tmp_path, {"refiner": _networks(config)[0]}, {})
    assert set(kept.refiner) == set(refiner.state_dict())


def test_a_damaged_checkpoint_reads_as_none(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "checkpoint.safetensors").write_bytes(b"not safetensors")
    assert read_checkpoint_meta(folder) is None


def test_publishing_copies_nothing_of_an_old_manifest_but_its_typed_fields(tmp_path: Path) -> None:
    """Recalibrating a bundled version works from the typed manifest alone (old layout in, new out)."""
    shutil.copytree(BUNDLED / "v0001", tmp_path / "v0001")
    loaded = registry.load_version(tmp_path, "v0001")
    version = registry.publish(tmp_path, loaded.refiner, loaded.detector, loaded.parsed_manifest)
    data = registry.read_manifest(tmp_path, version)
    assert "threshold" not in data
    assert registry.load_version(tmp_path, version).calibration == loaded.calibration


def _networks(config: ModelConfig):
    from model.networks import Detector, Refiner

    return Refiner(config), Detector(config)
