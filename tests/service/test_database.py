"""The embedded database's one way in: every store (jobs, cameras, events, webhook outbox) opening the
same fresh file at once, as a starting server does, gets a working WAL connection."""

from __future__ import annotations

import sqlite3
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cameras.store import CameraStore
from service.database.sqlite import SqliteDatabase, open_database
from service.events.outbox import OutboxStore
from service.jobs.layout import database_path
from service.jobs.store import SqlJobStore
from service.settings import Settings


def test_stores_opening_a_fresh_file_at_once_all_get_in(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = database_path(data)
    start = threading.Barrier(8)
    failures: list[BaseException] = []

    def open_and_write(index: int) -> None:
        try:
            start.wait()
            with closing(open_database(path, 30.0)) as connection:
                connection.execute(f"CREATE TABLE IF NOT EXISTS t{index} (x INTEGER)")
                connection.execute(f"INSERT INTO t{index} VALUES ({index})")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)

    threads = [threading.Thread(target=open_and_write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert sum(check.execute(f"SELECT x FROM t{i}").fetchone()[0] for i in range(8)) == sum(range(8))
    # the stores' own tables go into the same file beside them
    assert CameraStore(SqliteDatabase(path)).list() == []
    assert SqlJobStore(SqliteDatabase(path)).list() == []
    assert OutboxStore(SqliteDatabase(path)).count() == 0
    with sqlite3.connect(path) as check:
        tables = {row[0] for row in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"cameras", "training_jobs", "webhook_outbox", "t0"} <= tables


@pytest.mark.parametrize("url", ["mysql://vad:s3cret-pw@db:3306/vad", "sqlite:///tmp/x?password=s3cret-pw"])
def test_a_database_url_of_another_kind_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=url)
    message = str(refused.value)
    assert "database_url" in message and "not a PostgreSQL URL" in message
    assert "s3cret-pw" not in message  # the URL's password never reaches a log


def test_an_unset_or_empty_database_url_is_the_embedded_sqlite_file() -> None:
    assert Settings().database_url is None
    assert not Settings(database_url="").database_url


def test_a_postgresql_url_without_the_driver_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    from service.cli import main

    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    monkeypatch.delitem(sys.modules, "service.database.postgres", raising=False)
    monkeypatch.setenv("VAD_DATABASE_URL", "postgresql://vad@db:5432/vad")
    monkeypatch.setenv("VAD_DATA_DIR", str(tmp_path))
    assert main(["worker", "--once"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "the PostgreSQL driver is missing" in error[0] and "[postgres]" in error[0], error
