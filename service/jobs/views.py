"""The public view of a training job: the one place that decides a job's JSON shape in responses
(server paths in a job's footage are never shown)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from service.jobs.store import Job
from service.settings import Settings


def iso(timestamp: float | None) -> str | None:
    """A Unix timestamp as ISO 8601 UTC with milliseconds; None stays None."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="milliseconds")


def public_job(job: Job, settings: Settings, detail: bool = True) -> dict[str, Any]:
    """The job as the API shows it; ``detail`` adds its configuration, epoch history and events."""
    body: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "progress": job.progress,
        "version": job.version,
        "error": job.error,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "attempts": job.attempts,
        "max_attempts": settings.job_max_attempts,
        "cancel_requested": job.cancel_requested,
        "worker": job.worker_id,
        "lease_expires_at": iso(job.lease_expires_at),
        "options": job.options,
        "footage": [{k: f[k] for k in ("name", "source", "bytes") if k in f} for f in job.footage],
        "activation": job.activation,
    }
    if detail:
        body["config"] = job.config
        body["history"] = job.history
        body["events"] = job.events
    return body
