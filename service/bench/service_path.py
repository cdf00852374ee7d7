"""The served path, against a real `vad serve` process on loopback: frames/s of ``POST /v1/clips``
(``service``), per-frame latency of K WebSocket streams at the camera rate (``streams``), the largest
K that stays real-time (``max_realtime_streams``) and the server's peak resident memory."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import torch

from model import registry
from service.bench.cameras import cameras_section
from service.bench.footage import CAMERA_FPS, Footage, jpeg_frames, write_clip
from service.bench.server_process import ServerProcess
from service.bench.timing import say

REALTIME_P99_MS = 250.0


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


def service_clips(server: ServerProcess, clips: list[Path], concurrency: int) -> dict[str, Any]:
    """Post every clip (``concurrency`` at a time); frames/s = all frames / wall time."""
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
        say(f"streams K={k}: {result['fps_per_stream']} fps/stream, p50 {result['p50_ms']} ms, "
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


def service_section(weights_dir: Path, version: str, footage: Footage, model_fps: float, quick: bool,
                    stream_seconds: float | None, flow: str | None = None,
                    device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """``service``, ``streams``, ``max_realtime_streams``, ``realtime_rule`` and ``peak_rss_mb`` of a
    server of ``version`` on ``device``; ``model_fps`` is the model path's frames/s to compare with."""
    out: dict[str, Any] = {}
    env = {**os.environ, "VAD_LOG_LEVEL": "warning", "VAD_DEVICE": str(device), **({"VAD_FLOW_PRESET": flow} if flow else {})}
    with served_weights(weights_dir, version) as served, tempfile.TemporaryDirectory(prefix="vad-bench-") as tmp:
        # cameras play the written clips (file:// under the footage root); events and the queue go to tmp
        env.update(VAD_CAMERA_URL_ALLOW='["file://"]', VAD_FOOTAGE_ROOT=tmp, VAD_DATA_DIR=str(Path(tmp) / "data"))
        clips = [write_clip(Path(tmp) / f"{name}.avi", gray[: (16 if quick else None)]) for name, gray, _, _ in footage.clips]
        with ServerProcess(env, weights_dir=served) as server:
            runs = [service_clips(server, clips, c) for c in ((1,) if quick else (1, 2))]
            best = max(runs, key=lambda r: r["frames_per_s"])
            out["service"] = {
                "frames_per_s": best["frames_per_s"],
                "ratio_to_model": round(best["frames_per_s"] / model_fps, 3),
                "runs": runs,
            }
            say(f"service: POST /v1/clips {best['frames_per_s']} frames/s ({best['concurrency']} at a time) = "
                f"{out['service']['ratio_to_model']:.0%} of the model path; runs {runs}")
            frames = jpeg_frames(footage, 400)
            streams, best_k = streams_section(server, frames, quick, stream_seconds or (1.0 if quick else 10.0))
            out["streams"] = streams
            out["max_realtime_streams"] = best_k
            out["realtime_rule"] = (f"every frame answered with a score, each stream at >= 95% of {CAMERA_FPS:g} "
                                    f"frames/s, p99 <= {REALTIME_P99_MS:g} ms")
            out.update(cameras_section(server, clips, quick, stream_seconds or (1.0 if quick else 10.0)))
            out["peak_rss_mb"] = server.peak_rss_mb()
            say(f"max real-time streams: {best_k}; server peak RSS {out['peak_rss_mb']} MB")
    return out
