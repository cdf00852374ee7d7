"""The appearance-anomaly generator: deterministic, normal frames only, objects within their ranges."""

import numpy as np
import pytest

from model.inject import (
    CLEAN_MARGIN, LENGTH_RANGE, MIN_RUN, SIDE_RANGE, SPEED_RANGE, inject_appearance, normal_runs, render,
)

HEIGHT, WIDTH = 120, 160
ABNORMAL_VALUE = 3  # abnormal frames are flat 3; normal ones never hold a 3 anywhere


def _clips() -> list[tuple[np.ndarray, np.ndarray]]:
    """Two clips: runs of 45, 12 (too short), 31 and 70 normal frames around abnormal ones."""
    rng = np.random.default_rng(7)
    clips = []
    for pattern in ([0] * 45 + [1] * 10 + [0] * 12 + [1] * 5 + [0] * 31, [1] * 8 + [0] * 70):
        labels = np.array(pattern)
        gray = rng.integers(20, 230, (len(labels), HEIGHT, WIDTH)).astype(np.uint8)
        gray[labels == 1] = ABNORMAL_VALUE
        clips.append((gray, labels))
    return clips


def _flat(runs) -> list[np.ndarray]:
    return [a for r in runs for a in (r.clean, *(x for c in r.copies for x in (c.frames, c.injected)))]


def test_same_seed_same_output_other_seed_differs() -> None:
    clips = _clips()
    first, again, other = (inject_appearance(clips, seed=s, copies=2) for s in (0, 0, 1))
    assert all(np.array_equal(a, b) for a, b in zip(_flat(first), _flat(again), strict=True))
    assert [c.spec for r in first for c in r.copies] == [c.spec for r in again for c in r.copies]
    assert [c.spec for r in first for c in r.copies] != [c.spec for r in other for c in r.copies]
    assert not all(np.array_equal(a, b) for a, b in zip(_flat(first), _flat(other)))


def test_only_normal_frames_are_used_and_the_input_is_untouched() -> None:
    clips = _clips()
    before = [gray.copy() for gray, _ in clips]
    runs = inject_appearance(clips, seed=3, copies=2)
    assert all(np.array_equal(gray, kept) for (gray, _), kept in zip(clips, before))
    # the 12-frame run is too short; the others are used, in clip order
    assert [(r.clip, r.start, r.stop) for r in runs] == [(0, 0, 45), (0, 72, 103), (1, 8, 78)]
    assert all(r.stop - r.start >= MIN_RUN for r in runs)
    for run in runs:
        gray, labels = clips[run.clip]
        assert (labels[run.start : run.stop] == 0).all()
        assert np.array_equal(run.clean, gray[run.start : run.stop])
        assert not (run.clean == ABNORMAL_VALUE).any()
        for copy in run.copies:
            # every pixel outside the object is the clean (normal) frame's
            for t in range(len(copy.frames)):
                outside = render(copy.spec, (HEIGHT, WIDTH), t)[0] == 0
                assert np.array_equal(copy.frames[t][outside], run.clean[t][outside])


def test_objects_runs_and_masks_within_their_ranges() -> None:
    runs = inject_appearance(_clips(), seed=0, copies=6)
    specs = [c.spec for r in runs for c in r.copies]
    assert {s.speed == 0 for s in specs} == {True, False}  # some stand still, some drift
    assert len({s.shape for s in specs}) > 1 and len({s.texture.kind for s in specs}) > 1
    for run in runs:
        for copy in run.copies:
            spec, mask = copy.spec, copy.injected
            assert SIDE_RANGE[0] <= spec.height <= SIDE_RANGE[1] and SIDE_RANGE[0] <= spec.width <= SIDE_RANGE[1]
            assert spec.speed == 0 or SPEED_RANGE[0] - 1e-9 <= spec.speed <= SPEED_RANGE[1] + 1e-9
            # one contiguous run of 20-40 frames with clean frames on both sides
            frames = np.flatnonzero(mask)
            assert LENGTH_RANGE[0] <= len(frames) <= LENGTH_RANGE[1]
            assert np.array_equal(frames, np.arange(frames[0], frames[-1] + 1))
            assert frames[0] >= CLEAN_MARGIN and len(mask) - 1 - frames[-1] >= CLEAN_MARGIN
            # the mask is exactly the frames whose pixels changed
            assert np.array_equal((copy.frames != run.clean).any(axis=(1, 2)), mask)
            centres = []
            for t in frames:
                alpha, _ = render(spec, (HEIGHT, WIDTH), int(t))
                ys, xs = np.nonzero(alpha)
                assert ys.min() >= 0 and ys.max() < HEIGHT and xs.min() >= 0 and xs.max() < WIDTH
                # the outline spans its box (to the pixel: a box at a sub-pixel position covers side + 1)
                assert spec.height - 2 <= np.ptp(ys) + 1 <= spec.height + 1
                assert spec.width - 2 <= np.ptp(xs) + 1 <= spec.width + 1
                weights = alpha[ys, xs]
                centres.append((np.average(ys, weights=weights), np.average(xs, weights=weights)))
            steps = np.hypot(*np.diff(np.array(centres), axis=0).T)
            assert steps.max() <= SPEED_RANGE[1] + 0.1  # measured drift, at most 3 px/frame
            assert steps == pytest.approx(spec.speed, abs=0.1)


def test_normal_runs_are_maximal() -> None:
    assert normal_runs(np.array([0, 0, 1, 0, 1, 1, 0, 0, 0])) == [(0, 2), (3, 4), (6, 9)]
    assert normal_runs(np.ones(4)) == []
