"""Reliability fixtures: one tiny trained registry per session (v0001 active, v0002 a distinct
version), and per test a private copy, TestClient and live uvicorn factories, and `vad serve`
subprocesses (for resident-memory figures and restarts)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from model.config import TrainConfig
from service.settings import Settings
from tests.reliability.helpers import ServerProcess, frames, write_video
from tests.support import (
    TINY_JOB_TRAINING, TINY_MODEL, LiveServer, publish_second_version, started_clients, started_servers,
)


@pytest.fixture(scope="session")
def reliability_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v0001 (trained on synthetic footage, ACTIVE) and v0002 (its detector bias shifted)."""
    from model.train import train

    root = tmp_path_factory.mktemp("reliability")
    clip = write_video(root / "normal.avi", frames(24, seed=11), "MJPG")
    weights = root / "weights"
    result = train([clip], weights, TINY_MODEL, TrainConfig(**TINY_JOB_TRAINING), device="cpu", show_progress_bar=False)
    assert result.version == "v0001"
    publish_second_version(weights, detector_bias_shift=3.0)
    return weights


@pytest.fixture
def weights_dir(reliability_weights: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reliability_weights, tmp_path / "weights"))


@pytest.fixture(autouse=True)
def _no_vad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VAD_"):
            monkeypatch.delenv(name)


@pytest.fixture
def base_values(weights_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """Settings shared by a test's server(s) and workers."""
    return {
        "weights_dir": str(weights_dir), "data_dir": str(tmp_path / "data"), "device": "cpu",
        "max_queue_delay_ms": 2.0, "training_model_config": TINY_MODEL.to_dict(), "training_config": TINY_JOB_TRAINING,
        "job_lease_s": 3.0, "job_heartbeat_s": 0.5, "job_poll_interval_s": 0.25,
    }


@pytest.fixture
def make_settings(base_values: dict[str, Any]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return Settings(**{**base_values, **overrides})

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


@pytest.fixture
def server_process(base_values: dict[str, Any], tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """server_process(port=None, **settings) -> a started `vad serve` subprocess; all stopped at teardown."""
    started: list[ServerProcess] = []

    def start(port: int | None = None, **overrides: Any) -> ServerProcess:
        server = ServerProcess({**base_values, **overrides}, tmp_path / f"server{len(started) + 1}.log", port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
