"""Events test fixtures: the served registry (tests/conftest.py served_weights) with a data folder of
the test's own, where events, their pictures and the webhook outbox are kept."""

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
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_settings(served_weights: Path, data_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"weights_dir": served_weights, "device": "cpu", "max_queue_delay_ms": 2.0,
                                     "data_dir": data_dir}
        values.update(overrides)
        return Settings(**values)

    return make
