"""What the test suites share: the one synthetic footage generator (moving blobs, with an optional
planted anomaly) and its encodings, the tiny model configurations tests train with, the served
registry (a briefly trained v0001 whose scores tell a planted anomaly from normal frames, and a
v0002), a real uvicorn server in a thread, and settings as a subprocess's environment."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from model import registry
from model.config import CalibrationConfig, ModelConfig, TrainConfig

if TYPE_CHECKING:  # the serving package is imported where a server is made, not by model-only tests
    from fastapi.testclient import TestClient

    from service.settings import Settings

# --- footage -----------------------------------------------------------------------------------

HEIGHT, WIDTH = 64, 96
PATCH = 16  # the patch size of every tiny configuration below
PATCHES_PER_FRAME = (HEIGHT // PATCH) * (WIDTH // PATCH)  # 4 x 6 = 24


def synthetic_frames(count: int, seed: int = 0, anomaly_from: int | None = None,
                     anomaly_until: int | None = None) -> np.ndarray:
    """(count, 64, 96) uint8: a fixed textured background (``seed``) with two small dark 'pedestrians'
    walking slowly (1 px/frame) and a little sensor noise.

    The planted anomaly: from frame ``anomaly_from`` (up to ``anomaly_until``, exclusive; default the
    end) a large bright block crosses the scene fast (6 px/frame)."""
    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(60, 140, (HEIGHT, WIDTH)).astype(np.uint8), (5, 5), 0)
    frames = []
    for t in range(count):
        frame = background.copy()
        for lane, (y, speed) in enumerate(((14, 1), (40, -1))):
            x = (10 + lane * 30 + speed * t) % (WIDTH - 8)
            frame[y : y + 12, x : x + 6] = 30
        if anomaly_from is not None and anomaly_from <= t < (anomaly_until if anomaly_until is not None else count):
            x = (6 * (t - anomaly_from)) % (WIDTH - 20)
            frame[20:40, x : x + 20] = 250
        noise = rng.normal(0, 2, frame.shape)
        frames.append(np.clip(frame + noise, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_frames(folder: Path, frames: np.ndarray) -> Path:
    """A folder of PNG frames (000.png, 001.png, ...), as `vad train` reads one."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    return folder


def write_video(path: Path, frames: np.ndarray, fourcc: str = "MJPG", fps: float = 10.0) -> Path:
    """Grayscale frames as a video file (MJPG AVI, or mp4v MP4 and the like with ``fourcc``)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (frames.shape[2], frames.shape[1]))
    assert writer.isOpened(), fourcc
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def png_bytes(frame: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", frame)
    assert ok
    return data.tobytes()


def jpeg_bytes(frame: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


# --- figures -----------------------------------------------------------------------------------


def positive(value: object) -> bool:
    """A measured figure that is a finite number above 0 (what the bench tests assert of timings)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# --- tiny models -------------------------------------------------------------------------------

TINY_MODEL = ModelConfig(
    input_mode="appearance+motion", patch_size=PATCH, stride=PATCH, latent_dim=8,
    refiner_channels=(4, 8, 8), detector_channels=(4, 8, 8),
)
# What jobs train with (VAD_TRAINING_CONFIG); patience is high so a job runs the epochs it asks for.
TINY_JOB_TRAINING = dict(patches_per_epoch=256, batch_size=32, max_epochs=1, holdout_patches=64,
                         detector_polish_epochs=0, patience=1000, phase_two_steps=50)


def tiny_model_config(input_mode: str = "appearance+motion") -> ModelConfig:
    return ModelConfig(
        input_mode=input_mode, patch_size=PATCH, stride=PATCH, latent_dim=8,
        refiner_channels=(8, 8, 16), detector_channels=(8, 8, 16),
    )


def tiny_train_config(**overrides) -> TrainConfig:
    fields = dict(patches_per_epoch=1024, batch_size=64, max_epochs=2, holdout_patches=128,
                  detector_polish_epochs=1, holdout_fraction=0.2, phase_two_steps=100,
                  phase_two_batch_size=32)
    fields.update(overrides)
    return TrainConfig(**fields)


def publish_second_version(weights: Path, detector_bias_shift: float = 0.0) -> None:
    """Publish v0002 from v0001's networks (D's bias shifted, so its scores differ, when asked) and
    keep v0001 active."""
    loaded = registry.load_version(weights, "v0001")
    with torch.no_grad():
        loaded.detector.head.bias += detector_bias_shift
    manifest = dataclasses.replace(loaded.parsed_manifest, parent_version="v0001")
    assert registry.publish(weights, loaded.refiner, loaded.detector, manifest) == "v0002"
    registry.set_active_version(weights, "v0001")


def publish_smoothed(weights: Path, version: str, smoothing_frames: int) -> str:
    """Publish ``version``'s networks and tau again with a causal window of ``smoothing_frames``
    frames; returns the new version's name (not activated)."""
    loaded = registry.load_version(weights, version)
    manifest = loaded.parsed_manifest
    manifest = dataclasses.replace(
        manifest, parent_version=version,
        calibration=dataclasses.replace(manifest.calibration, smoothing_frames=smoothing_frames),
        calibration_config=dataclasses.replace(manifest.calibration_config, smoothing_frames=smoothing_frames),
    )
    return registry.publish(weights, loaded.refiner, loaded.detector, manifest)


# The served registry of the service and reliability suites. v0001 is trained briefly (a few seconds
# on two cores) on synthetic normal footage, long enough for D to separate (a D that has not learned
# has a D(R(X)) spread of ~1e-5, below float noise in the fused score), and calibrated on 48 held-out
# normal frames (4 clips x 60 frames, a fifth held out in blocks).
SERVED_FOOTAGE = {"clips": 4, "frames": 60, "seed": 100}
SERVED_TRAINING = dict(patches_per_epoch=2048, batch_size=32, max_epochs=2, holdout_patches=128,
                       detector_polish_epochs=0, patience=1000, phase_two_steps=200, holdout_fraction=0.2)
# a score that goes through D (so v0002, D's bias shifted, scores differ), frame by frame
SERVED_CALIBRATION = dict(score_mode="fused", smoothing_frames=1, false_alarm_rate=0.02)
# The footage the served model's separation is checked on (never trained or calibrated on): a normal
# clip, and a clip whose planted anomaly (the fast bright block) starts at frame 20.
CHECK_NORMAL_SEED, CHECK_PLANTED_SEED, CHECK_PLANTED_FROM = 900, 901, 20


def offline_scores(weights: Path, version: str, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frame scores, flags) of one clip scored at once by a version, outside the service."""
    from model.offline import scorer_for
    from model.scoring import FrameStream

    results = FrameStream(scorer_for(registry.load_version(weights, version))).score(frames)
    return np.array([r.score for r in results]), np.array([r.anomalous for r in results])


def served_separation(weights: Path, version: str = "v0001") -> dict[str, float]:
    """How a version scores fresh synthetic footage: normal frames (a normal clip and the planted
    clip's frames before its anomaly) against the planted anomaly's frames. Asserts that every
    anomalous frame scores above every normal frame and is flagged, and that few normal frames are."""
    normal, _ = offline_scores(weights, version, synthetic_frames(40, seed=CHECK_NORMAL_SEED))
    planted, flags = offline_scores(
        weights, version, synthetic_frames(40, seed=CHECK_PLANTED_SEED, anomaly_from=CHECK_PLANTED_FROM))
    normal = np.concatenate([normal, planted[:CHECK_PLANTED_FROM]])
    anomalous = planted[CHECK_PLANTED_FROM:]
    threshold = registry.load_version(weights, version).calibration.threshold
    figures = {
        "threshold": threshold, "normal_median": float(np.median(normal)), "normal_max": float(normal.max()),
        "anomaly_min": float(anomalous.min()), "anomaly_median": float(np.median(anomalous)),
        "normal_flagged_share": float((normal > threshold).mean()),
    }
    assert figures["anomaly_min"] > figures["normal_max"], figures
    assert flags[CHECK_PLANTED_FROM:].all(), figures
    assert figures["normal_flagged_share"] <= 0.1, figures
    return figures


def train_served_registry(root: Path) -> tuple[Path, dict[str, float]]:
    """root/weights with v0001 (trained as above, its separation checked; ACTIVE) and v0002 (v0001
    with D's bias shifted: a distinct version whose scores differ); and v0001's separation figures."""
    from model.train import train

    footage = [write_frames(root / f"normal{i}", synthetic_frames(SERVED_FOOTAGE["frames"], seed=SERVED_FOOTAGE["seed"] + i))
               for i in range(SERVED_FOOTAGE["clips"])]
    weights = root / "weights"
    result = train(footage, weights, TINY_MODEL, TrainConfig(**SERVED_TRAINING), device="cpu", show_progress_bar=False,
                   calibration_config=CalibrationConfig(**SERVED_CALIBRATION))
    assert result.version == "v0001"
    assert result.manifest["training_footage"]["holdout_frames"] == 48
    separation = served_separation(weights)
    publish_second_version(weights, detector_bias_shift=3.0)
    return weights, separation


def settings_env(values: dict[str, Any]) -> dict[str, str]:
    """Settings field values as the VAD_* environment variables a `vad serve` / `vad worker` reads."""
    env = {}
    for name, value in values.items():
        if isinstance(value, (dict, list)):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"VAD_{name.upper()}"] = text
    return env


def registry_copy(weights: Path, tmp_path: Path) -> Path:
    """A test's private copy of a session registry (to activate versions in and tamper with)."""
    return Path(shutil.copytree(weights, tmp_path / "weights"))


def clear_vad_environment(monkeypatch: Any) -> None:
    """No VAD_* variable of the machine running the tests reaches a Settings() (pytest.MonkeyPatch)."""
    for name in list(os.environ):
        if name.startswith("VAD_"):
            monkeypatch.delenv(name)


class LiveServer:
    """create_app(settings) under uvicorn in a thread on a free loopback port; ``wrap`` may put an
    ASGI wrapper (e.g. a byte counter) around the app."""

    def __init__(self, settings: Settings, wrap: Callable[[Any], Any] | None = None) -> None:
        import uvicorn

        from service.app import create_app
        from service.server import uvicorn_config

        self.settings = settings
        self.app = create_app(settings)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        served = wrap(self.app) if wrap else self.app
        self.server = uvicorn.Server(uvicorn_config(served, settings, "127.0.0.1", self.port, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def services(self) -> Any:  # service.deps.Services
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


def started_clients(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """For a fixture: make(**settings) -> a started TestClient (lifespan run); all closed after."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def started_servers(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., LiveServer]]:
    """For a fixture: start(wrap=None, **settings) -> a started LiveServer; all stopped after."""
    servers: list[LiveServer] = []

    def start(wrap: Callable[[Any], Any] | None = None, **overrides: Any) -> LiveServer:
        server = LiveServer(make_settings(**overrides), wrap).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
