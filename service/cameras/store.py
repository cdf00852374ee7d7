"""The cameras a server watches, persisted in the ``cameras`` table of the project's database
(``service/database``: the SQLite file in VAD_DATA_DIR, or PostgreSQL with VAD_DATABASE_URL), so they
come back after a restart.

The URL is stored as given, credentials included (the server needs them to connect): it leaves this
module only to be opened, or through service.cameras.urls.redact. Blocking calls: run them in a thread.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from service.database.base import Database

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
COLUMNS = "name, url, fps, enabled, created_at, updated_at"
CAMERAS_LOCK = 0x76616402  # Database.lock's key: an add counts the table before it inserts ("vad" 2)


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


class CameraLimitError(Exception):
    """The table already holds as many cameras as allowed."""


def camera_from_row(row: Any) -> Camera:
    return Camera(row["name"], row["url"], row["fps"], bool(row["enabled"]), row["created_at"], row["updated_at"])


class CameraStore:
    """One table, a fresh connection per call (like the job store). Which replica runs each camera
    is kept in the same rows, by service/cameras/leases.py."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def list(self) -> list[Camera]:
        with self.database.read() as db:
            return [camera_from_row(row) for row in db.execute(f"SELECT {COLUMNS} FROM cameras ORDER BY name")]

    def get(self, name: str) -> Camera | None:
        with self.database.read() as db:
            row = db.execute(f"SELECT {COLUMNS} FROM cameras WHERE name = ?", (name,)).fetchone()
        return camera_from_row(row) if row else None

    def add(self, name: str, url: str, fps: float, enabled: bool, limit: int | None = None) -> Camera:
        """CameraExistsError when the name is taken; CameraLimitError when the table already holds
        ``limit`` cameras (counted in the same transaction under CAMERAS_LOCK, so replicas adding at
        once keep to it)."""
        now = time.time()
        with self.database.write() as db:
            self.database.lock(db, CAMERAS_LOCK)
            if limit is not None and db.execute("SELECT COUNT(*) AS n FROM cameras").fetchone()["n"] >= limit:
                if db.execute("SELECT 1 FROM cameras WHERE name = ?", (name,)).fetchone() is None:
                    raise CameraLimitError(name)
            added = db.execute(
                f"INSERT INTO cameras ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (name, url, fps, int(enabled), now, now),
            ).rowcount
        if added != 1:
            raise CameraExistsError(name)
        return Camera(name, url, fps, enabled, now, now)

    def update(self, camera: Camera) -> Camera:
        """Store ``camera``'s url, fps and enabled (its name identifies it); updated_at is now."""
        changed = self.patch(camera.name, camera.url, camera.fps, camera.enabled)
        assert changed is not None, camera.name
        return changed

    def patch(self, name: str, url: str | None = None, fps: float | None = None, enabled: bool | None = None) -> Camera | None:
        """Change the given fields only, in one statement (two changes at once both land); updated_at
        is now. None when there is no such camera."""
        with self.database.write() as db:
            row = db.execute(
                "UPDATE cameras SET url = COALESCE(?, url), fps = COALESCE(?, fps), enabled = COALESCE(?, enabled), "
                f"updated_at = ? WHERE name = ? RETURNING {COLUMNS}",
                (url, fps, None if enabled is None else int(enabled), time.time(), name),
            ).fetchone()
        return camera_from_row(row) if row else None

    def delete(self, name: str) -> bool:
        with self.database.write() as db:
            return db.execute("DELETE FROM cameras WHERE name = ?", (name,)).rowcount > 0
