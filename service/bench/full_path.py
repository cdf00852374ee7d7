"""The project's whole scoring path (FrameStream in chunks, as `vad detect` runs it) end to end from
decoded frames: frames/s, the share of patches scored, the encoding's share, and EER/AUC on labelled
clips."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from model.offline import FRAMES_PER_BATCH
from model.scoring import FrameStream, PatchScorer, SkipUnchanged
from service.bench.footage import CAMERA_FPS, Footage
from service.bench.timing import best_seconds, synchronized


def full_path(scorer: PatchScorer, footage: Footage, skip: SkipUnchanged | None) -> dict[str, Any]:
    """FrameStream over every clip in chunks of FRAMES_PER_BATCH; EER/AUC over the clips when they are
    labelled."""
    from model.evaluate import figures

    scores, labels = [], []
    seen = scored = 0
    started = time.perf_counter()
    for _, gray, clip_labels, _ in footage.clips:
        stream = FrameStream(scorer, CAMERA_FPS, skip=skip)
        scores += [r.score for r in stream.score_clip(gray, FRAMES_PER_BATCH)]
        seen += stream.patches_seen
        scored += stream.patches_scored
        if clip_labels is not None:
            labels.append(clip_labels)
    seconds = time.perf_counter() - started
    # the encoding's share, timed apart on the same frames (flow dominates appearance+flow)
    sample = footage.clips[0][1][:32]
    encode_s = best_seconds(synchronized(lambda: scorer.encode(sample), scorer.device), 0.0, 3) / len(sample)
    out: dict[str, Any] = {
        "frames": len(scores),
        "frames_per_s": round(len(scores) / seconds, 2),
        "scored_patch_share": round(scored / max(seen, 1), 3),
        "encode_ms_per_frame": round(encode_s * 1e3, 2),
        "encoding": scorer.encoding,
        "skip": None if skip is None else {"level": skip.level, "share": skip.share},
    }
    if footage.labelled and labels:
        all_labels = np.concatenate(labels)
        if 0 < all_labels.sum() < len(all_labels):
            out.update(figures(all_labels, np.asarray(scores)))
    return out
