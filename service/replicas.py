"""Replicas: the `vad serve` processes sharing one database (SQLite on one host, PostgreSQL across
hosts), each with an identity and a heartbeat, so that they can share out what only one of them may
do at a time: watching each camera (service/cameras/leases.py) and sending each webhook delivery
(service/events/outbox.py), and know whose open events are left behind by a replica that died.

Each process is one ``Replica``: an id (``VAD_REPLICA_ID``, else ``hostname-pid-random``), a row in the
table ``replicas`` whose ``last_seen`` it renews every ``VAD_REPLICA_LEASE_S / 3``. A replica is
**live** while its ``last_seen`` is at most ``VAD_REPLICA_LEASE_S`` old, dead after that (kill -9, a
lost host, a database it cannot reach); a clean stop deletes its row at once. Every heartbeat also
deletes the rows of dead replicas. As often, in a loop of its own, the replica runs the callbacks its
parts registered (``on_tick``): the cameras rebalance, the events of dead replicas are closed.

Times are each process's ``time.time()``: replicas on several hosts need synchronised clocks (NTP),
well within the lease, as the job leases do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.background import cancel_and_wait
from service.database import database_errors, database_for
from service.database.base import Database
from service.settings import Settings

log = logging.getLogger("vad.replicas")

Tick = Callable[[], Awaitable[None]]
Clock = Callable[[], float]


def new_replica_id() -> str:
    """``hostname-pid-random``: unique even where containers all run as pid 1 on one hostname."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class ReplicaRow:
    id: str
    started_at: float
    last_seen: float


class ReplicaStore:
    """The table ``replicas``; every call a short transaction of its own (blocking: run in a thread)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def heartbeat(self, replica: str, started_at: float, now: float) -> None:
        """Record ``replica`` as seen at ``now`` (its row created again if a sweep had removed it)."""
        with self.database.write() as db:
            db.execute(
                "INSERT INTO replicas (id, started_at, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen",
                (replica, started_at, now),
            )

    def live(self, since: float) -> list[ReplicaRow]:
        """The replicas seen at or after ``since``, by id."""
        with self.database.read() as db:
            rows = db.execute(
                "SELECT id, started_at, last_seen FROM replicas WHERE last_seen >= ? ORDER BY id", (since,)
            ).fetchall()
        return [ReplicaRow(row["id"], row["started_at"], row["last_seen"]) for row in rows]

    def sweep(self, since: float) -> list[str]:
        """Delete the rows of replicas not seen since ``since`` (dead); their ids."""
        with self.database.write() as db:
            rows = db.execute("DELETE FROM replicas WHERE last_seen < ? RETURNING id", (since,)).fetchall()
        return sorted(row["id"] for row in rows)

    def remove(self, replica: str) -> None:
        with self.database.write() as db:
            db.execute("DELETE FROM replicas WHERE id = ?", (replica,))


class Replica:
    """This process as one of the replicas (see the module docstring). ``start`` registers it (and
    fails, stopping the server, when the database cannot be reached); ``stop`` deletes its row."""

    def __init__(self, settings: Settings, database: Database | None = None, clock: Clock = time.time) -> None:
        self.id = settings.replica_id or new_replica_id()
        self.lease_s = settings.replica_lease_s
        self.interval_s = settings.replica_lease_s / 3
        self.database = database or database_for(settings)  # the one the server's stores share
        self.store = ReplicaStore(self.database)
        self.clock = clock
        self.started_at = clock()
        self._ticks: list[Tick] = []
        self._tasks: list[asyncio.Task[None]] = []
        # other live replicas at the last heartbeat: what only several replicas need (the cameras'
        # shared pictures) is skipped while this one is alone
        self.others_live = False

    def live_since(self) -> float:
        """The oldest ``last_seen`` of a live replica, now."""
        return self.clock() - self.lease_s

    def on_tick(self, tick: Tick) -> None:
        """Run ``tick()`` every heartbeat interval (its own errors are logged, never stop the others)."""
        self._ticks.append(tick)

    async def start(self) -> None:
        await asyncio.to_thread(self.store.heartbeat, self.id, self.started_at, self.clock())
        await self._count_others()
        log.info("replica %s: heartbeat every %.1f s, dead after %.1f s of silence", self.id, self.interval_s, self.lease_s)
        # two loops: a slow tick (cameras stopping, say) never delays the heartbeat that keeps this replica live
        self._tasks = [asyncio.create_task(self._every_interval(self.heartbeat), name="vad-replica-heartbeat"),
                       asyncio.create_task(self._every_interval(self.tick), name="vad-replica-ticks")]

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []
        try:
            await asyncio.to_thread(self.store.remove, self.id)
        except database_errors():
            log.warning("replica %s: could not remove its row at stop; the others see it dead after %.0f s",
                        self.id, self.lease_s)

    async def heartbeat(self) -> None:
        """Renew this replica's row, and delete those of dead replicas."""
        try:
            await asyncio.to_thread(self.store.heartbeat, self.id, self.started_at, self.clock())
            dead = await asyncio.to_thread(self.store.sweep, self.live_since())
            if dead:
                log.warning("replica %s: replicas %s stopped heartbeating; their work is taken over", self.id, ", ".join(dead))
            await self._count_others()
        except database_errors():
            log.exception("replica %s: heartbeat failed; retrying in %.1f s", self.id, self.interval_s)

    async def _count_others(self) -> None:
        self.others_live = len(await asyncio.to_thread(self.store.live, self.live_since())) > 1

    async def tick(self) -> None:
        """Run every registered tick, in order."""
        for tick in self._ticks:
            try:
                await tick()
            except Exception:  # noqa: BLE001 - one failing part must not stop the others
                log.exception("replica %s: %r failed", self.id, tick)

    async def _every_interval(self, step: Tick) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await step()
