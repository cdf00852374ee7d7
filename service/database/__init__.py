"""The one database of the job queue, the cameras, the events and the webhook outbox.

- ``base``: ``Database`` (what every store uses: ``read()``, ``write()``, ``exists()``) and ``Dialect``
  (the SQL that differs between the two);
- ``sqlite``: the embedded default, one file in the data folder, for the server and workers of one host;
- ``postgres``: PostgreSQL (``VAD_DATABASE_URL``), for servers and workers on several hosts;
- ``migrations``: the versioned schema both are kept at.

``database_for(settings)`` picks one; every store is built on what it returns.
"""

from __future__ import annotations

import sqlite3
import sys

from model.config import ConfigError
from service.database.base import Database
from service.database.sqlite import SqliteDatabase
from service.settings import Settings


def database_for(settings: Settings) -> Database:
    """PostgreSQL when VAD_DATABASE_URL is set, else the SQLite file in VAD_DATA_DIR."""
    if settings.database_url is None:
        return SqliteDatabase.in_data_dir(settings.data_dir)
    try:
        from service.database.postgres import PostgresDatabase
    except ImportError as exc:
        raise ConfigError(
            f"VAD_DATABASE_URL is set but the PostgreSQL driver is missing ({exc}): "
            "pip install 'vad-alocc[postgres]' (psycopg 3)"
        ) from None
    return PostgresDatabase(settings.database_url.get_secret_value())


def database_errors() -> tuple[type[Exception], ...]:
    """The exceptions a database call may raise when the database is busy or unreachable, for
    ``except database_errors():`` in loops that retry. psycopg's only once something imported it
    (nothing else can raise them), so SQLite-only processes never load the driver."""
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    if "psycopg" in sys.modules:
        errors += (sys.modules["psycopg"].Error,)
    return errors
