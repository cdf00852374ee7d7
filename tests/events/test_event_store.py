"""The event store (service/events/store.py) on each database (the SQLite file, then a real
PostgreSQL server: ``make_database``): rows and pictures, paging newest first, events left open by a
crash, retention by age and by size, nothing created by reads."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from service.database.base import Database
from service.events.store import HEATMAP, SNAPSHOT, EventQuery, EventRecord, EventStore
from service.jobs.store import SqlJobStore

NewStore = Callable[[], EventStore]


@pytest.fixture
def new_store(make_database: Callable[[], Database], tmp_path: Path) -> NewStore:
    """An EventStore on the test's database and data folder; each call a new one (a restarted server)."""
    return lambda: EventStore(make_database(), tmp_path / "data")


def record(start: float, state: str = "closed", camera: str = "cam1", picture_bytes: int = 0) -> EventRecord:
    return EventRecord(
        id=uuid.uuid4().hex, camera=camera, source="camera", state=state, start_at=start,
        end_at=start + 5 if state == "closed" else None, last_at=start + 5, peak_score=2.5, peak_frame=7,
        model_version="v0001", frames=50, picture_bytes=picture_bytes,
    )


def saved_with_pictures(store: EventStore, start: float, size: int = 1000, state: str = "closed") -> EventRecord:
    event = record(start, state)
    event.picture_bytes = store.write_pictures(event.id, b"j" * (size // 2), b"p" * (size - size // 2))
    store.save(event)
    return event


def test_reads_create_nothing(new_store: NewStore, tmp_path: Path) -> None:
    store = new_store()
    assert store.list(EventQuery()) == ([], None)
    assert store.get(uuid.uuid4().hex) is None
    assert store.close_dangling(time.time(), "r1") == [] and store.prune(time.time(), 1) == []
    assert not (tmp_path / "data").exists() and not store.exists()


def test_shares_the_job_database_with_the_job_queue(new_store: NewStore, make_database: Callable[[], Database]) -> None:
    jobs = SqlJobStore(make_database())
    jobs.submit(uuid.uuid4().hex, {}, {}, [])
    store = new_store()
    event = record(1000.0)
    store.save(event)
    assert new_store().get(event.id) == event  # a new instance (a restarted server) reads it
    assert len(jobs.list()) == 1 and len(SqlJobStore(make_database()).list()) == 1


def test_pages_newest_first_with_filters(new_store: NewStore) -> None:
    store = new_store()
    events = [record(1000.0 + i // 2, camera=f"cam{i % 3}") for i in range(25)]  # ties on start
    for event in events:
        store.save(event)
    expected = sorted(events, key=lambda e: (e.start_at, e.id), reverse=True)
    seen, cursor = [], None
    while True:
        page, cursor = store.list(EventQuery(limit=7, cursor=cursor))
        seen += page
        if cursor is None:
            break
    assert [e.id for e in seen] == [e.id for e in expected]
    page, cursor = store.list(EventQuery(camera="cam1", since=1003.0, until=1008.0))
    assert cursor is None
    assert [e.id for e in page] == [e.id for e in expected if e.camera == "cam1" and 1003 <= e.start_at < 1008]


def test_pictures_are_written_whole_and_replaced(new_store: NewStore) -> None:
    store = new_store()
    event = record(1000.0)
    assert store.write_pictures(event.id, b"first", b"map1") == 9
    assert store.write_pictures(event.id, b"second!", b"map22") == 12
    assert store.picture(event.id, SNAPSHOT).read_bytes() == b"second!"
    assert store.picture(event.id, HEATMAP).read_bytes() == b"map22"
    assert sorted(p.name for p in store.folder(event.id).iterdir()) == [HEATMAP, SNAPSHOT]  # no temp file left
    assert store.picture(event.id, "other.txt") is None and store.picture("../x", SNAPSHOT) is None


def test_events_left_open_are_closed_at_their_last_frame(new_store: NewStore) -> None:
    store = new_store()
    dangling, done = record(1000.0, state="open"), record(900.0)
    dangling.last_at = 1012.5
    store.save(dangling)
    store.save(done)
    (closed,) = new_store().close_dangling(time.time(), "r1")  # recorded before replicas were: nobody's
    assert closed.id == dangling.id and closed.state == "closed" and closed.end_at == 1012.5
    assert store.get(dangling.id).state == "closed" and store.get(dangling.id).end_at == 1012.5
    assert store.get(done.id) == done
    assert store.close_dangling(time.time(), "r1") == []


def test_retention_by_age_spares_open_events(new_store: NewStore) -> None:
    store = new_store()
    now = time.time()
    old, recent = saved_with_pictures(store, now - 40 * 86400), saved_with_pictures(store, now - 3600)
    old_open = saved_with_pictures(store, now - 40 * 86400, state="open")
    assert store.prune(now - 30 * 86400, 10**9) == [old.id]
    assert store.get(old.id) is None and not store.folder(old.id).exists()
    assert store.get(recent.id) is not None and store.picture(recent.id, SNAPSHOT) is not None
    assert store.get(old_open.id) is not None


def test_retention_by_size_deletes_the_oldest_first(new_store: NewStore) -> None:
    store = new_store()
    now = time.time()
    events = [saved_with_pictures(store, now - 1000 + i, size=1000) for i in range(6)]
    deleted = store.prune(now - 86400, 3500)
    assert deleted == [e.id for e in events[:3]]  # 6000 bytes -> 3000: the three oldest go
    assert [e.id for e in store.list(EventQuery())[0]] == [e.id for e in reversed(events[3:])]
    assert all(not store.folder(e.id).exists() for e in events[:3])
    assert store.prune(now - 86400, 3500) == []


def test_orphan_picture_folders_are_removed(new_store: NewStore) -> None:
    store = new_store()
    kept = saved_with_pictures(store, 1000.0)
    orphan = record(1001.0)
    store.write_pictures(orphan.id, b"j", b"p")  # a crash before its row was written
    assert store.remove_orphan_pictures(time.time() - 60) == 0  # just written: maybe another replica's new event
    assert store.remove_orphan_pictures(time.time() + 1) == 1
    assert not store.folder(orphan.id).exists() and store.folder(kept.id).exists()


def test_saving_again_replaces_the_row(new_store: NewStore) -> None:
    store = new_store()
    event = record(1000.0, state="open")
    store.save(event)
    event.state, event.end_at, event.frames, event.peak_score = "closed", 1009.25, 93, 3.75
    store.save(event)
    assert new_store().get(event.id) == event and len(store.list(EventQuery())[0]) == 1
