"""Training-job fixtures: a tiny base version trained once per session, and per test a private
registry copy, data folder and footage root, with factories for live servers and worker processes
that all read the same settings. Every test using ``job_env`` runs twice: on the embedded SQLite
file, and on a fresh database of a real PostgreSQL server (``database_url``, tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from model import registry
from model.config import TrainConfig
from model.train import train
from service.settings import Settings
from tests.conftest import synthetic_frames, write_frames, write_video
from tests.jobs.helpers import WorkerProcess
from tests.support import TINY_JOB_TRAINING, TINY_MODEL, LiveServer


@pytest.fixture(scope="session")
def base_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with one tiny version, v0001 (active)."""
    root = tmp_path_factory.mktemp("jobs-base")
    clip = write_video(root / "base.avi", synthetic_frames(24, seed=11))
    weights = root / "weights"
    result = train([clip], weights, TINY_MODEL, TrainConfig(**TINY_JOB_TRAINING), device="cpu", show_progress_bar=False)
    assert result.version == "v0001"
    registry.set_active_version(weights, "v0001")
    return weights


@pytest.fixture(autouse=True)
def _no_vad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VAD_"):
            monkeypatch.delenv(name)


class JobEnv:
    """One deployment: the settings a server and its workers share, and what was started."""

    def __init__(self, root: Path, weights: Path, database_url: str | None) -> None:
        self.root = root
        self.weights = weights
        self.data = root / "data"
        self.footage = root / "footage"
        self.footage.mkdir()
        # Normal footage under the footage root: two videos and a frame folder (20-24 frames, 64x96).
        self.clips = [write_video(self.footage / f"cam{i}.avi", synthetic_frames(24, seed=i)) for i in range(2)]
        self.frame_folder = write_frames(self.footage / "frames", synthetic_frames(20, seed=3))
        self.values: dict[str, Any] = {
            "weights_dir": str(weights), "data_dir": str(self.data), "footage_root": str(self.footage),
            "device": "cpu", "job_lease_s": 3.0, "job_heartbeat_s": 0.5, "job_poll_interval_s": 0.25,
            "job_max_attempts": 3, "training_model_config": TINY_MODEL.to_dict(), "training_config": TINY_JOB_TRAINING,
            "max_queue_delay_ms": 2.0, "log_level": "info",
        }
        if database_url is not None:
            self.values["database_url"] = database_url
        self.servers: list[LiveServer] = []
        self.workers: list[WorkerProcess] = []

    def settings(self, **overrides: Any) -> Settings:
        return Settings(**{**self.values, **overrides})

    def start_server(self, **overrides: Any) -> LiveServer:
        server = LiveServer(self.settings(**overrides)).start()
        self.servers.append(server)
        return server

    def start_worker(self, **overrides: Any) -> WorkerProcess:
        values = {**self.values, **overrides}
        worker = WorkerProcess(values, self.root / f"worker{len(self.workers) + 1}.log")
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        for server in self.servers:
            server.stop()


@pytest.fixture
def job_env(tmp_path: Path, base_weights: Path, database_url: str | None) -> Iterator[JobEnv]:
    env = JobEnv(tmp_path, Path(shutil.copytree(base_weights, tmp_path / "weights")), database_url)
    yield env
    env.close()
