"""The webhook outbox: deliveries waiting to be POSTed, one row each, in the table ``webhook_outbox``
of the project's database (``service/database``: the SQLite file in VAD_DATA_DIR, or PostgreSQL),
so they survive a restart.

A delivery is one event change (opened or closed) for one URL. ``seq`` orders them: each URL's
deliveries are sent oldest first, and the bound drops the oldest waiting ones of all URLs. Every call
opens its own short connection (the job workers use the same database).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from service.database.base import Database, not_in
from service.jobs.store import finite_json


@dataclass(frozen=True)
class Delivery:
    id: str  # 32 hex, the X-VAD-Delivery header (the same on every attempt)
    url: str
    kind: str  # opened | closed
    event: dict[str, Any]
    attempts: int  # attempts made so far
    next_at: float  # Unix seconds; not tried before then


class OutboxStore:
    """Every call a short transaction of its own; the schema is brought up to date at the first."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def add(
        self, kind: str, event: dict[str, Any], urls: list[str], now: float, max_waiting: int,
        in_flight: Collection[str] = (),
    ) -> int:
        """One delivery of ``(kind, event)`` per URL, due now; then the oldest waiting deliveries beyond
        ``max_waiting`` are deleted (``in_flight`` ones are being sent, not waiting). Returns how many."""
        body = json.dumps(finite_json(event), separators=(",", ":"), allow_nan=False)
        waiting_only, flying = not_in("id", list(in_flight))
        with self.database.write() as db:
            db.executemany(
                "INSERT INTO webhook_outbox (id, url, kind, event, next_at, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(uuid.uuid4().hex, url, kind, body, now, now) for url in urls],
            )
            waiting = db.execute(
                f"SELECT COUNT(*) AS n FROM webhook_outbox WHERE {waiting_only}", flying
            ).fetchone()["n"]
            excess = waiting - max_waiting
            if excess <= 0:
                return 0
            db.execute(
                f"DELETE FROM webhook_outbox WHERE seq IN (SELECT seq FROM webhook_outbox WHERE {waiting_only}"
                " ORDER BY seq LIMIT ?)", [*flying, excess],
            )
            return excess

    def head(self, url: str) -> Delivery | None:
        """The oldest delivery waiting for ``url``."""
        with self.database.read() as db:
            row = db.execute(
                "SELECT id, url, kind, event, attempts, next_at FROM webhook_outbox WHERE url = ? ORDER BY seq LIMIT 1",
                (url,),
            ).fetchone()
        if row is None:
            return None
        return Delivery(row["id"], row["url"], row["kind"], json.loads(row["event"]), row["attempts"], row["next_at"])

    def remove(self, delivery_id: str) -> bool:
        """Delete a delivered or abandoned delivery; False when it was already gone."""
        with self.database.write() as db:
            return db.execute("DELETE FROM webhook_outbox WHERE id = ?", (delivery_id,)).rowcount > 0

    def reschedule(self, delivery_id: str, attempts: int, next_at: float) -> None:
        with self.database.write() as db:
            db.execute("UPDATE webhook_outbox SET attempts = ?, next_at = ? WHERE id = ?", (attempts, next_at, delivery_id))

    def remove_other_urls(self, urls: list[str]) -> dict[str, int]:
        """Delete the deliveries to URLs not in ``urls`` (no longer configured); {url: deleted}."""
        others, configured = not_in("url", urls)
        with self.database.write() as db:
            gone = {
                row["url"]: row["n"] for row in db.execute(
                    f"SELECT url, COUNT(*) AS n FROM webhook_outbox WHERE {others} GROUP BY url", configured
                )
            }
            db.execute(f"DELETE FROM webhook_outbox WHERE {others}", configured)
        return gone

    def count(self) -> int:
        with self.database.read() as db:
            return db.execute("SELECT COUNT(*) AS n FROM webhook_outbox").fetchone()["n"]
