"""The versioned schema (service/database/migrations.py): an SQLite file from before versioning is
upgraded in place with its rows; migrations run once, in order, under the schema lock, however many
processes start together; a failing one changes nothing; a schema newer than the code is refused."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable

import pytest

from service.cameras.store import CameraStore
from service.database.base import Database
from service.database.migrations import MIGRATIONS, Migration, SchemaTooNewError, migrate
from service.database.sqlite import SqliteDatabase
from service.events.outbox import OutboxStore
from service.events.store import EventQuery, EventStore
from service.jobs.layout import database_path
from service.jobs.store import SqlJobStore

# The tables as the stores created them before the schema was versioned (commit 3bc5ea8), each store
# its own, with the job store's PRAGMA user_version = 1.
UNVERSIONED_SQLITE = """
CREATE TABLE training_jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    options TEXT NOT NULL, config TEXT NOT NULL, footage TEXT NOT NULL, progress TEXT,
    history TEXT NOT NULL DEFAULT '[]', events TEXT NOT NULL DEFAULT '[]', version TEXT, error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, worker_id TEXT, lease_expires_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, activation TEXT, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, started_at REAL, finished_at REAL
);
CREATE INDEX training_jobs_state ON training_jobs (state, created_at);
PRAGMA user_version = 1;
CREATE TABLE cameras (
    name TEXT PRIMARY KEY, url TEXT NOT NULL, fps REAL NOT NULL CHECK (fps > 0 AND fps <= 60),
    enabled INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE events (
    id TEXT PRIMARY KEY, camera TEXT NOT NULL, source TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'closed')), start_at REAL NOT NULL, end_at REAL,
    last_at REAL NOT NULL, peak_score REAL NOT NULL, peak_frame INTEGER NOT NULL, model_version TEXT NOT NULL,
    frames INTEGER NOT NULL, picture_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX events_start ON events (start_at, id);
CREATE INDEX events_camera_start ON events (camera, start_at, id);
CREATE INDEX events_state ON events (state);
CREATE TABLE webhook_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, url TEXT NOT NULL, kind TEXT NOT NULL,
    event TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX webhook_outbox_url ON webhook_outbox (url, seq);
INSERT INTO training_jobs (id, state, options, config, footage, events, created_at, updated_at)
    VALUES ('0123456789abcdef0123456789abcdef', 'queued', '{"epochs":2}', '{}', '[]',
            '[{"at":1700000000.0,"event":"queued"}]', 1700000000.5, 1700000000.5);
INSERT INTO cameras VALUES ('lobby', 'rtsp://10.0.0.5/stream', 12.5, 1, 1700000001.0, 1700000001.0);
INSERT INTO events VALUES ('fedcba9876543210fedcba9876543210', 'lobby', 'camera', 'closed', 1700000002.0,
    1700000007.0, 1700000007.0, 2.5, 7, 'v0001', 50, 1234);
INSERT INTO webhook_outbox (id, url, kind, event, next_at, created_at)
    VALUES ('00000000000000000000000000000001', 'http://hooks', 'closed', '{"id":"e"}', 1700000008.0, 1700000008.0)
"""

NEWEST = MIGRATIONS[-1].version
PROBE = Migration(NEWEST + 1, "a probe table (not idempotent: a second run would fail)",
                  "CREATE TABLE probe (n INTEGER NOT NULL); INSERT INTO probe (n) VALUES (1)")


def versions(database: Database) -> list[int]:
    with database.connect() as connection:
        return [row["version"] for row in connection.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_an_sqlite_file_from_before_versioning_is_upgraded_in_place(tmp_path) -> None:
    path = database_path(tmp_path / "data")
    path.parent.mkdir()
    with sqlite3.connect(path) as old:
        old.executescript(UNVERSIONED_SQLITE)
    database = SqliteDatabase(path)
    jobs = SqlJobStore(database)
    (job,) = jobs.list()  # the first use migrates
    assert versions(database) == [m.version for m in MIGRATIONS]
    assert (job.id, job.state, job.options, job.created_at) == ("0123456789abcdef0123456789abcdef", "queued", {"epochs": 2}, 1700000000.5)
    assert [(c.name, c.fps, c.enabled) for c in CameraStore(database).list()] == [("lobby", 12.5, True)]
    (event,), _ = EventStore(database, tmp_path / "data").list(EventQuery())
    assert (event.id, event.end_at, event.picture_bytes) == ("fedcba9876543210fedcba9876543210", 1700000007.0, 1234)
    assert OutboxStore(database).head("http://hooks").event == {"id": "e"}
    claimed, _ = jobs.claim("w", lease_s=60, max_attempts=3)  # the old rows work as new ones
    assert claimed.id == job.id and claimed.attempts == 1
    assert migrate(SqliteDatabase(path)) == []  # recorded: nothing to do the next time


def test_migrations_run_once_in_order_whoever_starts_together(make_database: Callable[[], Database]) -> None:
    migrations = (*MIGRATIONS, PROBE)
    results: list[list[int]] = []
    failures: list[BaseException] = []
    start = threading.Barrier(6)

    def starting_process() -> None:
        database = make_database()  # its own connections, as another process's
        try:
            start.wait()
            results.append(migrate(database, migrations))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)

    threads = [threading.Thread(target=starting_process) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    everything = [m.version for m in migrations]
    assert sorted(results) == [[]] * 5 + [everything]  # one applied them all, in order; the others found them
    database = make_database()
    assert versions(database) == everything
    with database.connect() as connection:
        assert connection.execute("SELECT COUNT(*) AS n FROM probe").fetchone()["n"] == 1


def test_a_failing_migration_changes_nothing(make_database: Callable[[], Database]) -> None:
    database = make_database()
    migrate(database)
    broken = Migration(NEWEST + 1, "fails half-way", "CREATE TABLE probe (n INTEGER); SELECT * FROM no_such_table")
    with pytest.raises(Exception, match="no_such_table"):
        migrate(database, (*MIGRATIONS, broken))
    assert versions(database) == [m.version for m in MIGRATIONS]
    assert migrate(database, (*MIGRATIONS, PROBE)) == [NEWEST + 1]  # its probe table was rolled back with it: no clash


def test_a_schema_newer_than_the_code_is_refused(make_database: Callable[[], Database]) -> None:
    migrate(make_database(), (*MIGRATIONS, PROBE))
    with pytest.raises(SchemaTooNewError, match=f"schema version {NEWEST + 1}, newer than this version of vad knows \\({NEWEST}\\)"):
        make_database().ensure_schema()
