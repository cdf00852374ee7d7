"""Every server setting in one typed place, read from ``VAD_*`` environment variables.

``Settings()`` reads the environment; tests and ``serve()`` pass their own values as keyword
arguments (which win over the environment). docs/server.md has the table of every setting.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import BUNDLED_WEIGHTS_DIR, SKIP_LEVEL, SKIP_SHARE, FlowPreset
from model.devices import DEVICE_PATTERN

MiB = 1024 * 1024
DropPolicy = Literal["drop_oldest", "reject_newest"]
ActivationPolicy = Literal["manual", "auto"]


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value (VAD_DATABASE_URL with its password, say) is named, not echoed
    model_config = SettingsConfigDict(env_prefix="VAD_", extra="ignore", frozen=True, hide_input_in_errors=True)

    # Model
    weights_dir: Path = Field(BUNDLED_WEIGHTS_DIR, description="Registry folder holding vNNNN versions and ACTIVE.")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps.")
    follow_latest: bool = Field(False, description="Poll the registry and activate the newest published version.")
    follow_interval_s: float = Field(10.0, gt=0, description="Seconds between polls when follow_latest is on.")
    active_poll_s: float = Field(
        5.0, ge=0,
        description="Seconds between reads of the registry's ACTIVE file; a replica serving another version switches to the one it names (0 = only at start).",
    )

    # Inference speed (docs/speed.md)
    skip_unchanged: bool | Literal["auto"] = Field(
        "auto", description="Reuse a patch's scores while its input stays within VAD_SKIP_LEVEL/VAD_SKIP_SHARE of the patch as last scored (static cameras). auto: on the CPU, off on CUDA (where its small per-frame steps cost more than the networks they save; docs/speed.md).",
    )
    skip_level: int = Field(SKIP_LEVEL, ge=0, le=255, description="Grey levels a pixel value may differ by and still count as unchanged.")
    skip_share: float = Field(SKIP_SHARE, ge=0, lt=1, description="Share of a patch's values that may change before it is rescored.")
    precision: Literal["float32", "bf16", "fp16", "int8", "auto"] = Field(
        "float32", description="Precision of the networks. CPU: float32, bf16 (needs AVX512-BF16 or AMX), int8 "
        "(ONNX Runtime, quantised at load on normal footage) or auto (the fastest that passes); each is checked "
        "at load against float32 and falls back to it with a warning. CUDA: float32, bf16 or fp16 autocast.",
    )
    cuda_graphs: bool = Field(False, description="CUDA only: replay captured CUDA graphs per batch-size bucket.")
    flow_preset: FlowPreset | None = Field(
        None, description="appearance+flow versions: override the version's own optical-flow preset (changes the model's input; unset = the version's).",
    )
    inference_backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="CPU only: auto (ONNX Runtime when installed, else torch), torch or onnxruntime.",
    )
    serve_processes: int = Field(
        1, ge=1, le=64,
        description="Serving processes behind the one port (`vad serve --processes`): each loads the model and runs its own batcher; "
        "they share the port (the kernel hands each new connection to one), the database and the metrics. More than 1 where one "
        "Python process cannot keep the device busy (docs/speed.md); on the CPU the cores are split among them.",
    )
    encoding: Literal["auto", "opencv", "torch"] = Field(
        "auto", description="Who encodes frames (grey, optical flow, patches, unchanged-patch test): auto (torch on CUDA, on the device; OpenCV on the CPU, where it is faster), opencv or torch.",
    )

    # Dynamic batching
    max_batch_patches: int = Field(4096, ge=1, description="Most patches in one forward pass.")
    max_queue_delay_ms: float = Field(5.0, ge=0, description="Longest a batch waits for more work after its first job.")
    max_queue: int = Field(
        64, ge=1,
        description="Scoring requests admitted at once (clip upload, single frame or WebSocket frame: one each).",
    )
    clip_chunk_frames: int = Field(16, ge=1, le=1024, description="Frames of a clip decoded and scored per job.")
    shutdown_grace_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long open requests may finish; then open streams (SSE, "
        "WebSocket, NDJSON) are closed so the server stops.",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 503 overloaded / not ready.")

    # Input limits
    max_upload_bytes: int = Field(256 * MiB, ge=1, description="Largest clip upload (the file part's bytes).")
    max_image_bytes: int = Field(16 * MiB, ge=1, description="Largest image posted to /v1/frames.")
    max_frames: int = Field(9_000, ge=1, description="Most frames decoded from one clip.")
    max_pixels: int = Field(4096 * 2160, ge=1, description="Largest frame (width x height), checked from headers.")
    ws_max_message_bytes: int = Field(16 * MiB, ge=1, description="Largest WebSocket message; larger closes with 1009.")
    ws_max_pending_frames: int = Field(
        8, ge=1, description="Frames a WebSocket may have waiting to be scored before its drop policy applies."
    )
    ws_drop_policy: DropPolicy = Field("drop_oldest", description="Default drop policy of a new WebSocket stream.")

    # Training jobs (POST /v1/training-jobs, `vad worker`); server and workers read the same values
    data_dir: Path = Field(Path("data"), description="Job queue (jobs.sqlite3), uploaded footage and checkpoints.")
    database_url: SecretStr | None = Field(
        None, description="postgresql://user:password@host:5432/name: the job queue, cameras, events and webhook outbox "
        "in PostgreSQL, shared by servers and workers on any host; unset: the embedded SQLite file in VAD_DATA_DIR.",
    )
    footage_root: Path | None = Field(
        None, description="Folder whose files/folders jobs may name in 'paths'; unset: paths are refused."
    )
    activation_policy: ActivationPolicy = Field(
        "manual", description="manual, or auto: activate a job's version when its validation is no worse."
    )
    job_max_attempts: int = Field(3, ge=1, description="Attempts (lease expiries) before a job fails.")
    job_lease_s: float = Field(60.0, gt=0, description="A worker's lease on its job, renewed by heartbeats.")
    job_heartbeat_s: float = Field(10.0, gt=0, description="Seconds between a worker's lease renewals.")
    job_poll_interval_s: float = Field(
        2.0, gt=0, description="Idle workers poll for jobs, the server for finished ones, this often."
    )
    max_training_files: int = Field(64, ge=1, description="Most footage files (uploads + paths) in one job.")
    training_model_config: dict[str, Any] = Field(
        default_factory=dict, description="ModelConfig fields for jobs (JSON), over the `vad train` defaults."
    )
    training_config: dict[str, Any] = Field(
        default_factory=dict,
        description="TrainConfig and CalibrationConfig fields for jobs (JSON); a job's options win.",
    )

    # Cameras (POST /v1/cameras): what may be opened, and how a dropped camera is reconnected
    camera_url_allow: list[str] = Field(
        default_factory=list,
        description='JSON list of "scheme://host" or "scheme://host:port" a camera URL may name (a host may start '
                    'with "*.", no port = any port); empty: cameras are disabled. Files: file:// under VAD_FOOTAGE_ROOT.',
    )
    max_cameras: int = Field(32, ge=0, description="Most cameras one server watches.")
    camera_reconnect_initial_s: float = Field(1.0, gt=0, description="First wait before reconnecting a dropped camera.")
    camera_reconnect_max_s: float = Field(30.0, gt=0, description="Cap of the doubling wait between reconnects.")
    camera_open_timeout_s: float = Field(10.0, gt=0, description="How long opening a camera (or reading a frame) may take.")

    # Events: runs of anomalous frames (cameras, opted-in WebSocket streams, clip uploads)
    event_open_frames: int = Field(3, ge=1, description="k: an event opens when k of the last n frames are over tau.")
    event_window_frames: int = Field(5, ge=1, description="n: the window event_open_frames counts in.")
    event_close_frames: int = Field(10, ge=1, description="m: an open event closes after m frames in a row at or under tau.")
    event_max_frames: int = Field(3000, ge=1, description="An event this long is closed and a new one opened (endless ones split).")
    event_retention_days: float = Field(30.0, gt=0, description="Events (and their snapshots) older than this are deleted.")
    event_max_bytes: int = Field(1024 * MiB, ge=1, description="Snapshots kept at most; the oldest events go first.")

    # Webhooks: every event opened and closed is POSTed to each URL, signed, from a persistent outbox
    webhook_urls: list[str] = Field(default_factory=list, description="JSON list of URLs that receive events.")
    webhook_secret: SecretStr | None = Field(
        None, description="Shared secret of the X-VAD-Signature header (sha256=HMAC-SHA256 of the body)."
    )
    webhook_max_attempts: int = Field(8, ge=1, description="Deliveries tried per event and URL before it is dropped.")
    webhook_retry_initial_s: float = Field(1.0, gt=0, description="First wait before a failed delivery is retried (doubles).")
    webhook_retry_max_s: float = Field(300.0, gt=0, description="Cap of the wait between retries.")
    webhook_timeout_s: float = Field(5.0, gt=0, description="Seconds one delivery may take.")
    webhook_outbox_max: int = Field(10_000, ge=1, description="Deliveries waiting at most; beyond it the oldest are dropped.")

    # Replicas: several `vad serve` on one database share the cameras and the webhook outbox (service/replicas.py)
    replica_id: str | None = Field(
        None, max_length=200, description="This server's name among the replicas sharing the database; unset: hostname-pid-random.",
    )
    replica_lease_s: float = Field(
        15.0, gt=0, description="A replica silent this long is dead: its cameras, webhook claims and open events are taken over (it heartbeats every third of it).",
    )

    # Access
    api_key: SecretStr | None = Field(None, description="When set, Bearer key required on state-changing endpoints.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS (JSON list); none by default.")
    log_level: str = Field("info", description="uvicorn log level.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not DEVICE_PATTERN.match(value):
            raise ValueError("device must be auto, cpu, mps, cuda or cuda:N")
        return value

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None
        return value

    @field_validator("replica_id", mode="before")
    @classmethod
    def _empty_replica_id_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("footage_root", mode="before")
    @classmethod
    def _empty_root_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_urls")
    @classmethod
    def _http_webhook_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                shown = f"{parts.scheme}://{parts.hostname or ''}..." if parts.scheme else "a URL without a scheme"
                raise ValueError(f"webhook_urls: {shown} is not an http:// or https:// URL with a host")
        if len(set(value)) != len(value):
            raise ValueError("webhook_urls: a URL is listed twice")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # VAD_DATABASE_URL= (empty) is the embedded SQLite database
        scheme = urlsplit(value.get_secret_value().strip()).scheme
        if scheme not in ("postgresql", "postgres"):
            shown = f"a {scheme}:// URL" if scheme else "a URL without a scheme"
            raise ValueError(f"database_url: {shown} is not a PostgreSQL URL (postgresql://user:password@host:5432/name); "
                             "leave it unset for the embedded SQLite database in data_dir")
        return SecretStr(value.get_secret_value().strip())

    @field_validator("training_model_config")
    @classmethod
    def _valid_model_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        from model.config import ModelConfig

        ModelConfig.from_dict(value)  # raises ConfigError (a ValueError)
        return value

    @field_validator("training_config")
    @classmethod
    def _valid_train_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        from model.config import split_train_settings

        split_train_settings(value)  # training and calibration settings; raises ConfigError (a ValueError)
        return value

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> "Settings":
        if self.job_heartbeat_s >= self.job_lease_s:
            raise ValueError("job_heartbeat_s must be shorter than job_lease_s (a lease must be renewed before it ends)")
        return self

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings from the environment (cached); create_app() accepts others."""
    return Settings()
