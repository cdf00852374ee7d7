"""Phase two of D: what each sample is, what passes through R, what is trained and what is frozen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import NEGATIVE_KINDS
from model.data import EncodedClip, PatchSampler
from model.networks import Detector, Refiner
from model.phase_two import (
    BAD_OLD_WEIGHT, GOOD_RAW_WEIGHT, GOOD_REFINED_WEIGHT, NegativeMaker, phase_two_batch, retrain_detector,
    usable_kinds, weighted_detector_loss,
)
from tests.conftest import tiny_model_config, tiny_train_config

NEW_MARK, OLD_MARK = 0.5, -0.25  # what the stand-in refiners output, so each row's origin shows


def _sampler(seed: int = 0) -> PatchSampler:
    rng = np.random.default_rng(seed)
    channels = rng.integers(0, 120, (12, 2, 40, 40)).astype(np.uint8)
    channels[:, 1] = 0
    channels[:, 1, 10:24, 10:24] = 90  # something moves here
    return PatchSampler([EncodedClip("c", channels)], patch_size=16, motion_share=0.5, seed=seed)


def _batch(kinds: tuple[str, ...] = NEGATIVE_KINDS):
    sampler = _sampler()
    x = sampler.sample(8)
    new = lambda b: torch.full_like(b, NEW_MARK)  # noqa: E731
    old = lambda b: torch.full_like(b, OLD_MARK)  # noqa: E731
    maker = NegativeMaker(sampler, old, (1.3, 3.0), seed=0)
    return x, phase_two_batch(x, new, old, maker, kinds)


def test_labels_and_weights_of_each_sample_kind() -> None:
    x, batch = _batch()
    count = x.shape[0]
    kinds = np.array(batch.kinds)
    assert sorted(set(batch.kinds)) == sorted({"refined", "raw", "old", *NEGATIVE_KINDS})
    for kind in set(batch.kinds):
        rows = torch.from_numpy(kinds == kind)
        assert rows.sum() == count
        assert torch.all(batch.labels[rows] == (1.0 if kind in ("refined", "raw") else 0.0))
    def side(kind: str) -> float:
        return float(batch.weights[torch.from_numpy(kinds == kind)].sum())
    assert side("refined") == pytest.approx(GOOD_REFINED_WEIGHT)
    assert side("raw") == pytest.approx(GOOD_RAW_WEIGHT)
    assert side("old") == pytest.approx(BAD_OLD_WEIGHT)
    for kind in NEGATIVE_KINDS:
        assert side(kind) == pytest.approx((1 - BAD_OLD_WEIGHT) / len(NEGATIVE_KINDS))
    assert float(batch.weights[batch.labels == 1].sum()) == pytest.approx(1.0)
    assert float(batch.weights[batch.labels == 0].sum()) == pytest.approx(1.0)


def test_every_negative_passes_through_r_new_and_normal_rows_are_r_new_and_x() -> None:
    x, batch = _batch()
    kinds = np.array(batch.kinds)
    rows = lambda kind: batch.inputs[torch.from_numpy(kinds == kind)]  # noqa: E731
    for kind in NEGATIVE_KINDS:
        assert torch.all(rows(kind) == NEW_MARK), kind
    assert torch.all(rows("refined") == NEW_MARK)
    assert torch.equal(rows("raw"), x)
    assert torch.all(rows("old") == OLD_MARK)  # R_old(X), the one negative not through R_new


def test_negative_kinds_change_what_they_claim() -> None:
    sampler = _sampler()
    x = sampler.sample(16)
    maker = NegativeMaker(sampler, lambda b: b * 0.5, (2.0, 2.0), seed=1)
    swapped = maker.make("motion_swap", x)
    assert torch.equal(swapped[:, 0], x[:, 0]) and not torch.equal(swapped[:, 1], x[:, 1])
    pasted = maker.make("paste", x)
    changed = (pasted != x).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # most patches got a foreign region (a donor may match)
    sped = maker.make("speed", x)
    assert ((sped[:, 1] + 1) * 127.5).max() > 90 * 1.9  # motion 90 sped up twice
    blended = maker.make("average", x)
    assert blended.shape == x.shape and blended.abs().max() <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="unknown negative kind"):
        maker.make("glitter", x)


def test_motion_kinds_are_dropped_without_a_motion_channel() -> None:
    assert usable_kinds(NEGATIVE_KINDS, has_motion=False) == ("average", "paste")
    assert usable_kinds(NEGATIVE_KINDS, has_motion=True) == NEGATIVE_KINDS
    assert usable_kinds(("speed",), has_motion=False) == ("average", "paste")  # appearance-only input


def test_retraining_changes_d_only_and_keeps_r_frozen() -> None:
    torch.manual_seed(0)
    config = tiny_model_config()
    refiner_new, refiner_old, detector = Refiner(config).eval(), Refiner(config).eval(), Detector(config)
    frozen = {k: v.clone() for k, v in {**refiner_new.state_dict(), **{f"old.{k}": v for k, v in
                                          refiner_old.state_dict().items()}}.items()}
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    cfg = tiny_train_config(phase_two_steps=20, phase_two_batch_size=8, holdout_patches=32,
                            phase_two_negatives=NEGATIVE_KINDS)
    trained, report = retrain_detector(refiner_new, refiner_old, detector, _sampler(0), _sampler(1), cfg,
                                       torch.device("cpu"))
    after_r = {**refiner_new.state_dict(), **{f"old.{k}": v for k, v in refiner_old.state_dict().items()}}
    assert all(torch.equal(frozen[k], after_r[k]) for k in frozen)
    # frozen by running without autograd, not by switching the caller's modules off for good
    assert all(p.requires_grad for p in refiner_new.parameters())
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items() if k in before)
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())  # the input D is untouched
    assert report.steps == 20 and sorted(report.negatives) == sorted(NEGATIVE_KINDS)
    assert 0.0 <= report.holdout_separation <= 1.0


def test_weighted_loss_counts_both_sides_equally() -> None:
    _, batch = _batch()
    perfect = torch.where(batch.labels == 1, 20.0, -20.0)
    wrong = -perfect
    assert float(weighted_detector_loss(perfect, batch)) < 1e-6
    assert float(weighted_detector_loss(wrong, batch)) == pytest.approx(20.0, rel=1e-3)


def test_a_deadline_in_the_past_stops_phase_two_at_once() -> None:
    config = tiny_model_config()
    cfg = tiny_train_config(phase_two_steps=50, phase_two_batch_size=8, holdout_patches=32)
    _, report = retrain_detector(Refiner(config), Refiner(config), Detector(config), _sampler(0), _sampler(1),
                                 cfg, torch.device("cpu"), deadline=0.0)
    assert report.steps == 0


def _d_r_x_auc(weights, clip: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    from model import registry
    from model.calibrate import clip_raw_scores, frame_peaks
    from model.offline import scorer_for
    from model.encoding import encode_frames

    loaded = registry.load_version(weights, "v0001")
    raw, _ = clip_raw_scores(scorer_for(loaded), encode_frames(clip, loaded.config, fps=10.0))
    return float(roc_auc_score(labels, frame_peaks(raw, "d_r_x", loaded.calibration)))


def test_phase_two_makes_d_of_r_separate_injected_objects(normal_footage, tmp_path) -> None:
    """The same tiny model trained without and with phase two, four seeds each: phase two makes
    D(R(X)) rank frames with an injected fast object above clean ones. On footage this small the
    effect varies with the seed (measured: 0.70/0.47/0.76/0.83 without, 0.82/0.97/0.66/0.89 with),
    so the test asks for the mean and for most seeds, not for every one."""
    from model.train import train
    from tests.conftest import synthetic_frames

    clip = synthetic_frames(40, seed=7, anomaly_from=20)  # frames 20..39: a bright block, 6 px/frame
    labels = np.r_[np.zeros(20), np.ones(20)]
    aucs: dict[int, list[float]] = {0: [], 400: []}
    for seed in range(4):
        for steps in aucs:
            weights = tmp_path / f"seed{seed}-steps{steps}"
            train(normal_footage, weights, tiny_model_config(),
                  tiny_train_config(phase_two_steps=steps, phase_two_batch_size=32, detector_polish_epochs=0,
                                    max_epochs=4, seed=seed),
                  show_progress_bar=False)
            aucs[steps].append(_d_r_x_auc(weights, clip, labels))
    assert np.mean(aucs[400]) > np.mean(aucs[0]) + 0.08, aucs
    assert sum(a > b for a, b in zip(aucs[400], aucs[0])) >= 3, aucs
