"""The footage the bench scores: Ped2 test clips (frames, labels and their JPEG files) when the data set
is there, else synthetic Ped2-sized frames; and the same footage as JPEG frames or MJPG clips to send
to a server."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from model.data import read_footage

CAMERA_FPS = 10.0  # Ped2's camera rate: each benchmark stream sends this many frames per second
PED2_HEIGHT, PED2_WIDTH = 240, 360


def default_dataset_root() -> Path | None:
    """VAD_PED2_ROOT, else ../shared/datasets/ped2 beside the repository, when it holds Ped2's labels."""
    candidates = [os.environ.get("VAD_PED2_ROOT"), Path(__file__).resolve().parents[3] / "shared" / "datasets" / "ped2"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "labels" / "test_frame_labels.json").is_file():
            return Path(candidate)
    return None


class Footage:
    """Ped2 test clips (frames + labels), or synthetic Ped2-sized frames when the data set is absent."""

    def __init__(self, root: Path | None, clip_names: list[str] | None, max_frames: int | None, seed: int = 0) -> None:
        self.root = root
        self.clips: list[tuple[str, np.ndarray, np.ndarray | None, list[Path]]] = []
        if root is not None:
            from model.evaluate import ped2_test_clips

            for clip in ped2_test_clips(root):
                if clip_names is not None and clip.name not in clip_names:
                    continue
                gray = read_footage(clip.folder, max_frames).gray
                files = sorted(p for p in clip.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                self.clips.append((clip.name, gray, clip.labels[: len(gray)], files[: len(gray)]))
        else:
            self.clips.append(("synthetic", synthetic_ped2(max_frames or 40, seed), None, []))

    @property
    def labelled(self) -> bool:
        return all(labels is not None for _, _, labels, _ in self.clips)

    def frames(self, count: int) -> np.ndarray:
        """The first ``count`` frames over the clips, in order."""
        out = np.concatenate([gray for _, gray, _, _ in self.clips])
        return out[:count]


def synthetic_ped2(count: int, seed: int) -> np.ndarray:
    """A static textured 240x360 scene with a few small bright blobs walking across it."""
    import cv2

    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(60, 160, (PED2_HEIGHT, PED2_WIDTH)).astype(np.uint8), (7, 7), 0)
    frames = []
    for t in range(count):
        frame = background.astype(np.float32)
        for k in range(4):
            y, x = 40 + 45 * k, (20 + 3 * t * (k + 1)) % (PED2_WIDTH - 16)
            frame[y : y + 24, x : x + 10] = 30.0
        frame += rng.normal(0, 2, frame.shape)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def jpeg_frames(footage: Footage, count: int) -> list[bytes]:
    """Up to ``count`` frames as JPEG bytes: Ped2's own files, or the synthetic frames encoded."""
    import cv2

    files = [f for _, _, _, fs in footage.clips for f in fs]
    if files:
        return [f.read_bytes() for f in files[:count]]
    gray = footage.frames(count)
    return [cv2.imencode(".jpg", g, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for g in gray]


def write_clip(path: Path, gray: np.ndarray, fps: float = CAMERA_FPS) -> Path:
    """Gray frames as an MJPG AVI at ``path``."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (gray.shape[2], gray.shape[1]))
    for frame in gray:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path
