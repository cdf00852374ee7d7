"""prepare_streams (model/scoring.py): several streams' chunks encoded in one pass give each stream
exactly what its own FrameStream.prepare gives, whatever mix of streams, rates, first chunks and
sizes a batch holds (issue 15 items 1 and 3: encoding batched across streams); finish_streams
finishes them together exactly as each stream's own finish would."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from model import registry
from model.offline import scorer_for
from model.scoring import FrameStream, finish_streams, prepare_streams
from tests.support import synthetic_frames

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device here: the CUDA case runs where torch sees a GPU")),
]


def frames(seed: int, count: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Walkers on a textured scene, (count, height, width) uint8."""
    gray = synthetic_frames(count, seed=seed)
    return np.stack([cv2.resize(frame, (width, height)) for frame in gray])


@pytest.mark.parametrize("device", DEVICES)
def test_streams_prepared_together_equal_each_alone(device: str) -> None:
    loaded = registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu")
    assert loaded.config.input_mode == "appearance+flow"  # the flow path is the one batched
    scorer = scorer_for(loaded, device, encoding="torch")
    footage = {s: frames(s, 6) for s in range(4)}
    other_size = frames(9, 3, 90, 120)
    rates = {0: 10.0, 1: 10.0, 2: 5.0, 3: 10.0}  # stream 2 runs at another rate: another motion scale

    together = {s: FrameStream(scorer, rates[s]) for s in range(4)}
    alone = {s: FrameStream(scorer, rates[s]) for s in range(4)}
    together[4], alone[4] = FrameStream(scorer, 10.0), FrameStream(scorer, 10.0)

    # pass 1: streams 0-2 send one frame (their first: no predecessor); stream 3 two frames
    # pass 2: 0, 2 and 1 one frame each, 4 its first frame, of another size
    # pass 3: 3 two more frames, 0 and 2 one, 4 two frames of its size
    batches = [
        [(0, footage[0][0:1]), (1, footage[1][0:1]), (2, footage[2][0:1]), (3, footage[3][0:2])],
        [(0, footage[0][1:2]), (2, footage[2][1:2]), (1, footage[1][1:2]), (4, other_size[0:1])],
        [(3, footage[3][2:4]), (0, footage[0][2:3]), (2, footage[2][2:3]), (4, other_size[1:3])],
    ]
    for batch in batches:
        got = prepare_streams([(together[s], chunk) for s, chunk in batch])
        finishing = []
        for (s, chunk), (patches, grid, count) in zip(batch, got):
            want_patches, want_grid, want_count = alone[s].prepare(chunk)
            assert (grid, count) == (want_grid, want_count)
            assert patches.shape == want_patches.shape, (s, patches.shape, want_patches.shape)
            assert torch.equal(patches.cpu(), want_patches.cpu()), f"stream {s}: patches differ"
            finishing.append((together[s], scorer.raw_scores(patches), grid, count))
        # the batch's chunks finished together equal each finished alone (and leave the same
        # reference for the next chunk's unchanged-patch test)
        for (s, _), (_, raw, grid, count), results in zip(batch, finishing, finish_streams(finishing)):
            want = alone[s].finish(raw, grid, count)
            assert [(r.index, r.score, r.anomalous, r.uncertain) for r in results] == [
                (r.index, r.score, r.anomalous, r.uncertain) for r in want], f"stream {s}"
            assert all(np.array_equal(r.map, w.map) for r, w in zip(results, want)), f"stream {s}: maps differ"


def test_one_chunk_per_stream() -> None:
    loaded = registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu")
    stream = FrameStream(scorer_for(loaded, "cpu", encoding="torch"))
    chunk = frames(0, 1)
    with pytest.raises(ValueError, match="one chunk per stream"):
        prepare_streams([(stream, chunk), (stream, chunk)])


def test_clips_side_by_side_score_as_clip_after_clip() -> None:
    """The bench's batched full path (every clip a stream, one encoding pass per round) gives the
    sequential full path's scores, here on synthetic clips of different lengths."""
    from service.bench.footage import Footage
    from service.bench.full_path import full_path, full_path_side_by_side

    loaded = registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu")
    scorer = scorer_for(loaded, "cpu", encoding="torch")
    footage = Footage(None, None, 0)
    footage.clips = [(str(seed), frames(seed, count, 64, 96), None, []) for seed, count in ((1, 7), (2, 3), (3, 5))]
    one_by_one = full_path(scorer, footage, scorer.skip)
    together = full_path_side_by_side(scorer, footage, scorer.skip, chunk_frames=2)
    assert [len(clip) for clip in together["scores"]] == [7, 3, 5]
    assert together["scores"] == one_by_one["scores"]
    assert together["scored_patch_share"] == one_by_one["scored_patch_share"]
