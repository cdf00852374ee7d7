import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import registry
from model.config import CalibrationConfig, ModelConfig, TrainConfig
from model.manifest import VersionManifest
from model.networks import Detector, Refiner
from model.scoring import Calibration
from tests.conftest import tiny_model_config


def _manifest_fields(config: ModelConfig) -> VersionManifest:
    calibration = Calibration(
        score_mode="d_r_x", threshold=1.0, reject_band=(0.5, 1.5), smoothing_frames=1,
        component_center={"d_r_x": 0.0, "d_x": 0.0, "reconstruction": 0.0},
        component_scale={"d_r_x": 1.0, "d_x": 1.0, "reconstruction": 1.0},
        map_width=0.2, false_alarm_rate=0.01,
    )
    return VersionManifest(config, TrainConfig(), CalibrationConfig(score_mode="d_r_x", smoothing_frames=1), calibration)


def _publish(weights: Path) -> str:
    config = tiny_model_config()
    return registry.publish(weights, Refiner(config), Detector(config), _manifest_fields(config))


def test_publish_and_load_round_trip(tmp_path: Path) -> None:
    config = tiny_model_config()
    refiner, detector = Refiner(config), Detector(config)
    version = registry.publish(tmp_path, refiner, detector, _manifest_fields(config))
    assert version == "v0001"
    loaded = registry.load_version(tmp_path, version)
    assert loaded.config == config
    for key, value in refiner.state_dict().items():
        assert torch.equal(loaded.refiner.state_dict()[key], value)
    assert loaded.manifest["version"] == "v0001"
    assert set(os.listdir(tmp_path)) == {"v0001"}  # no temporary folder left behind
    assert (tmp_path / "v0001").stat().st_mode & 0o777 == 0o755  # readable by a server of another user
    assert (tmp_path / "v0001" / registry.WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644


def test_versions_are_numbered_and_never_overwritten(tmp_path: Path) -> None:
    first = _publish(tmp_path)
    before = (tmp_path / first / registry.WEIGHTS_FILE).read_bytes()
    assert [_publish(tmp_path) for _ in range(2)] == ["v0002", "v0003"]
    assert registry.list_versions(tmp_path) == ["v0001", "v0002", "v0003"]
    assert (tmp_path / first / registry.WEIGHTS_FILE).read_bytes() == before


def test_active_version_pointer(tmp_path: Path) -> None:
    _publish(tmp_path)
    _publish(tmp_path)
    assert registry.active_version(tmp_path) == "v0002"  # newest by default
    registry.set_active_version(tmp_path, "v0001")
    assert registry.active_version(tmp_path) == "v0001"


def test_tampered_tensor_file_is_refused(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    path = tmp_path / version / registry.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(registry.RegistryError, match="sha256"):
        registry.load_version(tmp_path, version)


def test_tampered_manifest_is_refused(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    path = tmp_path / version / registry.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["model_config"]["latent_dim"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(registry.RegistryError, match="shape"):
        registry.load_version(tmp_path, version)


def test_pickle_renamed_to_safetensors_is_refused_without_unpickling(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / version / registry.WEIGHTS_FILE
    path.write_bytes(pickle.dumps({"refiner.x": Exploit()}))
    manifest_path = tmp_path / version / registry.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["weights_sha256"] = registry._sha256(path)  # even with a matching checksum
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(registry.RegistryError, match="not a safetensors file"):
        registry.load_version(tmp_path, version)
    assert not marker.exists()


def test_missing_files_and_bad_names(tmp_path: Path) -> None:
    version = _publish(tmp_path)
    (tmp_path / version / registry.WEIGHTS_FILE).unlink()
    with pytest.raises(registry.RegistryError, match="missing"):
        registry.load_version(tmp_path, version)
    with pytest.raises(registry.VersionNotFound):
        registry.load_version(tmp_path, "v0042")
    with pytest.raises(registry.VersionNotFound, match="not a version name"):
        registry.load_version(tmp_path, "../etc")


def test_a_publish_killed_midway_leaves_no_visible_version(tmp_path: Path) -> None:
    """SIGKILL while the weights are being written: no vNNNN appears, the next publish is v0001."""
    script = f"from tests.test_support_publish import publish_slowly; publish_slowly({str(tmp_path)!r})"
    process = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(".publish-") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and process.poll() is None, "publish never started"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert registry.list_versions(tmp_path) == []
    assert _publish(tmp_path) == "v0001"
