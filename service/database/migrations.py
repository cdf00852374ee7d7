"""The schema, owned by the project and versioned: ``MIGRATIONS`` is the ordered list of changes,
``schema_migrations`` records which a database has had.

``migrate`` runs in one write transaction under the schema lock (SQLite: the file's write lock that
BEGIN IMMEDIATE takes; PostgreSQL: an advisory lock), so of processes starting together one applies
the missing migrations and the others then find them recorded. Both databases roll DDL back with the
transaction: a migration that fails leaves the schema as it was.

Migration 1 is the schema as it stood before it was versioned, written ``IF NOT EXISTS``: an SQLite
file from then is upgraded in place (its tables and rows kept, any missing table created, version 1
recorded). To change the schema, append a migration with the next number; never edit one that has
shipped. ``{placeholders}`` are the dialect's DDL fragments (``service/database/base.Dialect``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.database.base import Database, Dialect

log = logging.getLogger("vad.database")

SCHEMA_LOCK = 0x76616401  # Database.lock's key migrations run under ("vad" 1)


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer version of the project than this one."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str  # statements separated by ';'

    def statements(self, dialect: "Dialect") -> list[str]:
        text = self.sql.format(**dataclasses.asdict(dialect))
        return [statement.strip() for statement in text.split(";") if statement.strip()]


VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at {float_type} NOT NULL
)
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "training jobs, cameras, events and the webhook outbox", """
CREATE TABLE IF NOT EXISTS training_jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    options TEXT NOT NULL,
    config TEXT NOT NULL,
    footage TEXT NOT NULL,
    progress TEXT,
    history TEXT NOT NULL DEFAULT '[]',
    events TEXT NOT NULL DEFAULT '[]',
    version TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    lease_expires_at {float_type},
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    activation TEXT,
    created_at {float_type} NOT NULL,
    updated_at {float_type} NOT NULL,
    started_at {float_type},
    {insertion_column}finished_at {float_type}
);
CREATE INDEX IF NOT EXISTS training_jobs_state ON training_jobs (state, created_at);

CREATE TABLE IF NOT EXISTS cameras (
    name {binary_text} PRIMARY KEY,
    url TEXT NOT NULL,
    fps {float_type} NOT NULL CHECK (fps > 0 AND fps <= 60),
    enabled INTEGER NOT NULL,
    created_at {float_type} NOT NULL,
    updated_at {float_type} NOT NULL
);

CREATE TABLE IF NOT EXISTS events (
    id {binary_text} PRIMARY KEY,
    camera TEXT NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    start_at {float_type} NOT NULL,
    end_at {float_type},
    last_at {float_type} NOT NULL,
    peak_score {float_type} NOT NULL,
    peak_frame INTEGER NOT NULL,
    model_version TEXT NOT NULL,
    frames INTEGER NOT NULL,
    picture_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_start ON events (start_at, id);
CREATE INDEX IF NOT EXISTS events_camera_start ON events (camera, start_at, id);
CREATE INDEX IF NOT EXISTS events_state ON events (state);

CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq {serial_key},
    id TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at {float_type} NOT NULL,
    created_at {float_type} NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_outbox_url ON webhook_outbox (url, seq)
"""),
    # Several `vad serve` replicas on one database (service/replicas.py): who is alive, which replica
    # runs each camera (a lease: owner, generation, expiry; the owner's last status for the others to
    # show), which replica opened each event, and which replica is sending each webhook delivery.
    Migration(2, "replicas, camera leases, the replica of each event, webhook delivery claims", """
CREATE TABLE replicas (
    id {binary_text} PRIMARY KEY,
    started_at {float_type} NOT NULL,
    last_seen {float_type} NOT NULL
);
ALTER TABLE cameras ADD COLUMN owner TEXT;
ALTER TABLE cameras ADD COLUMN lease_generation INTEGER NOT NULL DEFAULT 0;
ALTER TABLE cameras ADD COLUMN lease_until {float_type};
ALTER TABLE cameras ADD COLUMN status TEXT;
CREATE INDEX cameras_owner ON cameras (owner);
ALTER TABLE events ADD COLUMN replica TEXT;
ALTER TABLE webhook_outbox ADD COLUMN claimed_by TEXT
"""),
    # Each replica's event changes, for the other replicas' SSE streams (service/events/relay.py);
    # rows are kept for a minute.
    Migration(3, "event changes relayed between replicas", """
CREATE TABLE event_changes (
    seq {serial_key},
    replica TEXT NOT NULL,
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    at {float_type} NOT NULL
);
CREATE INDEX event_changes_at ON event_changes (at)
"""),
)


def migrate(database: "Database", migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply the migrations ``database`` has not had, in order; returns their versions (none: [])."""
    newest = max(migration.version for migration in migrations)
    applied = []
    with database.connect(write=True) as connection:
        database.lock(connection, SCHEMA_LOCK)
        connection.execute(VERSIONS_TABLE.format(**dataclasses.asdict(database.dialect)))
        done = {row["version"] for row in connection.execute("SELECT version FROM schema_migrations")}
        if done and max(done) > newest:
            raise SchemaTooNewError(
                f"database {database.describe()} has schema version {max(done)}, newer than this version of "
                f"vad knows ({newest}): run the newer vad, or restore a backup from before it"
            )
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version in done:
                continue
            for statement in migration.statements(database.dialect):
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            applied.append(migration.version)
    for version in applied:
        log.info("database %s: applied schema migration %d", database.describe(), version)
    return applied
