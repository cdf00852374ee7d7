"""What every store needs from its database, whichever it is: a connection to read with, a write
transaction, the schema brought up to date once (``service/database/migrations.py``), and the few
pieces of SQL where SQLite and PostgreSQL differ (``Dialect``).

The stores write their SQL once, with ``?`` placeholders (the PostgreSQL connection turns them into
psycopg's ``%s``) and the dialect's fragments where the two disagree; rows are read by column name
(``row["state"]``), and come back as the same Python values from both: Unix seconds as floats, JSON
documents as text the stores decode, flags as 0/1 integers.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from service.database.migrations import migrate


@dataclass(frozen=True)
class Dialect:
    """The SQL that differs between the two databases. The DDL fragments fill the migrations'
    ``{placeholders}``; the locking fragments end a SELECT inside a write transaction."""

    float_type: str  # an 8-byte float (PostgreSQL's REAL is 4 bytes: DOUBLE PRECISION there)
    binary_text: str  # text ordered byte by byte, as SQLite does (PostgreSQL's default follows the locale)
    serial_key: str  # an integer primary key the database numbers in insertion order
    insertion_order: str  # the column ordering training_jobs by insertion (ties on created_at)
    insertion_column: str  # DDL of that column where it has to be declared (PostgreSQL has no rowid)
    lock_rows: str  # rows about to be changed: locked until the transaction ends
    skip_locked: str  # as lock_rows, but rows another transaction holds are left out, not waited for


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """sqlite3.Connection's shape, which the PostgreSQL connection copies; rows support ``row[name]``."""

    def execute(self, sql: str, parameters: Sequence[Any] = ...) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> Cursor: ...


class Database(ABC):
    """One database: ``read()`` and ``write()`` hand out a fresh connection per operation (callers
    are threads and processes; nothing is shared between them), the schema migrated before the first."""

    dialect: Dialect

    def __init__(self) -> None:
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    @abstractmethod
    def connect(self, write: bool = False) -> AbstractContextManager[Connection]:
        """A connection, closed afterwards; ``write``: one transaction, committed at the end or rolled
        back on an exception. The schema is not checked: stores use ``read`` and ``write``."""

    @abstractmethod
    def _schema_exists(self) -> bool:
        """Whether the database has been created (the SQLite file, the PostgreSQL migrations table)."""

    @abstractmethod
    def lock(self, connection: Connection, key: int) -> None:
        """Inside a write transaction: take the lock ``key`` (an advisory lock number on PostgreSQL:
        migrations.SCHEMA_LOCK, cameras.store.CAMERAS_LOCK), held until the transaction ends. Writers holding one key run one at a time; it guards what a
        transaction counts before it writes (SQLite's write lock already serialises every writer)."""

    @abstractmethod
    def describe(self) -> str:
        """Where the database is, for messages (no password)."""

    def exists(self) -> bool:
        """Whether there is a database to read (readers create nothing)."""
        return self._schema_ready or self._schema_exists()

    def ensure_schema(self) -> None:
        """Bring the schema up to date, once per object (every process does it at its first use)."""
        with self._schema_lock:
            if not self._schema_ready:
                migrate(self)
                self._schema_ready = True

    @contextmanager
    def read(self) -> Iterator[Connection]:
        self.ensure_schema()
        with self.connect() as connection:
            yield connection

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction. SQLite: BEGIN IMMEDIATE, one writer at a time for the whole file.
        PostgreSQL: rows a transaction reads to change are locked with ``dialect.lock_rows``."""
        self.ensure_schema()
        with self.connect(write=True) as connection:
            yield connection


def not_in(column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
    """``column NOT IN (?, ...)`` and its parameters; always true for no values (PostgreSQL refuses
    an empty ``IN ()``, which SQLite accepts)."""
    if not values:
        return "1 = 1", []
    return f"{column} NOT IN ({', '.join('?' * len(values))})", list(values)
