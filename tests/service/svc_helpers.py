"""Helpers shared by the service tests: synthetic footage, encoded images, a tiny AVI, metrics parsing."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

HEIGHT, WIDTH = 64, 96
PATCH = 16
PATCHES_PER_FRAME = (HEIGHT // PATCH) * (WIDTH // PATCH)  # 4 x 6 = 24


def synthetic_frames(count: int, seed: int = 0, start: int = 0, anomaly: bool = False) -> np.ndarray:
    """(count, 64, 96) uint8: a bright square moving right on a noisy background."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 100, (HEIGHT, WIDTH)).astype(np.int16)
    frames = []
    for t in range(start, start + count):
        frame = base + rng.integers(-6, 7, (HEIGHT, WIDTH))
        x = (4 + 3 * t) % (WIDTH - 16)
        frame[24:36, x : x + 12] = 220
        if anomaly:
            frame[4:60, 40:90] = rng.integers(0, 255, (56, 50))
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def png_bytes(frame: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", frame)
    assert ok
    return data.tobytes()


def jpeg_bytes(frame: np.ndarray, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR declaring ``width`` x ``height`` and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64


def jpeg_header_only(width: int, height: int) -> bytes:
    """SOI, an APP0 segment and an SOF0 declaring ``width`` x ``height``; no scan."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\x00" * 32


def write_avi(path: Path, frames: np.ndarray, fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (frames.shape[2], frames.shape[1]), False)
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def metric_families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(families: dict, family: str, sample: str, **labels: str) -> float | None:
    for s in families[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def histogram_buckets(families: dict, family: str, **labels: str) -> dict[float, float]:
    """{upper bound: cumulative count} of one histogram series."""
    buckets: dict[float, float] = {}
    for s in families[family].samples:
        if s.name == f"{family}_bucket" and all(s.labels.get(k) == v for k, v in labels.items()):
            buckets[float(s.labels["le"])] = buckets.get(float(s.labels["le"]), 0.0) + s.value
    return buckets
