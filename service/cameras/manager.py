"""CameraManager: the cameras this replica watches, each a reader thread (service/cameras/source.py)
and an asyncio task that scores its frames through the shared batcher; and every camera's view, on
whichever replica runs it.

Per camera the task takes the newest frame, scores it with a ``BatchedStream`` (source label
``camera``; a new one when the served version changes, carrying the motion channel as a WebSocket
stream does), records the camera's metrics (frames, anomalous frames, capture-to-score lag), keeps
the latest frame and result for ``latest.jpg`` / ``latest-heatmap.png`` (also written to the data
folder for the other replicas while there are any: service/cameras/shared_latest.py), and reports every scored
frame to the event recorder (``events.source("camera", name)``, fenced by the camera's lease), whose
open event it finishes when the camera stops here. A frame that finds the batcher full, or no model
loaded, is dropped and counted.

Which cameras run here is the database's to say (service/cameras/leases.py): ``reconcile``, at start,
after every change made through this replica and at every heartbeat (service/replicas.py), renews this
replica's leases, claims its share of the free cameras and runs exactly the ones it holds, as stored:
a camera changed or deleted through any replica is restarted or stopped here within a heartbeat.
Changes go to the store first (service/cameras/store.py), then ``reconcile`` applies them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from model.results import FrameResult
from service.background import cancel_and_wait
from service.batcher import Batcher
from service.cameras.leases import Assignment, CameraLeases, Lease, Placement
from service.cameras.shared_latest import EVERY_S as SHARE_EVERY_S
from service.cameras.shared_latest import SharedLatest
from service.cameras.source import DISABLED, FAILED, STATES, Backoff, CameraSource, SourceStatus
from service.cameras.store import Camera, CameraExistsError, CameraLimitError, CameraStore
from service.cameras.urls import UrlPolicy, redact
from service.database import database_errors
from service.errors import (
    CameraElsewhere, CameraExists, CameraNotFound, FrameTooSmall, NoCameraFrame, Overloaded, ServiceError,
    TooManyCameras,
)
from service.events.recorder import EventRecorder, SourceEvents
from service.events.store import iso_utc
from service.metrics import Metrics, zero_and_remove
from service.model_store import ModelStore, ServingModel
from service.pipeline import BatchedStream
from service.rendering import MapGeometry, frame_jpeg, heatmap_png
from service.replicas import Replica
from service.settings import Settings

log = logging.getLogger("vad.cameras")
SOURCE_CAMERA = "camera"
LATEST_MAX_SIDE = 640  # latest.jpg / latest-heatmap.png are shrunk to this
UNASSIGNED = "unassigned"  # the view of an enabled camera no live replica holds (yet)


@dataclass
class Latest:
    """A camera's most recent scored frame."""

    gray: np.ndarray
    result: FrameResult
    model: ServingModel
    captured_at: float


@dataclass
class _Watch:
    """One camera as it runs here: its stored record and lease generation, its reader, its scoring
    task, its events and what it saw last."""

    camera: Camera
    generation: int
    events: SourceEvents
    status: SourceStatus = field(default_factory=SourceStatus)
    source: CameraSource | None = None
    task: asyncio.Task[None] | None = None
    scorer: BatchedStream | None = None
    latest: Latest | None = None
    shared_at: float = float("-inf")  # time.monotonic() the latest pictures were last written for the others
    sharing: asyncio.Task[None] | None = None  # that write, while it runs
    reconnects_counted: int = 0  # of status.reconnects, added to the metric so far


class CameraManager:
    def __init__(
        self, settings: Settings, metrics: Metrics, models: ModelStore, batcher: Batcher, events: EventRecorder,
        replica: Replica,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models = models
        self.batcher = batcher
        self.events = events
        self.replica = replica
        self.policy = UrlPolicy(settings.camera_url_allow, settings.footage_root)  # ValueError: a bad entry
        database = replica.database
        self.store = CameraStore(database)
        self.leases = CameraLeases(database)
        self.backoff = Backoff(settings.camera_reconnect_initial_s, settings.camera_reconnect_max_s,
                               settings.camera_open_timeout_s)
        self.watches: dict[str, _Watch] = {}  # the cameras running here
        self.shared = SharedLatest(settings.data_dir)  # the latest pictures, for the other replicas
        self._lock = asyncio.Lock()  # one reconcile or change at a time
        self._held_until = 0.0  # time.monotonic() when this replica's leases lapse unless renewed
        self._stopped = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Claim this replica's share of the stored cameras (an unreadable URL now refused shows as
        ``failed``), then follow the table at every heartbeat."""
        await self.reconcile()
        self.replica.on_tick(self.reconcile)

    async def stop(self) -> None:
        """Stop every camera here (their open events close), then give their leases back at once."""
        async with self._lock:
            self._stopped = True
            held = [Lease(watch.camera, watch.generation) for watch in self.watches.values()]
            await asyncio.gather(*(self._halt(self.watches.pop(name)) for name in list(self.watches)))
            try:
                await asyncio.to_thread(self.leases.release, self.replica.id, held)
            except database_errors():
                log.warning("cameras: could not release %d leases at stop; they expire in %.0f s",
                            len(held), self.replica.lease_s)
            self.metrics.replica_cameras.set(0)

    # --- the API's operations -------------------------------------------------------------------

    async def list(self) -> list[dict[str, Any]]:
        placements = await asyncio.to_thread(self.leases.placements, time.time())
        return [self._view(placement) for placement in placements]

    async def view(self, name: str) -> dict[str, Any]:
        return self._view(await self._placement(name))

    async def add(self, name: str, url: str, fps: float, enabled: bool) -> dict[str, Any]:
        self.policy.check(url)
        limit = self.settings.max_cameras * len(await asyncio.to_thread(self.replica.store.live, self.replica.live_since()))
        try:
            await asyncio.to_thread(self.store.add, name, url, fps, enabled, max(limit, self.settings.max_cameras))
        except CameraExistsError:
            raise CameraExists(f"a camera named {name!r} exists") from None
        except CameraLimitError:
            raise TooManyCameras(f"the servers watch at most {self.settings.max_cameras} cameras each (VAD_MAX_CAMERAS, "
                                 f"here {max(limit, self.settings.max_cameras)} in all); delete one first") from None
        log.info("camera %s added: %s at %g fps%s", name, redact(url), fps, "" if enabled else " (disabled)")
        await self.reconcile()  # run here at once when this replica has room
        return await self.view(name)

    async def update(self, name: str, url: str | None, fps: float | None, enabled: bool | None) -> dict[str, Any]:
        if url is not None:
            self.policy.check(url)
        if await asyncio.to_thread(self.store.patch, name, url, fps, enabled) is None:
            raise CameraNotFound(f"no camera named {name!r}")
        await self.reconcile()  # restarted here if it runs here; elsewhere at its replica's next heartbeat
        return await self.view(name)

    async def delete(self, name: str) -> None:
        if not await asyncio.to_thread(self.store.delete, name):
            raise CameraNotFound(f"no camera named {name!r}")
        await self.reconcile()
        log.info("camera %s deleted", name)

    async def latest_jpeg(self, name: str) -> bytes:
        return await self._picture(name, "jpeg")

    async def latest_heatmap(self, name: str) -> bytes:
        return await self._picture(name, "heatmap")

    # --- views ----------------------------------------------------------------------------------

    async def _placement(self, name: str) -> Placement:
        found = await asyncio.to_thread(self.leases.placements, time.time(), name)
        if not found:
            raise CameraNotFound(f"no camera named {name!r}")
        return found[0]

    def _view(self, placement: Placement) -> dict[str, Any]:
        """A camera as the API shows it: from memory where it runs here, else as its owner last wrote."""
        camera, watch = placement.camera, self.watches.get(placement.camera.name)
        if watch is not None:
            status, owner = asdict(watch.status), self.replica.id
        else:
            status, owner = {**asdict(SourceStatus()), **(placement.status or {})}, placement.owner
            if not camera.enabled:
                status["state"] = DISABLED
            elif owner is None:
                status["state"] = UNASSIGNED
        return {
            "name": camera.name, "url": redact(camera.url), "fps": camera.fps, "enabled": camera.enabled,
            "owner": owner, "state": status["state"], "last_frame_at": _iso(status["last_frame_at"]),
            "frames_scored": status["frames_scored"], "frames_anomalous": status["frames_anomalous"],
            "frames_dropped": status["frames_dropped"], "reconnects": status["reconnects"],
            "last_error": status["last_error"],
            "created_at": _iso(camera.created_at), "updated_at": _iso(camera.updated_at),
            "latest_url": f"/v1/cameras/{camera.name}/latest.jpg",
            "latest_heatmap_url": f"/v1/cameras/{camera.name}/latest-heatmap.png",
        }

    # --- which cameras run here -----------------------------------------------------------------

    async def reconcile(self) -> None:
        """Renew, claim, give up the surplus (see service/cameras/leases.py), then run here exactly
        the cameras this replica holds, as stored."""
        async with self._lock:
            if self._stopped:
                return
            asked_at = time.monotonic()
            statuses = {name: (watch.generation, asdict(watch.status)) for name, watch in self.watches.items()}
            try:
                assignment = await asyncio.to_thread(
                    self.leases.assign, self.replica.id, time.time(), self.replica.lease_s, self.settings.max_cameras,
                    statuses,
                )
            except database_errors():
                if self.watches and time.monotonic() > self._held_until:
                    log.error("cameras: leases unrenewed for %.0f s: stopping the %d cameras here (another replica "
                              "may hold them now)", self.replica.lease_s, len(self.watches))
                    await self._run_only({})
                raise
            self._held_until = asked_at + self.replica.lease_s
            await self._apply(assignment)

    async def _apply(self, assignment: Assignment) -> None:
        await asyncio.gather(*(self._halt(self.watches.pop(lease.camera.name), forget=True)
                               for lease in assignment.surplus if lease.camera.name in self.watches))
        if assignment.surplus:
            names = ", ".join(lease.camera.name for lease in assignment.surplus)
            log.info("cameras: %s given up (this replica's share is %d of %d live replicas)", names,
                     assignment.share, assignment.live_replicas)
            await asyncio.to_thread(self.leases.release, self.replica.id, assignment.surplus)
        gone = await self._run_only(assignment.held)
        if gone:  # disabled, deleted or taken over: free again if still ours (fenced by generation)
            await asyncio.to_thread(self.leases.release, self.replica.id, gone)

    async def _run_only(self, held: dict[str, Lease]) -> list[Lease]:
        """Stop what runs here but is not held (or not as held), start what is held; the leases stopped.
        Cameras stop together: a tick stopping many must not outlast the leases it renewed."""
        stopping = [name for name, watch in self.watches.items()
                    if name not in held or (held[name].camera, held[name].generation) != (watch.camera, watch.generation)]
        halted = [self.watches.pop(name) for name in stopping]
        await asyncio.gather(*(self._halt(watch, forget=watch.camera.name not in held) for watch in halted))
        stopped = [Lease(watch.camera, watch.generation) for watch in halted if watch.camera.name not in held]
        for name, lease in held.items():
            if name not in self.watches:
                await self.events.close_left_open(SOURCE_CAMERA, name)  # by a replica that held it before
                await self._launch(lease)
        self.metrics.replica_cameras.set(len(self.watches))
        return stopped

    # --- running cameras ------------------------------------------------------------------------

    async def _picture(self, name: str, kind: str) -> bytes:
        """A camera's latest picture (``jpeg`` or ``heatmap``): rendered here where it runs; elsewhere
        the one its owner left in the data folder while fresh, else CameraElsewhere naming the owner.
        NoCameraFrame where it runs nowhere now or has no frame yet, CameraNotFound for an unknown camera."""
        watch = self.watches.get(name)
        if watch is not None:
            if watch.latest is None:
                raise NoCameraFrame(f"camera {name!r} has no scored frame yet")
            return _render(watch.latest, kind)
        placement = await self._placement(name)  # CameraNotFound first: a deleted camera has no picture
        if placement.owner is None:
            why = "it is disabled" if not placement.camera.enabled else "it waits for a replica to take it"
            raise NoCameraFrame(f"camera {name!r} has no scored frame: it runs on no replica now ({why})")
        shared = await asyncio.to_thread(self.shared.read, name, kind, time.time())
        if shared is None:
            raise CameraElsewhere(f"camera {name!r} runs on replica {placement.owner!r}, not on this one "
                                  f"({self.replica.id!r}): its latest frame is served there")
        return shared

    def _share(self, watch: _Watch) -> None:
        """While other replicas are live, write the camera's latest pictures for them at most every
        SHARE_EVERY_S, rendered and written in a worker thread while scoring goes on (one write at a
        time per camera: a frame that finds one running is not shared)."""
        if not self.replica.others_live or watch.latest is None or (watch.sharing and not watch.sharing.done()):
            return
        if time.monotonic() - watch.shared_at < SHARE_EVERY_S:
            return
        watch.shared_at = time.monotonic()
        name, latest = watch.camera.name, watch.latest

        def render_and_write() -> None:
            self.shared.write(name, {kind: _render(latest, kind) for kind in ("jpeg", "heatmap")})

        async def write() -> None:
            try:
                await asyncio.to_thread(render_and_write)
            except Exception:  # the camera keeps being scored; the others answer 409 meanwhile
                log.exception("camera %s: could not write its latest pictures for the other replicas", name)

        watch.sharing = asyncio.create_task(write(), name=f"vad-camera-{name}-share")

    async def _launch(self, lease: Lease) -> None:
        camera, generation = lease.camera, lease.generation
        events = self.events.source(
            SOURCE_CAMERA, camera.name,
            fence=lambda connection: self.leases.holds(connection, camera.name, self.replica.id, generation),
        )
        watch = _Watch(camera, generation, events)
        self.watches[camera.name] = watch
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

    async def _halt(self, watch: _Watch, forget: bool = False) -> None:
        """Stop a camera's reader and task; its open event (if any) closes (fenced: not when another
        replica holds the camera now). ``forget``: it stops running here, its metrics go too."""
        await cancel_and_wait(watch.task)
        if watch.sharing is not None:
            await watch.sharing  # a write in flight finishes before the pictures are removed below
        if watch.source is not None:
            await asyncio.to_thread(watch.source.stop)
        try:
            await watch.events.finish()
        except Exception:
            log.exception("closing camera %s's open event failed", watch.camera.name)
        if forget:
            self._forget_metrics(watch.camera.name)
            await asyncio.to_thread(self.shared.remove, watch.camera.name)

    async def _score_frames(self, watch: _Watch, source: CameraSource) -> None:
        name, events = watch.camera.name, watch.events
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
            self._share(watch)
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
            zero_and_remove(self.metrics.camera_state, name, state)


def _render(latest: Latest, kind: str) -> bytes:
    """``jpeg``: the frame; ``heatmap``: the frame with its anomaly map over it; both shrunk to LATEST_MAX_SIDE."""
    if kind == "jpeg":
        return frame_jpeg(latest.gray, LATEST_MAX_SIDE)
    height, width = latest.gray.shape
    geometry = MapGeometry.of(latest.model.scorer.config, height, width)
    return heatmap_png(latest.gray, latest.result.map, geometry, LATEST_MAX_SIDE)


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else iso_utc(seconds)
