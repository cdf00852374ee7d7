"""The embedded database, the default: one SQLite file in the data folder
(``service/jobs/layout.database_path``: ``VAD_DATA_DIR/jobs.sqlite3``) shared by the server and the
workers of one host.

``open_database`` is the one way into the file: a connection in autocommit mode (write transactions
say BEGIN IMMEDIATE), rows by column name, and a busy timeout so concurrent writers wait instead of
failing. The file is switched to write-ahead logging once per process (readers never block the
writer); that switch needs the file to itself for a moment, is not covered by SQLite's busy timeout,
and so is retried here until the timeout.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.database.base import Connection, Database, Dialect
from service.jobs.layout import database_path

# BEGIN IMMEDIATE takes the file's write lock before a transaction reads anything: writers run one
# at a time, so nothing needs locking row by row.
SQLITE = Dialect(
    float_type="REAL", binary_text="TEXT", serial_key="INTEGER PRIMARY KEY AUTOINCREMENT", insertion_order="rowid",
    insertion_column="", lock_rows="", skip_locked="",
)

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


class SqliteDatabase(Database):
    """One SQLite file, a fresh connection per operation."""

    dialect = SQLITE

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        super().__init__()
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s

    @classmethod
    def in_data_dir(cls, data_dir: str | Path) -> "SqliteDatabase":
        return cls(database_path(data_dir))

    def _schema_exists(self) -> bool:
        return self.path.is_file()

    def lock(self, connection: Connection, key: int) -> None:
        """Nothing to add: BEGIN IMMEDIATE already holds the file's write lock."""

    def describe(self) -> str:
        return str(self.path)

    @contextmanager
    def connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        connection = open_database(self.path, self.busy_timeout_s)
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
