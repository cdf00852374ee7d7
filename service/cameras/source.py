"""One camera's frames: a reader thread that opens the URL, samples it at the camera's fps and hands
the newest grey frame to the event loop.

Opened with OpenCV's FFmpeg backend (``cv2.VideoCapture(url, cv2.CAP_FFMPEG)`` with open and read
timeouts), not PyAV: OpenCV is already a dependency and decodes clip uploads (service/video.py)
with the same FFmpeg, so RTSP, HTTP MJPEG and files need nothing new. Its calls block, hence a
thread per camera: a slow or dead camera blocks only its own thread.

The hand-off holds one frame: a frame read while the previous one still waits replaces it (counted
in ``frames_dropped``), so a slow scorer makes a camera skip frames, never lag behind. Live streams
are sampled at the camera's fps (the frames in between are read and dropped, not counted); files
are played at the camera's fps and looped (demos, tests).

States: ``connecting`` (the first open), ``live`` (frames arrive), ``reconnecting`` (the stream
dropped or would not open: retried after camera_reconnect_initial_s, doubling up to
camera_reconnect_max_s, reset by a frame), ``failed`` (permanent: the URL is no longer allowed or
the file left the footage root; nothing is retried). ``disabled`` is the manager's (no source).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from service.cameras.urls import CameraTarget, redact
from service.errors import ServiceError

CONNECTING, LIVE, RECONNECTING, FAILED, DISABLED = "connecting", "live", "reconnecting", "failed", "disabled"
STATES = (CONNECTING, LIVE, RECONNECTING, FAILED, DISABLED)
STOP_JOIN_S = 1.0  # longest stop() waits for the thread (an open in progress finishes on its own)


@dataclass(frozen=True)
class CapturedFrame:
    gray: np.ndarray  # (H, W) uint8
    captured_at: float  # Unix seconds, when it was read
    index: int  # its number among the sampled frames of this source


@dataclass(frozen=True)
class Backoff:
    """How long to wait before reconnecting, and the open/read timeout."""

    initial_s: float
    max_s: float
    timeout_s: float


@dataclass
class SourceStatus:
    """What the API and metrics show of a camera (written by the reader thread and the scorer)."""

    state: str = CONNECTING
    last_frame_at: float | None = None
    frames_scored: int = 0
    frames_anomalous: int = 0
    frames_dropped: int = 0
    reconnects: int = 0
    last_error: str | None = None  # redacted


def to_gray(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return frame
    code = cv2.COLOR_BGRA2GRAY if frame.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return cv2.cvtColor(frame, code)


class CameraSource:
    """Reads one camera in its own thread. ``recheck`` returns the target to open (the allowlist and
    footage root applied again at every (re)connect) or raises a ServiceError: a permanent failure.
    ``on_change(status)`` is called from the thread at each state change and reconnect."""

    def __init__(
        self, name: str, url: str, fps: float, backoff: Backoff, max_pixels: int,
        recheck: Callable[[], CameraTarget], on_change: Callable[[SourceStatus], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.shown_url = redact(url)
        self.fps = fps
        self.backoff = backoff
        self.max_pixels = max_pixels
        self.recheck = recheck
        self.on_change = on_change
        self.loop = loop
        self.status = SourceStatus()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._slot: CapturedFrame | None = None
        self._ready = asyncio.Event()
        self._index = 0
        self._thread = threading.Thread(target=self._run, name=f"vad-camera-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Blocking (up to STOP_JOIN_S): run it in a thread."""
        self._stop.set()
        self._thread.join(STOP_JOIN_S)

    async def next_frame(self) -> CapturedFrame:
        """The newest frame not yet taken (waits for one)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            with self._lock:
                frame, self._slot = self._slot, None
            if frame is not None:
                return frame

    # --- the reader thread ----------------------------------------------------------------------

    def _set(self, state: str, error: str | None = None) -> None:
        if self._stop.is_set():
            return  # stopped (deleted or changed): nothing more to report
        self.status.state = state
        if error is not None:
            self.status.last_error = error
        self.on_change(self.status)

    def _hand_over(self, frame: np.ndarray) -> None:
        captured = CapturedFrame(to_gray(frame), time.time(), self._index)
        self._index += 1
        with self._lock:
            if self._slot is not None:
                self.status.frames_dropped += 1  # the scorer did not take the previous one in time
            self._slot = captured
        self.status.last_frame_at = captured.captured_at
        try:
            self.loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed: the server is stopping
            self._stop.set()

    def _run(self) -> None:
        wait = self.backoff.initial_s
        first = True
        while not self._stop.is_set():
            if not first:
                self.status.reconnects += 1
                self.on_change(self.status)
            first = False
            try:
                target = self.recheck()
            except ServiceError as exc:
                self._set(FAILED, exc.message)
                return
            capture = self._open(target)
            if capture is None:
                self._set(RECONNECTING if self.status.state != CONNECTING else CONNECTING,
                          f"could not open {self.shown_url} within {self.backoff.timeout_s:g} s")
            else:
                try:
                    delivered, problem = self._read(capture, target)
                finally:
                    capture.release()
                if self._stop.is_set() or problem == FAILED:
                    return
                if delivered:
                    wait = self.backoff.initial_s
                if target.is_file and delivered:
                    first = True  # the end of a file: play it again, not a reconnect
                    continue
                self._set(RECONNECTING, problem)
            if self._stop.wait(wait):
                return
            wait = min(wait * 2, self.backoff.max_s)
            if self.status.state == CONNECTING:
                self._set(RECONNECTING)

    def _open(self, target: CameraTarget) -> cv2.VideoCapture | None:
        timeout_ms = int(self.backoff.timeout_s * 1000)
        capture = cv2.VideoCapture(
            target.openable, cv2.CAP_FFMPEG,
            [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms],
        )
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def _read(self, capture: cv2.VideoCapture, target: CameraTarget) -> tuple[bool, str | None]:
        """Read until the stream ends or stop: (whether a frame was delivered, what ended it)."""
        interval = 1.0 / self.fps
        due = time.monotonic()
        delivered = False
        while not self._stop.is_set():
            if target.is_file and self._stop.wait(max(0.0, due - time.monotonic())):
                break  # files play at the camera's fps
            if not capture.grab():
                return delivered, (f"{self.shown_url}: the stream ended or sent no frame within "
                                   f"{self.backoff.timeout_s:g} s")
            now = time.monotonic()
            if now < due:
                continue  # a live stream faster than the camera's fps: sampled
            due = max(due + interval, now) if not target.is_file else due + interval
            ok, frame = capture.retrieve()
            if not ok or frame is None:
                continue
            height, width = frame.shape[:2]
            if height * width > self.max_pixels:
                self._set(FAILED, f"{self.shown_url}: frames of {width}x{height} are over VAD_MAX_PIXELS")
                return delivered, FAILED
            self._hand_over(frame)
            if not delivered:
                delivered = True
                self._set(LIVE)
        return delivered, None
