"""The server's side of training jobs: submission, queries and cancellation, and a watcher that
sweeps expired leases and applies the activation policy.

A `vad worker` (``service/jobs/worker.py``) does the training; server and workers meet in the job
store (``service/jobs/store.py``) and in the data folder (``service/jobs/layout.py``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any

from starlette.requests import Request

from service.background import cancel_and_wait
from service.database import database_for
from service.errors import InvalidJobRequest, JobFinished, JobNotFound
from service.jobs.activation import apply_policy
from service.jobs.form import receive_training_form
from service.jobs.layout import remove_job_files, resolve_footage_path, upload_dir
from service.jobs.options import job_config, parse_options, parse_paths
from service.jobs.store import Job, JobFinishedError, JobNotFoundError, JobStore, SqlJobStore, new_job_id
from service.metrics import Metrics
from service.model_store import ModelStore
from service.settings import Settings

log = logging.getLogger("vad.training")


class TrainingService:
    """The server's side of training jobs: submission, queries, cancellation, and a watcher that
    sweeps expired leases, refreshes the vad_training_jobs gauge and applies VAD_ACTIVATION_POLICY to
    newly succeeded jobs. Nothing touches the data folder until the first job is submitted."""

    def __init__(self, settings: Settings, metrics: Metrics, models: ModelStore, store: JobStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models = models
        self.store = store or SqlJobStore(database_for(settings))
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.metrics.set_training_jobs({state: 0 for state in ("queued", "running", "succeeded", "failed", "cancelled")})
        self._watcher = asyncio.create_task(self._watch(), name="vad-training-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._watcher)
        self._watcher = None

    async def _watch(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:
                log.exception("training-job poll failed")
            await asyncio.sleep(self.settings.job_poll_interval_s)

    async def poll_once(self) -> None:
        reaped = await asyncio.to_thread(self.store.reap, self.settings.job_max_attempts)
        for job in reaped:
            await asyncio.to_thread(remove_job_files, self.settings.data_dir, job.id)
        for job in await asyncio.to_thread(self.store.pending_activation):
            await self._decide(job)
        await self.refresh_metrics()

    async def refresh_metrics(self) -> None:
        self.metrics.set_training_jobs(await asyncio.to_thread(self.store.counts))

    async def _decide(self, job: Job) -> None:
        decision = await apply_policy(job, self.settings, self.models)
        if await asyncio.to_thread(self.store.set_activation, job.id, decision):
            self.metrics.training_activations.labels(decision["decision"]).inc()
            log.info("training job %s: version %s %s (%s)", job.id, job.version, decision["decision"], decision["reason"])

    # -- requests --------------------------------------------------------------------------------

    async def submit(self, request: Request) -> Job:
        job_id = new_job_id()
        folder = upload_dir(self.settings.data_dir, job_id)
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        try:
            form = await receive_training_form(request, folder, self.settings)
            options = parse_options(form.text.get("options"))
            footage: list[dict[str, Any]] = [
                {"source": "upload", "name": f.name, "path": str(f.path), "bytes": f.size, "container": f.container}
                for f in form.files
            ]
            for value in parse_paths(form.text.get("paths")):
                real, shown = resolve_footage_path(self.settings.footage_root, value)
                footage.append({"source": "path", "name": shown, "path": str(real)})
            if not footage:
                raise InvalidJobRequest("no footage: send video files in 'files' or footage-root paths in 'paths'")
            if len(footage) > self.settings.max_training_files:
                raise InvalidJobRequest(f"more than {self.settings.max_training_files} clips (VAD_MAX_TRAINING_FILES)")
            config = await asyncio.to_thread(job_config, self.settings, options)
            job = await asyncio.to_thread(
                self.store.submit, job_id, options.model_dump(exclude_none=True), config, footage
            )
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise
        if not form.files:
            await asyncio.to_thread(shutil.rmtree, folder, True)
        await self.refresh_metrics()
        log.info("training job %s queued (%d clip(s))", job.id, len(footage))
        return job

    async def get(self, job_id: str) -> Job:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None:
            raise JobNotFound(f"no training job {job_id!r}")
        return job

    async def list(self, state: str | None, limit: int) -> list[Job]:
        return await asyncio.to_thread(self.store.list, state, limit)

    async def cancel(self, job_id: str) -> Job:
        try:
            job = await asyncio.to_thread(self.store.request_cancel, job_id)
        except JobNotFoundError as exc:
            raise JobNotFound(f"no training job {job_id!r}") from exc
        except JobFinishedError as exc:
            raise JobFinished(str(exc)) from exc
        if job.state == "cancelled":
            await asyncio.to_thread(remove_job_files, self.settings.data_dir, job.id)
        await self.refresh_metrics()
        return job
