"""Normal footage in, training patches out.

Footage is a video file (anything OpenCV decodes) or a folder of image frames (sorted by name). Each
clip is split in time into blocks; a share ``holdout_fraction`` of the blocks, spread evenly over the
clip, is held out for the stopping rule and for calibration, so the threshold never comes from frames
the networks fitted and holds for the whole of a camera's footage, not only its last minutes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from model.config import ModelConfig
from model.encoding import encode_frames, to_model_input

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pgm"}


class FootageError(ValueError):
    """Footage that cannot be used; the message names the file."""


@dataclass
class Clip:
    name: str
    gray: np.ndarray  # (T, H, W) uint8
    fps: float


def _read_image_folder(folder: Path, max_frames: int | None) -> Clip:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FootageError(f"{folder}: no image frames ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder")
    if max_frames is not None:
        files = files[:max_frames]
    frames: list[np.ndarray] = []
    for file in files:
        image = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise FootageError(f"{file}: not a readable image")
        if frames and image.shape != frames[0].shape:
            raise FootageError(
                f"{file}: frame size {image.shape[1]}x{image.shape[0]} differs from "
                f"{frames[0].shape[1]}x{frames[0].shape[0]} of {files[0].name}"
            )
        frames.append(image)
    return Clip(folder.name, np.stack(frames), fps=10.0)


def _read_video_file(path: Path, max_frames: int | None) -> Clip:
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise FootageError(f"{path}: not a video OpenCV can decode")
        fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        frames: list[np.ndarray] = []
        while max_frames is None or len(frames) < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
            if frames and gray.shape != frames[0].shape:
                raise FootageError(f"{path}: frame {len(frames)} changes size mid-clip")
            frames.append(gray)
    finally:
        capture.release()
    if not frames:
        raise FootageError(f"{path}: no decodable frames")
    return Clip(path.stem, np.stack(frames), fps=fps if 0 < fps < 1000 else 10.0)


def read_footage(path: str | Path, max_frames: int | None = None) -> Clip:
    """Read one clip (video file or frame folder) as grayscale uint8 frames."""
    path = Path(path)
    if not path.exists():
        raise FootageError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_image_folder(path, max_frames)
    return _read_video_file(path, max_frames)


def load_normal_footage(paths: list[str | Path], max_frames: int | None = None) -> list[Clip]:
    """Read every clip; all must share one frame size (a fixed camera)."""
    if not paths:
        raise FootageError("no normal footage given")
    clips = [read_footage(p, max_frames) for p in paths]
    first = clips[0]
    for path, clip in zip(paths, clips):
        if clip.gray.shape[1:] != first.gray.shape[1:]:
            raise FootageError(
                f"{path}: frame size {clip.gray.shape[2]}x{clip.gray.shape[1]} differs from "
                f"{first.gray.shape[2]}x{first.gray.shape[1]} of {paths[0]} (one camera per model)"
            )
    return clips


def footage_digest(clips: list[Clip]) -> str:
    """sha256 over every frame, recorded in the manifest so a version names the footage it learned."""
    digest = hashlib.sha256()
    for clip in clips:
        digest.update(clip.gray.tobytes())
    return digest.hexdigest()


HOLDOUT_BLOCK_FRAMES = 25  # frames of one held-out block (2.5 s at 10 frames/s)


@dataclass
class EncodedClip:
    name: str
    channels: np.ndarray  # (T, C, H, W) uint8
    first_frame: int = 0  # index of channels[0] in the footage it was cut from

    @property
    def frames(self) -> int:
        return self.channels.shape[0]


def encode_clips(clips: list[Clip], config: ModelConfig) -> list[EncodedClip]:
    return [EncodedClip(clip.name, encode_frames(clip.gray, config, fps=clip.fps)) for clip in clips]


def held_out_blocks(blocks: int, fraction: float) -> list[int]:
    """Indices of the held-out blocks among ``blocks``: about ``fraction`` of them, evenly spread,
    the last one always among them."""
    count = max(1, int(round(blocks * fraction)))
    return sorted({int(np.ceil((i + 1) * blocks / count)) - 1 for i in range(count)})


def split_holdout(
    clips: list[EncodedClip], fraction: float, block_frames: int = HOLDOUT_BLOCK_FRAMES
) -> tuple[list[EncodedClip], list[EncodedClip]]:
    """Each clip is cut into equal blocks of about ``block_frames`` (a tenth of a shorter clip); the
    ``held_out_blocks`` are held out, the rest trains (one segment per run of kept blocks). A clip too
    short for ``fraction`` of it to be a whole block keeps its tail (``fraction`` of it, at least one
    frame) as before."""
    train, holdout = [], []
    for clip in clips:
        # short clips get shorter blocks (ten of them), so that held-out frames still spread out
        blocks = int(round(clip.frames / min(block_frames, max(4, clip.frames // 10))))
        if blocks * fraction < 1:  # too short to hold out whole blocks: the tail
            cut = min(clip.frames - 1, max(1, int(round(clip.frames * (1 - fraction)))))
            train.append(EncodedClip(clip.name, clip.channels[:cut], clip.first_frame))
            holdout.append(EncodedClip(clip.name, clip.channels[cut:], clip.first_frame + cut))
            continue
        bounds = np.linspace(0, clip.frames, blocks + 1).round().astype(int)
        kept_from = 0
        for index in held_out_blocks(blocks, fraction):
            begin, stop = int(bounds[index]), int(bounds[index + 1])
            if begin > kept_from:
                train.append(EncodedClip(clip.name, clip.channels[kept_from:begin], clip.first_frame + kept_from))
            holdout.append(EncodedClip(clip.name, clip.channels[begin:stop], clip.first_frame + begin))
            kept_from = stop
        if kept_from < clip.frames:
            train.append(EncodedClip(clip.name, clip.channels[kept_from:], clip.first_frame + kept_from))
    return train, holdout


class PatchSampler:
    """Random training patches from anywhere in the frames (not only grid positions).

    Most patches of a fixed camera are still background; a share ``motion_share`` of each batch is
    drawn around pixels where the second channel shows movement, so R and D spend their capacity on
    the people the scene is about.
    """

    def __init__(
        self, clips: list[EncodedClip], patch_size: int, motion_share: float, seed: int
    ) -> None:
        if not clips:
            raise FootageError("no training footage")
        self.clips = clips
        self.patch_size = patch_size
        self.motion_share = motion_share if clips[0].channels.shape[1] > 1 else 0.0
        self.rng = np.random.default_rng(seed)
        height, width = clips[0].channels.shape[2:]
        if height < patch_size or width < patch_size:
            raise FootageError(f"{clips[0].name}: frames {width}x{height} are smaller than a patch")
        self._frame_index = np.concatenate(
            [np.stack([np.full(c.frames, i), np.arange(c.frames)], 1) for i, c in enumerate(clips)]
        )
        self._moving = self._moving_points() if self.motion_share > 0 else np.empty((0, 4), int)

    def _moving_points(self) -> np.ndarray:
        """(clip, frame, y, x) of up to 200 moving pixels per frame, the patch centred on them."""
        points = []
        half = self.patch_size // 2
        for i, clip in enumerate(self.clips):
            motion = clip.channels[:, 1]
            for t in range(clip.frames):
                ys, xs = np.nonzero(motion[t] > 64)
                if len(ys) == 0:
                    continue
                pick = self.rng.choice(len(ys), size=min(200, len(ys)), replace=False)
                height, width = motion.shape[1:]
                y = np.clip(ys[pick] - half, 0, height - self.patch_size)
                x = np.clip(xs[pick] - half, 0, width - self.patch_size)
                points.append(np.stack([np.full(len(pick), i), np.full(len(pick), t), y, x], 1))
        return np.concatenate(points) if points else np.empty((0, 4), int)

    @property
    def has_motion(self) -> bool:
        return len(self._moving) > 0

    def _moving_patches(self, count: int) -> np.ndarray:
        points = self._moving[self.rng.integers(0, len(self._moving), count)]
        size = self.patch_size
        return np.stack([self.clips[c].channels[t, :, y : y + size, x : x + size] for c, t, y, x in points])

    def sample_moving(self, count: int) -> torch.Tensor:
        """(count, C, P, P) patches centred where something moves, in [-1, 1]."""
        return to_model_input(torch.from_numpy(self._moving_patches(count)))

    def sample_sped_up(self, count: int, speedup: tuple[float, float]) -> torch.Tensor:
        """Pseudo-anomalies: moving patches with the motion channel scaled as if moving faster."""
        batch = self._moving_patches(count).astype(np.float32)
        factors = self.rng.uniform(speedup[0], speedup[1], size=(count, 1, 1))
        batch[:, 1] = np.clip(batch[:, 1] * factors, 0, 255)
        return to_model_input(torch.from_numpy(batch))

    @property
    def frame_count(self) -> int:
        return len(self._frame_index)

    def sample(self, count: int) -> torch.Tensor:
        """(count, C, P, P) float patches in [-1, 1]."""
        moving = int(round(count * self.motion_share)) if len(self._moving) else 0
        picks = self._frame_index[self.rng.integers(0, len(self._frame_index), count - moving)]
        height, width = self.clips[0].channels.shape[2:]
        ys = self.rng.integers(0, height - self.patch_size + 1, len(picks))
        xs = self.rng.integers(0, width - self.patch_size + 1, len(picks))
        points = np.concatenate([np.column_stack([picks, ys, xs]), self._moving[
            self.rng.integers(0, len(self._moving), moving)
        ]]) if moving else np.column_stack([picks, ys, xs])
        size = self.patch_size
        batch = np.stack(
            [self.clips[c].channels[t, :, y : y + size, x : x + size] for c, t, y, x in points]
        )
        return to_model_input(torch.from_numpy(batch))
