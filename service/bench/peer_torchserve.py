"""`vad bench --peer torchserve`: the same R and D served by TorchServe (a general model server, what a
team would otherwise deploy), measured beside `vad serve` on the same clips and the same 10 fps streams
with the same clients (service_path.py): frames/s of whole clips, p99 of K streams, the largest
real-time K, and peak RSS (TorchServe's Java frontend + its Python workers, summed).

TorchServe is a benchmark-only extra, never a dependency of the service. It is installed into its own
virtual environment under the bench's cache (``VAD_BENCH_CACHE``, default ~/.cache/vad-bench), not
into the service's: torchserve and torch-model-archiver pull their own packages (psutil, Pillow, ...),
which would then be audited and shipped with the service's environment. That environment gets the
same torch wheel and the same versions of numpy, OpenCV, safetensors (and ONNX Runtime when the bench
has it) as the process running the bench, so the handler (torchserve_handler.py, importing this
checkout's ``model`` package through PYTHONPATH) scores exactly as the service does. Without Java 17+
or when the packages cannot be installed the section is skipped with the reason.

TorchServe's configuration (its docs: docs/batch_inference_with_ts.md, docs/configuration.md and the
stateful-inference example, examples/stateful):
- 2 workers per model, one per core (``default_workers_per_model`` is the core count), each scoring on
  1 intra-op thread, so workers do not oversubscribe the 2 cores;
- clips (model ``vad_clips``): ``batchSize`` 1. A clip request is already a batch of frames (scored 16
  frames per forward pass); with a larger batchSize the frontend hands two clips arriving together to
  one worker, which scores them one after the other while the other worker idles;
- stream frames (model ``vad_frames``): TorchServe has no WebSocket, so each frame is one HTTP request
  ``POST /predictions/vad_frames`` carrying its stream id in ``ts_request_sequence_id``. The handler
  keeps each stream's FrameStream (previous frame for the flow), so a stream must stay on one worker
  in order: sequence batching (``sequenceBatching: true``, TorchServe's mechanism for stateful models)
  pins each sequence to a worker and batches one frame of each of up to ``batchSize`` 8 sequences,
  waiting at most ``maxBatchDelay`` 10 ms for them (the docs' walkthrough values; 10 ms of a 100 ms
  frame interval). A sequence ends after ``sequenceMaxIdleMSec`` without frames, so trials are spaced
  by more than that.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from service.bench.footage import CAMERA_FPS, Footage, jpeg_frames, write_clip
from service.bench.server_process import REPO, ServerProcess, proc_status_kib, child_pids, free_port
from service.bench.service_path import (
    REALTIME_P99_MS, clips_throughput, http_frame_streams, served_weights, streams_section,
)
from service.bench.timing import say

PEERS = ("torchserve",)
# pyyaml: TorchServe's worker reads model-config.yaml with it but does not declare it
TORCHSERVE_PACKAGES = ("torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml")
# installed in the peer's environment at the versions the bench runs with, when the bench has them
MIRRORED_PACKAGES = ("torch", "numpy", "opencv-python-headless", "safetensors", "onnx", "onnxruntime")
HANDLER = Path(__file__).with_name("torchserve_handler.py")
CLIP_MODEL, FRAME_MODEL = "vad_clips", "vad_frames"
WORKERS = 2
STREAM_BATCH_SIZE, STREAM_BATCH_DELAY_MS = 8, 10
SEQUENCE_IDLE_MS = 1000  # a stream silent this long is over (10 frame intervals)
MAX_SEQUENCES = 256  # streams TorchServe holds at once: the bench's largest K
SEQUENCE_QUEUE = 10  # frames one stream may have waiting (1 s at 10 fps); beyond: refused (dropped)
JAVA_MIN_VERSION = 17


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (no Java, packages not installable); the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("VAD_BENCH_CACHE") or Path.home() / ".cache" / "vad-bench")


def java_problem() -> str | None:
    """Why TorchServe's Java frontend cannot run here, or None when a Java 17+ runtime is on PATH."""
    java = shutil.which("java", path=str(Path(os.environ["JAVA_HOME"]) / "bin")) if os.environ.get("JAVA_HOME") else None
    java = java or shutil.which("java")
    if java is None:
        return "no java on PATH (TorchServe's frontend needs Java 17: Debian's openjdk-17-jre-headless)"
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{java} -version failed: {exc}"
    text = out.stderr + out.stdout
    try:
        quoted = text.split('"')[1]
        major = int(quoted.split(".")[0] if not quoted.startswith("1.") else quoted.split(".")[1])
    except (IndexError, ValueError):
        return f"cannot read the Java version from: {text.strip()[:200]}"
    return None if major >= JAVA_MIN_VERSION else f"Java {major} found, TorchServe 0.12 needs {JAVA_MIN_VERSION}+"


def peer_requirements() -> list[str]:
    """What the peer's environment installs: TorchServe, and the bench's own versions of the packages
    the handler's scoring uses (torch without its local tag: pip finds the same wheel)."""
    pins = []
    for name in MIRRORED_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return [*TORCHSERVE_PACKAGES, *pins]


def peer_environment(cache: Path | None = None) -> Path:
    """The peer's virtual environment (made or updated when its requirements changed); returns its
    bin folder. Raises PeerUnavailable when it cannot be made."""
    venv = (cache or cache_dir()) / "torchserve-venv"
    requirements = peer_requirements()
    marker = venv / "vad-bench-requirements.json"
    if marker.is_file() and json.loads(marker.read_text()) == requirements and (venv / "bin" / "torchserve").is_file():
        return venv / "bin"
    say(f"peer: installing {' '.join(requirements)} into {venv}")
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerUnavailable(f"{' '.join(step[:4])} failed: {exc}") from exc
        if done.returncode != 0:
            raise PeerUnavailable(f"{' '.join(step[:4])} failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")
    marker.write_text(json.dumps(requirements))
    return venv / "bin"


def model_config(version: str, requests: str) -> str:
    """The archive's model-config.yaml (TorchServe's per-model settings; the handler's under ``handler``)."""
    lines = [f"minWorkers: {WORKERS}", f"maxWorkers: {WORKERS}", "responseTimeout: 600"]
    if requests == "clips":
        lines += ["batchSize: 1", "maxBatchDelay: 0"]
    else:
        lines += [f"batchSize: {STREAM_BATCH_SIZE}", f"maxBatchDelay: {STREAM_BATCH_DELAY_MS}", "sequenceBatching: true",
                  f"sequenceMaxIdleMSec: {SEQUENCE_IDLE_MS}", f"maxNumSequence: {MAX_SEQUENCES}",
                  f"maxSequenceJobQueueSize: {SEQUENCE_QUEUE}"]
    lines += ["handler:", f"  version: {version}", f"  requests: {requests}", "  threads: 1"]
    return "\n".join(lines) + "\n"


def build_archives(bin_dir: Path, weights_dir: Path, version: str, work: Path) -> Path:
    """vad_clips.mar and vad_frames.mar (handler + the version's safetensors and manifest) in a model store."""
    store, stage = work / "model-store", work / "stage"
    store.mkdir()
    shutil.copytree((weights_dir / version).resolve(), stage / version)  # unpacked into model_dir/<version>/
    for name, requests in ((CLIP_MODEL, "clips"), (FRAME_MODEL, "frames")):
        config = work / f"{name}.yaml"
        config.write_text(model_config(version, requests))
        command = [str(bin_dir / "torch-model-archiver"), "--model-name", name, "--version", "1.0",
                   "--handler", str(HANDLER), "--extra-files", str(stage), "--config-file", str(config),
                   "--export-path", str(store)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise PeerUnavailable(f"torch-model-archiver failed: {(done.stderr or done.stdout)[-1500:]}")
    return store


def _rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB; 0 when it is gone or has none (a process ending while sampled)."""
    try:
        return proc_status_kib(pid, "VmRSS")
    except OSError:
        return 0


class TorchServe:
    """`torchserve --foreground` on free loopback ports, started in its own process group (stopped by
    signal, the group killed if it lingers), its memory sampled while it runs. A context manager."""

    def __init__(self, bin_dir: Path, store: Path, work: Path) -> None:
        self.bin_dir, self.store, self.work = bin_dir, store, work
        self.ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc", "grpc_management")}
        self.url = f"http://127.0.0.1:{self.ports['inference']}"
        self.management_url = f"http://127.0.0.1:{self.ports['management']}"
        self.log_path = work / "torchserve.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.peak_mb = {"total": 0.0, "frontend": 0.0, "workers": 0.0}
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def config(self) -> Path:
        path = self.work / "config.properties"
        path.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{self.ports['inference']}",
            f"management_address=http://127.0.0.1:{self.ports['management']}",
            f"metrics_address=http://127.0.0.1:{self.ports['metrics']}",
            "grpc_inference_address=127.0.0.1", f"grpc_inference_port={self.ports['grpc']}",
            "grpc_management_address=127.0.0.1", f"grpc_management_port={self.ports['grpc_management']}",
            f"model_store={self.store}",
            f"default_workers_per_model={WORKERS}",
            "disable_token_authorization=true",
            "enable_model_api=true",  # registering the second model through the management API
            "disable_system_metrics=true",  # no per-minute metrics subprocess beside the workers
            f"max_request_size={64 << 20}", f"max_response_size={64 << 20}",
            f"job_queue_size={max(100, MAX_SEQUENCES * SEQUENCE_QUEUE)}",
        ]) + "\n")
        return path

    def start(self, model: str, timeout_s: float = 300.0) -> "TorchServe":
        """Starts TorchServe with ``model`` registered; returns once its workers are ready."""
        env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(self.work), "LOG_LOCATION": str(self.work / "logs"),
               "METRICS_LOCATION": str(self.work / "logs"), "OMP_NUM_THREADS": "1"}
        command = [str(self.bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--model-store", str(self.store),
                   "--ts-config", str(self.config()), "--models", f"{model}={model}.mar"]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(command, cwd=self.work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self._sampler = threading.Thread(target=self._sample, name="torchserve-rss", daemon=True)
        self._sampler.start()
        self.wait_ready(model, timeout_s)
        return self

    def wait_ready(self, model: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                break
            try:
                reply = httpx.get(f"{self.management_url}/models/{model}", timeout=5)
                if reply.status_code == 200:
                    workers = reply.json()[0].get("workers", [])
                    if len(workers) >= WORKERS and all(w.get("status") == "READY" for w in workers):
                        return
            except (httpx.HTTPError, ValueError, IndexError, KeyError):
                pass
            time.sleep(0.5)
        raise PeerUnavailable(f"TorchServe did not get {model} ready within {timeout_s} s: {self.log()[-3000:]}")

    def swap_model(self, old: str, new: str, timeout_s: float = 300.0) -> None:
        """Unregisters ``old`` (its workers stop) and registers ``new`` from the store with its workers."""
        httpx.delete(f"{self.management_url}/models/{old}", timeout=120).raise_for_status()
        reply = httpx.post(f"{self.management_url}/models", params={"url": f"{new}.mar", "model_name": new,
                           "initial_workers": WORKERS, "synchronous": "true"}, timeout=timeout_s)
        if reply.status_code != 200:
            raise PeerUnavailable(f"registering {new} failed ({reply.status_code}): {reply.text[:500]}")
        self.wait_ready(new, timeout_s)

    def log(self) -> str:
        """The tails of the launcher's output, the frontend's log and the workers' log (not the metrics)."""
        logs = [self.log_path, self.work / "logs" / "ts_log.log", self.work / "logs" / "model_log.log"]
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs if p.is_file())

    def processes(self) -> tuple[int | None, list[int]]:
        """(the Java frontend's pid, its worker processes' pids): the frontend is the launcher's child."""
        if self.process is None:
            return None, []
        frontends = child_pids(self.process.pid, skip_tracker=False)
        if not frontends:
            return None, []
        frontend = frontends[0]
        workers, todo = [], child_pids(frontend, skip_tracker=False)
        while todo:
            pid = todo.pop()
            workers.append(pid)
            todo += child_pids(pid, skip_tracker=False)
        return frontend, workers

    def _sample(self) -> None:
        while not self._sampling.wait(0.2):
            frontend, workers = self.processes()
            if frontend is None:
                continue
            front, back = _rss_kib(frontend) / 1024, sum(_rss_kib(p) for p in workers) / 1024
            if front + back > self.peak_mb["total"]:
                self.peak_mb = {"total": round(front + back, 1), "frontend": round(front, 1), "workers": round(back, 1)}

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the frontend (it stops its workers), then the whole process group if it lingers."""
        self._sampling.set()
        if self.process is None or self.process.poll() is not None:
            return
        frontend, _ = self.processes()
        if frontend is not None:
            os.kill(frontend, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group this class started: stragglers
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def __enter__(self) -> "TorchServe":
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


async def post_torchserve_clip(client: httpx.AsyncClient, path: Path) -> int:
    """One clip (the same MJPG AVI bytes `POST /v1/clips` gets) as the body of ``/predictions/vad_clips``."""
    response = await client.post(f"/predictions/{CLIP_MODEL}", content=path.read_bytes(),
                                  headers={"Content-Type": "video/x-msvideo"})
    response.raise_for_status()
    return int(response.json()["frame_count"])


def _ratio(ours: float | int | None, theirs: float | int | None) -> float | None:
    if ours is None or theirs is None or theirs == 0:
        return None
    return round(ours / theirs, 2)


def peer_section(peer: str, weights_dir: Path, version: str, footage: Footage, service: dict[str, Any], quick: bool,
                 stream_seconds: float | None) -> dict[str, Any]:
    """``peer``: TorchServe's figures, `vad serve`'s per-frame HTTP streams (POST /v1/frames, for the
    like-for-like protocol) and the ratios this service / peer. ``service``: the run's service section
    (clips frames/s, WebSocket streams). Skipped with ``skipped``: the reason, when TorchServe cannot run."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r} (one of {PEERS})")
    out: dict[str, Any] = {"name": peer}
    if "service" not in service:
        out["skipped"] = "the peer is compared with the service section (run without --no-service)"
        say(f"peer {peer}: skipped ({out['skipped']})")
        return out
    try:
        problem = java_problem()
        if problem:
            raise PeerUnavailable(problem)
        bin_dir = peer_environment()
    except PeerUnavailable as exc:
        out["skipped"] = str(exc)
        say(f"peer {peer}: skipped ({exc})")
        return out
    seconds = stream_seconds or (1.0 if quick else 10.0)
    frames = jpeg_frames(footage, 400)
    with tempfile.TemporaryDirectory(prefix="vad-bench-torchserve-") as tmp:
        work = Path(tmp)
        clips = [write_clip(work / f"{name}.avi", gray[: (16 if quick else None)]) for name, gray, _, _ in footage.clips]
        store = build_archives(bin_dir, weights_dir, version, work)
        with TorchServe(bin_dir, store, work) as server:
            server.start(CLIP_MODEL)
            out["workers"] = WORKERS
            runs = [clips_throughput(server.url, clips, c, post_torchserve_clip) for c in ((1,) if quick else (1, 2))]
            best = max(runs, key=lambda r: r["frames_per_s"])
            out["clips"] = {"frames_per_s": best["frames_per_s"], "runs": runs}
            say(f"peer {peer}: clips {best['frames_per_s']} frames/s ({best['concurrency']} at a time); runs {runs}")
            server.swap_model(CLIP_MODEL, FRAME_MODEL)

            def sequence_id(index: int) -> dict[str, str]:
                return {"ts_request_sequence_id": f"bench-{index}-{uuid.uuid4().hex[:12]}"}

            streams, best_k = streams_section(
                http_frame_streams(server.url, f"/predictions/{FRAME_MODEL}", sequence_id), frames, quick, seconds,
                label=f"peer {peer} HTTP frame streams", pause_s=2 * SEQUENCE_IDLE_MS / 1000)
            out["streams"] = streams
            out["max_realtime_streams"] = best_k
            server.stop()
            out["peak_rss_mb"] = server.peak_mb["total"]
            out["peak_rss_mb_parts"] = server.peak_mb
        out["streams_protocol"] = (f"TorchServe has no WebSocket: each stream sends one HTTP POST per frame at "
                                   f"{CAMERA_FPS:g} fps, its stream id in ts_request_sequence_id (sequence batching)")
        out["config"] = {"workers": WORKERS, "threads_per_worker": 1, "clips": model_config(version, "clips"),
                         "frames": model_config(version, "frames"), "requirements": peer_requirements()}
        say(f"peer {peer}: max real-time HTTP frame streams {best_k}; peak RSS {out['peak_rss_mb']} MB "
            f"(frontend {server.peak_mb['frontend']} + workers {server.peak_mb['workers']})")

        # this service over the same protocol as the peer's streams: POST /v1/frames, one per frame
        # (stateless: no predecessor, so no motion channel; less work per frame than a stream's)
        env = {**os.environ, "VAD_LOG_LEVEL": "warning", "VAD_DEVICE": "cpu", "VAD_DATA_DIR": str(work / "data")}
        with served_weights(weights_dir, version) as served, ServerProcess(env, weights_dir=served) as ours:
            same_clips = clips_throughput(ours.url, clips, 1 if quick else 2)
            http_streams, http_k = streams_section(http_frame_streams(ours.url, "/v1/frames?maps=true"), frames, quick,
                                                   seconds, label="service HTTP frame streams (POST /v1/frames)")
            ours_rss = ours.peak_rss_mb()
    out["service_http_frames"] = {"streams": http_streams, "max_realtime_streams": http_k,
                                  "note": "POST /v1/frames scores each frame alone (no motion channel from a predecessor)"}
    out["service_same_work"] = {"clips": same_clips, "peak_rss_mb": ours_rss,
                                "note": "a fresh vad serve doing the peer's work (clips, then HTTP frame streams): its peak RSS"}
    out["compare"] = {
        "clips_frames_per_s": {"service": service["service"]["frames_per_s"], "peer": out["clips"]["frames_per_s"],
                               "ratio": _ratio(service["service"]["frames_per_s"], out["clips"]["frames_per_s"])},
        "max_realtime_streams": {
            "service_websocket": service["max_realtime_streams"], "service_http_frames": http_k, "peer_http_frames": best_k,
            "ratio_websocket": _ratio(service["max_realtime_streams"], best_k), "ratio_http_frames": _ratio(http_k, best_k)},
        "p99_ms_by_k": {
            "service_websocket": {t["k"]: t["p99_ms"] for t in service["streams"]},
            "service_http_frames": {t["k"]: t["p99_ms"] for t in http_streams},
            "peer_http_frames": {t["k"]: t["p99_ms"] for t in out["streams"]}},
        "peak_rss_mb": {"service": ours_rss, "peer": out["peak_rss_mb"], "ratio": _ratio(ours_rss, out["peak_rss_mb"])},
        "realtime_rule": f"every frame answered, each stream at >= 95% of {CAMERA_FPS:g} frames/s, p99 <= {REALTIME_P99_MS:g} ms",
    }
    c = out["compare"]
    say(f"vs {peer}: clips {c['clips_frames_per_s']['service']} / {c['clips_frames_per_s']['peer']} frames/s = "
        f"{c['clips_frames_per_s']['ratio']}x; real-time streams WebSocket {service['max_realtime_streams']} "
        f"(HTTP frames {http_k}) / {best_k} = {c['max_realtime_streams']['ratio_websocket']}x "
        f"({c['max_realtime_streams']['ratio_http_frames']}x); peak RSS {ours_rss} / {out['peak_rss_mb']} MB")
    return out
