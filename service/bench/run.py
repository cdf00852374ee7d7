"""`vad bench`'s run: loads the version, then each section in an order that keeps their thread set-ups
apart (roofline, naive loop and ablation with torch's default threads; then, as `vad serve` runs,
the model path, full path, CUDA and the served path), and gathers every figure in one dict."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model import inference, registry
from model.devices import resolve_device
from model.encoding import encode_frames
from model.offline import scorer_for
from model.scoring import SkipUnchanged
from service.bench.ablation import ablation
from service.bench.footage import Footage, default_dataset_root
from service.bench.full_path import finishing, full_path, full_path_side_by_side
from model.cpu_features import detect_cpu_features
from service.bench.model_path import (
    cpu_precisions_here, cuda_section, cut_patches, model_path, naive_loop, precision_path, required_flops,
)
from service.bench.decoding import decoding_section
from service.bench.peer_torchserve import peer_section
from service.bench.roofline import int8_roofline_gops, roofline_gflops
from service.bench.service_path import service_section
from service.bench.timing import say


def run_bench(
    weights_dir: Path, version: str | None = None, quick: bool = False, dataset_root: Path | None = None,
    eval_clips: list[str] | None = None, naive_frames: int | None = None, stream_seconds: float | None = None,
    service: bool = True, ablate: bool = True, flow: str | None = None, device: str = "auto", peer: str | None = None,
    processes: Sequence[int] = (1,),
) -> dict[str, Any]:
    """Every figure of docs/speed.md in one run. ``device``: where the networks run (``auto``: CUDA
    when there is a GPU, as `vad serve` does); the roofline is that device's float32 matmul. ``peer``:
    also serve the version with that model server (``torchserve``) and measure it beside the service.
    ``processes``: the server's VAD_SERVE_PROCESSES; with several counts the first gives the service
    figures and every count is measured in ``service_by_processes`` (clips, streams, memory)."""
    threads, workers = torch.get_num_threads(), inference.CPU_WORKERS
    try:
        return _run_bench(weights_dir, version, quick, dataset_root, eval_clips, naive_frames, stream_seconds,
                          service, ablate, flow, resolve_device(device), peer, processes)
    finally:  # the bench dedicates this process's cores to inference workers; put that back
        inference.CPU_WORKERS = workers
        torch.set_num_threads(threads)


def _run_bench(
    weights_dir: Path, version: str | None, quick: bool, dataset_root: Path | None, eval_clips: list[str] | None,
    naive_frames: int | None, stream_seconds: float | None, service: bool, ablate: bool, flow: str | None,
    device: torch.device, peer: str | None = None, processes: Sequence[int] = (1,),
) -> dict[str, Any]:
    """run_bench on a resolved device, the process's thread set-up left to the caller to restore."""
    started = time.perf_counter()
    version = version or registry.active_version(weights_dir)
    if version is None:
        raise registry.VersionNotFound(f"no published version in {weights_dir}")
    loaded = registry.load_version(weights_dir, version, "cpu")
    scorer = scorer_for(loaded, device, flow=flow)
    on_cuda = device.type == "cuda"
    config = loaded.config
    root = dataset_root if dataset_root is not None else default_dataset_root()
    if quick:
        footage = Footage(root, eval_clips or (["01"] if root else None), 24)
    else:
        footage = Footage(root, eval_clips, None)
    result: dict[str, Any] = {
        "command": " ".join(["vad", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine(),
                    "device": torch.cuda.get_device_name(device) if on_cuda else "cpu"},
        "version": version,
        "weights_dir": str(weights_dir),
        "input_mode": config.input_mode,
        "flow_preset": scorer.flow,
        "flow_preset_overridden": flow is not None,
        "patch_size": config.patch_size,
        "stride": config.stride,
        "dataset": str(root) if root else "synthetic 240x360 frames (Ped2 not found)",
        "clips": [name for name, *_ in footage.clips],
    }
    roof = roofline_gflops(quick, device)
    result["roofline_gflops"] = round(roof["gflops"], 1)
    result["roofline_by_size"] = roof["by_size"]
    say(f"roofline: float32 matmul on {result['machine']['device']} {result['roofline_gflops']} GFLOP/s "
        f"({roof['by_size']}), {torch.get_num_threads()} CPU threads")
    # the CPU's other precisions: what the CPU offers, and each one's own roofline (bf16: GFLOP/s, int8: GOP/s)
    precisions = [] if on_cuda else cpu_precisions_here()
    rooflines = {"float32": roof["gflops"]}
    if not on_cuda:
        result["machine"]["cpu_features"] = detect_cpu_features().to_dict()
        say(detect_cpu_features().summary())
    for precision in precisions:
        other = roofline_gflops(quick, device, torch.bfloat16) if precision == "bf16" else int8_roofline_gops(quick)
        rooflines[precision] = other["gflops" if precision == "bf16" else "gops"]
        result.setdefault("rooflines", {"float32": {"gflops": result["roofline_gflops"], "by_size": roof["by_size"]}})
        result["rooflines"][precision] = {"gflops": round(rooflines[precision], 1), "by_size": other["by_size"]}
        say(f"roofline: {precision} matmul {rooflines[precision]:.1f} G{'FL' if precision == 'bf16' else ''}OP/s ({other['by_size']})")

    # the naive loop first, with torch's default threads and no worker pool used yet in this process
    naive = naive_loop(scorer, footage.frames(naive_frames or (2 if quick else 48)))
    result["naive"] = naive
    say(f"naive per-patch loop: {naive['frames_per_s']} frames/s end to end "
        f"({naive['model_only_frames_per_s']} model only, encoding {naive['encode_ms_per_frame']} ms/frame)")
    sample = footage.frames(16)
    channels = encode_frames(sample, config, flow=scorer.flow)
    if ablate and not on_cuda:  # CPU engines; with torch's default threads too, before the serving set-up below
        per_frame = cut_patches(scorer, channels[:1], config.patch_size)
        result["ablation"] = ablation(scorer, channels, required_flops(scorer, per_frame), quick)
    # from here on as `vad serve` runs: batches split over single-threaded workers, other ops 1 thread
    if not on_cuda:
        result["machine"]["cpu_workers"] = inference.dedicate_cpu_to_workers()
    # non-overlapping patches (Ped2's 96 per frame at 30x30), and the version's own stride if it overlaps
    strides = [config.patch_size] + ([config.stride] if config.stride != config.patch_size else [])
    for stride in strides:
        key = "model" if stride == config.patch_size else "model_served_stride"
        result[key] = model_path(scorer, channels, roof["gflops"], quick, stride)
        m = result[key]
        say(f"model path (stride {stride}, {m['patches_per_frame']} patches/frame): {m['gflops_per_frame']} GFLOP/frame, "
            f"{m['frames_per_s']} frames/s at {m['best_frames_per_batch']} frames/batch {m['frames_per_s_by_batch']}, "
            f"{m['gflops']} GFLOP/s = {m['roofline_fraction']:.0%} of the roofline")
    for precision in precisions:  # the same model path in each other CPU precision (non-overlapping patches)
        p = result.setdefault("model_by_precision", {})[precision] = precision_path(
            loaded, channels, precision, rooflines, quick, config.patch_size, flow)
        if p["ran"]:
            say(f"model path in {precision} ({p['backend']}): {p['frames_per_s']} frames/s at {p['best_frames_per_batch']} frames/batch "
                f"{p['frames_per_s_by_batch']}, {p['gflops']} GFLOP/s = {p['roofline_fraction']:.0%} of the {precision} roofline, "
                f"{p['roofline_fraction_float32']:.0%} of float32's; score difference {p['max_diff_over_spread']} of the spread "
                f"({'passes' if p['passes_check'] else 'fails'} the load check, tolerance {p['tolerance']})")
        else:
            say(f"model path in {precision}: not run ({p['reason']})")
    m = result["model_served_stride"] if "model_served_stride" in result else result["model"]
    result["engine"] = {"backend": scorer.engine.backend if scorer.engine else "torch (unfused)",
                        "cpu_workers": scorer.engine.workers.count if scorer.engine and scorer.engine.workers else 1}

    full = full_path(scorer, footage, scorer.skip)
    result["full"] = full
    if scorer.skip is not None or not quick:
        other = SkipUnchanged() if scorer.skip is None else None
        result["full_alternative"] = full_path(scorer, footage, other)
    if scorer.encoding == "torch":  # every clip at once, one encoding pass per round on the device
        result["full_side_by_side"] = full_path_side_by_side(scorer, footage, scorer.skip)
        side = result["full_side_by_side"]
        pairs = zip((s for clip in side.pop("scores") for s in clip), (s for clip in full["scores"] for s in clip))
        side["max_score_difference_from_full"] = max(abs(a - b) for a, b in pairs)
        say(f"full path, {len(footage.clips)} clips side by side: {side['frames_per_s']} frames/s, "
            f"EER {side.get('eer')} AUC {side.get('auc')}, scores within {side['max_score_difference_from_full']:.2g} of clip after clip")
    for key in ("full", "full_alternative"):
        result.get(key, {}).pop("scores", None)
    naive["speedup"] = round(full["frames_per_s"] / naive["frames_per_s"], 2)
    encode_s = full["encode_ms_per_frame"] / 1e3
    model_only_full = 1.0 / max(1.0 / full["frames_per_s"] - encode_s, 1e-9)
    naive["speedup_model_only"] = round(model_only_full / naive["model_only_frames_per_s"], 2)
    say(f"full path ({len(footage.clips)} clips, {full['frames']} frames, skip {full['skip']}): {full['frames_per_s']} frames/s, "
        f"{full['scored_patch_share']:.0%} of patches scored, EER {full.get('eer')} AUC {full.get('auc')}; "
        f"speed-up over naive {naive['speedup']}x end to end, {naive['speedup_model_only']}x without the encoding")
    if "full_alternative" in result:
        alt = result["full_alternative"]
        say(f"  alternative (skip {alt['skip']}): {alt['frames_per_s']} frames/s, {alt['scored_patch_share']:.0%} scored, "
            f"EER {alt.get('eer')} AUC {alt.get('auc')}")

    result["finishing"] = finishing(scorer, footage, streams=16 if quick else 256, quick=quick)
    say(f"finishing {result['finishing']['streams']} single-frame stream chunks: "
        f"{result['finishing']['one_by_one_us_per_stream']} us each one by one, "
        f"{result['finishing']['together_us_per_stream']} us each together")
    if on_cuda:
        result["cuda"] = cuda_section(loaded, channels, m["gflops_per_frame"] * 1e9, quick)
    result["decoding"] = decoding_section(footage, device, quick)

    if service:
        result.update(service_section(weights_dir, version, footage, m["frames_per_s"], quick, stream_seconds, flow,
                                      device, processes[0]))
        if len(processes) > 1:  # the same server with other process counts, in the same run (no cameras)
            others = {count: service_section(weights_dir, version, footage, m["frames_per_s"], quick, stream_seconds,
                                             flow, device, count, cameras=False) for count in processes[1:]}
            result["service_by_processes"] = {str(count): _service_summary(part) for count, part in
                                              [(processes[0], result), *others.items()]}
    if peer:
        result["peer"] = peer_section(peer, weights_dir, version, footage, result, quick, stream_seconds)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _service_summary(section: dict[str, Any]) -> dict[str, Any]:
    """What ``service_by_processes`` keeps of one service section."""
    return {"clips_frames_per_s": section["service"]["frames_per_s"], "ratio_to_model": section["service"]["ratio_to_model"],
            "max_realtime_streams": section["max_realtime_streams"], "peak_rss_mb": section["peak_rss_mb"]}
