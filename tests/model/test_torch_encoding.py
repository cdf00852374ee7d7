"""The torch encoding (model/torch_encoding.py, model/flow_torch.py) is the OpenCV encoding
(model/encoding.py) within stated bounds, on the CPU always and on CUDA where there is one.

Bounds, against what was measured on this machine's CPU (OpenCV 5.0, torch 2.13):
- appearance and frame-difference channels: equal;
- resized frames: within 1 grey level (OpenCV's bilinear weights are fixed point), equal for 2x shrinks;
- Farneback flow vectors: within FLOW_PX of OpenCV's (measured at most 1.8e-5 px on Ped2 pairs);
- the uint8 flow channel: at most FLOW_MAX_LEVELS grey levels apart, more than 1 level apart on at
  most FLOW_SHARE_OVER_1 of the pixels, mean |difference| at most FLOW_MEAN_LEVELS (measured on
  Ped2: max 1 for farneback-1iter, 3 for farneback; over 1 on <= 4.5e-6; mean <= 5.5e-5);
- v0003's scores through FrameStream: frame scores within FRAME_SCORE, patch scores within
  PATCH_SCORE, the same flags and the same patches rescored (measured on Ped2: 1.2e-4 and 8.5e-4,
  against tau 4.08 and a normal-frame spread of several units).
"""

from __future__ import annotations

import glob

import cv2
import numpy as np
import pytest
import torch

from model import registry
from model.config import ModelConfig
from model.encoding import encode_frames, resolve_encoding
from model.flow_torch import farneback_flow
from model.offline import scorer_for
from model.scoring import FrameStream, patch_scores
from model.torch_encoding import encode_frames_torch, encode_stack, resize_frames
from service.bench.footage import default_dataset_root, synthetic_ped2
from tests.support import synthetic_frames

FLOW_PX = 1e-3
FLOW_MAX_LEVELS = 3
FLOW_SHARE_OVER_1 = 1e-4
FLOW_MEAN_LEVELS = 1e-3
FRAME_SCORE = 1e-3
PATCH_SCORE = 5e-3

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device here: the CUDA parity runs where torch sees a GPU")),
]
PED2 = default_dataset_root()
needs_ped2 = pytest.mark.skipif(PED2 is None, reason="Ped2 not found (VAD_PED2_ROOT or ../shared/datasets/ped2)")


def flow_config(preset: str, frame_height: int | None = None) -> ModelConfig:
    return ModelConfig(input_mode="appearance+flow", flow_preset=preset, flow_scale_px=3.867,
                       patch_size=16, stride=16, frame_height=frame_height)


def assert_flow_channel_close(reference: np.ndarray, mine: np.ndarray) -> None:
    assert np.array_equal(reference[:, 0], mine[:, 0]), "the appearance channel differs"
    difference = np.abs(reference[:, 1].astype(np.int16) - mine[:, 1])
    figures = f"max {difference.max()}, over 1: {(difference > 1).mean():.2e}, mean {difference.mean():.2e}"
    assert difference.max() <= FLOW_MAX_LEVELS, figures
    assert (difference > 1).mean() <= FLOW_SHARE_OVER_1, figures
    assert difference.mean() <= FLOW_MEAN_LEVELS, figures


def ped2_clips(count: int, frames: int) -> list[np.ndarray]:
    from model.data import read_footage

    assert PED2 is not None
    folders = sorted(glob.glob(str(PED2 / "testing" / "frames" / "*")))
    return [read_footage(folder, frames).gray for folder in folders[:: max(1, len(folders) // count)][:count]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["farneback-1iter", "farneback", "farneback-half"])
def test_flow_channel_matches_opencv_on_synthetic_frames(device: str, preset: str) -> None:
    for gray in (synthetic_ped2(6, seed=1), synthetic_frames(8, seed=3, anomaly_from=3)):
        config = flow_config(preset)
        assert_flow_channel_close(encode_frames(gray, config), encode_frames_torch(gray, config, device=device).cpu().numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_flow_vectors_match_opencv(device: str) -> None:
    gray = synthetic_ped2(4, seed=2)
    settings = (0.5, 3, 15, 2, 5, 1.2)
    expected = np.stack([cv2.calcOpticalFlowFarneback(a, b, None, *settings, 0) for a, b in zip(gray[:-1], gray[1:])])
    frames = torch.from_numpy(gray).to(device)
    flow = farneback_flow(frames[:-1], frames[1:], *settings).permute(0, 2, 3, 1).cpu().numpy()
    assert np.abs(flow - expected).max() <= FLOW_PX
    assert np.abs(expected).max() > 1  # the blobs move: there is flow to get right


@pytest.mark.parametrize("device", DEVICES)
def test_frame_difference_and_appearance_are_equal(device: str) -> None:
    gray = synthetic_frames(6, seed=4, anomaly_from=2)
    config = ModelConfig(input_mode="appearance+motion", patch_size=16, stride=16, motion_gain=4.0, reference_fps=10.0)
    for previous in (None, gray[0]):
        expected = encode_frames(gray[1:], config, previous, fps=25.0)
        assert np.array_equal(encode_frames_torch(gray[1:], config, previous, fps=25.0, device=device).cpu().numpy(), expected)
    appearance = ModelConfig(input_mode="appearance", patch_size=16, stride=16)
    assert np.array_equal(encode_frames_torch(gray, appearance, device=device).cpu().numpy(), encode_frames(gray, appearance))


@pytest.mark.parametrize("device", DEVICES)
def test_resized_frames_within_one_grey_level(device: str) -> None:
    gray = np.random.default_rng(0).integers(0, 256, (2, 64, 96), dtype=np.uint8)
    for height, width in ((32, 48), (40, 60), (27, 41), (100, 150)):
        interpolation = cv2.INTER_AREA if height < 64 else cv2.INTER_LINEAR
        expected = np.stack([cv2.resize(f, (width, height), interpolation=interpolation) for f in gray])
        mine = resize_frames(torch.from_numpy(gray).to(device), height, width).cpu().numpy()
        limit = 0 if (height, width) == (32, 48) else 1  # OpenCV's 2x2 shrink is integer arithmetic: equal
        assert np.abs(mine.astype(np.int16) - expected).max() <= limit, (height, width)
    # a processing size below the frames' (frame_height): the whole encoding resizes the same way
    config = flow_config("farneback-1iter", frame_height=120)
    frames = synthetic_ped2(4, seed=5)
    reference, mine = encode_frames(frames, config), encode_frames_torch(frames, config, device=device).cpu().numpy()
    assert reference.shape == mine.shape == (4, 2, 120, 180)
    assert_flow_channel_close(reference, mine)


@pytest.mark.parametrize("device", DEVICES)
def test_frames_the_processing_size_enlarges_encode_as_with_opencv(device: str) -> None:
    """Frames below the processing size are enlarged on the host by OpenCV itself (enlarged_on_host):
    the device's bilinear resize is within 1 grey level of OpenCV's, which Farneback turned into a
    flow channel up to 12 levels apart on Ped2 frames at 200x300. Now the appearance is equal and
    the flow channel within the Ped2 bounds (measured: max 1 level, mean 3e-5)."""
    config = flow_config("farneback-1iter", frame_height=240)
    frames = synthetic_frames(4, seed=1)  # 64x96 -> 240x360
    reference, mine = encode_frames(frames, config), encode_frames_torch(frames, config, device=device).cpu().numpy()
    assert reference.shape == mine.shape == (4, 2, 240, 360)
    assert_flow_channel_close(reference, mine)
    # a stream's frames, through the scorer: predecessor and frames at the processing size alike
    scorer = scorer_for(registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu"), device, encoding="torch")
    assert tuple(scorer.frames_in(frames).shape) == (4, 240, 360)


@pytest.mark.parametrize("device", DEVICES)
def test_streams_batched_together_equal_one_by_one(device: str) -> None:
    config = flow_config("farneback-1iter")
    gray = synthetic_ped2(10, seed=6)
    chunks = torch.from_numpy(np.stack([gray[1:5], gray[6:10]])).to(device)
    previous = torch.from_numpy(np.stack([gray[0], gray[5]])).to(device)
    together = encode_stack(chunks, config, previous).cpu().numpy()
    for stream in range(2):
        alone = encode_frames_torch(chunks[stream], config, previous[stream]).cpu().numpy()
        assert np.abs(together[stream].astype(np.int16) - alone).max() <= 1  # a batch size may change float rounding


def v0003_scores(gray_clips: list[np.ndarray], encoding: str, device: str, chunk: int) -> tuple[np.ndarray, np.ndarray, int]:
    loaded = registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu")
    scorer = scorer_for(loaded, device, encoding=encoding)
    calibration = loaded.calibration
    frames, patches, scored = [], [], 0
    for gray in gray_clips:
        stream = FrameStream(scorer, 10.0)
        for start in range(0, len(gray), chunk):
            frames += [r.score for r in stream.score(gray[start : start + chunk])]
            assert stream.last_raw is not None
            patches.append(patch_scores(stream.last_raw, calibration.score_mode, calibration).numpy())
        scored += stream.patches_scored
    return np.array(frames), np.concatenate(patches), scored


def assert_scores_close(gray_clips: list[np.ndarray], device: str) -> None:
    frames_cv, patches_cv, scored_cv = v0003_scores(gray_clips, "opencv", "cpu", 8)
    frames_torch, patches_torch, scored_torch = v0003_scores(gray_clips, "torch", device, 8)
    tau = registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu").calibration.threshold
    assert np.abs(frames_cv - frames_torch).max() <= FRAME_SCORE
    assert np.abs(patches_cv - patches_torch).max() <= PATCH_SCORE
    assert np.array_equal(frames_cv > tau, frames_torch > tau)
    assert scored_cv == scored_torch


@pytest.mark.parametrize("device", DEVICES)
def test_v0003_scores_match_the_opencv_encoding_on_synthetic_frames(device: str) -> None:
    assert_scores_close([synthetic_ped2(17, seed=7)], device)


@needs_ped2
@pytest.mark.parametrize("device", DEVICES)
def test_flow_channel_matches_opencv_on_ped2(device: str) -> None:
    loaded_config = registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu").config
    for gray in ped2_clips(2, 9):
        assert_flow_channel_close(encode_frames(gray, loaded_config),
                                  encode_frames_torch(gray, loaded_config, device=device).cpu().numpy())


@needs_ped2
@pytest.mark.parametrize("device", DEVICES)
def test_v0003_scores_match_the_opencv_encoding_on_ped2(device: str) -> None:
    assert_scores_close(ped2_clips(2, 17), device)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_encoding_keeps_patches_on_the_device(device: str) -> None:
    loaded = registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu")
    stream = FrameStream(scorer_for(loaded, device, encoding="torch"), 10.0)
    patches, _, count = stream.prepare(synthetic_ped2(3, seed=8))
    assert patches.device.type == torch.device(device).type and count == 3
    assert isinstance(stream.previous, torch.Tensor) and stream.previous.device.type == torch.device(device).type


def test_auto_picks_torch_on_cuda_and_opencv_on_the_cpu() -> None:
    assert resolve_encoding("auto", "cpu") == "opencv"
    assert resolve_encoding("auto", "cuda") == "torch"
    assert resolve_encoding("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown encoding"):
        resolve_encoding("gpu", "cpu")


def test_a_stream_in_pieces_scores_as_the_whole_with_the_torch_encoding() -> None:
    loaded = registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu")
    scorer = scorer_for(loaded, "cpu", encoding="torch")
    gray = synthetic_ped2(12, seed=9)
    whole = [r.score for r in FrameStream(scorer, 10.0).score(gray)]
    pieces = [r.score for r in FrameStream(scorer, 10.0).score_clip(gray, 5)]
    assert np.allclose(whole, pieces, rtol=0, atol=1e-5)
