"""The webhook outbox: deliveries waiting to be POSTed, one row each, in the jobs' SQLite file
(``VAD_DATA_DIR/jobs.sqlite3``, table ``webhook_outbox``), so they survive a restart.

A delivery is one event change (opened or closed) for one URL. ``seq`` orders them: each URL's
deliveries are sent oldest first, and the bound drops the oldest waiting ones of all URLs. Every call
opens its own short connection (the file is in WAL mode; the job workers write to it too).
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.database import connected, create_tables
from service.jobs.store import finite_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_outbox_url ON webhook_outbox (url, seq);
"""


@dataclass(frozen=True)
class Delivery:
    id: str  # 32 hex, the X-VAD-Delivery header (the same on every attempt)
    url: str
    kind: str  # opened | closed
    event: dict[str, Any]
    attempts: int  # attempts made so far
    next_at: float  # Unix seconds; not tried before then


class OutboxStore:
    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._initialised = False

    @contextmanager
    def _connection(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A connection, inside BEGIN IMMEDIATE when ``write``; the table is created on first use."""
        if not self._initialised:
            create_tables(self.path, self.busy_timeout_s, SCHEMA)
            self._initialised = True
        with connected(self.path, self.busy_timeout_s, write) as connection:
            yield connection

    def add(
        self, kind: str, event: dict[str, Any], urls: list[str], now: float, max_waiting: int,
        in_flight: Collection[str] = (),
    ) -> int:
        """One delivery of ``(kind, event)`` per URL, due now; then the oldest waiting deliveries beyond
        ``max_waiting`` are deleted (``in_flight`` ones are being sent, not waiting). Returns how many."""
        body = json.dumps(finite_json(event), separators=(",", ":"), allow_nan=False)
        with self._connection() as db:
            db.executemany(
                "INSERT INTO webhook_outbox (id, url, kind, event, next_at, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(uuid.uuid4().hex, url, kind, body, now, now) for url in urls],
            )
            flying = list(in_flight)
            marks = ",".join("?" * len(flying))
            waiting = db.execute(
                f"SELECT COUNT(*) FROM webhook_outbox WHERE id NOT IN ({marks})", flying
            ).fetchone()[0]
            excess = waiting - max_waiting
            if excess <= 0:
                return 0
            db.execute(
                f"DELETE FROM webhook_outbox WHERE seq IN (SELECT seq FROM webhook_outbox WHERE id NOT IN ({marks})"
                " ORDER BY seq LIMIT ?)", [*flying, excess],
            )
            return excess

    def head(self, url: str) -> Delivery | None:
        """The oldest delivery waiting for ``url``."""
        with self._connection(write=False) as db:
            row = db.execute(
                "SELECT id, url, kind, event, attempts, next_at FROM webhook_outbox WHERE url = ? ORDER BY seq LIMIT 1",
                (url,),
            ).fetchone()
        if row is None:
            return None
        return Delivery(row["id"], row["url"], row["kind"], json.loads(row["event"]), row["attempts"], row["next_at"])

    def remove(self, delivery_id: str) -> bool:
        """Delete a delivered or abandoned delivery; False when it was already gone."""
        with self._connection() as db:
            return db.execute("DELETE FROM webhook_outbox WHERE id = ?", (delivery_id,)).rowcount > 0

    def reschedule(self, delivery_id: str, attempts: int, next_at: float) -> None:
        with self._connection() as db:
            db.execute("UPDATE webhook_outbox SET attempts = ?, next_at = ? WHERE id = ?", (attempts, next_at, delivery_id))

    def remove_other_urls(self, urls: list[str]) -> dict[str, int]:
        """Delete the deliveries to URLs not in ``urls`` (no longer configured); {url: deleted}."""
        marks = ",".join("?" * len(urls))
        with self._connection() as db:
            gone = {
                row[0]: row[1] for row in db.execute(
                    f"SELECT url, COUNT(*) FROM webhook_outbox WHERE url NOT IN ({marks}) GROUP BY url", urls
                )
            }
            db.execute(f"DELETE FROM webhook_outbox WHERE url NOT IN ({marks})", urls)
        return gone

    def count(self) -> int:
        with self._connection(write=False) as db:
            return db.execute("SELECT COUNT(*) FROM webhook_outbox").fetchone()[0]
