"""The model commands of `vad`: train, calibrate, eval and detect.

They need only `model/`, so `torchrun -m model.cli train ...` trains without the serving package; the
`vad` entry point (service/cli.py) adds serve, worker and bench to the same parser. Errors a user can
cause (bad footage, unknown version, bad settings) print one line naming the problem and exit with
status 2; nothing is published on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from model.config import (
    BUNDLED_WEIGHTS_DIR, DEFAULT_INPUT_MODE, ENCODINGS, FLOW_PRESET_NAMES, INPUT_MODES, NEGATIVE_KINDS, SCORE_MODES,
    CalibrationConfig, ModelConfig, TrainConfig,
)
from model.devices import DEVICE_PATTERN
from model.inject import INJECT_KINDS

DEFAULT_WEIGHTS = os.environ.get("VAD_WEIGHTS_DIR")
# model.inference.PRECISIONS, spelled out: importing it loads torch, which `vad --help` does not need
PRECISION_CHOICES = ["float32", "bf16", "fp16", "int8", "auto"]


def weights_dir_arg(value: str | None) -> Path:
    return Path(value or DEFAULT_WEIGHTS or BUNDLED_WEIGHTS_DIR)


def write_json(path: str, data: Any) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, target)


def device_arg(value: str) -> str:
    """--device: the values VAD_DEVICE takes, refused at parse time like any bad option."""
    if not DEVICE_PATTERN.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not one of auto, cpu, mps, cuda, cuda:N")
    return value


def positive_int(value: str) -> int:
    number = int(value) if value.strip().lstrip("+-").isdigit() else 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return number


def _frame_size(value: str) -> tuple[int, int]:
    width, _, height = value.lower().partition("x")
    if not (width.isdigit() and height.isdigit()) or min(int(width), int(height)) < 8:
        raise argparse.ArgumentTypeError(f"{value!r} is not a frame size like 720x480")
    return int(width), int(height)


def _calibration_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The CalibrationConfig fields given on the command line (--score-mode, --smoothing, --false-alarm-rate)."""
    return {name: getattr(args, name) for name in ("score_mode", "smoothing_frames", "false_alarm_rate")
            if getattr(args, name) is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from model.train import train

    model_fields: dict[str, Any] = {"input_mode": args.input_mode}
    if args.flow_preset:
        model_fields["flow_preset"] = args.flow_preset
    if args.patch_size:
        model_fields["patch_size"] = args.patch_size
    if args.stride:
        model_fields["stride"] = args.stride
    if args.latent_dim:
        model_fields["latent_dim"] = args.latent_dim
    if args.frame_height:
        model_fields["frame_height"] = args.frame_height
    train_fields: dict[str, Any] = {"fit_input_to_footage": not args.fixed_input}
    if args.score_mode is None and args.input_mode == "appearance":
        args.score_mode = "d_r_x"  # no motion channel: the paper's score
    if args.phase_two_negatives:
        train_fields["phase_two_negatives"] = tuple(args.phase_two_negatives.split(","))
    for name in ("max_epochs", "time_budget_s", "patches_per_epoch", "batch_size", "seed", "pseudo_anomaly_share",
                 "phase_two_steps"):
        value = getattr(args, name)
        if value is not None:
            train_fields[name] = value
    result = train(
        args.normal,
        weights_dir_arg(args.weights),
        ModelConfig(**model_fields),
        TrainConfig(**train_fields),
        device=args.device,
        resume=args.resume,
        parent_version=args.parent,
        reject_and_refine=args.reject_and_refine,
        calibration_config=CalibrationConfig(**_calibration_fields(args)),
    )
    if result.version is not None:
        cal = result.manifest["calibration"]
        print(f"published {result.version} in {weights_dir_arg(args.weights)} "
              f"(tau {cal['threshold']:.4f}, {result.manifest['validation']['epochs']} epochs, "
              f"{result.manifest['validation']['seconds']} s)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from model.recalibrate import recalibrate
    from model.registry import read_manifest

    weights = weights_dir_arg(args.weights)
    version = recalibrate(weights, args.version, args.normal, **_calibration_fields(args))
    manifest = read_manifest(weights, version)
    cal = manifest["calibration"]
    print(f"published {version} in {weights}: {args.version}'s networks, score {cal['score_mode']} "
          f"(causal window {cal['smoothing_frames']}), tau {cal['threshold']:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from model import registry
    from model.evaluate import Playback, evaluate_ped2

    if args.dataset != "ped2":
        raise ValueError(f"unknown dataset {args.dataset!r} (supported: ped2)")
    weights = weights_dir_arg(args.weights)
    playback = Playback(args.resize, args.frame_step)
    clip_names = args.clips.split(",") if args.clips else None
    report = evaluate_ped2(args.root, weights, args.version, args.device or "cpu", plots_dir=args.plots, playback=playback,
                           inject_kind=args.inject, inject_seed=args.inject_seed, inject_copies=args.inject_copies,
                           clip_names=clip_names, encoding=args.encoding, precision=args.precision)
    summary, details = report["summary"], report["details"]
    print(f"Ped2 frame-level, {summary['frames']} frames, version {summary['version']} ({summary['input_mode']}, "
          f"networks in {summary['precision']}):")
    for mode, fig in {**summary["scores"], "motion": details["motion"], "fused": details["fused"]}.items():
        print(f"  {mode:15s} AUC {fig['auc']:.4f}  EER {fig['eer']:.4f}")
    served = details["served"]
    print(f"  served ({served['score_mode']}, causal window {served['smoothing_frames']}): "
          f"AUC {served['auc']:.4f}  EER {served['eer']:.4f}; at tau: detection "
          f"{served['detection_rate_at_tau']:.3f}, false alarms {served['false_alarm_rate_at_tau']:.3f}")
    for name, fig in summary["baselines"].items():
        print(f"  baseline: {name} (no network), causal window {served['smoothing_frames']}: "
              f"AUC {fig['auc']:.4f}  EER {fig['eer']:.4f}")
    minmax = details["per_clip_minmax_non_causal"]
    print(f"  (non-causal per-clip min-max, comparison only: AUC {minmax['auc']:.4f}  EER {minmax['eer']:.4f})")
    if summary["motion_saturated_share"] is not None:
        print(f"  motion channel: {summary['motion_saturated_share']:.2%} of moving values at full scale "
              f"(playback {summary['playback']})")
    if "injected" in summary:
        inj = summary["injected"]
        print(f"Injected {inj['kind']} anomalies (seed {inj['seed']}): {inj['objects']} objects in {inj['runs']} "
              f"normal runs, {inj['frames']} injected and {inj['clean_frames']} clean frames:")
        print(f"  served ({inj['score_mode']}): AUC {inj['auc']:.4f}; at tau: detected {inj['detected_at_tau']:.3f}, "
              f"clean false alarms {inj['clean_false_alarms']:.3f}")
        print(f"  baseline: motion (no network): AUC {inj['motion_auc']:.4f}")
    print(f"  {summary['seconds']} s; plots in {args.plots}")
    if args.json:
        write_json(args.json, summary)
    if args.record:
        registry.update_manifest(weights, summary["version"], {"ped2": {**summary, **details}})
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from model.offline import detect_file

    result = detect_file(args.clip, weights_dir_arg(args.weights), args.version, args.device or "cpu",
                         include_maps=not args.no_maps)
    if args.json:
        write_json(args.json, result)
    flagged = result["anomalous_frames"]
    print(f"{args.clip}: {result['frame_count']} frames, {len(flagged)} anomalous "
          f"(model {result['model_version']}, tau {result['threshold']:.4f})")
    if not args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "frames"}))
    return 0


def add_model_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register train, calibrate, eval and detect on a `vad` parser's subcommands."""
    train = sub.add_parser("train", help="train on normal footage and publish weights/vNNNN")
    train.add_argument("--normal", nargs="+", required=True, help="video files or frame folders of normal activity")
    train.add_argument("--weights", help="weights folder (default: VAD_WEIGHTS_DIR or the bundled weights/)")
    train.add_argument("--input-mode", default=DEFAULT_INPUT_MODE, choices=list(INPUT_MODES))
    train.add_argument("--flow-preset", choices=list(FLOW_PRESET_NAMES),
                       help=f"optical flow of appearance+flow input (default {ModelConfig.flow_preset})")
    train.add_argument("--patch-size", type=int)
    train.add_argument("--stride", type=int, help="patch stride when scoring (default 30)")
    train.add_argument("--latent-dim", type=int)
    train.add_argument("--phase-two-steps", type=int,
                       help=f"steps of D's phase two against R's output, 0 = none (default {TrainConfig.phase_two_steps})")
    train.add_argument("--phase-two-negatives",
                       help=f"comma-separated pseudo-anomaly kinds of phase two, of {','.join(NEGATIVE_KINDS)} "
                            f"(default {','.join(TrainConfig().phase_two_negatives)})")
    train.add_argument("--frame-height", type=positive_int,
                       help="rows frames are resized to before scoring (default: chosen from the footage, "
                            "so moving people are about as tall as on UCSD Ped2)")
    train.add_argument("--fixed-input", action="store_true",
                       help="score frames at their own size with a fixed 4 px/frame flow scale and no frame-rate "
                            "scaling (how versions up to v0002 were trained)")
    train.add_argument("--epochs", dest="max_epochs", type=int)
    train.add_argument("--time-budget", dest="time_budget_s", type=float, help="seconds")
    train.add_argument("--patches-per-epoch", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--score-mode", choices=list(SCORE_MODES), help="served frame score (default fused: D(R(X)) + reconstruction + motion, standardised on held-out normal frames)")
    train.add_argument("--pseudo-anomalies", dest="pseudo_anomaly_share", type=float,
                       help="share of sped-up moving patches added to D's negatives (0 = the paper)")
    train.add_argument("--smoothing", dest="smoothing_frames", type=int, help="causal window (frames)")
    train.add_argument("--false-alarm-rate", type=float, help="share of normal frames above tau")
    train.add_argument("--seed", type=int)
    train.add_argument("--device", type=device_arg, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    train.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    train.add_argument("--parent", help="fine-tune from this version")
    train.add_argument("--reject-and-refine", action="store_true",
                       help="drop training frames the first model rejects, then fine-tune")
    train.set_defaults(func=cmd_train)

    calibrate = sub.add_parser("calibrate", help="re-calibrate a version on normal footage (new version, same networks)")
    calibrate.add_argument("--version", required=True)
    calibrate.add_argument("--normal", nargs="+", required=True, help="normal footage; each clip's held-out blocks calibrate")
    calibrate.add_argument("--weights")
    calibrate.add_argument("--score-mode", choices=list(SCORE_MODES))
    calibrate.add_argument("--smoothing", dest="smoothing_frames", type=int, help="causal window (frames)")
    calibrate.add_argument("--false-alarm-rate", type=float)
    calibrate.set_defaults(func=cmd_calibrate)

    evaluate = sub.add_parser("eval", help="frame-level AUC/EER on a labelled benchmark")
    evaluate.add_argument("--dataset", default="ped2")
    evaluate.add_argument("--root", required=True, help="dataset folder, e.g. ../shared/datasets/ped2")
    evaluate.add_argument("--version")
    evaluate.add_argument("--weights")
    evaluate.add_argument("--json", help="write the summary JSON here")
    evaluate.add_argument("--plots", default="artifacts/eval", help="folder for one PNG per test clip")
    evaluate.add_argument("--record", action="store_true", help="store the figures in the version's manifest")
    evaluate.add_argument("--device", type=device_arg)
    evaluate.add_argument("--precision", choices=PRECISION_CHOICES, default="float32",
                          help="the networks' precision, as VAD_PRECISION (CPU: float32, bf16, int8, auto; checked at load)")
    evaluate.add_argument("--encoding", choices=list(ENCODINGS), default="auto",
                          help="who encodes the frames: auto (torch on CUDA, OpenCV on the CPU), opencv or torch")
    evaluate.add_argument("--clips", help="comma-separated test clips to score (default: all 12, the protocol)")
    evaluate.add_argument("--resize", type=_frame_size, help="WxH: play the test clips at this size (robustness check)")
    evaluate.add_argument("--frame-step", type=positive_int, default=1,
                          help="keep every Nth frame: the test clips at 1/N of their frame rate (robustness check)")
    evaluate.add_argument("--inject", choices=list(INJECT_KINDS),
                          help="also score the normal test runs with foreign objects pasted in (model/inject.py)")
    evaluate.add_argument("--inject-seed", type=int, default=0, help="seed of the pasted objects (default 0)")
    evaluate.add_argument("--inject-copies", type=positive_int, default=1,
                          help="injected copies of each normal run, one object each (default 1)")
    evaluate.set_defaults(func=cmd_eval)

    detect = sub.add_parser("detect", help="score a clip offline with the active version")
    detect.add_argument("clip", help="video file or frame folder")
    detect.add_argument("--json", help="write the full per-frame result here")
    detect.add_argument("--version")
    detect.add_argument("--weights")
    detect.add_argument("--no-maps", action="store_true")
    detect.add_argument("--device", type=device_arg)
    detect.set_defaults(func=cmd_detect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vad", description="Video anomaly detection (ALOCC R + D)")
    add_model_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean a user's mistake (a bad setting, footage, dataset or version), not a bug."""
    from model.config import ConfigError
    from model.data import FootageError
    from model.evaluate import DatasetError
    from model.registry import RegistryError

    return FootageError, RegistryError, ConfigError, DatasetError, ValueError


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; a user's mistake is one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as exc:
        print(f"vad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vad {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
