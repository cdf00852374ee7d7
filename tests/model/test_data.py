import numpy as np
import pytest
import torch

from model.data import EncodedClip, FootageError, PatchSampler, read_footage, split_holdout


def _clip(frames: int = 6) -> EncodedClip:
    channels = np.zeros((frames, 2, 40, 40), np.uint8)
    channels[:, 0] = 100
    channels[:, 1, 10:20, 10:20] = 80  # something moves here, at "speed" 80
    return EncodedClip("c", channels)


def test_holdout_is_each_clips_tail() -> None:
    train, holdout = split_holdout([_clip(20)], 0.15)
    assert train[0].frames == 17 and holdout[0].frames == 3


def test_motion_sampling_centres_patches_on_movement() -> None:
    sampler = PatchSampler([_clip()], patch_size=16, motion_share=1.0, seed=0)
    patches = sampler.sample(64)
    assert patches.shape == (64, 2, 16, 16)
    moving = (patches[:, 1] > -1).flatten(1).any(1)
    assert moving.all()


def test_pseudo_anomalies_speed_up_the_motion_channel_only() -> None:
    sampler = PatchSampler([_clip()], patch_size=16, motion_share=1.0, seed=0)
    sped = sampler.sample_sped_up(32, (2.0, 3.0))
    motion = (sped[:, 1] + 1) * 255 / 2  # back to grey levels
    peak = motion.flatten(1).max(1).values
    assert torch.all(peak >= 160 - 1) and torch.all(peak <= 240 + 1)  # 80 x [2, 3]
    assert torch.allclose(sped[:, 0], torch.full_like(sped[:, 0], 100 * 2 / 255 - 1))


def test_unreadable_footage_names_the_file(tmp_path) -> None:
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(FootageError, match="x.mp4"):
        read_footage(bad)
