"""`vad bench`: one run that measures the whole path, from the machine's matmul roofline to the wire.

Sections (each prints a line as it finishes; ``--json`` writes them all):
- ``roofline_gflops``: float32 matmul GFLOP/s of this machine, in this run, with the threads the
  model path uses;
- ``model``: the networks' FLOPs per frame (FlopCounterMode on R and D, what scoring needs), frames/s
  of ``Scorer.raw_scores`` at the best of 1, 2, 4, 8, 16 frames per batch, GFLOP/s and the fraction
  of the roofline;
- ``naive``: the same networks (unfused modules) scoring one patch at a time, as a sliding-window
  loop does, with the same input encoding; ``speedup`` = the project's full scoring path
  (FrameStream: encoding, batching, skipping unchanged patches where on) over it, end to end on Ped2
  test clips, with the EER the full path reaches there (``full``);
- ``service``: frames/s of ``POST /v1/clips`` on a real server (uvicorn subprocess, loopback) and its
  ratio to the model path; ``streams``: per-frame latency of K WebSocket streams at 10 frames/s;
  ``max_realtime_streams``; ``peak_rss_mb`` of the server process.

Figures are from this run only: compare ratios, not absolute numbers from other machines.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from model import registry
from model.data import read_footage
from model.offline import FRAMES_PER_BATCH, scorer_for
from model.encoding import encode_frames
from model.scoring import COMPONENTS, FrameStream, Scorer, SkipUnchanged

FRAMES_PER_BATCH_TRIED = (1, 2, 4, 8, 16)
CUDA_FRAMES_PER_BATCH_TRIED = (64, 256)
CAMERA_FPS = 10.0  # Ped2's camera rate: each benchmark stream sends this many frames per second
REALTIME_P99_MS = 250.0
PED2_HEIGHT, PED2_WIDTH = 240, 360


def default_dataset_root() -> Path | None:
    candidates = [os.environ.get("VAD_PED2_ROOT"), Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ped2"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "labels" / "test_frame_labels.json").is_file():
            return Path(candidate)
    return None


def _say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# --- footage ---------------------------------------------------------------------------------------


class Footage:
    """Ped2 test clips (frames + labels), or synthetic Ped2-sized frames when the data set is absent."""

    def __init__(self, root: Path | None, clip_names: list[str] | None, max_frames: int | None, seed: int = 0) -> None:
        self.root = root
        self.clips: list[tuple[str, np.ndarray, np.ndarray | None, list[Path]]] = []
        if root is not None:
            from model.evaluate import ped2_test_clips

            for clip in ped2_test_clips(root):
                if clip_names is not None and clip.name not in clip_names:
                    continue
                gray = read_footage(clip.folder, max_frames).gray
                files = sorted(p for p in clip.folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                self.clips.append((clip.name, gray, clip.labels[: len(gray)], files[: len(gray)]))
        else:
            self.clips.append(("synthetic", synthetic_ped2(max_frames or 40, seed), None, []))

    @property
    def labelled(self) -> bool:
        return all(labels is not None for _, _, labels, _ in self.clips)

    def frames(self, count: int) -> np.ndarray:
        """The first ``count`` frames over the clips, in order."""
        out = np.concatenate([gray for _, gray, _, _ in self.clips])
        return out[:count]


def synthetic_ped2(count: int, seed: int) -> np.ndarray:
    """A static textured 240x360 scene with a few small bright blobs walking across it."""
    import cv2

    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(60, 160, (PED2_HEIGHT, PED2_WIDTH)).astype(np.uint8), (7, 7), 0)
    frames = []
    for t in range(count):
        frame = background.astype(np.float32)
        for k in range(4):
            y, x = 40 + 45 * k, (20 + 3 * t * (k + 1)) % (PED2_WIDTH - 16)
            frame[y : y + 24, x : x + 10] = 30.0
        frame += rng.normal(0, 2, frame.shape)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def jpeg_frames(footage: Footage, count: int) -> list[bytes]:
    import cv2

    files = [f for _, _, _, fs in footage.clips for f in fs]
    if files:
        return [files[i % len(files)].read_bytes() for i in range(min(count, len(files)))]
    gray = footage.frames(count)
    return [cv2.imencode(".jpg", g, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for g in gray]


# --- timing helpers --------------------------------------------------------------------------------


def _synchronized(fn, device: torch.device):
    """``fn`` that returns only once the GPU work it queued is done (timing asynchronous CUDA)."""
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


def _best_seconds(fn, seconds: float, repeats: int) -> float:
    """Best mean seconds per call over ``repeats`` windows of about ``seconds`` each (after a warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = min(best, elapsed / calls)
    return best


def roofline_gflops(quick: bool, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Best float32 matmul GFLOP/s over a few square sizes (on CUDA true float32: TF32 off, torch's
    default for matmul)."""
    if device.type == "cuda":
        sizes = (1024, 2048) if quick else (2048, 4096, 8192)
    else:
        sizes = (256, 512) if quick else (512, 1024, 2048)
    results = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        matmul = _synchronized(lambda: torch.mm(a, b), device)
        seconds = _best_seconds(matmul, 0.1 if quick else 0.5, 2 if quick else 5)
        results[n] = 2 * n**3 / seconds / 1e9
    return {"gflops": max(results.values()), "by_size": {str(k): round(v, 1) for k, v in results.items()}}


def required_flops(scorer: Scorer, patches: torch.Tensor) -> int:
    """FLOPs of what scoring needs on the unfused modules: R1 -> mu -> R2, then D on R(X) and on X
    (R's log-variance head, unused in eval, is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.networks import _pad

    refiner, detector = scorer.refiner, scorer.detector
    patches = patches.to(scorer.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        h = refiner.encoder(_pad(patches, scorer.config.patch_size)).flatten(1)
        refined = refiner.decode(refiner.to_mu(h))
        detector(torch.cat([refined, patches]))
    return int(counter.get_total_flops())


# --- model path, naive loop, full path -------------------------------------------------------------


def _cut(scorer: Scorer, channels: np.ndarray, stride: int) -> torch.Tensor:
    from model.encoding import to_model_input
    from model.patches import to_patches

    return to_patches(to_model_input(torch.from_numpy(channels)), scorer.config.patch_size, stride)[0]


def model_path(scorer: Scorer, channels: np.ndarray, roofline: float, quick: bool, stride: int) -> dict[str, Any]:
    """frames/s of raw_scores on pre-cut float patches of real frames, per frames-per-batch."""
    per_frame = _cut(scorer, channels[:1], stride)
    flops = required_flops(scorer, per_frame)
    by_batch = {}
    tried = FRAMES_PER_BATCH_TRIED[:2] if quick else FRAMES_PER_BATCH_TRIED
    if scorer.device.type == "cuda" and not quick:
        tried = tried + CUDA_FRAMES_PER_BATCH_TRIED  # a GPU needs far larger batches to fill up
    for frames in tried:
        idx = np.arange(frames) % len(channels)
        patches = _cut(scorer, channels[idx], stride)
        seconds = _best_seconds(lambda: scorer.raw_scores(patches, batch_size=patches.shape[0]),
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


def ablation(scorer: Scorer, channels: np.ndarray, flops: float, quick: bool) -> list[dict[str, Any]]:
    """Each inference optimisation added in turn, frames/s on the same patches (best of 1, 4, 16
    frames per batch): what each one gives on this machine."""
    from model.inference import InferenceNets, _CpuWorkers, _OrtRunner, onnxruntime_available

    refiner, detector, config = scorer.refiner, scorer.detector, scorer.config
    threads = torch.get_num_threads()
    workers = _CpuWorkers(threads) if threads > 1 else None

    def split(run):
        return (lambda x: workers(run, x)) if workers is not None else run

    nchw = InferenceNets(refiner, detector, channels_last=False, phase_max_cout=0)
    nhwc = InferenceNets(refiner, detector, channels_last=True, phase_max_cout=0)
    phase = InferenceNets(refiner, detector, channels_last=True)
    steps: list[tuple[str, Any]] = [
        ("modules as trained (batch norm, NCHW), intra-op threads", scorer.reference_scores),
        ("+ batch norm folded, shared first layer, no log-variance head", nchw),
        ("+ channels-last (NHWC)", nhwc),
        ("+ last transposed conv as conv3x3 + pixel shuffle", phase),
    ]
    # every intra-op step before any split one: once worker threads have run ops, libgomp makes the
    # calling thread's small parallel ops slower (see model.inference.dedicate_cpu_to_workers)
    plain = InferenceNets(refiner, detector, channels_last=False, phase_max_cout=0)
    if onnxruntime_available():
        steps.append((f"ONNX Runtime, {threads} intra-op thread(s)", _OrtRunner(plain, config.channels, config.patch_size, threads)))
    if workers is not None:
        steps.append((f"fused torch, batch split over {threads} single-threaded workers", split(phase)))
        if onnxruntime_available():
            steps.append((f"ONNX Runtime, split over {threads} single-threaded workers",
                          split(_OrtRunner(plain, config.channels, config.patch_size, 1))))
    sizes = (1, 16) if quick else (1, 4, 16)
    batches = {f: _cut(scorer, channels[np.arange(f) % len(channels)], config.patch_size) for f in sizes}
    best: dict[tuple[int, int], float] = {}
    # rounds over every step and size, best of the rounds: a burst of noise from another process on
    # the machine then spoils one window of a step, not all of one step's windows
    for _ in range(1 if quick else 4):
        for i, (_, run) in enumerate(steps):
            for frames, patches in batches.items():
                with torch.inference_mode():
                    seconds = _best_seconds(lambda: run(patches), 0.05 if quick else 0.3, 1)
                best[i, frames] = max(best.get((i, frames), 0.0), frames / seconds)
    out = []
    for i, (name, _) in enumerate(steps):
        by_batch = {str(f): round(best[i, f], 1) for f in sizes}
        top = max(by_batch.values())
        out.append({"step": name, "frames_per_s": top, "gflops": round(top * flops / 1e9, 1), "by_batch": by_batch})
        _say(f"  ablation: {name}: {top} frames/s ({by_batch})")
    return out


def naive_loop(scorer: Scorer, gray: np.ndarray) -> dict[str, Any]:
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


def full_path(scorer: Scorer, footage: Footage, skip: SkipUnchanged | None) -> dict[str, Any]:
    """The project's scoring path (FrameStream in chunks of FRAMES_PER_BATCH, as `vad detect` does),
    end to end from decoded frames; EER/AUC over the clips when they are labelled."""
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
    encode_s = _best_seconds(lambda: encode_frames(sample, scorer.config, flow=scorer.flow), 0.0, 3) / len(sample)
    out: dict[str, Any] = {
        "frames": len(scores),
        "frames_per_s": round(len(scores) / seconds, 2),
        "scored_patch_share": round(scored / max(seen, 1), 3),
        "encode_ms_per_frame": round(encode_s * 1e3, 2),
        "skip": None if skip is None else {"level": skip.level, "share": skip.share},
    }
    if footage.labelled and labels:
        all_labels = np.concatenate(labels)
        if 0 < all_labels.sum() < len(all_labels):
            out.update(figures(all_labels, np.asarray(scores)))
    return out


# --- the server ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served_weights(weights_dir: Path, version: str) -> Iterator[Path]:
    """A weights folder whose active version is ``version`` (a temporary link farm when it is not)."""
    if registry.active_version(weights_dir) == version:
        yield weights_dir
        return
    with tempfile.TemporaryDirectory(prefix="vad-bench-weights-") as tmp:
        (Path(tmp) / version).symlink_to((weights_dir / version).resolve(), target_is_directory=True)
        registry.set_active_version(tmp, version)
        yield Path(tmp)


class ServerProcess:
    def __init__(self, weights_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        environment = {**os.environ, "VAD_LOG_LEVEL": "warning", **(env or {})}
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--weights", str(weights_dir)],
            env=environment, stdout=self.log, stderr=subprocess.STDOUT,
            cwd=str(Path(__file__).resolve().parents[1]),
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within {timeout_s} s: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def write_clip(path: Path, gray: np.ndarray, fps: float = CAMERA_FPS) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (gray.shape[2], gray.shape[1]))
    for frame in gray:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def service_clips(server: ServerProcess, clips: list[Path], concurrency: int) -> dict[str, Any]:
    """Post every clip (``concurrency`` at a time); frames/s = all frames / wall time."""
    import httpx

    async def run() -> tuple[int, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
            queue = list(clips)
            frames = 0

            async def worker() -> None:
                nonlocal frames
                while queue:
                    path = queue.pop(0)
                    response = await client.post("/v1/clips", files={"file": (path.name, path.read_bytes(), "video/x-msvideo")})
                    response.raise_for_status()
                    frames += response.json()["frame_count"]

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return frames, time.perf_counter() - started

    frames, seconds = asyncio.run(run())
    return {"concurrency": concurrency, "frames": frames, "seconds": round(seconds, 2), "frames_per_s": round(frames / seconds, 2)}


def stream_trial(server: ServerProcess, k: int, frames: list[bytes], seconds: float) -> dict[str, Any]:
    """K WebSocket streams, each sending one frame every 1/CAMERA_FPS s for ``seconds``; per-frame
    latency = reply received - frame sent."""
    from websockets.asyncio.client import connect

    per_stream = max(1, int(round(seconds * CAMERA_FPS)))

    async def one(index: int) -> tuple[list[float], int, int, float]:
        latencies: list[float] = []
        errors = 0
        sent_at: dict[int, float] = {}
        offset = (index * 37) % len(frames)  # streams show different frames
        async with connect(f"{server.ws_url}/v1/stream", max_size=None) as ws:
            await ws.send(json.dumps({"maps": True}))
            json.loads(await ws.recv())  # the options reply

            async def receive() -> None:
                nonlocal errors
                for _ in range(per_stream):
                    reply = json.loads(await ws.recv())
                    if "error" in reply:
                        errors += 1
                    else:
                        latencies.append(time.perf_counter() - sent_at[reply["seq"]])

            receiver = asyncio.create_task(receive())
            start = time.perf_counter() + 0.05 * (index % 10) / 10  # streams' phases spread over a frame
            for i in range(per_stream):
                delay = start + i / CAMERA_FPS - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent_at[i] = time.perf_counter()
                await ws.send(frames[(offset + i) % len(frames)])
            try:
                await asyncio.wait_for(receiver, timeout=30)
            except asyncio.TimeoutError:
                receiver.cancel()
            finished = time.perf_counter()
            return latencies, errors, per_stream, finished - start

    async def run() -> list[tuple[list[float], int, int, float]]:
        return await asyncio.gather(*(one(i) for i in range(k)))

    results = asyncio.run(run())
    all_latencies = np.asarray([lat for r in results for lat in r[0]]) * 1e3
    # a stream's rate: frames answered with a score over the time from its first send to its last reply
    rates = [len(r[0]) / r[3] for r in results]
    dropped = sum(r[1] + (r[2] - len(r[0]) - r[1]) for r in results)
    p50, p95, p99 = (np.percentile(all_latencies, q) if len(all_latencies) else float("inf") for q in (50, 95, 99))
    return {
        "k": k,
        "fps_per_stream": round(min(rates), 2),
        "p50_ms": round(float(p50), 1),
        "p95_ms": round(float(p95), 1),
        "p99_ms": round(float(p99), 1),
        "dropped": int(dropped),
        "frames_per_stream": per_stream,
    }


def realtime(trial: dict[str, Any], per_stream_frames: int) -> bool:
    """Every stream kept up: every frame answered with a score, at >= 95% of the camera rate (the
    rate over send time plus the last reply's latency), and p99 within REALTIME_P99_MS."""
    return trial["dropped"] == 0 and trial["fps_per_stream"] >= 0.95 * CAMERA_FPS * (
        per_stream_frames / (per_stream_frames + 1)) and trial["p99_ms"] <= REALTIME_P99_MS


def streams_section(server: ServerProcess, frames: list[bytes], quick: bool, seconds: float) -> tuple[list[dict[str, Any]], int]:
    """K = 1, 4, 8, then the largest real-time K: doubling past 8 while real-time, then bisecting."""
    ks = [1, 2] if quick else [1, 4, 8]
    trials: dict[int, dict[str, Any]] = {}

    def trial(k: int) -> bool:
        result = stream_trial(server, k, frames, seconds)
        result["realtime"] = realtime(result, result["frames_per_stream"])
        trials[k] = result
        _say(f"streams K={k}: {result['fps_per_stream']} fps/stream, p50 {result['p50_ms']} ms, "
             f"p99 {result['p99_ms']} ms, dropped {result['dropped']}, real-time {result['realtime']}")
        return bool(result["realtime"])

    for k in ks:
        trial(k)
    good = [k for k in ks if trials[k]["realtime"]]
    best = max(good) if good else 0
    if not quick:
        low, high = best, None
        if trials[ks[-1]]["realtime"]:
            k = ks[-1]
            while high is None and k < 256:
                k *= 2
                if trial(k):
                    low = k
                else:
                    high = k
        else:
            high = min(k for k in ks if not trials[k]["realtime"] and k > best)
        while high is not None and high - low > max(1, low // 8):
            mid = (low + high) // 2
            if trial(mid):
                low = mid
            else:
                high = mid
        best = low
    return [trials[k] for k in sorted(trials)], best


# --- the run ---------------------------------------------------------------------------------------


def run_bench(
    weights_dir: Path, version: str | None = None, quick: bool = False, dataset_root: Path | None = None,
    eval_clips: list[str] | None = None, naive_frames: int | None = None, stream_seconds: float | None = None,
    service: bool = True, ablate: bool = True, flow: str | None = None, device: str = "auto",
) -> dict[str, Any]:
    """Every figure of docs/speed.md in one run. ``device``: where the networks run (``auto``: CUDA
    when there is a GPU, as `vad serve` does); the roofline is that device's float32 matmul."""
    from model import inference
    from model.devices import resolve_device

    threads, workers = torch.get_num_threads(), inference.CPU_WORKERS
    try:
        return _run_bench(weights_dir, version, quick, dataset_root, eval_clips, naive_frames, stream_seconds,
                          service, ablate, flow, resolve_device(device))
    finally:  # the bench dedicates this process's cores to inference workers; put that back
        inference.CPU_WORKERS = workers
        torch.set_num_threads(threads)


def _run_bench(
    weights_dir: Path, version: str | None, quick: bool, dataset_root: Path | None, eval_clips: list[str] | None,
    naive_frames: int | None, stream_seconds: float | None, service: bool, ablate: bool, flow: str | None,
    device: torch.device,
) -> dict[str, Any]:
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
    _say(f"roofline: float32 matmul on {result['machine']['device']} {result['roofline_gflops']} GFLOP/s "
         f"({roof['by_size']}), {torch.get_num_threads()} CPU threads")

    # the naive loop first, with torch's default threads and no worker pool used yet in this process
    naive = naive_loop(scorer, footage.frames(naive_frames or (2 if quick else 48)))
    result["naive"] = naive
    _say(f"naive per-patch loop: {naive['frames_per_s']} frames/s end to end "
         f"({naive['model_only_frames_per_s']} model only, encoding {naive['encode_ms_per_frame']} ms/frame)")
    sample = footage.frames(16)
    channels = encode_frames(sample, config, flow=scorer.flow)
    if ablate and not on_cuda:  # CPU engines; with torch's default threads too, before the serving set-up below
        per_frame = _cut(scorer, channels[:1], config.patch_size)
        result["ablation"] = ablation(scorer, channels, required_flops(scorer, per_frame), quick)
    # from here on as `vad serve` runs: batches split over single-threaded workers, other ops 1 thread
    from model.inference import dedicate_cpu_to_workers

    if not on_cuda:
        result["machine"]["cpu_workers"] = dedicate_cpu_to_workers()
    # non-overlapping patches (Ped2's 96 per frame at 30x30), and the version's own stride if it overlaps
    strides = [config.patch_size] + ([config.stride] if config.stride != config.patch_size else [])
    for stride in strides:
        key = "model" if stride == config.patch_size else "model_served_stride"
        result[key] = model_path(scorer, channels, roof["gflops"], quick, stride)
        m = result[key]
        _say(f"model path (stride {stride}, {m['patches_per_frame']} patches/frame): {m['gflops_per_frame']} GFLOP/frame, "
             f"{m['frames_per_s']} frames/s at {m['best_frames_per_batch']} frames/batch {m['frames_per_s_by_batch']}, "
             f"{m['gflops']} GFLOP/s = {m['roofline_fraction']:.0%} of the roofline")
    m = result["model_served_stride"] if "model_served_stride" in result else result["model"]
    result["engine"] = {"backend": scorer.engine.backend if scorer.engine else "torch (unfused)",
                        "cpu_workers": scorer.engine.workers.count if scorer.engine and scorer.engine.workers else 1}


    full = full_path(scorer, footage, scorer.skip)
    result["full"] = full
    if scorer.skip is not None or not quick:
        other = SkipUnchanged() if scorer.skip is None else None
        result["full_alternative"] = full_path(scorer, footage, other)
    naive["speedup"] = round(full["frames_per_s"] / naive["frames_per_s"], 2)
    encode_s = full["encode_ms_per_frame"] / 1e3
    model_only_full = 1.0 / max(1.0 / full["frames_per_s"] - encode_s, 1e-9)
    naive["speedup_model_only"] = round(model_only_full / naive["model_only_frames_per_s"], 2)
    _say(f"full path ({len(footage.clips)} clips, {full['frames']} frames, skip {full['skip']}): {full['frames_per_s']} frames/s, "
         f"{full['scored_patch_share']:.0%} of patches scored, EER {full.get('eer')} AUC {full.get('auc')}; "
         f"speed-up over naive {naive['speedup']}x end to end, {naive['speedup_model_only']}x without the encoding")
    if "full_alternative" in result:
        alt = result["full_alternative"]
        _say(f"  alternative (skip {alt['skip']}): {alt['frames_per_s']} frames/s, {alt['scored_patch_share']:.0%} scored, "
             f"EER {alt.get('eer')} AUC {alt.get('auc')}")

    if on_cuda:
        result["cuda"] = cuda_section(loaded, channels, m["gflops_per_frame"] * 1e9, quick)

    if service:
        result.update(service_section(weights_dir, version, footage, m["frames_per_s"], quick, stream_seconds, flow,
                                      device))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


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
                seconds = _best_seconds(lambda: scorer.raw_scores(x), 0.1 if quick else 0.5, 1 if quick else 3)  # returns on the CPU: synchronized
                by_batch[str(frames)] = round(frames / seconds, 1)
            best = max(by_batch.values())
            run = {"precision": precision, "cuda_graphs": graphs, "frames_per_s": best,
                   "gflops": round(best * flops / 1e9, 1), "frames_per_s_by_batch": by_batch,
                   "max_diff_over_std": {name: round(d, 5) for name, d in zip(COMPONENTS, diff)}}
            out["runs"].append(run)
            _say(f"cuda {precision} graphs={graphs}: {best} frames/s; max |diff| / std vs CPU float32 {run['max_diff_over_std']}")
    return out


def service_section(weights_dir: Path, version: str, footage: Footage, model_fps: float, quick: bool,
                    stream_seconds: float | None, flow: str | None = None,
                    device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with served_weights(weights_dir, version) as served, tempfile.TemporaryDirectory(prefix="vad-bench-") as tmp:
        clips = [write_clip(Path(tmp) / f"{name}.avi", gray[: (16 if quick else None)]) for name, gray, _, _ in footage.clips]
        env = {"VAD_DEVICE": str(device), **({"VAD_FLOW_PRESET": flow} if flow else {})}
        server = ServerProcess(served, env)
        try:
            server.wait_ready()
            runs = [service_clips(server, clips, c) for c in ((1,) if quick else (1, 2))]
            best = max(runs, key=lambda r: r["frames_per_s"])
            out["service"] = {
                "frames_per_s": best["frames_per_s"],
                "ratio_to_model": round(best["frames_per_s"] / model_fps, 3),
                "runs": runs,
            }
            _say(f"service: POST /v1/clips {best['frames_per_s']} frames/s ({best['concurrency']} at a time) = "
                 f"{out['service']['ratio_to_model']:.0%} of the model path; runs {runs}")
            frames = jpeg_frames(footage, 400)
            streams, best_k = streams_section(server, frames, quick, stream_seconds or (1.0 if quick else 10.0))
            out["streams"] = streams
            out["max_realtime_streams"] = best_k
            out["realtime_rule"] = (f"every frame answered with a score, each stream at >= 95% of {CAMERA_FPS:g} "
                                    f"frames/s, p99 <= {REALTIME_P99_MS:g} ms")
            out["peak_rss_mb"] = server.peak_rss_mb()
            _say(f"max real-time streams: {best_k}; server peak RSS {out['peak_rss_mb']} MB")
        finally:
            server.stop()
    return out
