"""Where events are kept: a table in the jobs' SQLite file (``service/jobs/layout.database_path``) and
two pictures per event under the data folder.

    VAD_DATA_DIR/jobs.sqlite3                   table ``events`` (this module), next to the jobs' tables
    VAD_DATA_DIR/events/<id>/snapshot.jpg       the peak frame
    VAD_DATA_DIR/events/<id>/heatmap.png        its anomaly map drawn over it

As the job store does: a fresh connection per operation (callers run these methods in worker
threads), WAL mode, the schema created idempotently at the first write (reads of a data folder
without a database create nothing). Pictures are written to a temp file
and renamed, so a reader never sees half a picture. Every method is blocking.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.database import connected, create_tables
from service.jobs.layout import database_path

EVENT_ID = re.compile(r"^[0-9a-f]{32}$")
SNAPSHOT, HEATMAP = "snapshot.jpg", "heatmap.png"

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    camera TEXT NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    start_at REAL NOT NULL,
    end_at REAL,
    last_at REAL NOT NULL,
    peak_score REAL NOT NULL,
    peak_frame INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    frames INTEGER NOT NULL,
    picture_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_start ON events (start_at, id);
CREATE INDEX IF NOT EXISTS events_camera_start ON events (camera, start_at, id);
CREATE INDEX IF NOT EXISTS events_state ON events (state)
"""


@dataclass
class EventRecord:
    """One event's row. Times are unix seconds; ``last_at`` is the newest frame time recorded (what
    ``end_at`` becomes if the server dies while the event is open); ``picture_bytes`` counts towards
    the size limit."""

    id: str
    camera: str
    source: str
    state: str
    start_at: float
    end_at: float | None
    last_at: float
    peak_score: float
    peak_frame: int
    model_version: str
    frames: int
    picture_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """The event as the API, SSE and webhooks carry it."""
        return {
            "id": self.id, "camera": self.camera, "source": self.source, "state": self.state,
            "start": iso_utc(self.start_at), "end": iso_utc(self.end_at) if self.end_at is not None else None,
            "peak_score": self.peak_score, "peak_frame": self.peak_frame, "model_version": self.model_version,
            "frames": self.frames, "snapshot_url": f"/v1/events/{self.id}/{SNAPSHOT}",
            "heatmap_url": f"/v1/events/{self.id}/{HEATMAP}",
        }


COLUMNS = ", ".join(f.name for f in fields(EventRecord))


def iso_utc(at: float) -> str:
    """Unix seconds -> ``2024-05-01T14:02:11.250Z``."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class EventQuery:
    """A page of ``GET /v1/events``: newest first (by start, then id), after ``cursor`` (the
    (start_at, id) of the previous page's last event)."""

    camera: str | None = None
    source: str | None = None
    since: float | None = None  # start_at >= since
    until: float | None = None  # start_at < until
    limit: int = 50
    cursor: tuple[float, str] | None = None


class EventStore:
    def __init__(self, data_dir: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = database_path(data_dir)
        self.pictures = Path(data_dir) / "events"
        self.busy_timeout_s = busy_timeout_s
        self._initialised = False

    # -- plumbing ---------------------------------------------------------------------------------

    def initialise(self) -> None:
        """Create the folder, the database file and the table if missing (idempotent)."""
        if not self._initialised:
            create_tables(self.path, self.busy_timeout_s, SCHEMA)
            self._initialised = True

    def exists(self) -> bool:
        return self._initialised or self.path.is_file()

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """Reads only call this once ``exists()``: nothing is created before the first event."""
        self.initialise()
        with connected(self.path, self.busy_timeout_s, write) as connection:
            yield connection

    @staticmethod
    def _record(row: sqlite3.Row) -> EventRecord:
        return EventRecord(**{key: row[key] for key in row.keys()})

    def folder(self, event_id: str) -> Path:
        if not EVENT_ID.match(event_id):
            raise ValueError(f"not an event id: {event_id!r}")
        return self.pictures / event_id

    # -- writing ----------------------------------------------------------------------------------

    def save(self, record: EventRecord) -> None:
        """Insert or replace the event's row."""
        values = [getattr(record, f.name) for f in fields(EventRecord)]
        with self._connection(write=True) as connection:
            connection.execute(
                f"INSERT OR REPLACE INTO events ({COLUMNS}) VALUES ({', '.join('?' * len(values))})", values
            )

    def write_pictures(self, event_id: str, snapshot: bytes, heatmap: bytes) -> int:
        """Write (atomically, replacing) the event's two pictures; returns their size in bytes."""
        folder = self.folder(event_id)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in ((SNAPSHOT, snapshot), (HEATMAP, heatmap)):
            handle, temp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
                os.replace(temp, folder / name)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        return len(snapshot) + len(heatmap)

    def close_dangling(self) -> list[EventRecord]:
        """Events left open by a server that died: closed, ending at their last recorded frame."""
        if not self.exists():
            return []
        with self._connection(write=True) as connection:
            rows = connection.execute(f"SELECT {COLUMNS} FROM events WHERE state = 'open'").fetchall()
            connection.execute("UPDATE events SET state = 'closed', end_at = last_at WHERE state = 'open'")
        records = [self._record(row) for row in rows]
        for record in records:
            record.state, record.end_at = "closed", record.last_at
        return records

    def prune(self, older_than: float, max_bytes: int) -> list[str]:
        """Delete closed events that ended before ``older_than`` and then, oldest first, closed events
        until the pictures of all events fit in ``max_bytes``, with their pictures. Returns the ids
        deleted. Open events are never deleted."""
        if not self.exists():
            return []
        with self._connection(write=True) as connection:
            doomed = [row["id"] for row in connection.execute(
                "SELECT id FROM events WHERE state = 'closed' AND end_at < ?", (older_than,))]
            connection.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in doomed])
            total = connection.execute("SELECT COALESCE(SUM(picture_bytes), 0) FROM events").fetchone()[0]
            if total > max_bytes:
                for row in connection.execute(
                    "SELECT id, picture_bytes FROM events WHERE state = 'closed' ORDER BY start_at, id"
                ).fetchall():
                    if total <= max_bytes:
                        break
                    doomed.append(row["id"])
                    total -= row["picture_bytes"]
                    connection.execute("DELETE FROM events WHERE id = ?", (row["id"],))
        for event_id in doomed:
            shutil.rmtree(self.folder(event_id), ignore_errors=True)
        return doomed

    def remove_orphan_pictures(self) -> int:
        """Delete picture folders no event owns (a crash between deleting rows and their files, or
        between writing pictures and the row). Only safe while no source is recording (startup)."""
        if not self.pictures.is_dir():
            return 0
        kept: set[str] = set()
        if self.exists():
            with self._connection() as connection:
                kept = {row["id"] for row in connection.execute("SELECT id FROM events")}
        removed = 0
        for folder in self.pictures.iterdir():
            if folder.is_dir() and EVENT_ID.match(folder.name) and folder.name not in kept:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    # -- reading ----------------------------------------------------------------------------------

    def get(self, event_id: str) -> EventRecord | None:
        if not EVENT_ID.match(event_id) or not self.exists():
            return None
        with self._connection() as connection:
            row = connection.execute(f"SELECT {COLUMNS} FROM events WHERE id = ?", (event_id,)).fetchone()
        return self._record(row) if row else None

    def list(self, query: EventQuery) -> tuple[list[EventRecord], tuple[float, str] | None]:
        """(a page of events, the cursor of the next page or None when this is the last)."""
        where, values = [], []
        for column, value in (("camera", query.camera), ("source", query.source)):
            if value is not None:
                where.append(f"{column} = ?")
                values.append(value)
        if query.since is not None:
            where.append("start_at >= ?")
            values.append(query.since)
        if query.until is not None:
            where.append("start_at < ?")
            values.append(query.until)
        if query.cursor is not None:
            where.append("(start_at < ? OR (start_at = ? AND id < ?))")
            values.extend([query.cursor[0], query.cursor[0], query.cursor[1]])
        if not self.exists():
            return [], None
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._connection() as connection:
            rows = connection.execute(
                f"SELECT {COLUMNS} FROM events {clause} ORDER BY start_at DESC, id DESC LIMIT ?",
                [*values, query.limit + 1],
            ).fetchall()
        records = [self._record(row) for row in rows[: query.limit]]
        more = len(rows) > query.limit
        return records, (records[-1].start_at, records[-1].id) if more else None

    def picture(self, event_id: str, name: str) -> Path | None:
        """The path of one of an event's pictures, or None when the event or the picture is unknown."""
        if not EVENT_ID.match(event_id) or name not in (SNAPSHOT, HEATMAP):
            return None
        path = self.folder(event_id) / name
        return path if path.is_file() else None
