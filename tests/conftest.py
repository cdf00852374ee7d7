"""Synthetic footage built once per session, and the tiny model configuration tests train with."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from model.config import ModelConfig, TrainConfig

PED2_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ped2"
HEIGHT, WIDTH = 64, 96


def synthetic_frames(count: int, seed: int, anomaly_from: int | None = None) -> np.ndarray:
    """A fixed textured background with two small 'pedestrians' walking slowly (1 px/frame).

    From frame ``anomaly_from`` on, a large bright block crosses the scene fast (6 px/frame).
    """
    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(60, 140, (HEIGHT, WIDTH)).astype(np.uint8), (5, 5), 0)
    frames = []
    for t in range(count):
        frame = background.copy()
        for lane, (y, speed) in enumerate(((14, 1), (40, -1))):
            x = (10 + lane * 30 + speed * t) % (WIDTH - 8)
            frame[y : y + 12, x : x + 6] = 30
        if anomaly_from is not None and t >= anomaly_from:
            x = (6 * (t - anomaly_from)) % (WIDTH - 20)
            frame[20:40, x : x + 20] = 250
        noise = rng.normal(0, 2, frame.shape)
        frames.append(np.clip(frame + noise, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_frames(folder: Path, frames: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    return folder


def write_video(path: Path, frames: np.ndarray, fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (frames.shape[2], frames.shape[1]))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def tiny_model_config(input_mode: str = "appearance+motion") -> ModelConfig:
    return ModelConfig(
        input_mode=input_mode, patch_size=16, stride=16, latent_dim=8,
        refiner_channels=(8, 8, 16), detector_channels=(8, 8, 16),
    )


def tiny_train_config(**overrides) -> TrainConfig:
    fields = dict(patches_per_epoch=1024, batch_size=64, max_epochs=2, holdout_patches=128,
                  detector_polish_epochs=1, holdout_fraction=0.2, phase_two_steps=100,
                  phase_two_batch_size=32)
    fields.update(overrides)
    return TrainConfig(**fields)


@pytest.fixture(scope="session")
def normal_footage(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("normal")
    return [write_frames(root / f"clip{i}", synthetic_frames(40, seed=i)) for i in range(2)]


@pytest.fixture(scope="session")
def anomalous_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("anomalous")
    return write_video(root / "anomaly.avi", synthetic_frames(30, seed=5, anomaly_from=15))


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory: pytest.TempPathFactory, normal_footage: list[Path]) -> Path:
    """One tiny version trained once for the whole session (a few seconds)."""
    from model.train import train

    weights = tmp_path_factory.mktemp("weights")
    train(normal_footage, weights, tiny_model_config(), tiny_train_config(), device="cpu",
          show_progress_bar=False)
    return weights
