"""Service test fixtures: one tiny trained model per session (two versions), per-test registry
copies, app/TestClient factories and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import pytest
import uvicorn
from fastapi.testclient import TestClient

from model import registry
from model.config import ModelConfig, TrainConfig
from model.train import train
from service.app import create_app
from service.server import uvicorn_config
from service.settings import Settings
from svc_helpers import PATCH, synthetic_frames

TINY_MODEL = ModelConfig(
    input_mode="appearance+motion", patch_size=PATCH, stride=PATCH, latent_dim=8,
    refiner_channels=(4, 8, 8), detector_channels=(4, 8, 8),
)
TINY_TRAINING = TrainConfig(
    patches_per_epoch=256, batch_size=32, max_epochs=1, holdout_patches=64, detector_polish_epochs=0,
    # a score that goes through D, so v0002 (D's bias shifted) scores differently from v0001
    score_mode="fused", smoothing_frames=1,
)


@pytest.fixture(scope="session")
def service_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with v0001 (trained on synthetic footage; ACTIVE) and v0002 (its detector bias
    shifted: a distinct version whose scores differ)."""
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
    loaded = registry.load_version(weights, "v0001")
    with __import__("torch").no_grad():
        loaded.detector.head.bias += 3.0
    inherited = {
        k: v for k, v in loaded.manifest.items()
        if k not in ("format", "created_at", "package_version", "weights_sha256", "version")
    }
    assert registry.publish(weights, loaded.refiner, loaded.detector, {**inherited, "parent_version": "v0001"}) == "v0002"
    registry.set_active_version(weights, "v0001")
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
    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


class LiveServer:
    """The app under a real uvicorn server, in a thread, on a free 127.0.0.1 port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        config = uvicorn_config(self.app, settings, "127.0.0.1", self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def services(self):  # noqa: ANN201 - service.deps.Services
        return self.app.state.services

    def start(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


@pytest.fixture
def live_server(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def start(**overrides: object) -> LiveServer:
        server = LiveServer(make_settings(**overrides)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
