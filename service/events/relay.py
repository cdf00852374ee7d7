"""Event changes made on other replicas, to this replica's Server-Sent Events streams.

Each replica (a `vad serve` on the shared database, or a child of `vad serve --processes N`) scores its
own cameras, streams and clips, so its event bus only sees its own changes. Behind one port or a
load balancer, a browser's SSE stream lands on one replica; without this it would miss every event
of the cameras the others run.

- Every change published on this replica's bus is also written to the table ``event_changes`` (one
  short insert, like the webhook outbox's). Also while it is alone: a replica joining could not be
  told in time to see the changes of the next moments (a heartbeat apart), and changes are rare (an
  open event's at most every 2 s).
- Every ``POLL_S`` the replica reads the rows other replicas wrote since its last read and hands them
  to its SSE subscribers only (``EventBus.relay``): webhooks stay with the replica that made the
  change, which has already put them in the outbox.
- Rows are read by ``seq``. On PostgreSQL, transactions can commit out of ``seq`` order, so each
  read looks back ``LOOKBACK`` numbers below the highest seen and skips the rows it already relayed.
  No clock is compared. A change relayed is at most ``POLL_S`` (plus a read) behind.
- Rows older than ``KEEP_S`` (by the deleting replica's clock) are deleted. A replica that could not
  read for longer than that misses those changes on its streams; they remain in ``GET /v1/events``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from service.background import cancel_and_wait
from service.database import database_errors
from service.database.base import Database
from service.events.bus import EventBus
from service.jobs.store import finite_json

log = logging.getLogger("vad.events")

POLL_S = 1.0
KEEP_S = 60.0
LOOKBACK = 1000  # seq numbers below the highest seen that a read looks at again (late commits)
PRUNE_EVERY = 30  # reads between deletions of old rows


class ChangeLog:
    """The table ``event_changes``; every call a short transaction of its own."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def add(self, replica: str, kind: str, event: dict[str, Any], at: float) -> None:
        body = json.dumps(finite_json(event), separators=(",", ":"), allow_nan=False)
        with self.database.write() as db:
            db.execute("INSERT INTO event_changes (replica, kind, event, at) VALUES (?, ?, ?, ?)", (replica, kind, body, at))

    def newest(self) -> int:
        """The highest seq so far (0: none)."""
        with self.database.read() as db:
            row = db.execute("SELECT MAX(seq) AS seq FROM event_changes").fetchone()
        return int(row["seq"] or 0)

    def after(self, seq: int, replica: str) -> list[tuple[int, str, str]]:
        """(seq, kind, event as JSON text) of the changes other replicas than ``replica`` wrote with a
        seq above ``seq``, in order."""
        with self.database.read() as db:
            rows = db.execute(
                "SELECT seq, kind, event FROM event_changes WHERE seq > ? AND replica <> ? ORDER BY seq", (seq, replica)
            ).fetchall()
        return [(int(row["seq"]), row["kind"], row["event"]) for row in rows]

    def prune(self, older_than: float) -> int:
        with self.database.write() as db:
            return db.execute("DELETE FROM event_changes WHERE at < ?", (older_than,)).rowcount


class EventRelay:
    """Writes this replica's changes to the change log and relays the other replicas' to ``bus``'s
    subscribers. ``attach`` before the first change; ``start``/``stop`` with the server."""

    def __init__(self, database: Database, replica: str, bus: EventBus, poll_s: float = POLL_S,
                 keep_s: float = KEEP_S) -> None:
        self.log = ChangeLog(database)
        self.replica = replica
        self.bus = bus
        self.poll_s, self.keep_s = poll_s, keep_s
        self._highest = self._floor = 0  # _floor: the newest change when this replica started
        self._relayed: set[int] = set()  # seqs within LOOKBACK of the highest, already relayed
        self._reads = 0
        self._task: asyncio.Task[None] | None = None

    def attach(self) -> None:
        self.bus.add_listener(self._record)

    def _record(self, kind: str, event: dict[str, Any]) -> None:
        try:
            self.log.add(self.replica, kind, event, time.time())
        except database_errors():  # the others' streams miss it; the change itself is stored and delivered
            log.warning("replica %s: could not write an event change for the other replicas' streams", self.replica)

    async def start(self) -> None:
        """From now on: the changes already in the log are not relayed."""
        self._highest = self._floor = await asyncio.to_thread(self.log.newest)
        self._task = asyncio.create_task(self._run(), name="vad-event-relay")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def poll(self) -> int:
        """One read: the other replicas' new changes to the subscribers; how many."""
        changes = await asyncio.to_thread(self.log.after, self._highest - LOOKBACK, self.replica)
        relayed = 0
        for seq, kind, event in changes:
            if seq in self._relayed or seq <= self._floor:
                continue  # relayed already (the look-back reads it again), or from before the start
            self._relayed.add(seq)
            self.bus.relay(kind, json.loads(event))
            relayed += 1
        if changes:
            self._highest = max(self._highest, changes[-1][0])
            self._relayed = {seq for seq in self._relayed if seq > self._highest - LOOKBACK}
        self._reads += 1
        if self._reads % PRUNE_EVERY == 0:
            await asyncio.to_thread(self.log.prune, time.time() - self.keep_s)
        return relayed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except database_errors():
                log.warning("replica %s: could not read the other replicas' event changes; retrying", self.replica)
