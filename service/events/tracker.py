"""The hysteresis that turns one source's per-frame flags into events. Pure: no I/O, no clock.

The rule, with k = VAD_EVENT_OPEN_FRAMES, n = VAD_EVENT_WINDOW_FRAMES, m = VAD_EVENT_CLOSE_FRAMES and
VAD_EVENT_MAX_FRAMES (defaults 3, 5, 10, 3000):

- **Open**: at an anomalous frame (score over tau) when at least k of the last n frames, this one
  included, are anomalous. The event starts at the earliest anomalous frame of that window (not one
  an earlier event already holds), so its start is the run's first flagged frame, not the k-th.
- **Close**: after m frames in a row that are not anomalous. The event ends at its last anomalous
  frame; the m clean frames are not part of it.
- **Split**: an event reaching the maximum length (frames from its start) closes there, at its last
  anomalous frame (the frame that reached the maximum, when it is anomalous). The window of the last
  n frames is kept, so if the run goes on, the next anomalous frame opens a new event at once (it
  still has k of n).
- **End of source** (``finish``): an open event closes at its last anomalous frame.
- **Peak**: the highest score of the event's anomalous frames, its frame index and that frame's
  picture (whatever the caller attached: the recorder keeps the grey frame and its anomaly map).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

Picture = TypeVar("Picture")


@dataclass(frozen=True)
class Observation(Generic[Picture]):
    """One scored frame: its index in the source, when it was captured (unix seconds), its score and
    flag, and the picture kept if it becomes an event's peak."""

    index: int
    at: float
    score: float
    anomalous: bool
    picture: Picture


@dataclass
class Run(Generic[Picture]):
    """An event as the tracker sees it: its first frame, its last frame (the last anomalous one, or
    the frame a split closed it at), its length in frames from start to end, and its peak."""

    start: Observation[Picture]
    end: Observation[Picture]
    frames: int
    peak: Observation[Picture]
    closed: bool = False


@dataclass(frozen=True)
class Change(Generic[Picture]):
    kind: Literal["opened", "closed"]
    run: Run[Picture]


class EventTracker(Generic[Picture]):
    """Feed every frame of one source, in order, to ``observe``; it returns the changes that frame
    made (an event opened, closed; both only when the maximum length is shorter than the window).
    ``current`` is the open event, if any."""

    def __init__(self, open_frames: int, window_frames: int, close_frames: int, max_frames: int) -> None:
        if not 1 <= open_frames <= window_frames:
            raise ValueError(
                f"event hysteresis: VAD_EVENT_OPEN_FRAMES ({open_frames}) must be between 1 and "
                f"VAD_EVENT_WINDOW_FRAMES ({window_frames})"
            )
        if close_frames < 1 or max_frames < 1:
            raise ValueError("event hysteresis: VAD_EVENT_CLOSE_FRAMES and VAD_EVENT_MAX_FRAMES must be at least 1")
        self.open_frames = open_frames
        self.close_frames = close_frames
        self.max_frames = max_frames
        self._window: deque[Observation[Picture]] = deque(maxlen=window_frames)
        self._clean_run = 0  # frames in a row not anomalous
        self._seen = 0  # frames of the open event so far, from its start
        self._seen_at_end = 0  # ... up to its last anomalous frame
        self._taken_until: int | None = None  # index of the last frame an earlier event held
        self.current: Run[Picture] | None = None

    def observe(self, frame: Observation[Picture]) -> list[Change[Picture]]:
        self._window.append(frame)
        self._clean_run = 0 if frame.anomalous else self._clean_run + 1
        if self.current is not None:
            return self._extend(self.current, frame)
        if frame.anomalous and sum(f.anomalous for f in self._window) >= self.open_frames:
            return self._open()
        return []

    def finish(self) -> list[Change[Picture]]:
        """The source ended: an open event closes at its last anomalous frame."""
        if self.current is None:
            return []
        return [self._close(self.current)]

    def _open(self) -> list[Change[Picture]]:
        window = list(self._window)
        first = next(i for i, f in enumerate(window)
                     if f.anomalous and (self._taken_until is None or f.index > self._taken_until))
        held = window[first:]
        peak = max((f for f in held if f.anomalous), key=lambda f: f.score)
        run = Run(start=held[0], end=held[-1], frames=len(held), peak=peak)
        self._seen = self._seen_at_end = run.frames
        self.current = run
        changes = [Change("opened", run)]
        if self._seen >= self.max_frames:
            changes.append(self._close(run))
        return changes

    def _extend(self, run: Run[Picture], frame: Observation[Picture]) -> list[Change[Picture]]:
        self._seen += 1
        run.frames = self._seen
        if frame.anomalous:
            run.end = frame
            if frame.score > run.peak.score:
                run.peak = frame
            self._seen_at_end = self._seen
        if self._seen >= self.max_frames or self._clean_run >= self.close_frames:
            return [self._close(run)]
        return []

    def _close(self, run: Run[Picture]) -> Change[Picture]:
        """Close at the last anomalous frame: the clean frames after it are not part of the event."""
        run.frames = self._seen_at_end
        run.closed = True
        self._taken_until = run.end.index
        self.current = None
        return Change("closed", run)
