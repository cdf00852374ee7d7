"""The TorchServe handler of `vad bench --peer torchserve`: this project's patch scoring (the same
safetensors weights, PatchScorer and FrameStream: flow from the previous frame, 30x30 patches, D(R(X)),
the calibrated frame score and tau) behind TorchServe's Python worker protocol.

Packed into the .mar by service/bench/peer_torchserve.py and imported by TorchServe's worker as a
top-level module, so it imports only the ``model`` package (on the worker's PYTHONPATH) and never
TorchServe itself: ``handle(data, context)`` is the entry point TorchServe calls with a batch of
requests (its dynamic batching), one response per request, in order.

The archive's ``model-config.yaml`` says what the requests are (``handler: {requests: ..., version:
..., threads: ...}``):
- ``clips``: each request body is a whole clip (the bench's MJPG AVI, the bytes `POST /v1/clips` gets),
  scored as one stream in chunks of ``model.offline.FRAMES_PER_BATCH`` frames, as `vad detect` does;
  the reply is ``model.results.clip_summary`` with maps.
- ``frames``: each request body is one JPEG/PNG frame of a live stream named by the
  ``ts_request_sequence_id`` header (TorchServe's sequence id). The handler keeps one FrameStream
  per stream (its previous frame feeds the motion channel, its smoothing window carries on), so a
  stream's frames must all reach this worker in order: TorchServe's sequence batching does that.
  A batch's frames of different streams go through the networks in one pass. The reply is the
  frame's ``model.results.frame_body`` with its map, as the WebSocket replies carry.
"""

from __future__ import annotations

import json
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from model import registry
from model.offline import iter_frame_results, scorer_for
from model.results import clip_summary, frame_body
from model.scoring import FrameStream, PatchScorer

REQUEST_KINDS = ("clips", "frames")
SEQUENCE_ID_HEADER = "ts_request_sequence_id"  # TorchServe's default header key for the sequence id
MAX_STREAMS = 1024  # FrameStreams kept (least recently used dropped): a bound on a worker's memory


class RequestError(ValueError):
    """A request this handler cannot score (answered 422 alone; the rest of the batch goes on)."""


def request_body(request: dict[str, Any]) -> bytes:
    """The raw bytes of one TorchServe request (``data`` for form uploads, ``body`` for raw ones)."""
    body = request.get("data") or request.get("body")
    if isinstance(body, str):
        body = body.encode()
    if not isinstance(body, (bytes, bytearray)) or not body:
        raise RequestError("empty request body")
    return bytes(body)


def decode_gray(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W) uint8 grayscale."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None or image.size == 0:
        raise RequestError("the frame is not a decodable JPEG/PNG image")
    return image


def decode_clip(data: bytes) -> tuple[np.ndarray, float]:
    """A video file's bytes -> ((T, H, W) uint8 grayscale, fps), decoded by OpenCV from a temporary file."""
    from model.data import FootageError, read_footage

    with tempfile.NamedTemporaryFile(suffix=".avi") as handle:
        handle.write(data)
        handle.flush()
        try:
            clip = read_footage(handle.name)
        except FootageError as exc:
            raise RequestError(str(exc)) from exc
    return clip.gray, clip.fps


class PatchScoringHandler:
    """R and D of one published version, scoring TorchServe batches of clips or stream frames."""

    def __init__(self) -> None:
        self.scorer: PatchScorer | None = None
        self.version = ""
        self.requests = "clips"
        self.streams: OrderedDict[str, FrameStream] = OrderedDict()

    def load(self, weights_dir: Path, version: str, requests: str, threads: int = 1) -> None:
        """Loads ``version`` from ``weights_dir`` (safetensors, checked against its manifest) on the CPU."""
        if requests not in REQUEST_KINDS:
            raise ValueError(f"requests must be one of {REQUEST_KINDS}, got {requests!r}")
        # one TorchServe worker per core: its scoring (and ONNX Runtime's, when installed) on
        # ``threads`` intra-op threads, so the workers do not oversubscribe the cores
        torch.set_num_threads(threads)
        self.scorer = scorer_for(registry.load_version(weights_dir, version, "cpu"), "cpu")
        self.version, self.requests = version, requests
        self.streams.clear()

    def initialize(self, context: Any) -> None:
        """TorchServe's start-up call: the version's folder was packed into the archive's model_dir."""
        options = (context.model_yaml_config or {}).get("handler") or {}
        self.load(Path(context.system_properties["model_dir"]), str(options["version"]),
                  str(options.get("requests", "clips")), int(options.get("threads", 1)))

    @property
    def engine(self) -> str:
        """What runs the networks: torch or onnxruntime (as PatchScorer chose)."""
        assert self.scorer is not None, "the handler is not loaded"
        return self.scorer.engine.backend if self.scorer.engine else "torch (unfused)"

    def score_clip(self, data: bytes) -> dict[str, Any]:
        assert self.scorer is not None and self.scorer.calibration is not None, "the handler is not loaded"
        gray, fps = decode_clip(data)
        results = list(iter_frame_results(self.scorer, gray, fps))
        return clip_summary(self.version, self.scorer.calibration.threshold, fps, results, True, {})

    def stream(self, stream_id: str) -> FrameStream:
        """The stream's FrameStream (a new one for a new id)."""
        assert self.scorer is not None, "the handler is not loaded"
        stream = self.streams.pop(stream_id, None) or FrameStream(self.scorer)
        self.streams[stream_id] = stream
        while len(self.streams) > MAX_STREAMS:
            self.streams.popitem(last=False)
        return stream

    def score_frames(self, frames: list[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
        """(stream id, (H, W) uint8 frame) pairs in arrival order -> one frame_body each, in the same order. Each
        stream's frames are prepared in order as one chunk; every stream's patches go through the
        networks in one pass."""
        assert self.scorer is not None and self.scorer.calibration is not None, "the handler is not loaded"
        by_stream: dict[str, list[int]] = {}
        for position, (stream_id, _) in enumerate(frames):
            by_stream.setdefault(stream_id, []).append(position)
        prepared = []
        for stream_id, positions in by_stream.items():
            gray = np.stack([frames[p][1] for p in positions])
            stream = self.stream(stream_id)
            prepared.append((stream, positions, *stream.prepare(gray)))
        raw = self.scorer.raw_scores(torch.cat([patches for _, _, patches, _, _ in prepared]))
        out: list[dict[str, Any]] = [{} for _ in frames]
        start = 0
        for stream, positions, patches, grid, count in prepared:
            results = stream.finish(raw[start : start + patches.shape[0]], grid, count)
            start += patches.shape[0]
            for position, result in zip(positions, results):
                out[position] = frame_body(self.version, self.scorer.calibration.threshold, result, True)
        return out

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """A TorchServe batch -> one JSON body per request; an unscorable request is answered 422."""
        bodies: list[dict[str, Any]] = [{} for _ in data]
        frames: list[tuple[int, str, np.ndarray]] = []
        for index, request in enumerate(data):
            try:
                body = request_body(request)
                if self.requests == "clips":
                    bodies[index] = self.score_clip(body)
                else:
                    stream_id = context.get_request_header(index, SEQUENCE_ID_HEADER) or f"request-{index}"
                    frames.append((index, stream_id, decode_gray(body)))
            except RequestError as exc:
                bodies[index] = {"error": str(exc)}
                context.set_response_status(422, str(exc), index)
        if frames:
            scored = self.score_frames([(stream_id, gray) for _, stream_id, gray in frames])
            for (index, _, _), body in zip(frames, scored):
                bodies[index] = body
        return [json.dumps(body) for body in bodies]


_handler = PatchScoringHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    """TorchServe's entry point: ``initialize`` on the first call, then the batch's responses."""
    if _handler.scorer is None:
        _handler.initialize(context)
    if data is None:  # TorchServe's warm-up call at load time
        return None
    return _handler.handle(data, context)
