"""Which replica runs each camera: a lease in the ``cameras`` table (``owner``, ``lease_generation``,
``lease_until``), so that every enabled camera is watched by exactly one live replica at a time.

- **Claiming.** ``assign`` runs in one write transaction: SQLite's BEGIN IMMEDIATE serialises it with
  every other writer; on PostgreSQL the free cameras are read ``FOR UPDATE SKIP LOCKED``, so replicas
  claiming at once each take different cameras and none waits for another. A claim sets the owner,
  the lease's expiry (now + ``VAD_REPLICA_LEASE_S``) and a new generation.
- **The share.** A replica holds at most ``fair_share`` = ceil(enabled cameras / live replicas)
  cameras (and at most ``VAD_MAX_CAMERAS``): with more it gives up the surplus (its last by name),
  which the others then claim, so a new replica gets its share within a heartbeat or two.
- **Renewal and takeover.** The owner renews its leases at every heartbeat; a camera whose lease has
  expired (its owner was killed, lost the database, or stalled) is free, and claimed by the next
  replica with room, within ``VAD_REPLICA_LEASE_S`` plus one heartbeat. A clean stop releases at once.
- **Fencing.** What a camera's owner writes (its events: ``holds``) is written only while the row
  still names it with the generation it claimed; a replica that lost the lease, and writes late,
  changes nothing. It stops the camera at its next heartbeat, or, when it cannot reach the database,
  once its leases have run out by its own clock.

The owner also writes each camera's status (state, counters) at every renewal, so that any replica
can show it. Blocking calls: run them in a thread.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from service.cameras.store import COLUMNS, Camera, camera_from_row
from service.database.base import Connection, Database

LEASE_COLUMNS = "owner, lease_generation, lease_until, status"


@dataclass(frozen=True)
class Lease:
    """A camera held by a replica: the camera as stored, and the generation of the claim."""

    camera: Camera
    generation: int


@dataclass(frozen=True)
class Placement:
    """Where a camera runs, as any replica sees it: its lease and its owner's last status."""

    camera: Camera
    owner: str | None  # the replica holding an unexpired lease, else None
    generation: int
    status: dict[str, Any] | None  # what its (last) owner wrote at its last renewal


@dataclass(frozen=True)
class Assignment:
    held: dict[str, Lease]  # the cameras this replica may run now (renewed or newly claimed)
    surplus: list[Lease]  # held beyond its share: stop them, then ``release``
    share: int
    live_replicas: int


def fair_share(cameras: int, replicas: int, cap: int) -> int:
    """How many cameras one replica may hold: ceil(cameras / replicas), at most ``cap``."""
    return min(cap, math.ceil(cameras / max(1, replicas)))


class CameraLeases:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.dialect = database.dialect

    def assign(
        self, replica: str, now: float, lease_s: float, cap: int, statuses: dict[str, tuple[int, dict[str, Any]]],
    ) -> Assignment:
        """Renew this replica's leases (writing ``statuses``: {name: (generation, status)} of the
        cameras it runs), claim free cameras up to its share, and say what it holds and must give up."""
        live_since, until = now - lease_s, now + lease_s
        with self.database.write() as db:
            others = db.execute(
                "SELECT COUNT(*) AS n FROM replicas WHERE last_seen >= ? AND id <> ?", (live_since, replica)
            ).fetchone()["n"]
            enabled = db.execute("SELECT COUNT(*) AS n FROM cameras WHERE enabled = 1").fetchone()["n"]
            share = fair_share(enabled, others + 1, cap)
            db.execute("UPDATE cameras SET lease_until = ? WHERE owner = ? AND enabled = 1", (until, replica))
            db.executemany(
                "UPDATE cameras SET status = ? WHERE name = ? AND owner = ? AND lease_generation = ?",
                [(json.dumps(status), name, replica, generation) for name, (generation, status) in statuses.items()],
            )
            mine = [self._lease(row) for row in db.execute(
                f"SELECT {COLUMNS}, lease_generation FROM cameras WHERE owner = ? AND enabled = 1 ORDER BY name",
                (replica,),
            ).fetchall()]
            claimed = []
            if len(mine) < share:
                free = db.execute(
                    f"SELECT name FROM cameras WHERE enabled = 1 AND (owner IS NULL OR (owner <> ? AND "
                    f"(lease_until IS NULL OR lease_until < ?))) ORDER BY name LIMIT ?{self.dialect.skip_locked}",
                    (replica, now, share - len(mine)),
                ).fetchall()
                for row in free:
                    db.execute(
                        "UPDATE cameras SET owner = ?, lease_generation = lease_generation + 1, lease_until = ?, "
                        "status = NULL WHERE name = ?", (replica, until, row["name"]),
                    )
                    claimed.append(self._lease(db.execute(
                        f"SELECT {COLUMNS}, lease_generation FROM cameras WHERE name = ?", (row["name"],)).fetchone()))
        held = mine[:share] + claimed
        return Assignment({lease.camera.name: lease for lease in held}, mine[share:], share, others + 1)

    def release(self, replica: str, leases: list[Lease]) -> None:
        """Give cameras up (stopped here first): free for any replica at once."""
        with self.database.write() as db:
            db.executemany(
                "UPDATE cameras SET owner = NULL, lease_until = NULL WHERE name = ? AND owner = ? AND lease_generation = ?",
                [(lease.camera.name, replica, lease.generation) for lease in leases],
            )

    def holds(self, connection: Connection, name: str, replica: str, generation: int) -> bool:
        """Inside a write transaction: whether ``replica`` still holds ``name`` with ``generation``
        (the row locked until the transaction ends). A deleted camera is nobody's: True."""
        row = connection.execute(
            f"SELECT owner, lease_generation FROM cameras WHERE name = ?{self.dialect.lock_rows}", (name,)
        ).fetchone()
        return row is None or (row["owner"] == replica and row["lease_generation"] == generation)

    def placements(self, now: float, name: str | None = None) -> list[Placement]:
        """Every camera (or the one named) with its owner, by name."""
        where, values = ("WHERE name = ?", [name]) if name is not None else ("", [])
        with self.database.read() as db:
            rows = db.execute(f"SELECT {COLUMNS}, {LEASE_COLUMNS} FROM cameras {where} ORDER BY name", values).fetchall()
        return [
            Placement(
                camera_from_row(row),
                row["owner"] if row["lease_until"] is not None and row["lease_until"] >= now else None,
                row["lease_generation"], json.loads(row["status"]) if row["status"] else None,
            )
            for row in rows
        ]

    @staticmethod
    def _lease(row: Any) -> Lease:
        return Lease(camera_from_row(row), row["lease_generation"])
