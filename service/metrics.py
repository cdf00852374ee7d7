"""Every Prometheus metric of the server, defined once, in base units (seconds, patches, frames).

Each app gets its own CollectorRegistry, so several apps (tests) never collide in the global one.

Under ``vad serve --processes N`` (service/processes.py) prometheus_client's multiprocess mode is on
(``PROMETHEUS_MULTIPROC_DIR``): counters and histograms add up over the processes, and each gauge says
how it combines (``multiprocess_mode``; ignored with one process). A label set a process drops stays in
its file, so it is set to 0 first (``zero_and_remove``).

Buckets follow the workload: one frame of a 240x360 camera at patch 30 / stride 15 is 345 patches and
a 16-frame clip chunk ~5.5k, so batch sizes span 1..16k patches; a single frame scores in
milliseconds on a GPU and tens of milliseconds on a CPU, a clip in seconds to minutes.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_PATCH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_JOB_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
EVENT_SOURCES = ("camera", "stream", "clip")  # what an event can come from
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "vad_http_request_duration_seconds", "HTTP request duration, until the last body byte is sent.",
            ["route", "method", "status"], buckets=REQUEST_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "vad_batch_queue_wait_seconds", "Time a scoring job waited before its forward pass started.",
            buckets=QUEUE_WAIT_BUCKETS, registry=r,
        )
        self.inference_duration = Histogram(
            "vad_inference_duration_seconds", "Duration of one batched forward pass (R and D).",
            buckets=INFERENCE_BUCKETS, registry=r,
        )
        self.batch_patches = Histogram(
            "vad_batch_size_patches", "Patches in one batched forward pass.",
            buckets=BATCH_PATCH_BUCKETS, registry=r,
        )
        self.batch_jobs = Histogram(
            "vad_batch_size_jobs", "Scoring jobs (request chunks / stream frames) sharing one forward pass.",
            buckets=BATCH_JOB_BUCKETS, registry=r,
        )
        self.frames = Counter("vad_frames_scored", "Frames scored.", ["source"], registry=r)
        self.anomalous_frames = Counter("vad_anomalous_frames", "Frames scored above tau.", ["source"], registry=r)
        self.rejected = Counter(
            "vad_overloaded_rejections", "Requests or stream frames refused because the queue was full.",
            ["source"], registry=r,
        )
        self.websocket_connections = Gauge(
            "vad_websocket_connections", "Open WebSocket streams.", registry=r, multiprocess_mode="livesum",
        )
        self.active_model = Gauge(
            "vad_active_model_info", "1 for the model version being served (label: version).",
            ["version", "device"], registry=r, multiprocess_mode="livemax",
        )
        self._active_labels: tuple[str, str] | None = None
        self.active_converged = Gauge(
            "vad_active_version_converged",
            "1 when this replica serves the version the registry's ACTIVE names (or there is no ACTIVE), 0 when not.",
            registry=r, multiprocess_mode="livemin",  # 0 while any serving process has not converged
        )
        self.model_reloads = Counter("vad_model_reloads", "Successful model activations.", registry=r)
        self.failed_reloads = Counter(
            "vad_model_reload_failures", "Model activations refused (verification, load or smoke test).",
            registry=r,
        )
        self.training_jobs = Gauge(
            "vad_training_jobs", "Training jobs in the job store by state (refreshed by the server's poll).",
            ["state"], registry=r, multiprocess_mode="livemostrecent",
        )
        self.training_activations = Counter(
            "vad_training_job_activations",
            "Activation-policy decisions on succeeded training jobs (activated, kept, refused, manual).",
            ["decision"], registry=r,
        )
        # Cameras (label: the camera's name; removed with the camera)
        self.camera_state = Gauge(
            "vad_camera_state", "1 for each camera's current state (connecting, live, reconnecting, failed, disabled).",
            ["camera", "state"], registry=r, multiprocess_mode="livemax",
        )
        self.camera_frames = Counter("vad_camera_frames_scored", "Frames scored per camera.", ["camera"], registry=r)
        self.camera_anomalous = Counter(
            "vad_camera_anomalous_frames", "Frames scored above tau per camera.", ["camera"], registry=r,
        )
        self.camera_reconnects = Counter("vad_camera_reconnects", "Reconnect attempts per camera.", ["camera"], registry=r)
        self.camera_lag = Histogram(
            "vad_camera_lag_seconds", "From a camera frame's capture to its score.",
            ["camera"], buckets=LAG_BUCKETS, registry=r,
        )
        self.replica_cameras = Gauge(
            "vad_replica_cameras", "Cameras this replica runs (holds the lease of); the replicas' sum is the enabled cameras.",
            registry=r, multiprocess_mode="livesum",
        )
        # Events and their delivery
        self.events_opened = Counter("vad_events_opened", "Events opened.", ["source"], registry=r)
        self.events_closed = Counter("vad_events_closed", "Events closed.", ["source"], registry=r)
        self.webhook_deliveries = Counter(
            "vad_webhook_deliveries", "Webhook delivery attempts by outcome (delivered, failed, dropped).",
            ["outcome"], registry=r,
        )
        self.webhook_outbox = Gauge("vad_webhook_outbox", "Webhook deliveries waiting in the outbox.", registry=r,
                                    multiprocess_mode="livemostrecent")
        for source in ("clip", "frame", "stream"):  # export zeros before the first observation
            self.frames.labels(source)
            self.anomalous_frames.labels(source)
            self.rejected.labels(source)
        for source in EVENT_SOURCES:
            self.events_opened.labels(source)
            self.events_closed.labels(source)
        for outcome in ("delivered", "failed", "dropped"):
            self.webhook_deliveries.labels(outcome)

    def set_active_model(self, version: str, device: str) -> None:
        if self._active_labels is not None:
            zero_and_remove(self.active_model, *self._active_labels)
        self._active_labels = (version, device)
        self.active_model.labels(version, device).set(1)

    def record_frames(self, source: str, frames: int, anomalous: int) -> None:
        self.frames.labels(source).inc(frames)
        if anomalous:
            self.anomalous_frames.labels(source).inc(anomalous)

    def set_training_jobs(self, counts: dict[str, int]) -> None:
        for state, count in counts.items():
            self.training_jobs.labels(state).set(count)

    def render(self) -> bytes:
        """The exposition text: this app's registry, or every serving process's values in multiprocess mode."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            combined = CollectorRegistry()
            MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)


def zero_and_remove(gauge: Gauge, *labels: str) -> None:
    """Drop a gauge's label set; in multiprocess mode its last value stays in the process's file, so
    it is set to 0 first."""
    gauge.labels(*labels).set(0)
    gauge.remove(*labels)
