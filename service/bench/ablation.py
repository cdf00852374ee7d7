"""Each CPU inference optimisation added in turn (batch norm folding, channels-last, the pixel-shuffle
transposed conv, ONNX Runtime, a batch split over single-threaded workers): what each one gives on
this machine, in frames/s on the same patches."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from model.inference import CpuWorkers, FusedNets, OrtRunner, export_onnx, onnxruntime_available
from model.scoring import PatchScorer
from service.bench.model_path import cut_patches
from service.bench.timing import best_seconds, say


def ablation(scorer: PatchScorer, channels: np.ndarray, flops: float, quick: bool) -> list[dict[str, Any]]:
    """Frames/s of each step (best of 1, 4, 16 frames per batch), its GFLOP/s at ``flops`` per frame."""
    refiner, detector, config = scorer.refiner, scorer.detector, scorer.config
    threads = torch.get_num_threads()
    workers = CpuWorkers(threads) if threads > 1 else None

    def split(run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return (lambda x: workers(run, x)) if workers is not None else run

    nchw = FusedNets(refiner, detector, channels_last=False, phase_max_cout=0)
    nhwc = FusedNets(refiner, detector, channels_last=True, phase_max_cout=0)
    phase = FusedNets(refiner, detector, channels_last=True)
    steps: list[tuple[str, Any]] = [
        ("modules as trained (batch norm, NCHW), intra-op threads", scorer.reference_scores),
        ("+ batch norm folded, shared first layer, no log-variance head", nchw),
        ("+ channels-last (NHWC)", nhwc),
        ("+ last transposed conv as conv3x3 + pixel shuffle", phase),
    ]
    # every intra-op step before any split one: once worker threads have run ops, libgomp makes the
    # calling thread's small parallel ops slower (see model.inference.dedicate_cpu_to_workers)
    plain = FusedNets(refiner, detector, channels_last=False, phase_max_cout=0)
    if onnxruntime_available():
        steps.append((f"ONNX Runtime, {threads} intra-op thread(s)", OrtRunner(export_onnx(plain, config.channels, config.patch_size), threads)))
    if workers is not None:
        steps.append((f"fused torch, batch split over {threads} single-threaded workers", split(phase)))
        if onnxruntime_available():
            steps.append((f"ONNX Runtime, split over {threads} single-threaded workers",
                          split(OrtRunner(export_onnx(plain, config.channels, config.patch_size), 1))))
    sizes = (1, 16) if quick else (1, 4, 16)
    batches = {f: cut_patches(scorer, channels[np.arange(f) % len(channels)], config.patch_size) for f in sizes}
    best: dict[tuple[int, int], float] = {}
    # rounds over every step and size, best of the rounds: a burst of noise from another process on
    # the machine then spoils one window of a step, not all of one step's windows
    for _ in range(1 if quick else 4):
        for i, (_, run) in enumerate(steps):
            for frames, patches in batches.items():
                with torch.inference_mode():
                    seconds = best_seconds(lambda: run(patches), 0.05 if quick else 0.3, 1)
                best[i, frames] = max(best.get((i, frames), 0.0), frames / seconds)
    out = []
    for i, (name, _) in enumerate(steps):
        by_batch = {str(f): round(best[i, f], 1) for f in sizes}
        top = max(by_batch.values())
        out.append({"step": name, "frames_per_s": top, "gflops": round(top * flops / 1e9, 1), "by_batch": by_batch})
        say(f"  ablation: {name}: {top} frames/s ({by_batch})")
    return out
