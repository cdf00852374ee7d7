"""tau comes from held-out normal frames only: training never draws from the frames calibration
scores, and calibration scores exactly the held-out blocks.

Every frame of the footage is told apart by its content (the synthetic noise differs frame to frame),
so the frames each step saw are identified from the encoded arrays it was handed, whatever the
bookkeeping (clip names, first_frame) says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model import calibrate, data
from model.encoding import encode_frames
from tests.support import synthetic_frames, tiny_model_config, tiny_train_config, write_frames

CLIPS = {"cam0": 0, "cam1": 1}  # clip name -> seed
FRAMES = 60
# 60 frames at holdout_fraction 0.2: ten blocks of 6 frames, blocks 4 and 9 held out
HELD_OUT = set(range(24, 30)) | set(range(54, 60))


def _frame_ids(clips: dict[str, np.ndarray]) -> dict[bytes, tuple[str, int]]:
    return {channels[t].tobytes(): (name, t) for name, channels in clips.items() for t in range(len(channels))}


def test_calibration_scores_only_held_out_frames_and_training_never_draws_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model.train import train

    config = tiny_model_config()
    footage = {name: synthetic_frames(FRAMES, seed=seed) for name, seed in CLIPS.items()}
    folders = [write_frames(tmp_path / name, frames) for name, frames in footage.items()]
    # the model's input of every frame, as training encodes whole clips (folders play at 10 frames/s)
    ids = _frame_ids({name: encode_frames(frames, config, fps=10.0) for name, frames in footage.items()})
    assert len(ids) == len(CLIPS) * FRAMES  # every frame is distinct

    calibrated: list[tuple[str, int]] = []  # every frame calibration scored
    samplers: list[set[tuple[str, int]]] = []  # the frames each patch sampler may draw from
    clip_raw_scores, sampler_init = calibrate.clip_raw_scores, data.PatchSampler.__init__

    def recording_raw_scores(scorer, channels):
        calibrated.extend(ids[frame.tobytes()] for frame in channels)
        return clip_raw_scores(scorer, channels)

    def recording_sampler(self, clips, *args, **kwargs):
        samplers.append({ids[frame.tobytes()] for clip in clips for frame in clip.channels})
        sampler_init(self, clips, *args, **kwargs)

    monkeypatch.setattr(calibrate, "clip_raw_scores", recording_raw_scores)
    monkeypatch.setattr(data.PatchSampler, "__init__", recording_sampler)
    result = train(folders, tmp_path / "weights", config,
                   tiny_train_config(max_epochs=1, patches_per_epoch=256, phase_two_steps=20, fit_input_to_footage=False),
                   device="cpu", show_progress_bar=False)

    held_out = {(name, t) for name in CLIPS for t in HELD_OUT}
    trained = {(name, t) for name in CLIPS for t in range(FRAMES)} - held_out
    # calibration scored each held-out frame once, and nothing else
    assert sorted(calibrated) == sorted(held_out)
    assert result.manifest["calibration"]["normal_frame_quantiles"]["frames"] == len(held_out)
    # each sampler draws either from training frames or from held-out ones, never both; the
    # training sampler has every training frame, and none that calibration scored
    assert samplers
    for frames in samplers:
        assert frames <= trained or frames <= held_out, sorted(frames & held_out)[:5]
    assert trained in samplers
    assert not trained & set(calibrated)
