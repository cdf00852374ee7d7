"""The networks alone: their FLOPs per frame, frames/s of ``PatchScorer.raw_scores`` on pre-cut patches per
frames-per-batch (``model``), the same in each other CPU precision this machine can run (``precisions``),
the same networks one patch at a time as a sliding-window loop runs them (``naive``), and on a GPU each
precision with and without CUDA graphs (``cuda``)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from model import registry
from model.cpu_features import detect_cpu_features
from model.encoding import encode_frames, to_model_input
from model.inference import InferenceEngine, onnxruntime_available
from model.networks import pad_patches
from model.offline import scorer_for
from model.patches import to_patches
from model.precision import TOLERANCE
from model.scoring import COMPONENTS, PatchScorer
from service.bench.timing import best_seconds, say

FRAMES_PER_BATCH_TRIED = (1, 2, 4, 8, 16)
CUDA_FRAMES_PER_BATCH_TRIED = (64, 256)


def cut_patches(scorer: PatchScorer, channels: np.ndarray, stride: int) -> torch.Tensor:
    """Encoded frames (T, H, W, C) -> the model's float patches of every frame, at ``stride``."""
    return to_patches(to_model_input(torch.from_numpy(channels)), scorer.config.patch_size, stride)[0]


def required_flops(scorer: PatchScorer, patches: torch.Tensor) -> int:
    """FLOPs of what scoring needs on the unfused modules: R1 -> mu -> R2, then D on R(X) and on X
    (R's log-variance head, unused in eval, is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    refiner, detector = scorer.refiner, scorer.detector
    patches = patches.to(scorer.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        h = refiner.encoder(pad_patches(patches, scorer.config.patch_size)).flatten(1)
        refined = refiner.decode(refiner.to_mu(h))
        detector(torch.cat([refined, patches]))
    return int(counter.get_total_flops())


def model_path(scorer: PatchScorer, channels: np.ndarray, roofline: float, quick: bool, stride: int) -> dict[str, Any]:
    """frames/s of raw_scores on pre-cut float patches of real frames, per frames-per-batch."""
    per_frame = cut_patches(scorer, channels[:1], stride)
    flops = required_flops(scorer, per_frame)
    by_batch = {}
    tried = FRAMES_PER_BATCH_TRIED[:2] if quick else FRAMES_PER_BATCH_TRIED
    if scorer.device.type == "cuda" and not quick:
        tried = tried + CUDA_FRAMES_PER_BATCH_TRIED  # a GPU needs far larger batches to fill up
    for frames in tried:
        idx = np.arange(frames) % len(channels)
        patches = cut_patches(scorer, channels[idx], stride)
        seconds = best_seconds(lambda: scorer.raw_scores(patches, batch_size=patches.shape[0]),
                               0.1 if quick else 0.5, 1 if quick else 6)
        by_batch[frames] = frames / seconds
    best = max(by_batch, key=by_batch.get)  # type: ignore[arg-type]
    fps = by_batch[best]
    gflops = fps * flops / 1e9
    return {
        "stride": stride,
        "gflops_per_frame": round(flops / 1e9, 4),
        "patches_per_frame": int(per_frame.shape[0]),
        "frames_per_s": round(fps, 1),
        "best_frames_per_batch": best,
        "frames_per_s_by_batch": {str(k): round(v, 1) for k, v in by_batch.items()},
        "gflops": round(gflops, 1),
        "roofline_fraction": round(gflops / roofline, 3),
    }


def cpu_precisions_here() -> list[str]:
    """The CPU precisions besides float32 this machine can run: bf16 with bf16 hardware, int8 with ONNX Runtime."""
    return [name for name, usable in (("bf16", detect_cpu_features().bf16_hardware), ("int8", onnxruntime_available()))
            if usable]


def precision_path(loaded: registry.LoadedVersion, channels: np.ndarray, precision: str, rooflines: dict[str, float],
                   quick: bool, stride: int, flow: str | None) -> dict[str, Any]:
    """``model_path`` in ``precision`` on the CPU, against that precision's roofline (``roofline_fraction``)
    and float32's (``roofline_fraction_float32``), with the load check's figure. Measured even where the
    check refuses the precision (``passes_check`` false): what it would give is part of the answer."""
    scorer = scorer_for(loaded, "cpu", flow=flow)
    scorer.engine = InferenceEngine(scorer.refiner, scorer.detector, "cpu", precision=precision,
                                    calibration=loaded.calibration, tolerance=math.inf)
    check = scorer.engine.precision_report["candidates"].get(precision, {})
    if scorer.engine.precision != precision:
        return {"precision": precision, "ran": False, "reason": check.get("reason", "not available")}
    result = model_path(scorer, channels, rooflines[precision], quick, stride)
    result.update(precision=precision, ran=True, backend=scorer.engine.backend,
                  roofline_fraction_float32=round(result["gflops"] / rooflines["float32"], 3),
                  max_diff_over_spread=check["max_diff_over_spread"],
                  passes_check=check["max_diff_over_spread"] <= TOLERANCE, tolerance=TOLERANCE)
    return result


def naive_loop(scorer: PatchScorer, gray: np.ndarray) -> dict[str, Any]:
    """Encode each frame, then run R and D on one patch at a time (the unfused modules)."""
    previous = None
    encode_s = model_s = 0.0
    for frame in gray:
        started = time.perf_counter()
        channels = encode_frames(frame[None], scorer.config, previous, flow=scorer.flow)
        previous = frame
        patches, _ = scorer.frame_patches(channels)
        encoded = time.perf_counter()
        for i in range(patches.shape[0]):  # each patch's scores read back, as such a loop does
            scorer.reference_scores(patches[i : i + 1].to(scorer.device)).cpu()
        model_s += time.perf_counter() - encoded
        encode_s += encoded - started
    count = len(gray)
    return {
        "frames": count,
        "frames_per_s": round(count / (encode_s + model_s), 2),
        "model_only_frames_per_s": round(count / model_s, 2),
        "encode_ms_per_frame": round(encode_s / count * 1e3, 2),
    }


def cuda_section(loaded: registry.LoadedVersion, channels: np.ndarray, flops: float, quick: bool) -> dict[str, Any]:
    """On a GPU: frames/s per precision, with and without CUDA graphs, and the largest difference of
    each precision's components from the CPU float32 reference (relative to each component's spread)."""
    reference_scorer = scorer_for(loaded, "cpu", fused=False)
    patches, _ = reference_scorer.frame_patches(channels[np.arange(16) % len(channels)])
    reference = reference_scorer.raw_scores(patches)
    spread = reference.std(0).clamp_min(1e-6)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "runs": []}
    for precision in ("float32", "bf16", "fp16"):
        for graphs in (False, True):
            scorer = scorer_for(loaded, "cuda", precision=precision, cuda_graphs=graphs)
            diff = ((scorer.raw_scores(patches) - reference).abs().amax(0) / spread).tolist()
            by_batch = {}
            for frames in FRAMES_PER_BATCH_TRIED + CUDA_FRAMES_PER_BATCH_TRIED if not quick else (1, 16):
                per_frame = patches.shape[0] // 16
                x = patches[torch.arange(frames * per_frame) % patches.shape[0]]
                seconds = best_seconds(lambda: scorer.raw_scores(x), 0.1 if quick else 0.5, 1 if quick else 3)  # returns on the CPU: synchronized
                by_batch[str(frames)] = round(frames / seconds, 1)
            best = max(by_batch.values())
            run = {"precision": precision, "cuda_graphs": graphs, "frames_per_s": best,
                   "gflops": round(best * flops / 1e9, 1), "frames_per_s_by_batch": by_batch,
                   "max_diff_over_std": {name: round(d, 5) for name, d in zip(COMPONENTS, diff)}}
            out["runs"].append(run)
            say(f"cuda {precision} graphs={graphs}: {best} frames/s; max |diff| / std vs CPU float32 {run['max_diff_over_std']}")
    return out
