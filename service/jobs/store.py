"""Training jobs: a durable queue shared by the server (which submits and watches) and the workers.

``JobStore`` is the interface; ``SqlJobStore`` implements it on the project's database
(``service/database``): by default the embedded SQLite file in the data folder
(``VAD_DATA_DIR/jobs.sqlite3``), for the server and workers of one host; with ``VAD_DATABASE_URL``,
PostgreSQL, for servers and workers on any number of hosts. The same SQL and the same guarantees on both:

- ``claim`` hands a queued job to exactly one worker: the expired-lease sweep, the pick of the oldest
  queued job and the guarded ``UPDATE ... WHERE id = ? AND state = 'queued'`` run in one write
  transaction. On SQLite it is ``BEGIN IMMEDIATE``, which takes the file's write lock before reading,
  so two workers can never both see the job as queued; on PostgreSQL the pick is
  ``SELECT ... FOR UPDATE SKIP LOCKED``: the row is locked until the claim commits, and a concurrent
  claim passes over it to the next queued job instead of waiting for it (or taking it too);
- every other read-then-write (a heartbeat, progress, a finish, a cancel, the lease sweep) locks the
  job's row first (SQLite: the write lock; PostgreSQL: ``FOR UPDATE``), so checks and writes see the
  same job;
- a worker owns its job through a lease (``lease_expires_at``) that its heartbeat renews. Every
  write a worker makes is fenced by (worker id, attempt number): once a lease has expired and the job
  was requeued or taken by another worker, the old worker's writes change nothing and it is told so;
- an expired lease puts the job back in the queue (the next worker resumes from the last epoch
  checkpoint), fails it once it has been attempted ``max_attempts`` times, or cancels it if a cancel
  was pending.

Timestamps are Unix seconds (``time.time()`` of the process writing them), so workers on other
machines need synchronised clocks (NTP); JSON documents are stored as text, read back as written.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from service.database.base import Connection, Database

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
MAX_EVENTS = 200  # events kept per job (oldest dropped)

# What a worker's heartbeat or progress write learns about its job.
LeaseStatus = Literal["ok", "cancel", "lost"]


class JobNotFoundError(LookupError):
    pass


class JobFinishedError(Exception):
    """The job is already succeeded, failed or cancelled."""

    def __init__(self, job: "Job") -> None:
        super().__init__(f"training job {job.id} is already {job.state}")
        self.job = job


@dataclass
class Job:
    id: str
    state: str
    options: dict[str, Any]
    config: dict[str, Any]
    footage: list[dict[str, Any]]
    created_at: float
    updated_at: float
    progress: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    version: str | None = None
    error: str | None = None
    attempts: int = 0
    worker_id: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    activation: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


class JobStore(Protocol):
    """What the server and the workers need from a job queue (see the module docstring)."""

    def exists(self) -> bool:
        """Whether the queue has been created (readers do not create it)."""

    def submit(
        self, job_id: str, options: dict[str, Any], config: dict[str, Any], footage: list[dict[str, Any]]
    ) -> Job: ...

    def get(self, job_id: str) -> Job | None: ...

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""

    def counts(self) -> dict[str, int]: ...

    def reap(self, max_attempts: int) -> list[Job]:
        """Resolve expired leases; returns the jobs this call moved to a terminal state."""

    def claim(self, worker_id: str, lease_s: float, max_attempts: int) -> tuple[Job | None, list[Job]]:
        """(the oldest queued job, now running under this worker's lease, or None; jobs reaped)."""

    def heartbeat(self, job_id: str, worker_id: str, attempt: int, lease_s: float) -> LeaseStatus: ...

    def record_progress(
        self, job_id: str, worker_id: str, attempt: int, lease_s: float,
        progress: dict[str, Any], history: list[dict[str, Any]],
    ) -> LeaseStatus: ...

    def finish(
        self, job_id: str, worker_id: str, attempt: int, state: str,
        version: str | None = None, error: str | None = None,
    ) -> bool:
        """Record the outcome; False (and no change) when the worker no longer holds the job."""

    def release(self, job_id: str, worker_id: str, attempt: int, reason: str) -> bool:
        """Hand a running job back to the queue (worker shutting down); the attempt is not counted."""

    def request_cancel(self, job_id: str) -> Job:
        """queued -> cancelled at once; running -> cancel_requested (its worker stops it)."""

    def pending_activation(self) -> list[Job]:
        """Succeeded jobs whose version the activation policy has not yet decided on, oldest first."""

    def set_activation(self, job_id: str, decision: dict[str, Any]) -> bool: ...


def new_job_id() -> str:
    return uuid.uuid4().hex


def _dumps(value: Any) -> str:
    return json.dumps(finite_json(value), separators=(",", ":"), allow_nan=False)


def finite_json(value: Any) -> Any:
    """NaN/inf (e.g. an undefined AUC) become null, so every stored document is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


COLUMNS = (
    "id, state, options, config, footage, progress, history, events, version, error, attempts, worker_id, "
    "lease_expires_at, cancel_requested, activation, created_at, updated_at, started_at, finished_at"
)


def _row_to_job(row: Any) -> Job:
    return Job(
        id=row["id"], state=row["state"], options=json.loads(row["options"]), config=json.loads(row["config"]),
        footage=json.loads(row["footage"]), created_at=row["created_at"], updated_at=row["updated_at"],
        progress=json.loads(row["progress"]) if row["progress"] else None,
        history=json.loads(row["history"]), events=json.loads(row["events"]), version=row["version"],
        error=row["error"], attempts=row["attempts"], worker_id=row["worker_id"],
        lease_expires_at=row["lease_expires_at"], cancel_requested=bool(row["cancel_requested"]),
        started_at=row["started_at"], finished_at=row["finished_at"],
        activation=json.loads(row["activation"]) if row["activation"] else None,
    )


class SqlJobStore:
    """The queue in the project's database: a fresh connection per operation (thread- and
    process-safe; the worker's heartbeat thread and its training thread each use their own)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.dialect = database.dialect

    def exists(self) -> bool:
        return self.database.exists()

    @contextmanager
    def _read(self) -> Iterator[Connection | None]:
        """A connection for reading, or None while the queue does not exist yet (nothing is created)."""
        if not self.database.exists():
            yield None
            return
        with self.database.read() as connection:
            yield connection

    def _write(self) -> AbstractContextManager[Connection]:
        """A write transaction (the rows it reads to change are locked: ``_fetch(..., lock=True)``)."""
        return self.database.write()

    def _fetch(self, connection: Connection, job_id: str, lock: bool = False) -> Job | None:
        """The job; ``lock``: its row locked until the write transaction ends (it is about to change)."""
        row = connection.execute(
            f"SELECT {COLUMNS} FROM training_jobs WHERE id = ?{self.dialect.lock_rows if lock else ''}", (job_id,)
        ).fetchone()
        return _row_to_job(row) if row else None

    @staticmethod
    def _event(job: Job, now: float, event: str, **details: Any) -> str:
        events = job.events + [{"at": round(now, 3), "event": event, **details}]
        return _dumps(events[-MAX_EVENTS:])

    # -- reading ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self._read() as connection:
            return None if connection is None else self._fetch(connection, job_id)

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        with self._read() as connection:
            if connection is None:
                return []
            if state is None:
                rows = connection.execute(
                    f"SELECT {COLUMNS} FROM training_jobs ORDER BY created_at DESC, {self.dialect.insertion_order} DESC "
                    "LIMIT ?", (limit,)
                )
            else:
                rows = connection.execute(
                    f"SELECT {COLUMNS} FROM training_jobs WHERE state = ? "
                    f"ORDER BY created_at DESC, {self.dialect.insertion_order} DESC LIMIT ?", (state, limit),
                )
            return [_row_to_job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        found = {state: 0 for state in STATES}
        with self._read() as connection:
            if connection is not None:
                for row in connection.execute("SELECT state, COUNT(*) AS n FROM training_jobs GROUP BY state"):
                    found[row["state"]] = row["n"]
        return found

    def pending_activation(self) -> list[Job]:
        with self._read() as connection:
            if connection is None:
                return []
            rows = connection.execute(
                f"SELECT {COLUMNS} FROM training_jobs WHERE state = 'succeeded' AND activation IS NULL "
                f"ORDER BY finished_at, {self.dialect.insertion_order}"
            )
            return [_row_to_job(row) for row in rows]

    # -- the server's writes ---------------------------------------------------------------------

    def submit(
        self, job_id: str, options: dict[str, Any], config: dict[str, Any], footage: list[dict[str, Any]]
    ) -> Job:
        now = time.time()
        with self._write() as connection:
            connection.execute(
                "INSERT INTO training_jobs (id, state, options, config, footage, events, created_at, updated_at) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, _dumps(options), _dumps(config), _dumps(footage),
                 _dumps([{"at": round(now, 3), "event": "queued"}]), now, now),
            )
            job = self._fetch(connection, job_id)
        assert job is not None
        return job

    def request_cancel(self, job_id: str) -> Job:
        now = time.time()
        with self._write() as connection:
            job = self._fetch(connection, job_id, lock=True)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.finished:
                raise JobFinishedError(job)
            if job.state == "queued":
                connection.execute(
                    "UPDATE training_jobs SET state = 'cancelled', cancel_requested = 1, error = ?, events = ?, "
                    "updated_at = ?, finished_at = ? WHERE id = ?",
                    ("cancelled before it started", self._event(job, now, "cancelled"), now, now, job_id),
                )
            elif not job.cancel_requested:
                connection.execute(
                    "UPDATE training_jobs SET cancel_requested = 1, events = ?, updated_at = ? WHERE id = ?",
                    (self._event(job, now, "cancel_requested"), now, job_id),
                )
            updated = self._fetch(connection, job_id)
        assert updated is not None
        return updated

    def set_activation(self, job_id: str, decision: dict[str, Any]) -> bool:
        now = time.time()
        with self._write() as connection:
            cursor = connection.execute(
                "UPDATE training_jobs SET activation = ?, updated_at = ? WHERE id = ? AND activation IS NULL",
                (_dumps({**decision, "at": round(now, 3)}), now, job_id),
            )
            return cursor.rowcount == 1

    # -- leases ----------------------------------------------------------------------------------

    def _reap(self, connection: Connection, max_attempts: int, now: float) -> list[Job]:
        """Resolve the expired leases (rows another transaction holds are its to resolve)."""
        finished = []
        rows = connection.execute(
            f"SELECT {COLUMNS} FROM training_jobs WHERE state = 'running' AND lease_expires_at < ?"
            f"{self.dialect.skip_locked}", (now,)
        ).fetchall()
        for row in rows:
            job = _row_to_job(row)
            lost = {"attempt": job.attempts, "worker": job.worker_id}
            if job.cancel_requested:
                state, error = "cancelled", "cancelled (its worker stopped before acknowledging the cancel)"
            elif job.attempts >= max_attempts:
                state = "failed"
                error = (f"gave up after {job.attempts} attempt(s): each time the worker's lease expired "
                         f"(worker killed or stalled); VAD_JOB_MAX_ATTEMPTS={max_attempts}")
            else:
                connection.execute(
                    "UPDATE training_jobs SET state = 'queued', worker_id = NULL, lease_expires_at = NULL, "
                    "events = ?, updated_at = ? WHERE id = ?",
                    (self._event(job, now, "lease_expired", **lost), now, job.id),
                )
                continue
            connection.execute(
                "UPDATE training_jobs SET state = ?, error = ?, worker_id = NULL, lease_expires_at = NULL, "
                "events = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                (state, error, self._event(job, now, "lease_expired", **lost), now, now, job.id),
            )
            finished.append(self._fetch(connection, job.id))
        return [job for job in finished if job is not None]

    def reap(self, max_attempts: int) -> list[Job]:
        now = time.time()
        with self._read() as connection:  # a cheap read first: the write lock only when there is work
            if connection is None or connection.execute(
                "SELECT 1 FROM training_jobs WHERE state = 'running' AND lease_expires_at < ? LIMIT 1", (now,)
            ).fetchone() is None:
                return []
        with self._write() as connection:
            return self._reap(connection, max_attempts, time.time())

    def claim(self, worker_id: str, lease_s: float, max_attempts: int) -> tuple[Job | None, list[Job]]:
        now = time.time()
        with self._write() as connection:
            reaped = self._reap(connection, max_attempts, now)
            row = connection.execute(
                f"SELECT id FROM training_jobs WHERE state = 'queued' ORDER BY created_at, {self.dialect.insertion_order} "
                f"LIMIT 1{self.dialect.skip_locked}"
            ).fetchone()
            if row is None:
                return None, reaped
            job = self._fetch(connection, row["id"])
            assert job is not None
            cursor = connection.execute(
                "UPDATE training_jobs SET state = 'running', worker_id = ?, attempts = attempts + 1, "
                "lease_expires_at = ?, started_at = COALESCE(started_at, ?), events = ?, updated_at = ? "
                "WHERE id = ? AND state = 'queued'",
                (worker_id, now + lease_s, now,
                 self._event(job, now, "claimed", attempt=job.attempts + 1, worker=worker_id), now, job.id),
            )
            if cursor.rowcount != 1:  # cannot happen under the lock; kept as the guard it is
                return None, reaped
            return self._fetch(connection, job.id), reaped

    def _owned(self, connection: Connection, job_id: str, worker_id: str, attempt: int) -> Job | None:
        """The job, its row locked, if this worker still holds this attempt; else None (fenced off)."""
        job = self._fetch(connection, job_id, lock=True)
        if job is None or job.state != "running" or job.worker_id != worker_id or job.attempts != attempt:
            return None
        return job

    def heartbeat(self, job_id: str, worker_id: str, attempt: int, lease_s: float) -> LeaseStatus:
        now = time.time()
        with self._write() as connection:
            job = self._owned(connection, job_id, worker_id, attempt)
            if job is None:
                return "lost"
            connection.execute("UPDATE training_jobs SET lease_expires_at = ? WHERE id = ?", (now + lease_s, job_id))
            return "cancel" if job.cancel_requested else "ok"

    def record_progress(
        self, job_id: str, worker_id: str, attempt: int, lease_s: float,
        progress: dict[str, Any], history: list[dict[str, Any]],
    ) -> LeaseStatus:
        now = time.time()
        with self._write() as connection:
            job = self._owned(connection, job_id, worker_id, attempt)
            if job is None:
                return "lost"
            connection.execute(
                "UPDATE training_jobs SET progress = ?, history = ?, lease_expires_at = ?, updated_at = ? "
                "WHERE id = ?",
                (_dumps(progress), _dumps(history), now + lease_s, now, job_id),
            )
            return "cancel" if job.cancel_requested else "ok"

    def finish(
        self, job_id: str, worker_id: str, attempt: int, state: str,
        version: str | None = None, error: str | None = None,
    ) -> bool:
        if state not in TERMINAL_STATES:
            raise ValueError(f"not a final state: {state!r}")
        now = time.time()
        return self._end_attempt(job_id, worker_id, attempt, now, state,
                                 {"state": state, "version": version, "error": error, "finished_at": now})

    def release(self, job_id: str, worker_id: str, attempt: int, reason: str) -> bool:
        # the attempt is handed back uncounted
        return self._end_attempt(job_id, worker_id, attempt, time.time(), "released", {"state": "queued"},
                                 "attempts = attempts - 1, ", reason=reason)

    def _end_attempt(
        self, job_id: str, worker_id: str, attempt: int, now: float, event: str, columns: dict[str, Any],
        counting: str = "", **details: Any,
    ) -> bool:
        """End ``attempt`` if this worker still holds it: set ``columns`` (and the ``counting``
        expression), drop the lease, record ``event``. False, and no change, when it lost the lease."""
        with self._write() as connection:
            job = self._owned(connection, job_id, worker_id, attempt)
            if job is None:
                return False
            assignments = "".join(f"{name} = ?, " for name in columns)
            connection.execute(
                f"UPDATE training_jobs SET {assignments}{counting}worker_id = NULL, lease_expires_at = NULL, "
                "events = ?, updated_at = ? WHERE id = ?",
                (*columns.values(), self._event(job, now, event, attempt=attempt, worker=worker_id, **details),
                 now, job_id),
            )
            return True
