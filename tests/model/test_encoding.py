import numpy as np
import pytest
import torch

from model.config import FLOW_PRESET_NAMES, ConfigError, ModelConfig
from model.encoding import FLOW_PRESETS, encode_frames, to_model_input


def test_appearance_is_the_frame_itself() -> None:
    gray = np.random.default_rng(0).integers(0, 256, (3, 8, 9), dtype=np.uint8)
    channels = encode_frames(gray, ModelConfig(input_mode="appearance", patch_size=8, stride=8))
    assert channels.shape == (3, 1, 8, 9)
    assert np.array_equal(channels[:, 0], gray)


def test_motion_is_the_scaled_previous_frame_difference() -> None:
    gray = np.zeros((3, 4, 4), dtype=np.uint8)
    gray[1] = 10
    gray[2] = 100
    config = ModelConfig(input_mode="appearance+motion", patch_size=8, stride=8, motion_gain=4.0)
    channels = encode_frames(gray, config)
    assert channels[0, 1].max() == 0  # first frame: no predecessor
    assert (channels[1, 1] == 40).all()
    assert (channels[2, 1] == 255).all()  # 90 * 4 clipped
    # a stream that passes the previous frame gets the same channel as the whole clip
    assert np.array_equal(encode_frames(gray[2:], config, previous=gray[1]), channels[2:])


def test_flow_sees_a_moving_square() -> None:
    gray = np.full((2, 64, 64), 80, dtype=np.uint8)
    gray[0, 20:36, 10:26] = 220
    gray[1, 20:36, 14:30] = 220  # moved 4 px right
    channels = encode_frames(gray, ModelConfig(input_mode="appearance+flow", patch_size=16, stride=16))
    flow = channels[1, 1].astype(float)
    assert flow[20:36, 10:30].mean() > 5 * flow[50:, 50:].mean() + 1


def test_model_input_scale() -> None:
    x = to_model_input(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]


def test_bad_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_frames(np.zeros((2, 4, 4), dtype=np.float32), ModelConfig())


def test_the_flow_preset_is_part_of_the_config() -> None:
    """encode_frames uses the config's preset; presets really differ; an override wins."""
    assert tuple(FLOW_PRESETS) == FLOW_PRESET_NAMES  # every name ModelConfig accepts has settings
    gray = np.full((2, 64, 64), 80, dtype=np.uint8)
    gray[0, 20:36, 10:26] = 220
    gray[1, 20:36, 13:29] = 220
    base = {"input_mode": "appearance+flow", "patch_size": 16, "stride": 16}
    three = encode_frames(gray, ModelConfig(**base, flow_preset="farneback"))
    one = encode_frames(gray, ModelConfig(**base, flow_preset="farneback-1iter"))
    assert not np.array_equal(three, one)
    assert np.array_equal(encode_frames(gray, ModelConfig(**base, flow_preset="farneback-1iter"), flow="farneback"), three)
    with pytest.raises(ConfigError, match="flow_preset"):
        ModelConfig(**base, flow_preset="lucas-kanade")  # type: ignore[arg-type]


def test_settings_saved_before_the_flow_preset_existed_keep_their_flow() -> None:
    saved = ModelConfig(input_mode="appearance+flow").to_dict()
    assert saved["flow_preset"] == "farneback-1iter"
    assert ModelConfig.from_saved(saved).flow_preset == "farneback-1iter"
    del saved["flow_preset"]
    assert ModelConfig.from_saved(saved).flow_preset == "farneback"  # what they were trained with
    assert ModelConfig.from_dict(saved).flow_preset == "farneback-1iter"  # new settings: today's default
