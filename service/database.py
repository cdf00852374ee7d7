"""The embedded database: one SQLite file in the data folder (service/jobs/layout.database_path) holds
the job queue, the cameras, the events and the webhook outbox, each in its own tables.

``open_database`` is the one way in: a connection in autocommit mode (callers say BEGIN IMMEDIATE
for writes), rows by column name, and a busy timeout so concurrent writers wait instead of failing.
The file is switched to write-ahead logging once per process; that switch needs the file to itself
for a moment, is not covered by SQLite's busy timeout, and so is retried here until the timeout.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_wal_ready: set[Path] = set()
_wal_lock = threading.Lock()
RETRY_S = 0.05


def open_database(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection to ``path`` (folder and file created when missing), in WAL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    connection.row_factory = sqlite3.Row
    connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    try:
        _ensure_wal(connection, path.resolve(), busy_timeout_s)
    except BaseException:
        connection.close()
        raise
    return connection


def _ensure_wal(connection: sqlite3.Connection, path: Path, busy_timeout_s: float) -> None:
    with _wal_lock:
        if path in _wal_ready:
            return
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                connection.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(RETRY_S)  # another connection (or process) holds the file a moment
        _wal_ready.add(path)


@contextmanager
def connected(path: Path, busy_timeout_s: float, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection, closed afterwards. ``write``: inside BEGIN IMMEDIATE (the write lock is taken
    before anything is read), committed at the end or rolled back on an exception."""
    connection = open_database(path, busy_timeout_s)
    try:
        if not write:
            yield connection
            return
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    finally:
        connection.close()


def create_tables(path: Path, busy_timeout_s: float, schema: str) -> None:
    """Run ``schema`` (statements separated by ';', each idempotent) in one write transaction."""
    with connected(path, busy_timeout_s, write=True) as connection:
        for statement in schema.split(";"):
            if statement.strip():
                connection.execute(statement)
