"""`vad`: the one entry point. The model commands (train, calibrate, eval, detect) live in model/cli.py;
this module adds the ones that need the serving package: serve, worker and bench.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from model.cli import add_model_commands, device_arg, positive_int, run, weights_dir_arg, write_json
from model.config import FLOW_PRESET_NAMES


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from service.jobs.worker import run_worker
    from service.settings import Settings

    overrides: dict[str, Any] = {}
    for name in ("weights", "data_dir", "device"):
        value = getattr(args, name)
        if value:
            overrides["weights_dir" if name == "weights" else name] = value
    settings = Settings(**overrides)
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_worker(settings, once=args.once)


def cmd_bench(args: argparse.Namespace) -> int:
    from service.bench import run_bench

    clips = args.clips.split(",") if args.clips else None
    result = run_bench(weights_dir_arg(args.weights), args.version, quick=args.quick,
                       dataset_root=Path(args.root) if args.root else None, eval_clips=clips,
                       naive_frames=args.naive_frames, stream_seconds=args.stream_seconds,
                       service=not args.no_service, ablate=not args.no_ablation, flow=args.flow,
                       device=args.device, peer=args.peer, processes=args.processes)
    if args.json:
        write_json(args.json, result)
    return 0


def process_counts(value: str) -> list[int]:
    """--processes of vad bench: one count or a comma-separated list of them."""
    return [positive_int(part) for part in value.split(",")]


def cmd_serve(args: argparse.Namespace) -> int:
    from service.settings import Settings

    overrides: dict[str, Any] = {"weights_dir": args.weights} if args.weights else {}
    if args.processes is not None:
        overrides["serve_processes"] = args.processes
    settings = Settings(**overrides)
    if settings.serve_processes > 1:  # the parent imports neither torch nor the app (tests/service/test_serve_processes.py)
        from service.processes import serve_processes

        return serve_processes(settings, args.host, args.port, overrides)
    from service.server import serve

    serve(settings, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vad", description="Video anomaly detection (ALOCC R + D)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_commands(sub)
    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--weights")
    serve.add_argument("--processes", type=positive_int, default=None,
                       help="serving processes behind the port (default: VAD_SERVE_PROCESSES, 1); docs/server.md")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="measure roofline, model path, naive loop, server and streams (docs/speed.md)")
    bench.add_argument("--weights", help="weights folder (default: VAD_WEIGHTS_DIR or the bundled weights/)")
    bench.add_argument("--version", help="version to measure (default: the active one)")
    bench.add_argument("--json", help="write every figure here")
    bench.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, figures not meaningful")
    bench.add_argument("--root", help="UCSD Ped2 folder (default: VAD_PED2_ROOT or ../shared/datasets/ped2)")
    bench.add_argument("--clips", help="comma-separated Ped2 test clips for the full path and service (default: all 12)")
    bench.add_argument("--naive-frames", type=int, help="frames the per-patch loop scores (default 48)")
    bench.add_argument("--stream-seconds", type=float, help="seconds each WebSocket trial sends (default 10)")
    bench.add_argument("--no-service", action="store_true", help="skip the server and stream sections")
    bench.add_argument("--no-ablation", action="store_true", help="skip measuring each optimisation in turn")
    bench.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda, cuda:1 (default: CUDA when available, as vad serve)")
    bench.add_argument("--flow", choices=list(FLOW_PRESET_NAMES),
                       help="override the version's optical-flow preset (appearance+flow; changes the model's input)")
    bench.add_argument("--peer", choices=["torchserve"],
                       help="also serve the version with TorchServe (benchmark-only, installed into ~/.cache/vad-bench; "
                            "needs Java 17) and compare it on the same clips and streams")
    bench.add_argument("--processes", type=process_counts, default=[1],
                       help="serving processes of the measured server (VAD_SERVE_PROCESSES; default 1); a list "
                            "such as 1,4 measures the server with each count in the same run")
    bench.set_defaults(func=cmd_bench)

    worker = sub.add_parser("worker", help="run queued training jobs (POST /v1/training-jobs) until stopped")
    worker.add_argument("--weights", help="weights folder (default: VAD_WEIGHTS_DIR or the bundled weights/)")
    worker.add_argument("--data-dir", help="job queue and footage folder (default: VAD_DATA_DIR or ./data)")
    worker.add_argument("--device", type=device_arg, help="cpu, cuda, cuda:1 (default: VAD_DEVICE, auto)")
    worker.add_argument("--once", action="store_true", help="run at most one job, then exit")
    worker.set_defaults(func=cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
