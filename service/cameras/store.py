"""The cameras a server watches, persisted in a table of the jobs' SQLite file
(service/jobs/layout.database_path: VAD_DATA_DIR/jobs.sqlite3), so they come back after a restart.

The URL is stored as given, credentials included (the server needs them to connect): it leaves this
module only to be opened, or through service.cameras.urls.redact. Blocking calls: run them in a thread.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.database import open_database
from service.jobs.layout import database_path

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS cameras (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    fps REAL NOT NULL CHECK (fps > 0 AND fps <= 60),
    enabled INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""


@dataclass(frozen=True)
class Camera:
    name: str
    url: str  # as given, credentials included: never returned or logged as is
    fps: float
    enabled: bool
    created_at: float
    updated_at: float


class CameraExistsError(Exception):
    pass


def _camera(row: sqlite3.Row) -> Camera:
    return Camera(row["name"], row["url"], row["fps"], bool(row["enabled"]), row["created_at"], row["updated_at"])


class CameraStore:
    """One table, a fresh connection per call (like the job store), WAL mode."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._ready = False

    @classmethod
    def in_data_dir(cls, data_dir: str | Path) -> "CameraStore":
        return cls(database_path(data_dir))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = open_database(self.path, self.busy_timeout_s)
        try:
            if not self._ready:
                connection.execute(SCHEMA)
                self._ready = True
            yield connection
        finally:
            connection.close()

    def list(self) -> list[Camera]:
        with self._connect() as db:
            return [_camera(row) for row in db.execute("SELECT * FROM cameras ORDER BY name")]

    def get(self, name: str) -> Camera | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM cameras WHERE name = ?", (name,)).fetchone()
        return _camera(row) if row else None

    def add(self, name: str, url: str, fps: float, enabled: bool) -> Camera:
        """CameraExistsError when the name is taken."""
        now = time.time()
        with self._connect() as db:
            try:
                db.execute("INSERT INTO cameras (name, url, fps, enabled, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                           (name, url, fps, int(enabled), now, now))
            except sqlite3.IntegrityError:
                raise CameraExistsError(name) from None
        return Camera(name, url, fps, enabled, now, now)

    def update(self, camera: Camera) -> Camera:
        """Store ``camera``'s url, fps and enabled (its name identifies it); updated_at is now."""
        now = time.time()
        with self._connect() as db:
            db.execute("UPDATE cameras SET url = ?, fps = ?, enabled = ?, updated_at = ? WHERE name = ?",
                       (camera.url, camera.fps, int(camera.enabled), now, camera.name))
        return Camera(camera.name, camera.url, camera.fps, camera.enabled, camera.created_at, now)

    def delete(self, name: str) -> bool:
        with self._connect() as db:
            return db.execute("DELETE FROM cameras WHERE name = ?", (name,)).rowcount > 0
