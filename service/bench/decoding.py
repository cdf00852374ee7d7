"""Decoding, measured three ways on the same footage (issue 15 item 2: which wins where):

- stream frames (JPEG, one per request): OpenCV's ``imdecode`` to grey on one thread, the same on a
  thread pool of one thread per core (what ``vad serve`` does: each request decodes in a worker thread,
  and OpenCV releases the GIL), and nvJPEG on the GPU in batches (``torchvision.io.decode_jpeg(...,
  device="cuda")``) where torchvision and CUDA are both there;
- clips (MJPG AVI): one ``cv2.VideoCapture`` read start to end (what ``VideoSource`` does), against the
  clip cut into as many ranges as cores, each read by its own capture after a seek.

Every figure is frames/s, best of a few windows; a method that cannot run says why instead.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from service.bench.footage import Footage, jpeg_frames, write_clip
from service.bench.timing import best_seconds, say, synchronized


def _imdecode_grey(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def _nvjpeg(images: list[bytes], device: torch.device) -> dict[str, Any]:
    """nvJPEG frames/s in batches of 16, 64 and 256 frames (grey output), or why it cannot run."""
    if device.type != "cuda":
        return {"skipped": "nvJPEG needs a CUDA device"}
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as exc:
        return {"skipped": f"torchvision is not installed ({exc})"}
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
    by_batch: dict[int, float] = {}
    for batch in (16, 64, 256):
        chunks = [encoded[i : i + batch] for i in range(0, len(encoded), batch)]

        def run() -> None:
            for chunk in chunks:
                decode_jpeg(chunk, mode=ImageReadMode.GRAY, device=device)

        by_batch[batch] = round(len(encoded) / best_seconds(synchronized(run, device), 0.5, 3), 1)
    best = max(by_batch, key=by_batch.__getitem__)
    return {"frames_per_s": by_batch[best], "best_frames_per_batch": best, "frames_per_s_by_batch": by_batch}


def _clip_frames_per_s(path: Path, frames: int, parts: int) -> float:
    """Frames/s reading the MJPG clip at ``path`` to grey with ``parts`` captures over disjoint ranges."""
    bounds = np.linspace(0, frames, parts + 1).astype(int)

    def read_range(start: int, stop: int) -> int:
        capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        try:
            if start:
                capture.set(cv2.CAP_PROP_POS_FRAMES, start)
            read = 0
            for _ in range(stop - start):
                ok, frame = capture.read()
                if not ok:
                    break
                cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
                read += 1
            return read
        finally:
            capture.release()

    if parts == 1:
        run = lambda: read_range(0, frames)  # noqa: E731
    else:
        pool = ThreadPoolExecutor(parts)
        run = lambda: sum(pool.map(read_range, bounds[:-1], bounds[1:]))  # noqa: E731
    try:
        return frames / best_seconds(run, 0.5, 3)
    finally:
        if parts > 1:
            pool.shutdown()


def decoding_section(footage: Footage, device: torch.device, quick: bool) -> dict[str, Any]:
    """The decoding figures: stream frames (OpenCV 1 thread / a pool, nvJPEG) and clips (1 capture /
    one per core), on the bench's footage."""
    cores = os.cpu_count() or 1
    images = jpeg_frames(footage, 32 if quick else 512)
    single = len(images) / best_seconds(lambda: [_imdecode_grey(d) for d in images], 0.3, 3)
    with ThreadPoolExecutor(cores) as pool:
        pooled = len(images) / best_seconds(lambda: list(pool.map(_imdecode_grey, images)), 0.3, 3)
    frames: dict[str, Any] = {
        "images": len(images),
        "opencv_1_thread_frames_per_s": round(single, 1),
        "opencv_pool_frames_per_s": round(pooled, 1),
        "pool_threads": cores,
        "nvjpeg": _nvjpeg(images, device),
    }
    gray = footage.frames(48 if quick else 360)
    with tempfile.TemporaryDirectory(prefix="vad-bench-decode-") as folder:
        path = write_clip(Path(folder) / "clip.avi", gray)
        clip = {
            "frames": len(gray),
            "one_capture_frames_per_s": round(_clip_frames_per_s(path, len(gray), 1), 1),
            "parallel_ranges": cores,
            "parallel_frames_per_s": round(_clip_frames_per_s(path, len(gray), cores), 1),
        }
    nv = frames["nvjpeg"]
    say(f"decoding JPEG frames ({len(images)}): OpenCV {frames['opencv_1_thread_frames_per_s']} frames/s on 1 thread, "
        f"{frames['opencv_pool_frames_per_s']} on {cores}; nvJPEG: "
        + (f"{nv['frames_per_s']} at {nv['best_frames_per_batch']}/batch" if "frames_per_s" in nv else nv["skipped"]))
    say(f"decoding an MJPG clip ({clip['frames']} frames): {clip['one_capture_frames_per_s']} frames/s with one capture, "
        f"{clip['parallel_frames_per_s']} with {cores} ranges in parallel")
    return {"frames": frames, "clip": clip}
