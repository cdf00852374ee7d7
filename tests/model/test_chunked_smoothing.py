"""Smoothing carries across chunks: a clip scored in chunks (FrameStream.score_clip,
iter_frame_results) gets the frame scores and flags of the clip scored at once, the causal window
reaching back into earlier chunks. The server's clip path is checked the same way in
tests/service/test_server_http.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model import registry
from model.offline import iter_frame_results, scorer_for
from model.scoring import FrameStream
from tests.support import publish_smoothed, synthetic_frames

WINDOW = 4


@pytest.fixture(scope="module")
def smoothed(trained_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """(scorer with a 4-frame window, the same networks and tau unsmoothed)."""
    import shutil

    weights = Path(shutil.copytree(trained_weights, tmp_path_factory.mktemp("smoothed") / "weights"))
    smoothed, unsmoothed = publish_smoothed(weights, "v0001", WINDOW), publish_smoothed(weights, "v0001", 1)
    return scorer_for(registry.load_version(weights, smoothed)), scorer_for(registry.load_version(weights, unsmoothed))


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_chunks_score_like_the_whole_clip(smoothed, chunk: int) -> None:
    scorer, unsmoothed = smoothed
    gray = synthetic_frames(30, seed=21, anomaly_from=15)  # the planted anomaly from frame 15
    whole = FrameStream(scorer).score(gray)
    if chunk == 16:
        pieces = list(iter_frame_results(scorer, gray, 10.0))  # what `vad detect` runs
    else:
        pieces = list(FrameStream(scorer).score_clip(gray, chunk))
    assert [r.index for r in pieces] == list(range(30))
    assert [r.score for r in pieces] == pytest.approx([r.score for r in whole], rel=1e-5, abs=1e-6)
    assert [r.anomalous for r in pieces] == [r.anomalous for r in whole]
    assert [r.uncertain for r in pieces] == [r.uncertain for r in whole]

    # The window is real and causal: each score is the mean of the last four unsmoothed frame
    # scores, earlier chunks' frames included, and the planted anomaly is flagged.
    peaks = np.array([r.score for r in FrameStream(unsmoothed).score(gray)])
    expected = [peaks[max(0, t - WINDOW + 1) : t + 1].mean() for t in range(30)]
    assert [r.score for r in pieces] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert not np.allclose(expected, peaks)
    assert all(r.anomalous for r in pieces[20:])
