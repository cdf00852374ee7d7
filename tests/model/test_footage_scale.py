"""Any camera: processing scale, motion full scale and frame rate come from the normal footage; held-out
frames spread over it; tau checked on a second held-out slice."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from model.calibrate import second_slice_check
from model.config import ConfigError, ModelConfig
from model.data import EncodedClip, held_out_blocks, split_holdout
from model.footage_scale import (
    MAX_FRAME_HEIGHT, TARGET_OBJECT_PX, choose_frame_height, fit_input_to_footage, MotionSaturation,
)
from model.encoding import encode_frames, processing_size


def _walkers(count: int, height: int, width: int, person: int, speed: float, seed: int = 0) -> np.ndarray:
    """Dark 'people' ``person`` rows tall crossing a textured background at ``speed`` px/frame."""
    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(90, 160, (height, width)).astype(np.uint8), (9, 9), 0)
    frames = []
    for t in range(count):
        frame = background.copy()
        for lane in range(3):
            x = int(10 + lane * width / 3 + speed * t) % (width - person)
            y = int(height * (0.2 + 0.25 * lane))
            frame[y : y + person, x : x + max(2, person // 3)] = 20
        frames.append(frame)
    return np.stack(frames)


def test_processing_height_puts_people_at_the_target_size() -> None:
    small = choose_frame_height(240, np.full(50, TARGET_OBJECT_PX), 30)
    assert small == 240  # Ped2-sized people: native size
    assert choose_frame_height(240, np.full(50, TARGET_OBJECT_PX * 1.1), 30) == 240  # within tolerance
    large = choose_frame_height(960, np.full(50, 4 * TARGET_OBJECT_PX), 30)
    assert large == 240  # people four times taller: a quarter of the rows
    assert choose_frame_height(240, np.full(50, TARGET_OBJECT_PX / 3), 30) == 240  # never upscaled
    assert choose_frame_height(2160, np.array([]), 30) == MAX_FRAME_HEIGHT  # nothing moves: capped
    assert choose_frame_height(480, np.full(5, 2000.0), 30) == 60  # at least two patches


def test_fit_from_footage_is_resolution_and_frame_rate_invariant() -> None:
    config = ModelConfig(input_mode="appearance+flow")
    native = _walkers(30, 240, 360, person=28, speed=2.0)
    doubled = np.stack([cv2.resize(f, (720, 480), interpolation=cv2.INTER_LINEAR) for f in native])
    fitted, report = fit_input_to_footage(config, [native], fps=10.0)
    fitted_big, _ = fit_input_to_footage(config, [doubled], fps=10.0)
    assert fitted.frame_height == 240 and fitted.reference_fps == 10.0
    assert abs(fitted_big.frame_height - 240) <= 24  # the same scene at twice the size: about the same rows
    assert fitted.flow_scale_px == pytest.approx(report["flow_scale_px"]) and fitted.flow_scale_px > 0
    # the model encodes the doubled footage at its own processing size, with the same motion
    a = encode_frames(native, fitted, fps=10.0)
    b = encode_frames(doubled, fitted, fps=10.0)
    assert a.shape == b.shape
    assert abs(float(a[5:, 1].mean()) - float(b[5:, 1].mean())) < 0.15 * float(a[5:, 1].mean())
    # half the frame rate: twice the motion per frame, scaled back by fps / reference_fps
    half = encode_frames(native[::2], fitted, fps=5.0)
    assert abs(float(half[3:, 1].mean()) - float(a[6::2, 1].mean())) < 0.3 * float(a[6::2, 1].mean())


def test_a_given_frame_height_is_kept_and_processing_size_keeps_the_aspect_ratio() -> None:
    config = ModelConfig(input_mode="appearance+motion")
    fitted, report = fit_input_to_footage(config, [_walkers(10, 240, 360, 28, 1.0)], fps=25.0, frame_height=120)
    assert fitted.frame_height == 120 and report["frame_height_chosen"] == "given"
    assert processing_size(480, 720, fitted) == (120, 180)
    with pytest.raises(ConfigError, match="frame_height"):
        ModelConfig(frame_height=10)


def test_saturation_is_the_share_of_moving_values_at_full_scale() -> None:
    channels = np.zeros((2, 2, 4, 4), np.uint8)
    channels[:, 1, 0, :] = 255  # 8 saturated
    channels[:, 1, 1, :] = 100  # 8 moving, not saturated
    with_motion, appearance_only = MotionSaturation(), MotionSaturation()
    with_motion.add(channels)
    appearance_only.add(channels[:, :1])
    assert with_motion.share == 0.5
    assert appearance_only.share is None  # appearance only: no motion channel


def test_held_out_blocks_spread_over_long_clips() -> None:
    assert held_out_blocks(20, 0.15) == [6, 13, 19]
    clip = EncodedClip("cam", np.arange(500).reshape(500, 1, 1, 1).astype(np.uint8))
    train, holdout = split_holdout([clip], 0.15)
    assert [(h.first_frame, h.frames) for h in holdout] == [(150, 25), (325, 25), (475, 25)]
    seen = sorted(f for part in train + holdout for f in range(part.first_frame, part.first_frame + part.frames))
    assert seen == list(range(500))  # every frame once, training and held-out never overlap
    for part in train + holdout:  # each segment's frames are the footage's frames at its offset
        assert np.array_equal(part.channels[:, 0, 0, 0], np.arange(part.first_frame, part.first_frame + part.frames) % 256)


def test_short_clips_hold_out_their_tail() -> None:
    train, holdout = split_holdout([EncodedClip("c", np.zeros((20, 1, 2, 2), np.uint8))], 0.15)
    assert [(t.first_frame, t.frames) for t in train] == [(0, 17)]
    assert [(h.first_frame, h.frames) for h in holdout] == [(17, 3)]


def test_second_slice_check_measures_tau_on_frames_it_was_not_drawn_from() -> None:
    rng = np.random.default_rng(0)
    same = [rng.standard_normal(400) for _ in range(6)]
    check = second_slice_check(same, 0.01)
    assert check["asked"] == 0.01 and check["mean"] == pytest.approx(0.01, abs=0.01)
    drifted = [rng.standard_normal(400) + (3.0 if i % 2 else 0.0) for i in range(6)]  # slice b is louder
    check = second_slice_check(drifted, 0.01)
    assert check["slice_a_tau_on_b"] > 0.5 and check["slice_b_tau_on_a"] == 0.0
    assert second_slice_check(same[:1], 0.01) == {}  # one segment: nothing to check against
