"""The project's whole scoring path (FrameStream in chunks, as `vad detect` runs it) end to end from
decoded frames: frames/s, the share of patches scored, the encoding's share, and EER/AUC on labelled
clips; clip after clip (``full_path``), or every clip as its own stream, all advancing together
(``full_path_side_by_side``: what `vad serve`'s batcher does with concurrent clips and streams)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from model.offline import FRAMES_PER_BATCH
from model.scoring import FrameStream, PatchScorer, SkipUnchanged, finish_streams, prepare_streams
from service.bench.footage import CAMERA_FPS, Footage
from service.bench.timing import best_seconds, synchronized


def full_path(scorer: PatchScorer, footage: Footage, skip: SkipUnchanged | None) -> dict[str, Any]:
    """FrameStream over every clip in chunks of FRAMES_PER_BATCH; EER/AUC over the clips when they are
    labelled."""
    started = time.perf_counter()
    streams = [FrameStream(scorer, CAMERA_FPS, skip=skip) for _ in footage.clips]
    clip_scores = [[r.score for r in stream.score_clip(gray, FRAMES_PER_BATCH)]
                   for stream, (_, gray, _, _) in zip(streams, footage.clips)]
    return _figures(scorer, footage, skip, streams, clip_scores, time.perf_counter() - started)


def full_path_side_by_side(scorer: PatchScorer, footage: Footage, skip: SkipUnchanged | None,
                           chunk_frames: int = FRAMES_PER_BATCH) -> dict[str, Any]:
    """Every clip as its own stream, all advancing together: each round prepares the next chunk of
    every clip in one pass (model.scoring.prepare_streams: one encoding pass on the device with the
    torch encoding), runs all their patches through the networks at once and finishes the chunks
    together (model.scoring.finish_streams), as the server's batcher does. The scores are those of
    ``full_path`` (each stream's own state); only the batching differs."""
    started = time.perf_counter()
    streams = [FrameStream(scorer, CAMERA_FPS, skip=skip) for _ in footage.clips]
    clip_scores: list[list[float]] = [[] for _ in footage.clips]
    longest = max(len(gray) for _, gray, _, _ in footage.clips)
    for start in range(0, longest, chunk_frames):
        live = [(i, gray[start : start + chunk_frames]) for i, (_, gray, _, _) in enumerate(footage.clips)
                if start < len(gray)]
        prepared = prepare_streams([(streams[i], chunk) for i, chunk in live])
        raw = scorer.raw_scores(torch.cat([patches for patches, _, _ in prepared]))
        parts = raw.split([p.shape[0] for p, _, _ in prepared])
        finished = finish_streams([(streams[i], part, grid, count)
                                   for (i, _), (_, grid, count), part in zip(live, prepared, parts)])
        for (i, _), results in zip(live, finished):
            clip_scores[i] += [r.score for r in results]
    out = _figures(scorer, footage, skip, streams, clip_scores, time.perf_counter() - started)
    out["chunk_frames"] = chunk_frames
    return out


def finishing(scorer: PatchScorer, footage: Footage, streams: int = 256, quick: bool = False) -> dict[str, Any]:
    """What finishing costs per single-frame stream chunk (calibrated scores, maps, smoothing) when
    ``streams`` chunks are finished one by one (each ``FrameStream.finish``) and together in one
    step (``finish_streams``, what the batcher does with the torch encoding). It runs on the CPU
    either way: the networks' output comes back from the device first."""
    gray = footage.frames(2)
    live = [FrameStream(scorer, CAMERA_FPS, skip=None) for _ in range(streams)]
    for stream in live:
        stream.prepare(gray[:1])  # a predecessor, so the next frame has motion
    prepared = [stream.prepare(gray[1:2]) for stream in live]
    raw = scorer.raw_scores(torch.cat([patches for patches, _, _ in prepared])).split([p.shape[0] for p, _, _ in prepared])
    chunks = [(stream, part, grid, count) for stream, part, (_, grid, count) in zip(live, raw, prepared)]
    window, repeats = (0.02, 1) if quick else (0.3, 5)
    alone = best_seconds(lambda: [stream.finish(part, grid, count) for stream, part, grid, count in chunks], window, repeats)
    together = best_seconds(lambda: finish_streams(chunks), window, repeats)
    return {"streams": streams, "one_by_one_us_per_stream": round(alone / streams * 1e6, 1),
            "together_us_per_stream": round(together / streams * 1e6, 1)}


def _figures(scorer: PatchScorer, footage: Footage, skip: SkipUnchanged | None, streams: list[FrameStream],
             clip_scores: list[list[float]], seconds: float) -> dict[str, Any]:
    from model.evaluate import figures

    scores = [score for clip in clip_scores for score in clip]
    labels = [clip_labels for _, _, clip_labels, _ in footage.clips if clip_labels is not None]
    seen = sum(stream.patches_seen for stream in streams)
    scored = sum(stream.patches_scored for stream in streams)
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
    out["scores"] = clip_scores  # per clip, for comparing two paths (dropped from the bench's JSON)
    return out
