"""The cameras table (service/cameras/store.py) on each database (the SQLite file, then a real
PostgreSQL server: ``make_database``): rows round-trip, names are unique and listed in byte order."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.cameras.store import Camera, CameraExistsError, CameraStore
from service.database.base import Database


def test_cameras_round_trip_and_names_are_unique(make_database: Callable[[], Database]) -> None:
    store = CameraStore(make_database())
    assert store.list() == [] and store.get("lobby") is None
    lobby = store.add("lobby", "rtsp://user:pw@10.0.0.5/stream", 12.5, enabled=False)
    with pytest.raises(CameraExistsError):
        store.add("lobby", "rtsp://other/stream", 5.0, enabled=True)
    names = ["cama", "cam_a", "cam-b", "cam0", "b"]
    for name in names:
        store.add(name, f"file:///footage/{name}.avi", 10.0, enabled=True)
    again = CameraStore(make_database())  # a restarted server
    assert again.get("lobby") == lobby and isinstance(lobby.enabled, bool) and lobby.fps == 12.5
    assert [camera.name for camera in again.list()] == sorted(names + ["lobby"])  # byte order, as Python's
    changed = again.update(Camera("lobby", "rtsp://user:pw@10.0.0.6/stream", 25.0, True, lobby.created_at, 0.0))
    assert store.get("lobby") == changed and changed.updated_at >= lobby.updated_at
    assert store.delete("lobby") and not store.delete("lobby") and store.get("lobby") is None
