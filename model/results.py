"""The JSON shapes of scoring results, in one place: a frame's result, a clip's summary, and the bodies
built from them by `vad detect`, POST /v1/frames, POST /v1/clips (JSON and NDJSON lines) and the
WebSocket's replies. service/schemas.py describes the same shapes for the OpenAPI document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class FrameResult:
    index: int
    timestamp_s: float
    score: float
    anomalous: bool
    uncertain: bool
    map: np.ndarray  # (rows, cols) patch anomaly in [0, 1]

    def to_dict(self, include_map: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "index": self.index,
            "timestamp_s": round(self.timestamp_s, 6),
            "score": self.score,
            "anomalous": self.anomalous,
            "uncertain": self.uncertain,
        }
        if include_map:
            data["map"] = np.round(self.map, 4).tolist()
        return data


def frame_body(version: str, threshold: float, result: FrameResult, include_map: bool) -> dict[str, Any]:
    """POST /v1/frames: one image's result with the version and tau that decided it."""
    return {"model_version": version, "threshold": threshold, **result.to_dict(include_map)}


def stream_reply(seq: int, version: str, result: FrameResult, include_map: bool) -> dict[str, Any]:
    """A WebSocket reply: the frame's sequence number, the version that scored it, its result."""
    return {"seq": seq, "model_version": version, **result.to_dict(include_map)}


def clip_summary(
    version: str, threshold: float, fps: float, results: list[FrameResult], include_maps: bool,
    timings: dict[str, float], include_frames: bool = True,
) -> dict[str, Any]:
    """A scored clip: what `vad detect` writes and POST /v1/clips returns (without ``frames``: the
    summary line closing an NDJSON response)."""
    summary: dict[str, Any] = {
        "model_version": version,
        "threshold": threshold,
        "fps": fps,
        "frame_count": len(results),
        "anomalous_frames": [r.index for r in results if r.anomalous],
    }
    if include_frames:
        summary["frames"] = [r.to_dict(include_maps) for r in results]
    summary["timings"] = timings
    return summary


def clip_frame_line(result: FrameResult, include_map: bool) -> dict[str, Any]:
    """One frame of an NDJSON clip response."""
    return {"type": "frame", **result.to_dict(include_map)}
