"""Service test fixtures: one tiny trained model per session (two versions), per-test registry
copies, app/TestClient factories and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import pytest
from fastapi.testclient import TestClient

from model.config import TrainConfig
from model.train import train
from service.settings import Settings
from svc_helpers import PATCH, synthetic_frames
from tests.support import TINY_MODEL, LiveServer, publish_second_version, started_clients, started_servers

TINY_TRAINING = TrainConfig(
    patches_per_epoch=256, batch_size=32, max_epochs=1, holdout_patches=64, detector_polish_epochs=0,
    phase_two_steps=50,
    # a score that goes through D, so v0002 (D's bias shifted) scores differently from v0001
    score_mode="fused", smoothing_frames=1,
)


@pytest.fixture(scope="session")
def service_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with v0001 (trained on synthetic footage; ACTIVE) and v0002 (its detector bias
    shifted: a distinct version whose scores differ)."""
    assert TINY_MODEL.patch_size == PATCH  # svc_helpers' frame geometry counts patches of this size
    root = tmp_path_factory.mktemp("vad-training")
    folders = []
    for clip in range(2):
        folder = root / f"clip{clip}"
        folder.mkdir()
        for index, frame in enumerate(synthetic_frames(20, seed=clip)):
            cv2.imwrite(str(folder / f"{index:04d}.png"), frame)
        folders.append(folder)
    weights = root / "weights"
    result = train(folders, weights, TINY_MODEL, TINY_TRAINING, device="cpu", show_progress_bar=False)
    assert result.version == "v0001"
    publish_second_version(weights, detector_bias_shift=3.0)
    return weights


@pytest.fixture
def weights_dir(service_weights: Path, tmp_path: Path) -> Path:
    """A private copy of the session registry (tests activate and tamper freely)."""
    return Path(shutil.copytree(service_weights, tmp_path / "weights"))


@pytest.fixture(autouse=True)
def _no_vad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VAD_"):
            monkeypatch.delenv(name)


@pytest.fixture
def make_settings(weights_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"weights_dir": weights_dir, "device": "cpu", "max_queue_delay_ms": 2.0}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """make_client(**settings) -> a started TestClient (lifespan run); all are closed at teardown."""
    yield from started_clients(make_settings)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def live_server(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., LiveServer]]:
    """live_server(wrap=None, **settings) -> a started uvicorn server; all are stopped at teardown."""
    yield from started_servers(make_settings)
