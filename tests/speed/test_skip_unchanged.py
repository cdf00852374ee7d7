"""FrameStream's skip of unchanged patches: exact when nothing changes, rescoring what does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.networks import Detector, Refiner
from model.scoring import Calibration, FrameStream, PatchScorer, SkipUnchanged

PATCH = 16
HEIGHT, WIDTH = 48, 64  # 3 x 4 patches


def _scorer(input_mode: str = "appearance+motion") -> PatchScorer:
    torch.manual_seed(0)
    config = ModelConfig(input_mode=input_mode, patch_size=PATCH, stride=PATCH, latent_dim=8,
                         refiner_channels=(4, 8, 8), detector_channels=(4, 8, 8))
    calibration = Calibration(
        score_mode="fused", threshold=0.0, reject_band=(-0.1, 0.1), smoothing_frames=1,
        component_center={"d_r_x": 0.0, "reconstruction": 0.0},
        component_scale={"d_r_x": 1.0, "reconstruction": 1.0}, map_width=1.0, false_alarm_rate=0.01,
    )
    return PatchScorer(Refiner(config), Detector(config), config, calibration)


def _background(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(60, 160, (HEIGHT, WIDTH)).astype(np.uint8)


def _run(scorer: PatchScorer, frames: np.ndarray, skip: SkipUnchanged | None, pieces: list[int]) -> tuple[list, FrameStream]:
    stream = FrameStream(scorer, skip=skip)
    results, start = [], 0
    for size in pieces:
        results += stream.score(frames[start : start + size])
        start += size
    assert start == len(frames)
    return results, stream


def _same(a: list, b: list) -> None:
    """Equal up to float rounding: a patch scored in a batch of another size may differ in the last bit."""
    np.testing.assert_allclose([r.score for r in a], [r.score for r in b], rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.map, y.map, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("input_mode", ["appearance", "appearance+motion", "appearance+flow"])
def test_a_static_scene_is_scored_once_and_scores_do_not_change(input_mode: str) -> None:
    scorer = _scorer(input_mode)
    frames = np.repeat(_background()[None], 12, axis=0)
    full, _ = _run(scorer, frames, None, [12])
    skipped, stream = _run(scorer, frames, SkipUnchanged(), [5, 1, 6])
    _same(full, skipped)
    assert stream.patches_seen == 12 * 12
    # the first frame is scored; with a motion channel the second too (its predecessor is no longer itself)
    assert stream.patches_scored == 12


def test_exact_setting_equals_full_scoring_on_a_changing_clip() -> None:
    scorer = _scorer()
    rng = np.random.default_rng(1)
    frames = np.clip(_background()[None].astype(int) + rng.integers(-3, 4, (10, HEIGHT, WIDTH)), 0, 255).astype(np.uint8)
    frames[4:6] = frames[3]  # a few bit-identical frames
    full, _ = _run(scorer, frames, None, [10])
    exact, stream = _run(scorer, frames, SkipUnchanged(level=0, share=0.0), [3, 3, 4])
    _same(full, exact)
    assert stream.patches_scored < stream.patches_seen  # the repeated frame's patches were reused


def test_a_changed_patch_is_rescored_and_only_it() -> None:
    scorer = _scorer()
    background = _background()
    frames = np.repeat(background[None], 20, axis=0)
    frames[10:15, 20:30, 20:30] = 250  # an object inside patch (row 1, col 1) for five frames
    full, _ = _run(scorer, frames, None, [20])
    skipped, stream = _run(scorer, frames, SkipUnchanged(level=16, share=0.01), [4, 7, 9])
    _same(full, skipped)  # every reused patch had bit-identical input: scores are exact
    # frame 0: all 12; 10: the object appears (+ motion); 11: motion gone; 15: it leaves; 16: motion gone
    assert stream.patches_scored == 12 + 4
    index = 1 * 4 + 1
    changed = [r.map.flatten()[index] for r in skipped]
    assert changed[10] != changed[9]


def test_changes_within_tolerance_reuse_the_last_scores() -> None:
    scorer = _scorer("appearance")
    background = _background()
    frames = np.repeat(background[None], 4, axis=0)
    frames[2, 0:16, 0:16] = np.clip(background[0:16, 0:16].astype(int) + 5, 0, 255)  # within 16 levels
    frames[3, 0:16, 0:16] = np.clip(background[0:16, 0:16].astype(int) + 40, 0, 255)  # beyond
    skipped, stream = _run(scorer, frames, SkipUnchanged(level=16, share=0.01), [4])
    full, _ = _run(scorer, frames, None, [4])
    assert skipped[2].map[0, 0] == skipped[1].map[0, 0]  # reused: the very same components
    assert skipped[2].map[0, 0] != pytest.approx(full[2].map[0, 0], rel=1e-7, abs=0)  # not what scoring frame 2 gives
    assert skipped[3].map[0, 0] == pytest.approx(full[3].map[0, 0], rel=1e-5)  # rescored
    assert stream.patches_scored == 12 + 1


def test_an_unfinished_batch_or_a_new_frame_size_starts_over() -> None:
    scorer = _scorer("appearance")
    frames = np.repeat(_background()[None], 3, axis=0)
    stream = FrameStream(scorer, skip=SkipUnchanged())
    stream.score(frames[:1])
    stream.prepare(frames[1:2])  # its finish never comes (e.g. the forward pass failed)
    patches, grid, count = stream.prepare(frames[2:3])
    assert patches.shape[0] == 12  # everything rescored, nothing reused from the lost batch
    stream.finish(scorer.raw_scores(patches), grid, count)
    bigger = np.repeat(np.tile(_background(), (1, 2))[None], 1, axis=0)
    patches, _, _ = stream.prepare(bigger)
    assert patches.shape[0] == 24


def test_skip_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        SkipUnchanged(level=300)
    with pytest.raises(ValueError):
        SkipUnchanged(share=1.0)


def test_a_frame_with_nothing_to_score_takes_an_empty_job() -> None:
    """The server's batcher answers an empty job with an empty (0, 3) tensor without a forward pass."""
    scorer = _scorer()
    frames = np.repeat(_background()[None], 3, axis=0)
    stream = FrameStream(scorer, skip=SkipUnchanged())
    first = stream.score(frames[:2])
    patches, grid, count = stream.prepare(frames[2:])
    assert patches.shape[0] == 0
    (result,) = stream.finish(torch.empty(0, 3), grid, count)
    np.testing.assert_array_equal(result.map, first[1].map)


def test_the_flow_preset_is_the_versions_own_unless_overridden() -> None:
    """The scorer encodes with the version's flow preset; an override changes the input (so the
    scores), and only when asked for."""
    scorer = _scorer("appearance+flow")
    assert scorer.flow == scorer.config.flow_preset == "farneback-1iter"
    frames = np.repeat(_background()[None], 3, axis=0)
    frames[1:, 10:30, 10:30] = 250
    frames[2, 10:30, 14:34] = 250
    default, _ = _run(scorer, frames, None, [3])
    overridden = PatchScorer(scorer.refiner, scorer.detector, scorer.config, scorer.calibration, flow="farneback")
    assert overridden.flow == "farneback"
    cheaper, _ = _run(overridden, frames, None, [3])
    assert any(a.score != b.score for a, b in zip(default, cheaper))
    with pytest.raises(ValueError, match="flow preset"):
        PatchScorer(scorer.refiner, scorer.detector, scorer.config, scorer.calibration, flow="lucas-kanade")


def _moving_square(count: int) -> np.ndarray:
    frames = np.repeat(_background(3)[None], count, axis=0)
    for t in range(count):
        x = 2 + 3 * t
        frames[t, 12:28, x : x + 12] = 240
    return frames


@pytest.mark.parametrize("input_mode", ["appearance+motion", "appearance+flow"])
def test_score_clip_scores_like_the_same_chunks_fed_by_hand(input_mode: str) -> None:
    scorer = _scorer(input_mode)
    frames = _moving_square(14)
    chunked, _ = _run(scorer, frames, SkipUnchanged(), [4, 4, 4, 2])
    clip = list(FrameStream(scorer, skip=SkipUnchanged()).score_clip(frames, 4))
    assert [r.index for r in clip] == list(range(14))
    np.testing.assert_array_equal([r.score for r in clip], [r.score for r in chunked])


def test_last_raw_holds_every_patch_of_the_last_chunk_reused_ones_included() -> None:
    scorer = _scorer("appearance+motion")
    frames = _moving_square(6)
    full = FrameStream(scorer, skip=None)
    full.score(frames)
    skipped = FrameStream(scorer, skip=SkipUnchanged())
    skipped.score(frames[:3])
    results = skipped.score(frames[3:])
    assert skipped.patches_scored < skipped.patches_seen  # some patches were reused
    assert skipped.last_raw.shape == (3 * 12, 4)
    torch.testing.assert_close(skipped.last_raw, full.last_raw[-3 * 12 :], rtol=1e-5, atol=1e-6)
    assert len(results) == 3


def test_a_patch_is_changed_past_level_and_share_only() -> None:
    skip = SkipUnchanged(level=16, share=0.01)  # 200 values: more than 2 must move by more than 16
    reference = torch.full((4, 200), 100, dtype=torch.uint8)
    patches = reference.clone()
    patches[0, :3] = 117  # 3 values by 17: changed
    patches[1, :2] = 200  # 2 values, however far: unchanged
    patches[2, :50] = 116  # by exactly 16: unchanged
    patches[3, :3] = 83  # downwards counts too (no uint8 wrap-around)
    assert skip.changed(patches, reference).tolist() == [0, 3]
    assert SkipUnchanged(level=0, share=0).changed(patches, reference).tolist() == [0, 1, 2, 3]
