"""Reliability fixtures: per test a private copy of the served registry (tests/conftest.py
served_weights: v0001 active, v0002 a distinct version), the settings its TestClient and live
uvicorn factories (tests/conftest.py) are built from, and `vad serve` subprocesses (for
resident-memory figures and restarts)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from tests.reliability.helpers import ServerProcess
from tests.support import TINY_JOB_TRAINING, TINY_MODEL, clear_vad_environment


@pytest.fixture(scope="session")
def reliability_weights(served_weights: Path) -> Path:
    """The session's served registry (copy it before changing it)."""
    return served_weights


@pytest.fixture(autouse=True)
def _no_vad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_vad_environment(monkeypatch)


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
