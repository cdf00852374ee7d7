"""The torch encoding on a device against the OpenCV encoding: parity, speed, and the full path.

    python -m service.bench.encoding_device --device cuda --root /path/to/ped2 --json out.json

prints one ``[bench]`` line per figure and writes them all as JSON:
- ``parity``: the uint8 flow channel of the torch encoding on the device against OpenCV's on Ped2
  test frames (mean |difference| in grey levels, share of pixels off by more than 1 and by any, the
  largest difference; the appearance channel must be equal), and v0003's scores of those frames
  through FrameStream with each encoding (largest |difference| of frame and patch scores, frames
  whose flag differs);
- ``encoding``: ms/frame of encoding on the device for one stream's chunks of 16, 64 and 256 frames
  and for 16 streams' chunks of 16 at once (frames copied to the device included), beside OpenCV's
  ms/frame for chunks of 16 on this machine's CPUs (its flow threads: one per core);
- ``full_path``: frames/s of the whole scoring path (service/bench/full_path.py: FrameStream in
  chunks over the Ped2 test clips, EER/AUC) with VAD_ENCODING=opencv and =torch, interleaved, the
  median of the rounds.

``--quick`` (the CPU test): 16 frames of one clip, chunks of 8, one round. Without ``--root`` it uses Ped2 when found
beside the repository (VAD_PED2_ROOT), else synthetic frames, and says so; a ``--root`` that is not
Ped2, or ``--device cuda`` without CUDA, stop it with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import registry
from model.devices import resolve_device
from model.encoding import encode_frames
from model.offline import scorer_for
from model.scoring import FrameStream, patch_scores
from model.torch_encoding import encode_frames_torch, encode_stack
from service.bench.footage import Footage, default_dataset_root
from service.bench.full_path import full_path
from service.bench.timing import best_seconds, say, synchronized

CHUNKS = (16, 64, 256)
STREAMS = 16  # streams batched together, one chunk of 16 frames each
QUICK_CHUNK, QUICK_FRAMES = 8, 16


def flow_parity(clips: list[np.ndarray], loaded: registry.LoadedVersion, device: torch.device) -> dict[str, Any]:
    """The torch encoding on ``device`` against OpenCV's, pixel by pixel, over ``clips``."""
    config = loaded.config
    differences, appearance_equal = [], True
    for gray in clips:
        reference = encode_frames(gray, config)
        mine = encode_frames_torch(gray, config, device=device).cpu().numpy()
        appearance_equal &= bool(np.array_equal(reference[:, 0], mine[:, 0]))
        if config.input_mode != "appearance":
            differences.append(np.abs(reference[:, 1].astype(np.int16) - mine[:, 1]).ravel())
    out: dict[str, Any] = {"frames": int(sum(len(c) for c in clips)), "appearance_equal": appearance_equal}
    if differences:
        d = np.concatenate(differences)
        out.update({
            "motion_mean_abs_diff": float(d.mean()),
            "motion_share_over_1": float((d > 1).mean()),
            "motion_share_over_0": float((d > 0).mean()),
            "motion_max_diff": int(d.max()),
        })
    return out


def score_parity(clips: list[np.ndarray], loaded: registry.LoadedVersion, device: torch.device, chunk: int) -> dict[str, Any]:
    """Frame and patch scores of FrameStream (unchanged-patch test on) with the OpenCV encoding on
    the CPU and the torch encoding on ``device``."""
    calibration = loaded.calibration
    runs: dict[str, tuple[list[np.ndarray], list[np.ndarray], int]] = {}
    for encoding, where in (("opencv", "cpu"), ("torch", device)):
        scorer = scorer_for(loaded, where, encoding=encoding)
        frames, patches, scored = [], [], 0
        for gray in clips:
            stream = FrameStream(scorer, 10.0)
            for start in range(0, len(gray), chunk):
                results = stream.score(gray[start : start + chunk])
                frames.append(np.array([r.score for r in results]))
                assert stream.last_raw is not None
                patches.append(patch_scores(stream.last_raw, calibration.score_mode, calibration).numpy())
            scored += stream.patches_scored
        runs[encoding] = (frames, patches, scored)
    frame_a, frame_b = (np.concatenate(runs[e][0]) for e in ("opencv", "torch"))
    patch_a, patch_b = (np.concatenate(runs[e][1]) for e in ("opencv", "torch"))
    tau = calibration.threshold
    return {
        "frames": int(len(frame_a)),
        "frame_score_max_abs_diff": float(np.abs(frame_a - frame_b).max()),
        "patch_score_max_abs_diff": float(np.abs(patch_a - patch_b).max()),
        "flag_differs": int(((frame_a > tau) != (frame_b > tau)).sum()),
        "patches_scored": {"opencv": runs["opencv"][2], "torch": runs["torch"][2]},
        "threshold": tau,
    }


def encoding_speed(frames: np.ndarray, loaded: registry.LoadedVersion, device: torch.device, quick: bool) -> dict[str, Any]:
    """ms/frame of the torch encoding on ``device`` per chunk size and for streams batched together,
    and OpenCV's on the CPU for the first chunk size."""
    config = loaded.config
    seconds, repeats = (0.0, 1) if quick else (1.0, 3)
    chunks, streams = (QUICK_CHUNK,) if quick else CHUNKS, 2 if quick else STREAMS
    first = frames[: chunks[0]]
    opencv = best_seconds(lambda: encode_frames(first, config), seconds, repeats) / len(first)
    out: dict[str, Any] = {"device": str(device), "opencv_cpu": {"chunk": len(first), "ms_per_frame": round(opencv * 1e3, 3)}}
    say(f"encoding: OpenCV on the CPU, chunks of {len(first)}: {out['opencv_cpu']['ms_per_frame']} ms/frame")
    out["torch_ms_per_frame"] = {}
    for chunk in chunks:
        sample = np.resize(frames, (chunk, *frames.shape[1:]))  # repeats the frames when there are fewer
        took = best_seconds(synchronized(lambda: encode_frames_torch(sample, config, device=device), device), seconds, repeats)
        out["torch_ms_per_frame"][str(chunk)] = round(took / chunk * 1e3, 3)
        say(f"encoding: torch on {device}, chunks of {chunk}: {out['torch_ms_per_frame'][str(chunk)]} ms/frame")
    stack = np.resize(frames, (streams, chunks[0], *frames.shape[1:]))
    took = best_seconds(synchronized(lambda: encode_stack(torch.from_numpy(stack).to(device), config), device), seconds, repeats)
    out["torch_streams"] = {"streams": streams, "chunk": chunks[0], "ms_per_frame": round(took / (streams * chunks[0]) * 1e3, 3)}
    say(f"encoding: torch on {device}, {streams} streams x {chunks[0]} frames at once: {out['torch_streams']['ms_per_frame']} ms/frame")
    out["speedup_torch_vs_opencv"] = round(opencv * 1e3 / out["torch_ms_per_frame"][str(chunks[0])], 2)
    return out


def full_path_speed(loaded: registry.LoadedVersion, footage: Footage, device: torch.device, rounds: int) -> dict[str, Any]:
    """Full-path frames/s with each encoding, rounds interleaved, medians (and the figures of the last round)."""
    scorers = {encoding: scorer_for(loaded, device, encoding=encoding) for encoding in ("opencv", "torch")}
    rates: dict[str, list[float]] = {encoding: [] for encoding in scorers}
    last: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for encoding, scorer in scorers.items():
            last[encoding] = full_path(scorer, footage, scorer.skip)
            last[encoding].pop("scores")
            rates[encoding].append(last[encoding]["frames_per_s"])
    out: dict[str, Any] = {"rounds": rounds, "device": str(device)}
    for encoding in scorers:
        out[encoding] = {**last[encoding], "frames_per_s": statistics.median(rates[encoding]), "rounds_frames_per_s": rates[encoding]}
        figures = {k: last[encoding][k] for k in ("auc", "eer") if k in last[encoding]}
        say(f"full path, VAD_ENCODING={encoding} on {device}: {out[encoding]['frames_per_s']} frames/s "
            f"(rounds {rates[encoding]}), {last[encoding]['frames']} frames {figures}")
    out["ratio_torch_to_opencv"] = round(out["torch"]["frames_per_s"] / out["opencv"]["frames_per_s"], 2)
    return out


def run(device_name: str, root: Path | None, weights: Path, version: str | None, quick: bool, clips: int | None) -> dict[str, Any]:
    try:
        device = resolve_device(device_name)
    except ValueError as exc:
        raise SystemExit(f"encoding_device: {exc}") from exc
    if root is not None and not (root / "labels" / "test_frame_labels.json").is_file():
        raise SystemExit(f"encoding_device: {root} is not the Ped2 folder (no labels/test_frame_labels.json)")
    root = root or default_dataset_root()
    version = version or registry.active_version(weights)
    if version is None:
        raise SystemExit(f"encoding_device: no published version in {weights}")
    loaded = registry.load_version(weights, version, "cpu")
    started = time.perf_counter()
    say(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", version {version} ({loaded.config.input_mode}, flow {loaded.config.flow_preset}), "
        + (f"Ped2 at {root}" if root else "no Ped2 found: synthetic frames"))
    names = None
    if root is not None:
        from model.evaluate import ped2_test_clips

        names = [clip.name for clip in ped2_test_clips(root)][: (1 if quick else clips or None)]
    footage = Footage(root, names, QUICK_FRAMES if quick else None)
    parity_clips = [gray[: QUICK_FRAMES if quick else 64] for _, gray, _, _ in footage.clips[:: 1 if quick else 3]]
    report: dict[str, Any] = {"device": str(device), "version": version, "dataset": str(root) if root else "synthetic",
                              "torch": torch.__version__}
    report["parity"] = {"flow": flow_parity(parity_clips, loaded, device),
                        "scores": score_parity(parity_clips, loaded, device, QUICK_CHUNK if quick else 16)}
    say(f"parity: {json.dumps(report['parity'])}")
    report["encoding"] = encoding_speed(footage.frames(256), loaded, device, quick)
    report["full_path"] = full_path_speed(loaded, footage, device, 1 if quick else 3)
    report["seconds"] = round(time.perf_counter() - started, 1)
    say(f"done in {report['seconds']} s")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.bench.encoding_device", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--root", type=Path, help="Ped2 folder (default: VAD_PED2_ROOT or ../shared/datasets/ped2, else synthetic frames)")
    parser.add_argument("--weights", type=Path, default=registry.BUNDLED_WEIGHTS_DIR, help="registry folder (default: the bundled weights)")
    parser.add_argument("--version", help="version to score with (default: the active one)")
    parser.add_argument("--clips", type=int, help="score only the first N Ped2 test clips in the full path (default: all 12)")
    parser.add_argument("--quick", action="store_true", help="a few frames, one round: checks that it runs, not speed")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    report = run(args.device, args.root, args.weights, args.version, args.quick, args.clips)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
