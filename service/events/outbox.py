"""The webhook outbox: deliveries waiting to be POSTed, one row each, in the table ``webhook_outbox``
of the project's database (``service/database``: the SQLite file in VAD_DATA_DIR, or PostgreSQL),
so they survive a restart.

A delivery is one event change (opened or closed) for one URL. ``seq`` orders them: each URL's
deliveries are sent oldest first, and the bound drops the oldest waiting ones of all URLs. Every call
opens its own short connection (the job workers use the same database).

Several replicas (service/replicas.py) share one outbox: a sender ``claim``s the head of a URL's queue
before sending it (``claimed_by``, in one write transaction with the head's row locked), and nobody
else sends that URL's deliveries while the claim stands, so each is sent by one replica at a time, in
order. A claim stands while its replica is live; ``reschedule`` (a failed attempt) and ``release`` (a
clean stop) give it back, and the claim of a replica that died is taken over once it is dead.
"""

from __future__ import annotations

import json
import uuid
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


@dataclass(frozen=True)
class Claim:
    """What ``claim`` found: a delivery to send now (claimed), or none, and then when to look again:
    ``due_in`` seconds when the head is waiting for its retry time, None (the queue is empty or
    another live replica is sending its head)."""

    delivery: Delivery | None
    due_in: float | None = None


def _delivery(row: object) -> Delivery:
    return Delivery(row["id"], row["url"], row["kind"], json.loads(row["event"]), row["attempts"], row["next_at"])  # type: ignore[index]


class OutboxStore:
    """Every call a short transaction of its own; the schema is brought up to date at the first."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def add(self, kind: str, event: dict[str, Any], urls: list[str], now: float, max_waiting: int) -> int:
        """One delivery of ``(kind, event)`` per URL, due now; then the oldest waiting deliveries beyond
        ``max_waiting`` are deleted (claimed ones are being sent, not waiting). Returns how many."""
        body = json.dumps(finite_json(event), separators=(",", ":"), allow_nan=False)
        with self.database.write() as db:
            db.executemany(
                "INSERT INTO webhook_outbox (id, url, kind, event, next_at, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(uuid.uuid4().hex, url, kind, body, now, now) for url in urls],
            )
            waiting = db.execute("SELECT COUNT(*) AS n FROM webhook_outbox WHERE claimed_by IS NULL").fetchone()["n"]
            excess = waiting - max_waiting
            if excess <= 0:
                return 0
            db.execute(
                "DELETE FROM webhook_outbox WHERE seq IN (SELECT seq FROM webhook_outbox WHERE claimed_by IS NULL"
                " ORDER BY seq LIMIT ?)", (excess,),
            )
            return excess

    def head(self, url: str) -> Delivery | None:
        """The oldest delivery waiting for ``url``."""
        with self.database.read() as db:
            row = db.execute(
                "SELECT id, url, kind, event, attempts, next_at FROM webhook_outbox WHERE url = ? ORDER BY seq LIMIT 1",
                (url,),
            ).fetchone()
        return None if row is None else _delivery(row)

    def claim(self, url: str, replica: str, now: float, live_since: float) -> Claim:
        """Claim ``url``'s oldest delivery for ``replica`` if it is due and nobody else holds it (a
        claim by a replica not seen since ``live_since`` is dead and taken over)."""
        if self.head(url) is None:  # nothing waiting: a read, not a write lock (SQLite's is the whole file's)
            return Claim(None)
        with self.database.write() as db:
            row = db.execute(
                "SELECT id, url, kind, event, attempts, next_at, claimed_by FROM webhook_outbox WHERE url = ? "
                f"ORDER BY seq LIMIT 1{self.database.dialect.lock_rows}", (url,),
            ).fetchone()
            if row is None:
                return Claim(None)
            holder = row["claimed_by"]
            if holder not in (None, replica) and db.execute(
                "SELECT 1 FROM replicas WHERE id = ? AND last_seen >= ?", (holder, live_since)
            ).fetchone() is not None:
                return Claim(None)
            if row["next_at"] > now:
                return Claim(None, row["next_at"] - now)
            db.execute("UPDATE webhook_outbox SET claimed_by = ? WHERE id = ?", (replica, row["id"]))
        return Claim(_delivery(row))

    def release(self, replica: str) -> int:
        """Give back every claim of ``replica`` (it stops); how many."""
        with self.database.write() as db:
            return db.execute("UPDATE webhook_outbox SET claimed_by = NULL WHERE claimed_by = ?", (replica,)).rowcount

    def remove(self, delivery_id: str) -> bool:
        """Delete a delivered or abandoned delivery; False when it was already gone."""
        with self.database.write() as db:
            return db.execute("DELETE FROM webhook_outbox WHERE id = ?", (delivery_id,)).rowcount > 0

    def reschedule(self, delivery_id: str, replica: str, attempts: int, next_at: float) -> bool:
        """After a failed attempt: retry at ``next_at``, the claim given back; False when ``replica``
        no longer held it (taken over after it was thought dead: the other replica's count stands)."""
        with self.database.write() as db:
            return db.execute(
                "UPDATE webhook_outbox SET attempts = ?, next_at = ?, claimed_by = NULL WHERE id = ? AND claimed_by = ?",
                (attempts, next_at, delivery_id, replica),
            ).rowcount > 0

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
