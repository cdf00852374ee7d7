"""Camera test fixtures: settings with cameras enabled for 127.0.0.1 and file:// under a footage root,
fast reconnects, the served registry (a model that flags the planted anomaly), and the clips the
cameras play (tests/support.py synthetic_frames)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from service.settings import Settings
from tests.support import clear_vad_environment, synthetic_frames, write_video

FPS = 10.0


@pytest.fixture(autouse=True)
def _no_vad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_vad_environment(monkeypatch)


@pytest.fixture
def footage_root(tmp_path: Path) -> Path:
    root = tmp_path / "footage"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def planted_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s at 10 fps: normal, the planted anomaly from 2 s to 4 s, normal again (played in a loop)."""
    return write_video(tmp_path_factory.mktemp("clips") / "planted.avi",
                       synthetic_frames(60, seed=901, anomaly_from=20, anomaly_until=40), fps=FPS)


@pytest.fixture(scope="session")
def normal_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("clips") / "normal.avi", synthetic_frames(40, seed=900), fps=FPS)


@pytest.fixture
def make_settings(weights_dir: Path, tmp_path: Path, footage_root: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "weights_dir": weights_dir, "device": "cpu", "max_queue_delay_ms": 2.0,
            "data_dir": tmp_path / "data", "footage_root": footage_root,
            "camera_url_allow": ["rtsp://127.0.0.1", "http://127.0.0.1", "file://"],
            "camera_reconnect_initial_s": 0.2, "camera_reconnect_max_s": 1.0, "camera_open_timeout_s": 3.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def ffmpeg() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        pytest.skip("the RTSP camera needs the ffmpeg command (Debian: apt-get install ffmpeg; .ci/run installs it)")
    return path
