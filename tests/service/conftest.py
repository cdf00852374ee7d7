"""Service test fixtures: per-test copies of the served registry (tests/conftest.py served_weights:
v0001 trained to tell a planted anomaly from normal frames, v0002 its D shifted) and the settings the
shared TestClient / uvicorn factories (make_client, client, live_server) are built from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from service.settings import Settings
from tests.support import clear_vad_environment


@pytest.fixture(autouse=True)
def _no_vad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_vad_environment(monkeypatch)


@pytest.fixture
def make_settings(weights_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"weights_dir": weights_dir, "device": "cpu", "max_queue_delay_ms": 2.0}
        values.update(overrides)
        return Settings(**values)

    return make
