"""Wire shapes. Every body is built by model/results.py (the same numbers as `vad detect`); the models here
document them in OpenAPI, type the small endpoints and validate WebSocket control messages."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from service.settings import DropPolicy


# The name events of a clip upload or a WebSocket stream are recorded under (their "camera" field).
EVENT_SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. too_large, overloaded.")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FrameOut(BaseModel):
    index: int
    timestamp_s: float
    score: float = Field(description="Frame score: its most anomalous patch, causally smoothed.")
    anomalous: bool = Field(description="score > threshold (tau).")
    uncertain: bool = Field(description="score inside the calibrated reject band around tau.")
    map: list[list[float]] | None = Field(None, description="Patch anomaly in [0, 1], rows x cols; omitted with maps=false.")


class FrameResponse(FrameOut):
    model_version: str
    threshold: float


class ThumbnailMode(str, Enum):
    """POST /v1/clips ``thumbnails``: which frames come back as small JPEGs (service/thumbnails.py)."""

    none = "none"
    anomalous = "anomalous"
    all = "all"


class Thumbnail(BaseModel):
    index: int = Field(description="The frame's index.")
    jpeg: str = Field(description="The frame in gray levels as a JPEG, longer side at most 240 px, base64.")


class ProcessedSize(BaseModel):
    width: int
    height: int


class ClipResponse(BaseModel):
    model_version: str
    threshold: float
    fps: float
    frame_count: int
    anomalous_frames: list[int]
    frames: list[FrameOut]
    timings: dict[str, float]
    damaged: bool = Field(False, description="The container declares frames that did not decode (damaged or truncated).")
    decode_errors: int = Field(0, description="How many declared frames did not decode; the others were scored.")
    thumbnails: list[Thumbnail] | None = Field(
        None, description="With thumbnails=anomalous|all: small JPEGs of chosen frames (at most 200), by index."
    )
    thumbnail_count: int | None = Field(None, description="With thumbnails=anomalous|all: how many came.")
    processed_size: ProcessedSize | None = Field(
        None, description="With thumbnails: the frame size the maps' patch grid lies on; stretch a thumbnail to it."
    )
    events: list[str] | None = Field(None, description="With events=NAME: the ids of the events the clip opened.")


class VersionEntry(BaseModel):
    version: str
    active: bool
    manifest: dict[str, Any] | None
    error: str | None = None


class VersionList(BaseModel):
    active: str | None
    versions: list[VersionEntry]


class ActiveModel(BaseModel):
    version: str
    device: str
    threshold: float
    input_mode: str
    patch_size: int
    stride: int
    loaded_at: float
    manifest: dict[str, Any]
    wanted: str | None = Field(None, description="The version the registry's ACTIVE named at this replica's last read (null: no ACTIVE file).")
    converged: bool = Field(True, description="This replica serves `wanted` (or there is no ACTIVE to follow).")
    last_error: str | None = Field(None, description="Why `wanted` failed on this replica (verification, load or smoke test); null once served.")


class Activation(BaseModel):
    version: str
    previous: str | None
    changed: bool
    device: str


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model_version: str
    replica: str = Field(description="The replica (serving process) that answered: VAD_REPLICA_ID, or hostname-pid-random.")


class StreamControl(BaseModel):
    """A WebSocket text message: any subset of the stream's options; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    maps: StrictBool | None = None
    drop_policy: DropPolicy | None = None
    fps: StrictFloat | StrictInt | None = Field(None, gt=0, le=1000)
    events: str | None = Field(
        None, pattern=EVENT_SOURCE_NAME + "|^$",
        description="Record this stream's events under this name (like a camera's); an empty string stops.",
    )
