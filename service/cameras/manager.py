"""CameraManager: the cameras a server watches, each a reader thread (service/cameras/source.py) and
an asyncio task that scores its frames through the shared batcher.

Per camera the task takes the newest frame, scores it with a ``BatchedStream`` (source label
``camera``; a new one when the served version changes, carrying the motion channel as a WebSocket
stream does), records the camera's metrics (frames, anomalous frames, capture-to-score lag), keeps
the latest frame and result for ``latest.jpg`` / ``latest-heatmap.png``, and reports every scored
frame to the event recorder (``events.source("camera", name)``), whose open event it finishes when
the camera stops. A frame that finds the batcher full, or no model loaded, is dropped and counted.

Changes go to the store (service/cameras/store.py) first, then to the running cameras; ``start``
restores the stored cameras.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.results import FrameResult
from service.background import cancel_and_wait
from service.batcher import Batcher
from service.cameras.source import DISABLED, FAILED, STATES, Backoff, CameraSource, SourceStatus
from service.cameras.store import Camera, CameraExistsError, CameraStore
from service.cameras.urls import UrlPolicy, redact
from service.database import database_for
from service.errors import (
    CameraExists, CameraNotFound, FrameTooSmall, NoCameraFrame, Overloaded, ServiceError, TooManyCameras,
)
from service.events.recorder import EventRecorder
from service.events.store import iso_utc
from service.metrics import Metrics
from service.model_store import ModelStore, ServingModel
from service.pipeline import BatchedStream
from service.rendering import MapGeometry, frame_jpeg, heatmap_png
from service.settings import Settings

log = logging.getLogger("vad.cameras")
SOURCE_CAMERA = "camera"
LATEST_MAX_SIDE = 640  # latest.jpg / latest-heatmap.png are shrunk to this


@dataclass
class Latest:
    """A camera's most recent scored frame."""

    gray: np.ndarray
    result: FrameResult
    model: ServingModel
    captured_at: float


@dataclass
class _Watch:
    """One camera as it runs: its stored record, its reader, its scoring task and what it saw last."""

    camera: Camera
    status: SourceStatus = field(default_factory=SourceStatus)
    source: CameraSource | None = None
    task: asyncio.Task[None] | None = None
    scorer: BatchedStream | None = None
    latest: Latest | None = None
    reconnects_counted: int = 0  # of status.reconnects, added to the metric so far


class CameraManager:
    def __init__(
        self, settings: Settings, metrics: Metrics, models: ModelStore, batcher: Batcher, events: EventRecorder
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models = models
        self.batcher = batcher
        self.events = events
        self.policy = UrlPolicy(settings.camera_url_allow, settings.footage_root)  # ValueError: a bad entry
        self.store = CameraStore(database_for(settings))
        self.backoff = Backoff(settings.camera_reconnect_initial_s, settings.camera_reconnect_max_s,
                               settings.camera_open_timeout_s)
        self.watches: dict[str, _Watch] = {}
        self._lock = asyncio.Lock()  # one change at a time

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the stored cameras (an unreadable URL now refused shows as ``failed``)."""
        for camera in await asyncio.to_thread(self.store.list):
            await self._launch(camera)

    async def stop(self) -> None:
        for name in list(self.watches):
            await self._halt(self.watches.pop(name))

    # --- the API's operations -------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        return [self.view(name) for name in sorted(self.watches)]

    def view(self, name: str) -> dict[str, Any]:
        watch = self._watch(name)
        camera, status = watch.camera, watch.status
        return {
            "name": camera.name, "url": redact(camera.url), "fps": camera.fps, "enabled": camera.enabled,
            "state": status.state, "last_frame_at": _iso(status.last_frame_at),
            "frames_scored": status.frames_scored, "frames_anomalous": status.frames_anomalous,
            "frames_dropped": status.frames_dropped, "reconnects": status.reconnects,
            "last_error": status.last_error,
            "created_at": _iso(camera.created_at), "updated_at": _iso(camera.updated_at),
            "latest_url": f"/v1/cameras/{camera.name}/latest.jpg",
            "latest_heatmap_url": f"/v1/cameras/{camera.name}/latest-heatmap.png",
        }

    async def add(self, name: str, url: str, fps: float, enabled: bool) -> dict[str, Any]:
        self.policy.check(url)
        async with self._lock:
            if name in self.watches:
                raise CameraExists(f"a camera named {name!r} exists")
            if len(self.watches) >= self.settings.max_cameras:
                raise TooManyCameras(f"the server watches at most {self.settings.max_cameras} cameras "
                                     "(VAD_MAX_CAMERAS); delete one first")
            try:
                camera = await asyncio.to_thread(self.store.add, name, url, fps, enabled)
            except CameraExistsError:
                raise CameraExists(f"a camera named {name!r} exists") from None
            await self._launch(camera)
        log.info("camera %s added: %s at %g fps%s", name, redact(url), fps, "" if enabled else " (disabled)")
        return self.view(name)

    async def update(self, name: str, url: str | None, fps: float | None, enabled: bool | None) -> dict[str, Any]:
        if url is not None:
            self.policy.check(url)
        async with self._lock:
            old = self._watch(name)
            changed = Camera(name, url if url is not None else old.camera.url, fps if fps is not None else old.camera.fps,
                             enabled if enabled is not None else old.camera.enabled,
                             old.camera.created_at, old.camera.updated_at)
            camera = await asyncio.to_thread(self.store.update, changed)
            await self._halt(self.watches.pop(name))
            await self._launch(camera)
        return self.view(name)

    async def delete(self, name: str) -> None:
        async with self._lock:
            self._watch(name)
            await asyncio.to_thread(self.store.delete, name)
            await self._halt(self.watches.pop(name))
            self._forget_metrics(name)
        log.info("camera %s deleted", name)

    def latest_jpeg(self, name: str) -> bytes:
        latest = self._latest(name)
        return frame_jpeg(latest.gray, LATEST_MAX_SIDE)

    def latest_heatmap(self, name: str) -> bytes:
        latest = self._latest(name)
        height, width = latest.gray.shape
        geometry = MapGeometry.of(latest.model.scorer.config, height, width)
        return heatmap_png(latest.gray, latest.result.map, geometry, LATEST_MAX_SIDE)

    # --- running cameras ------------------------------------------------------------------------

    def _watch(self, name: str) -> _Watch:
        watch = self.watches.get(name)
        if watch is None:
            raise CameraNotFound(f"no camera named {name!r}")
        return watch

    def _latest(self, name: str) -> Latest:
        latest = self._watch(name).latest
        if latest is None:
            raise NoCameraFrame(f"camera {name!r} has no scored frame yet")
        return latest

    async def _launch(self, camera: Camera) -> None:
        watch = _Watch(camera)
        self.watches[camera.name] = watch
        if not camera.enabled:
            watch.status.state = DISABLED
            self._record_state(watch)
            return
        try:
            self.policy.check(camera.url)
        except ServiceError as exc:  # stored before the allowlist or footage root changed
            watch.status.state, watch.status.last_error = FAILED, exc.message
            self._record_state(watch)
            return
        loop = asyncio.get_running_loop()
        source = CameraSource(
            camera.name, camera.url, camera.fps, self.backoff, self.settings.max_pixels,
            recheck=lambda: self.policy.check(camera.url),
            on_change=lambda status: self._record_state(watch), loop=loop,
        )
        watch.source, watch.status = source, source.status
        self._record_state(watch)
        watch.task = asyncio.create_task(self._score_frames(watch, source), name=f"vad-camera-{camera.name}")
        source.start()

    async def _halt(self, watch: _Watch) -> None:
        """Stop a camera's reader and task; its open event (if any) closes."""
        await cancel_and_wait(watch.task)
        if watch.source is not None:
            await asyncio.to_thread(watch.source.stop)
        try:
            await self.events.source(SOURCE_CAMERA, watch.camera.name).finish()
        except Exception:
            log.exception("closing camera %s's open event failed", watch.camera.name)

    async def _score_frames(self, watch: _Watch, source: CameraSource) -> None:
        name = watch.camera.name
        events = self.events.source(SOURCE_CAMERA, name)
        while True:
            frame = await source.next_frame()
            model = self.models.current
            if model is None:
                watch.status.frames_dropped += 1
                continue
            scorer = self._scorer_for(watch, model)
            try:
                if min(frame.gray.shape) < model.patch_size:
                    raise FrameTooSmall(f"frames of {frame.gray.shape[1]}x{frame.gray.shape[0]} are smaller than "
                                       f"the model's {model.patch_size}px patch")
                with self.batcher.admit(SOURCE_CAMERA):
                    result = await scorer.score_frame(frame.gray, frame.index, watch.camera.fps)
            except Overloaded:
                watch.status.frames_dropped += 1
                continue
            except ServiceError as exc:
                watch.status.frames_dropped += 1
                watch.status.last_error = exc.message
                continue
            self._record_frame(name, watch.status, result, frame.captured_at)
            watch.latest = Latest(frame.gray, result, model, frame.captured_at)
            try:
                await events.observe(frame.gray, result, model, frame.captured_at)
            except Exception:  # the camera keeps being scored whatever the event recorder does
                log.exception("recording camera %s's frame for events failed", name)

    def _scorer_for(self, watch: _Watch, model: ServingModel) -> BatchedStream:
        old = watch.scorer
        if old is None or old.model is not model:
            watch.scorer = BatchedStream(model, self.batcher, self.metrics, SOURCE_CAMERA, watch.camera.fps)
            if old is not None:
                watch.scorer.carry_motion_from(old)  # motion continues across a version swap
        return watch.scorer

    # --- metrics --------------------------------------------------------------------------------

    def _record_state(self, watch: _Watch) -> None:
        """The state gauge and reconnect counter; called from the camera's reader thread too
        (prometheus_client is thread-safe)."""
        name, status = watch.camera.name, watch.status
        for state in STATES:
            self.metrics.camera_state.labels(name, state).set(1 if state == status.state else 0)
        new = status.reconnects - watch.reconnects_counted
        self.metrics.camera_reconnects.labels(name).inc(max(0, new))
        watch.reconnects_counted += max(0, new)

    def _record_frame(self, name: str, status: SourceStatus, result: FrameResult, captured_at: float) -> None:
        status.frames_scored += 1
        self.metrics.camera_frames.labels(name).inc()
        anomalous = self.metrics.camera_anomalous.labels(name)  # exported (as 0) from the first frame on
        if result.anomalous:
            status.frames_anomalous += 1
            anomalous.inc()
        self.metrics.camera_lag.labels(name).observe(max(0.0, time.time() - captured_at))

    def _forget_metrics(self, name: str) -> None:
        for metric in (self.metrics.camera_frames, self.metrics.camera_anomalous, self.metrics.camera_reconnects,
                       self.metrics.camera_lag):
            try:
                metric.remove(name)
            except KeyError:
                pass
        for state in STATES:
            try:
                self.metrics.camera_state.remove(name, state)
            except KeyError:
                pass


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else iso_utc(seconds)
