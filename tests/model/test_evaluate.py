"""Figures on hand-made scores, and a Ped2 smoke test with the bundled default version."""

from pathlib import Path

import numpy as np
import pytest

from model import registry
from model.evaluate import equal_error_rate, figures, minmax_per_clip, ped2_test_clips
from tests.conftest import PED2_ROOT


def test_perfect_and_inverted_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert figures(labels, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])) == {"auc": 1.0, "eer": 0.0}
    assert figures(labels, -np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])) == {"auc": 0.0, "eer": 1.0}


def test_eer_matches_a_brute_force_search() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(400), np.ones(600)].astype(int)
    scores = np.r_[rng.normal(0, 1, 400), rng.normal(1.5, 1, 600)]
    best = min(
        (abs(((scores > t) & (labels == 0)).sum() / 400 - ((scores <= t) & (labels == 1)).sum() / 600),
         ((scores > t) & (labels == 0)).sum() / 400)
        for t in np.sort(scores)
    )[1]
    assert equal_error_rate(labels, scores) == pytest.approx(best, abs=0.005)
    # two unit-variance normals 1.5 apart: EER = Phi(-0.75) = 0.2266
    assert equal_error_rate(labels, scores) == pytest.approx(0.2266, abs=0.03)


def test_minmax_is_per_clip() -> None:
    out = minmax_per_clip([np.array([1.0, 3.0]), np.array([10.0, 20.0, 30.0])])
    assert out.tolist() == [0.0, 1.0, 0.0, 0.5, 1.0]


@pytest.mark.skipif(not PED2_ROOT.is_dir(), reason=f"UCSD Ped2 not found at {PED2_ROOT} (see its README)")
def test_ped2_smoke_bundled_default_separates_test_clip_01() -> None:
    """Clip 01 (180 frames, frames 60..179 abnormal: a cyclist): abnormal frames must score higher."""
    from model.detect import detect_file

    if registry.active_version(registry.BUNDLED_WEIGHTS_DIR) is None:
        pytest.skip("no bundled default version in weights/")
    clips = {c.name: c for c in ped2_test_clips(PED2_ROOT)}
    assert len(clips) == 12 and sum(len(c.labels) for c in clips.values()) == 2010
    clip = clips["01"]
    result = detect_file(clip.folder, registry.BUNDLED_WEIGHTS_DIR, include_maps=False)
    scores = np.array([f["score"] for f in result["frames"]])
    assert len(scores) == len(clip.labels)
    labels = clip.labels.astype(bool)
    assert figures(clip.labels, scores)["auc"] > 0.8
    flagged = np.array([f["anomalous"] for f in result["frames"]])
    assert flagged[labels].mean() > 0.5 > flagged[~labels].mean()


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    from model.evaluate import DatasetError

    with pytest.raises(DatasetError, match="test_frame_labels.json"):
        ped2_test_clips(tmp_path)
