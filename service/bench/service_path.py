"""The served path, against a real `vad serve` process on loopback: frames/s of ``POST /v1/clips``
(``service``), per-frame latency of K WebSocket streams at the camera rate (``streams``), the largest
K that stays real-time (``max_realtime_streams``) and the server's peak resident memory."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
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
GPU_MAX_QUEUE = 1024  # VAD_MAX_QUEUE of the server on a GPU, unless the environment sets it


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


ClipPoster = Callable[[httpx.AsyncClient, Path], Awaitable[int]]  # posts one clip, returns the frames scored
# One stream's connection: sends frame ``seq`` and returns once it is answered: perf_counter() when the
# answer came, None when it was an error (a frame never answered is a task still pending at the end)
FrameSender = Callable[[int, bytes], Awaitable["float | None"]]
StreamOpener = Callable[[int], AbstractAsyncContextManager[FrameSender]]  # stream index -> a connection


async def post_service_clip(client: httpx.AsyncClient, path: Path) -> int:
    """``POST /v1/clips`` of `vad serve` (multipart, the clip's file as it is)."""
    response = await client.post("/v1/clips", files={"file": (path.name, path.read_bytes(), "video/x-msvideo")})
    response.raise_for_status()
    return int(response.json()["frame_count"])


def clips_throughput(base_url: str, clips: list[Path], concurrency: int, post: ClipPoster = post_service_clip) -> dict[str, Any]:
    """Post every clip to the server at ``base_url`` with ``post`` (``concurrency`` at a time);
    frames/s = all frames / wall time."""
    async def run() -> tuple[int, float]:
        async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
            queue = list(clips)
            frames = 0

            async def worker() -> None:
                nonlocal frames
                while queue:
                    scored = await post(client, queue.pop(0))
                    frames += scored  # after the await: ``frames += await ...`` would read frames before it

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return frames, time.perf_counter() - started

    frames, seconds = asyncio.run(run())
    return {"concurrency": concurrency, "frames": frames, "seconds": round(seconds, 2), "frames_per_s": round(frames / seconds, 2)}


def websocket_streams(ws_url: str) -> StreamOpener:
    """Streams over `vad serve`'s ``WS /v1/stream`` (maps on): one connection per stream, replies
    matched to frames by ``seq``."""
    from websockets.asyncio.client import connect

    @asynccontextmanager
    async def open_stream(index: int) -> AsyncIterator[FrameSender]:
        async with connect(f"{ws_url}/v1/stream", max_size=None) as ws:
            await ws.send(json.dumps({"maps": True}))
            json.loads(await ws.recv())  # the options reply
            waiting: dict[int, asyncio.Future[float | None]] = {}

            async def receive() -> None:
                async for message in ws:
                    reply = json.loads(message)
                    answer = waiting.pop(reply.get("seq", -1), None)
                    if answer is not None and not answer.done():
                        answer.set_result(None if "error" in reply else time.perf_counter())

            async def send(seq: int, frame: bytes) -> float | None:
                waiting[seq] = asyncio.get_running_loop().create_future()
                answer = waiting[seq]
                await ws.send(frame)
                return await answer

            receiver = asyncio.create_task(receive())
            try:
                yield send
            finally:
                receiver.cancel()

    return open_stream


def http_frame_streams(base_url: str, path: str, stream_headers: Callable[[int], dict[str, str]] | None = None) -> StreamOpener:
    """Streams as one HTTP ``POST base_url + path`` per frame (the JPEG as the body), each stream on
    its own keep-alive client; a frame is answered when the reply is 200. ``stream_headers``: extra
    headers of stream ``index``'s requests (its stream id, for a server that keeps state per stream)."""
    @asynccontextmanager
    async def open_stream(index: int) -> AsyncIterator[FrameSender]:
        headers = {"Content-Type": "image/jpeg", **(stream_headers(index) if stream_headers else {})}
        async with httpx.AsyncClient(base_url=base_url, timeout=60, headers=headers) as client:
            async def send(seq: int, frame: bytes) -> float | None:
                try:
                    response = await client.post(path, content=frame)
                except httpx.HTTPError:
                    return None
                return time.perf_counter() if response.status_code == 200 else None

            yield send

    return open_stream


async def _latency(answer: Awaitable[float | None], sent: float) -> float | None:
    answered = await answer
    return None if answered is None else answered - sent


def stream_trial(open_stream: StreamOpener, k: int, frames: list[bytes], seconds: float) -> dict[str, Any]:
    """K streams, each sending one frame every 1/CAMERA_FPS s for ``seconds`` without waiting for
    answers; per-frame latency = answer received - frame sent."""
    per_stream = max(1, int(round(seconds * CAMERA_FPS)))

    async def one(index: int) -> tuple[list[float], int, float]:
        offset = (index * 37) % len(frames)  # streams show different frames
        async with open_stream(index) as send:
            start = time.perf_counter() + 0.05 * (index % 10) / 10  # streams' phases spread over a frame
            answers = []
            for i in range(per_stream):
                delay = start + i / CAMERA_FPS - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                answers.append(asyncio.create_task(_latency(send(i, frames[(offset + i) % len(frames)]), time.perf_counter())))
            done, pending = await asyncio.wait(answers, timeout=30)
            for task in pending:
                task.cancel()
            finished = time.perf_counter()
            latencies = [t.result() for t in done if t.exception() is None and t.result() is not None]
            return latencies, per_stream, finished - start

    async def run() -> list[tuple[list[float], int, float]]:
        return await asyncio.gather(*(one(i) for i in range(k)))

    results = asyncio.run(run())
    all_latencies = np.asarray([lat for r in results for lat in r[0]]) * 1e3
    # a stream's rate: frames answered with a score over the time from its first send to its last answer
    rates = [len(r[0]) / r[2] for r in results]
    dropped = sum(r[1] - len(r[0]) for r in results)  # answered with an error, or not at all
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


def streams_section(open_stream: StreamOpener, frames: list[bytes], quick: bool, seconds: float,
                    label: str = "streams", pause_s: float = 0.0, max_k: int = 256) -> tuple[list[dict[str, Any]], int]:
    """K = 1, 4, 8, then the largest real-time K: doubling past 8 while real-time (up to ``max_k``),
    then bisecting. ``pause_s``: idle time before each trial (a server that ends a stream only after it
    went quiet)."""
    ks = [1, 2] if quick else [1, 4, 8]
    trials: dict[int, dict[str, Any]] = {}

    def trial(k: int) -> bool:
        time.sleep(pause_s)
        result = stream_trial(open_stream, k, frames, seconds)
        result["realtime"] = realtime(result, result["frames_per_stream"])
        trials[k] = result
        say(f"{label} K={k}: {result['fps_per_stream']} fps/stream, p50 {result['p50_ms']} ms, "
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
            while high is None and k < max_k:
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
                    device: torch.device = torch.device("cpu"), processes: int = 1, cameras: bool = True) -> dict[str, Any]:
    """``service``, ``streams``, ``max_realtime_streams``, ``realtime_rule`` and ``peak_rss_mb`` of a
    server of ``version`` on ``device`` with ``processes`` serving processes (VAD_SERVE_PROCESSES);
    ``model_fps`` is the model path's frames/s to compare with; ``cameras``: also the cameras section."""
    out: dict[str, Any] = {"service_processes": processes}
    env = {**os.environ, "VAD_LOG_LEVEL": "warning", "VAD_DEVICE": str(device), "VAD_SERVE_PROCESSES": str(processes),
           **({"VAD_FLOW_PRESET": flow} if flow else {})}
    on_cuda = device.type == "cuda"
    if on_cuda:  # hundreds of streams each hold an admission while a frame is scored (64 suits 2 cores)
        env.setdefault("VAD_MAX_QUEUE", str(GPU_MAX_QUEUE))
    with served_weights(weights_dir, version) as served, tempfile.TemporaryDirectory(prefix="vad-bench-") as tmp:
        # cameras play the written clips (file:// under the footage root); events and the queue go to tmp
        env.update(VAD_CAMERA_URL_ALLOW='["file://"]', VAD_FOOTAGE_ROOT=tmp, VAD_DATA_DIR=str(Path(tmp) / "data"))
        clips = [write_clip(Path(tmp) / f"{name}.avi", gray[: (16 if quick else None)]) for name, gray, _, _ in footage.clips]
        with ServerProcess(env, weights_dir=served) as server:
            concurrency = (1,) if quick else (1, 4, len(clips)) if on_cuda else (1, 2)
            runs = [clips_throughput(server.url, clips, c) for c in concurrency]
            best = max(runs, key=lambda r: r["frames_per_s"])
            out["service"] = {
                "frames_per_s": best["frames_per_s"],
                "ratio_to_model": round(best["frames_per_s"] / model_fps, 3),
                "runs": runs,
            }
            say(f"service: POST /v1/clips {best['frames_per_s']} frames/s ({best['concurrency']} at a time) = "
                f"{out['service']['ratio_to_model']:.0%} of the model path; runs {runs}")
            frames = jpeg_frames(footage, 400)
            streams, best_k = streams_section(websocket_streams(server.ws_url), frames, quick,
                                              stream_seconds or (1.0 if quick else 10.0), max_k=1024 if on_cuda else 256)
            out["streams"] = streams
            out["max_realtime_streams"] = best_k
            out["realtime_rule"] = (f"every frame answered with a score, each stream at >= 95% of {CAMERA_FPS:g} "
                                    f"frames/s, p99 <= {REALTIME_P99_MS:g} ms")
            if cameras:
                out.update(cameras_section(server, clips, quick, stream_seconds or (1.0 if quick else 10.0)))
            out["peak_rss_mb"] = server.peak_rss_mb()
            say(f"max real-time streams: {best_k}; server peak RSS {out['peak_rss_mb']} MB")
    return out
