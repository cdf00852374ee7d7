"""Where events are kept: the table ``events`` of the project's database (``service/database``, next
to the jobs' tables) and two pictures per event under the data folder.

    VAD_DATA_DIR/jobs.sqlite3                   the database, by default (or PostgreSQL: VAD_DATABASE_URL)
    VAD_DATA_DIR/events/<id>/snapshot.jpg       the peak frame
    VAD_DATA_DIR/events/<id>/heatmap.png        its anomaly map drawn over it

As the job store does: a fresh connection per operation (callers run these methods in worker
threads), the schema brought up to date at the first write (reads before there is a database create
nothing). Pictures are written to a temp file and renamed, so a reader never sees half a picture.
Every method is blocking.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.database.base import Connection, Database
from service.files import write_atomically

EVENT_ID = re.compile(r"^[0-9a-f]{32}$")
SNAPSHOT, HEATMAP = "snapshot.jpg", "heatmap.png"

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
    replica: str | None = None  # the replica that opened it (service/replicas.py); None: before replicas

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
UPSERT = (
    f"INSERT INTO events ({COLUMNS}) VALUES ({', '.join('?' * len(fields(EventRecord)))}) ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{f.name} = excluded.{f.name}" for f in fields(EventRecord) if f.name != "id")
    + " WHERE events.state = 'open'"  # a closed event is final: a late write of a replica that lost it changes nothing
)
Fence = Callable[[Connection], bool]  # inside the write: may this writer still write (service/cameras/leases.py)


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
    def __init__(self, database: Database, data_dir: str | Path) -> None:
        self.database = database
        self.pictures = Path(data_dir) / "events"

    # -- plumbing ---------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.database.exists()

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[Connection]:
        """Reads only call this once ``exists()``: nothing is created before the first event."""
        with self.database.write() if write else self.database.read() as connection:
            yield connection

    @staticmethod
    def _record(row: Any) -> EventRecord:
        return EventRecord(**{f.name: row[f.name] for f in fields(EventRecord)})

    def folder(self, event_id: str) -> Path:
        if not EVENT_ID.match(event_id):
            raise ValueError(f"not an event id: {event_id!r}")
        return self.pictures / event_id

    # -- writing ----------------------------------------------------------------------------------

    def save(self, record: EventRecord, fence: Fence | None = None) -> bool:
        """Insert or replace the event's row, unless it is closed already or ``fence`` refuses (in the
        same transaction); whether it was written."""
        with self._connection(write=True) as connection:
            if fence is not None and not fence(connection):
                return False
            return connection.execute(UPSERT, [getattr(record, f.name) for f in fields(EventRecord)]).rowcount > 0

    def write_pictures(self, event_id: str, snapshot: bytes, heatmap: bytes) -> int:
        """Write (atomically, replacing) the event's two pictures; returns their size in bytes."""
        folder = self.folder(event_id)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in ((SNAPSHOT, snapshot), (HEATMAP, heatmap)):
            write_atomically(folder / name, data)
        return len(snapshot) + len(heatmap)

    def close_dangling(self, live_since: float, replica: str, own: bool = True) -> list[EventRecord]:
        """Events left open by a server that is gone, closed at their last recorded frame: those of
        replicas not seen since ``live_since`` (dead, table ``replicas``), of no replica (recorded
        before replicas were), and with ``own`` (a starting server) those ``replica`` itself left from
        an earlier run under the same VAD_REPLICA_ID. Never those of another live replica."""
        if not self.exists():
            return []
        mine = "replica = ?" if own else "0 = 1"
        with self._connection(write=True) as connection:
            rows = connection.execute(
                f"UPDATE events SET state = 'closed', end_at = last_at WHERE state = 'open' AND (replica IS NULL OR "
                f"{mine} OR (replica <> ? AND replica NOT IN (SELECT id FROM replicas WHERE last_seen >= ?))) "
                f"RETURNING {COLUMNS}", [*([replica] if own else []), replica, live_since],
            ).fetchall()
        return [self._record(row) for row in rows]

    def close_open(self, source: str, camera: str) -> list[EventRecord]:
        """Close the open events of one source (a camera taken over from a replica that left them)."""
        if not self.exists():
            return []
        with self._connection(write=True) as connection:
            rows = connection.execute(
                "UPDATE events SET state = 'closed', end_at = last_at WHERE state = 'open' AND source = ? AND camera = ? "
                f"RETURNING {COLUMNS}", (source, camera),
            ).fetchall()
        return [self._record(row) for row in rows]

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
            total = connection.execute(
                "SELECT COALESCE(SUM(picture_bytes), 0) AS total FROM events").fetchone()["total"]
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

    def remove_orphan_pictures(self, untouched_since: float) -> int:
        """Delete picture folders no event owns (a crash between deleting rows and their files, or
        between writing pictures and the row) and not modified since ``untouched_since``: a replica
        writes an event's pictures just before its row, so recent folders may be another's new event."""
        if not self.pictures.is_dir():
            return 0
        kept: set[str] = set()
        if self.exists():
            with self._connection() as connection:
                kept = {row["id"] for row in connection.execute("SELECT id FROM events")}
        removed = 0
        for folder in self.pictures.iterdir():
            if (folder.is_dir() and EVENT_ID.match(folder.name) and folder.name not in kept
                    and folder.stat().st_mtime < untouched_since):
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
