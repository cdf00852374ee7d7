"""Events from scored frames: ``EventRecorder`` (one per app, ``services.events``) hands each source
(a camera, an opted-in WebSocket stream, a clip upload) a ``SourceEvents``, which runs the hysteresis
(``tracker.py``) on its frames, keeps what it finds (``store.py``) and publishes every change on the
bus (``bus.py``: the webhook outbox and the SSE streams listen).

``observe`` runs on the event loop for every scored frame and does no more than the tracker's
arithmetic unless something changed: the pictures (JPEG, PNG) and the SQLite writes of an event run
in worker threads when it opens, at most every UPDATE_INTERVAL_S while it is open and its frames or
peak changed (published as ``updated``), and when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np

from model.config import ModelConfig
from model.results import FrameResult
from service.events.bus import EventBus
from service.events.store import EventRecord, EventStore, Fence
from service.events.tracker import Change, EventTracker, Observation, Run
from service.metrics import EVENT_SOURCES, Metrics
from service.model_store import ServingModel
from service.rendering import MapGeometry, frame_jpeg, heatmap_png
from service.replicas import Replica
from service.settings import Settings

log = logging.getLogger("vad.events")

UPDATE_INTERVAL_S = 2.0  # an open event's row, pictures and `updated` change at most this often
RETENTION_INTERVAL_S = 600.0  # how often old events are pruned (and once at startup)
PICTURE_MAX_SIDE = 960  # snapshots and heatmaps are shrunk to this longer side
ORPHAN_GRACE_S = 600.0  # picture folders without a row are removed at startup once this old


@dataclass(frozen=True)
class PeakPicture:
    """What an event's pictures are drawn from: the frame, its map, and the version that scored it."""

    gray: np.ndarray
    map: np.ndarray
    config: ModelConfig
    version: str


def render_pictures(picture: PeakPicture) -> tuple[bytes, bytes]:
    """(snapshot JPEG, heatmap PNG) of a peak frame."""
    height, width = picture.gray.shape
    geometry = MapGeometry.of(picture.config, height, width)
    return (frame_jpeg(picture.gray, PICTURE_MAX_SIDE),
            heatmap_png(picture.gray, picture.map, geometry, PICTURE_MAX_SIDE))


class SourceEvents:
    """The events of one source. Its owner calls ``observe`` for each scored frame, in order, one
    call at a time, and ``finish`` when the source ends. The frame passed in is kept by reference
    (the peak's picture), so it must not be modified afterwards.

    ``fence`` (a camera's lease) is checked in every write's transaction: once it refuses, or once
    another replica has closed the event, nothing of this event is written or published any more."""

    def __init__(self, recorder: "EventRecorder", kind: str, name: str, fence: Fence | None = None) -> None:
        self.recorder = recorder
        self.kind = kind
        self.name = name
        self.fence = fence
        settings = recorder.settings
        self.tracker: EventTracker[PeakPicture] = EventTracker(
            settings.event_open_frames, settings.event_window_frames, settings.event_close_frames,
            settings.event_max_frames,
        )
        self.record: EventRecord | None = None  # the open event as last stored
        self._drawn_peak: Observation[PeakPicture] | None = None  # the peak its pictures show
        self._stored_at = 0.0  # time.monotonic() of the last store of the open event
        self._lock = asyncio.Lock()
        self._lost = False  # a write of the open event was refused: it is not this replica's to record any more
        self.opened: list[str] = []  # ids of the events this source opened, in order

    async def observe(self, gray: np.ndarray, result: FrameResult, model: ServingModel, captured_at: float) -> None:
        frame = Observation(
            index=result.index, at=captured_at, score=float(result.score), anomalous=bool(result.anomalous),
            picture=PeakPicture(gray, result.map, model.scorer.config, model.version),
        )
        async with self._lock:
            changes = self.tracker.observe(frame)
            for change in changes:
                await self._apply(change)
            if not changes and self.tracker.current is not None:
                await self._maybe_update(self.tracker.current, frame)

    async def finish(self) -> None:
        """The source ended: an open event closes at its last anomalous frame."""
        async with self._lock:
            for change in self.tracker.finish():
                await self._apply(change)

    async def _apply(self, change: Change[PeakPicture]) -> None:
        run = change.run
        if change.kind == "opened":
            self.record = EventRecord(
                id=uuid.uuid4().hex, camera=self.name, source=self.kind, state="open",
                start_at=run.start.at, end_at=None, last_at=run.end.at, peak_score=run.peak.score,
                peak_frame=run.peak.index, model_version=run.peak.picture.version, frames=run.frames,
                replica=self.recorder.replica.id,
            )
            self._drawn_peak, self._lost = None, False
            self.opened.append(self.record.id)
            self.recorder._open.add(self)
            if await self._store(run, last_at=run.end.at):
                self.recorder.metrics.events_opened.labels(self.kind).inc()
                self.recorder.publish("opened", self.record)
        else:
            assert self.record is not None
            self.record.state, self.record.end_at = "closed", run.end.at
            if await self._store(run, last_at=run.end.at):
                self.recorder.metrics.events_closed.labels(self.kind).inc()
                self.recorder.publish("closed", self.record)
            self.recorder._open.discard(self)
            self.record = None

    async def _maybe_update(self, run: Run[PeakPicture], frame: Observation[PeakPicture]) -> None:
        assert self.record is not None
        if time.monotonic() - self._stored_at < UPDATE_INTERVAL_S:
            return
        changed = run.frames != self.record.frames or run.peak is not self._drawn_peak
        if await self._store(run, last_at=frame.at) and changed:
            self.recorder.publish("updated", self.record)

    async def _store(self, run: Run[PeakPicture], last_at: float) -> bool:
        """The open/closed event's row, and its pictures when its peak changed, in a worker thread;
        False when it was not written (fenced off, or closed by another replica)."""
        record = self.record
        assert record is not None
        record.frames, record.last_at = run.frames, last_at
        record.peak_score, record.peak_frame = run.peak.score, run.peak.index
        record.model_version = run.peak.picture.version
        peak = run.peak if run.peak is not self._drawn_peak else None
        self._stored_at = time.monotonic()
        if self._lost:
            return False
        if not await asyncio.to_thread(self.recorder.persist, record, peak, self.fence):
            self._lost = True
            log.warning("event %s of %s %r is no longer this replica's (lease lost, or closed by another): "
                        "not recorded further", record.id, self.kind, self.name)
            return False
        if peak is not None:
            self._drawn_peak = peak
        return True


class EventRecorder:
    """Creates each source's ``SourceEvents``, owns the store and the bus, and runs the retention
    loop. ``start`` closes the events a crash left open (published as ``closed``): this replica's own
    from an earlier run and those of dead replicas; afterwards, at every heartbeat of ``replica``,
    those of replicas that died since. Those of live replicas are theirs to close."""

    def __init__(self, settings: Settings, metrics: Metrics, replica: Replica | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.replica = replica or Replica(settings)
        self.bus = EventBus()
        self.store = EventStore(self.replica.database, settings.data_dir)
        self._open: set[SourceEvents] = set()  # sources with an open event (closed by stop)
        self._retention: asyncio.Task[None] | None = None
        # refuse an impossible hysteresis at startup, not at the first frame
        EventTracker(settings.event_open_frames, settings.event_window_frames, settings.event_close_frames,
                     settings.event_max_frames)

    def source(self, kind: str, name: str, fence: Fence | None = None) -> SourceEvents:
        """The events of one source; ``kind`` is camera, stream or clip, ``name`` what the events'
        ``camera`` field says (a camera's or stream's name, a clip's file name); ``fence`` see
        ``SourceEvents``."""
        if kind not in EVENT_SOURCES:
            raise ValueError(f"unknown event source {kind!r} (one of {', '.join(EVENT_SOURCES)})")
        return SourceEvents(self, kind, name, fence)

    async def start(self) -> None:
        dangling = await asyncio.to_thread(self.store.close_dangling, self.replica.live_since(), self.replica.id)
        self._closed_for_others(dangling, "was left open by a server that stopped")
        await asyncio.to_thread(self.store.remove_orphan_pictures, time.time() - ORPHAN_GRACE_S)
        self._retention = asyncio.create_task(self._retention_loop(), name="event-retention")
        self.replica.on_tick(self.close_orphaned)

    async def close_orphaned(self) -> None:
        """Close the events of replicas that died (called at every heartbeat)."""
        orphaned = await asyncio.to_thread(self.store.close_dangling, self.replica.live_since(), self.replica.id, False)
        self._closed_for_others(orphaned, "was left open by a replica that died")

    async def close_left_open(self, kind: str, name: str) -> None:
        """Close what another replica left open for this source (a camera this replica takes over)."""
        self._closed_for_others(await asyncio.to_thread(self.store.close_open, kind, name),
                                "was left open by the camera's previous replica")

    def _closed_for_others(self, records: list[EventRecord], why: str) -> None:
        for record in records:
            log.warning("event %s of %s %r %s: closed", record.id, record.source, record.camera, why)
            self.metrics.events_closed.labels(record.source).inc()
            self.publish("closed", record)

    async def stop(self) -> None:
        """Stop pruning and close the events still open (their sources did not finish)."""
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
            self._retention = None
        for source in list(self._open):
            try:
                await source.finish()
            except Exception:  # noqa: BLE001 - the others still close; this one is closed at next startup
                log.exception("closing the open event of %s %r failed", source.kind, source.name)

    def publish(self, kind: str, record: EventRecord) -> None:
        self.bus.publish(kind, record.to_json())

    def persist(self, record: EventRecord, peak: Observation[PeakPicture] | None, fence: Fence | None = None) -> bool:
        """(Worker thread) the pictures of a new peak, then the row; whether the row was written."""
        if peak is not None:
            record.picture_bytes = self.store.write_pictures(record.id, *render_pictures(peak.picture))
        return self.store.save(record, fence)

    async def prune(self) -> list[str]:
        """Apply the retention limits now (age: VAD_EVENT_RETENTION_DAYS; size: VAD_EVENT_MAX_BYTES)."""
        older_than = time.time() - self.settings.event_retention_days * 86400
        deleted = await asyncio.to_thread(self.store.prune, older_than, self.settings.event_max_bytes)
        if deleted:
            log.info("retention: %d events deleted", len(deleted))
        return deleted

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:  # noqa: BLE001 - a failed pass (disk, lock) is retried at the next one
                log.exception("event retention failed")
            await asyncio.sleep(RETENTION_INTERVAL_S)
