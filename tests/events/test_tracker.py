"""The event hysteresis (service/events/tracker.py): open at k of n, close after m clean frames, the
maximum length splitting an endless run, the peak, and the end of a source."""

from __future__ import annotations

import pytest

from service.events.tracker import Change, EventTracker, Observation

TAU = 1.0


def feed(tracker: EventTracker[str], flags: str, scores: dict[int, float] | None = None) -> list[tuple[int, Change[str]]]:
    """Frames from a string of flags ('x' anomalous, '.' clean); returns (frame index, change)."""
    changes = []
    for index, flag in enumerate(flags):
        score = (scores or {}).get(index, 2.0 if flag == "x" else 0.5)
        for change in tracker.observe(Observation(index, 100.0 + index / 10, score, flag == "x", f"frame{index}")):
            changes.append((index, change))
    return changes


def summary(tracker: EventTracker[str], flags: str) -> list[tuple[int, str, int, int, int]]:
    """(frame index, kind, start index, end index, frames) of each change, taken at that change
    (the run object goes on changing while open)."""
    taken = []
    for index, flag in enumerate(flags):
        score = 2.0 if flag == "x" else 0.5
        for c in tracker.observe(Observation(index, 100.0 + index / 10, score, flag == "x", f"frame{index}")):
            taken.append((index, c.kind, c.run.start.index, c.run.end.index, c.run.frames))
    return taken


def test_opens_at_k_of_n_from_the_first_flagged_frame() -> None:
    tracker: EventTracker[str] = EventTracker(3, 5, 10, 3000)
    changes = feed(tracker, "x...x.x.x")  # 2 of the last 5 at most until frame 8
    opened = changes[0]
    assert opened[0] == 8 and opened[1].kind == "opened"
    assert opened[1].run.start.index == 4  # the earliest flagged frame of the window 4..8
    assert opened[1].run.frames == 5 and tracker.current is opened[1].run


def test_isolated_flags_never_open() -> None:
    tracker: EventTracker[str] = EventTracker(3, 5, 10, 3000)
    assert feed(tracker, "x...x...x...x....xx....") == []
    assert tracker.current is None


def test_closes_after_m_clean_frames_at_the_last_flagged_one() -> None:
    tracker: EventTracker[str] = EventTracker(2, 3, 4, 3000)
    flags = "..xxx.x...x...."  # gaps of 3 clean frames keep it open; 4 close it
    assert summary(tracker, flags) == [(3, "opened", 2, 3, 2), (14, "closed", 2, 10, 9)]
    closed = feed(EventTracker(2, 3, 4, 3000), flags)[-1][1].run
    assert closed.closed and closed.end.at == pytest.approx(101.0)
    assert tracker.current is None


def test_a_closed_event_reopens_only_by_the_rule_again() -> None:
    tracker: EventTracker[str] = EventTracker(2, 3, 2, 3000)
    assert summary(tracker, "xx..x..xx..") == [(1, "opened", 0, 1, 2), (3, "closed", 0, 1, 2),
                                (8, "opened", 7, 8, 2), (10, "closed", 7, 8, 2)]


def test_maximum_length_splits_and_a_new_event_opens_at_once() -> None:
    tracker: EventTracker[str] = EventTracker(3, 5, 10, 6)
    assert summary(tracker, "xxxxxxxxxxxxxxx.........................") == [
        (2, "opened", 0, 2, 3), (5, "closed", 0, 5, 6),  # 6 frames: split
        (6, "opened", 6, 6, 1), (11, "closed", 6, 11, 6),  # the run goes on: opens at the next frame
        (12, "opened", 12, 12, 1), (17, "closed", 12, 14, 3),  # the rest: split again, at its last flag
    ]


def test_a_split_at_the_end_of_a_run_does_not_reopen() -> None:
    tracker: EventTracker[str] = EventTracker(3, 5, 10, 4)
    assert summary(tracker, "xxxx" + "." * 20) == [(2, "opened", 0, 2, 3), (3, "closed", 0, 3, 4)]


def test_peak_is_the_highest_score_of_the_event() -> None:
    tracker: EventTracker[str] = EventTracker(2, 3, 3, 3000)
    scores = {2: 3.0, 3: 1.5, 4: 8.0, 5: 7.5, 6: 2.2, 10: 9.9}  # 4: clean (and mis-scored); 10 after the close
    changes = feed(tracker, "..xx.xx...x", scores)
    opened, closed = changes[0][1].run, changes[1][1].run
    assert opened is closed  # one run, updated in place
    assert closed.peak.index == 5 and closed.peak.score == 7.5 and closed.peak.picture == "frame5"


def test_peak_while_opening_looks_at_the_whole_window() -> None:
    tracker: EventTracker[str] = EventTracker(3, 5, 3, 3000)
    changes = feed(tracker, "x.xx", {0: 8.0, 2: 3.0, 3: 4.0})
    assert changes[0][1].run.peak.index == 0


def test_finish_closes_an_open_event_at_its_last_flagged_frame() -> None:
    tracker: EventTracker[str] = EventTracker(2, 3, 10, 3000)
    feed(tracker, "xxx..")
    (change,) = tracker.finish()
    assert (change.kind, change.run.start.index, change.run.end.index, change.run.frames) == ("closed", 0, 2, 3)
    assert tracker.finish() == []


def test_k_one_opens_at_every_flag_and_max_one_closes_at_once() -> None:
    tracker: EventTracker[str] = EventTracker(1, 1, 1, 1)
    assert summary(tracker, "x.x") == [(0, "opened", 0, 0, 1), (0, "closed", 0, 0, 1),
                                (2, "opened", 2, 2, 1), (2, "closed", 2, 2, 1)]


@pytest.mark.parametrize("k, n", [(0, 5), (6, 5)])
def test_impossible_settings_are_refused(k: int, n: int) -> None:
    with pytest.raises(ValueError, match="VAD_EVENT_OPEN_FRAMES"):
        EventTracker(k, n, 10, 3000)
