"""`vad worker`: a separate process that takes training jobs from the queue and runs them.

Each job is trained by ``model.train.train`` (the code behind `vad train`) with ``resume=True`` and
its checkpoints in ``VAD_DATA_DIR/checkpoints/<job id>``, so a job whose worker died continues from
its last finished epoch. While it trains, a heartbeat thread renews the job's lease every
VAD_JOB_HEARTBEAT_S; a worker killed outright stops renewing, the lease runs out after VAD_JOB_LEASE_S
and another worker (or this one restarted) takes the job up, until VAD_JOB_MAX_ATTEMPTS.

The progress callback, called after every epoch, writes the epoch's figures to the job and stops
training when the job was cancelled (model.train.TrainingCancelled: nothing is published), when the
worker has lost its lease (another worker owns the job now), or when the worker was asked to stop
(SIGTERM/SIGINT: the job goes back to the queue, that attempt not counted, and its checkpoint stays).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from model import registry
from model.checkpoints import read_checkpoint_meta
from model.data import FootageError
from model.manifest import saved_configs
from model.train import TrainingCancelled, train
from service.database import database_errors, database_for
from service.jobs.layout import checkpoint_dir, remove_job_files, resolve_footage_path, upload_dir
from service.jobs.store import Job, JobStore, SqlJobStore, finite_json
from service.model_store import public_message
from service.settings import Settings

log = logging.getLogger("vad.worker")


class LeaseLost(Exception):
    """Another worker owns the job now (this one's lease expired): stop without touching it."""


class WorkerStopping(Exception):
    """The worker was asked to stop: hand the job back."""


class Heartbeat(threading.Thread):
    """Renews the lease every ``interval_s``; notices cancellation and a lost lease."""

    def __init__(self, store: JobStore, job: Job, worker_id: str, lease_s: float, interval_s: float) -> None:
        super().__init__(name=f"vad-heartbeat-{job.id[:8]}", daemon=True)
        self.store, self.job_id, self.worker_id, self.attempt = store, job.id, worker_id, job.attempts
        self.lease_s, self.interval_s = lease_s, interval_s
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                status = self.store.heartbeat(self.job_id, self.worker_id, self.attempt, self.lease_s)
            except database_errors() as exc:  # e.g. locked past the busy timeout, unreachable: try again
                log.warning("heartbeat for job %s failed: %s", self.job_id, exc)
                continue
            if status == "cancel":
                self.cancelled.set()
            elif status == "lost":
                self.lost.set()
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval_s + 5)


def continued_history(job: Job, meta: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The job's epoch history as this attempt resumes it: the epochs its checkpoint holds (the
    entries recorded by earlier attempts, plus any an attempt finished but died before recording);
    later entries are dropped because those epochs run again. No checkpoint: training restarts."""
    if meta is None:
        return []
    done = int(meta.get("epoch", 0))
    kept = {h["epoch"]: h for h in job.history if h.get("phase") == "train" and h.get("epoch", 0) <= done}
    for record in meta.get("history", []):
        if record.get("epoch") not in kept and record.get("epoch", 0) <= done:
            kept[record["epoch"]] = finite_json({**record, "attempt": None, "phase": "train", "recovered": True})
    return [kept[epoch] for epoch in sorted(kept)]


class Worker:
    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.database = database_for(settings)
        self.store: JobStore = SqlJobStore(self.database)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()

    # -- the loop --------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: Any) -> None:
            if self.stopping.is_set():
                raise KeyboardInterrupt
            log.info("worker %s: %s received, stopping after the current epoch", self.worker_id,
                     signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def run(self, once: bool = False) -> int:
        """Claim and run jobs until stopped; ``once``: run at most one job, then return."""
        log.info("worker %s: polling %s every %.1f s (weights %s)", self.worker_id, self.database.describe(),
                 self.settings.job_poll_interval_s, self.settings.weights_dir)
        while not self.stopping.is_set():
            try:
                ran = self.run_one()
            except database_errors() as exc:  # the queue is busy or unreachable for now: the lease covers us
                log.warning("worker %s: job store error (%s); retrying", self.worker_id, exc)
                ran = False
            if once:
                return 0
            if not ran:
                self.stopping.wait(self.settings.job_poll_interval_s)
        log.info("worker %s: stopped", self.worker_id)
        return 0

    def run_one(self) -> bool:
        """Claim the oldest queued job and run it; False when there was none."""
        job, reaped = self.store.claim(self.worker_id, self.settings.job_lease_s, self.settings.job_max_attempts)
        for finished in reaped:
            log.warning("job %s %s: %s", finished.id, finished.state, finished.error)
            remove_job_files(self.settings.data_dir, finished.id)
        if job is None:
            return False
        log.info("worker %s: claimed job %s (attempt %d)", self.worker_id, job.id, job.attempts)
        self.run_job(job)
        return True

    # -- one job ---------------------------------------------------------------------------------

    def _footage(self, job: Job) -> tuple[list[Path], dict[str, str]]:
        """The footage paths (re-checked: uploads inside the job's folder, paths under the footage
        root) and the names to show in messages instead of server paths."""
        paths, names = [], {}
        uploads = upload_dir(self.settings.data_dir, job.id).resolve()
        seen: dict[str, int] = {}
        for entry in job.footage:
            shown = entry["name"]
            seen[shown] = seen.get(shown, 0) + 1
            if seen[shown] > 1:
                shown = f"{shown} (#{seen[shown]})"
            if entry["source"] == "upload":
                path = Path(entry["path"]).resolve()
                if path.parent != uploads:
                    raise FootageError(f"{shown}: the upload is not in this job's folder")
            else:
                path, _ = resolve_footage_path(self.settings.footage_root, entry["name"])
            paths.append(path)
            names[str(path)] = shown
            names[str(Path(entry["path"]))] = shown
            if entry["source"] == "upload":
                names[path.stem] = shown  # clip names (e.g. "frames smaller than a patch") are stems
        return paths, names

    def _shown(self, message: str, names: dict[str, str]) -> str:
        for server_path in sorted(names, key=len, reverse=True):
            message = message.replace(server_path, names[server_path])
        for folder in {str(Path(self.settings.data_dir).resolve()), str(self.settings.data_dir)}:
            if len(folder) > 1:
                message = message.replace(folder, "<data dir>")
        # e.g. a publish that failed (disk full, read-only folder): no server path in the job's error
        return public_message(message, Path(self.settings.weights_dir))

    def _published_version(self, job: Job) -> str | None:
        """The version an earlier attempt of ``job`` published (its manifest names the job), if any."""
        for version in reversed(registry.list_versions(self.settings.weights_dir)):
            try:
                manifest = registry.read_manifest(self.settings.weights_dir, version)
            except registry.RegistryError:
                continue
            if (manifest.get("training_job") or {}).get("id") == job.id:
                return version
        return None

    def run_job(self, job: Job) -> None:
        settings, store, attempt = self.settings, self.store, job.attempts
        folder = checkpoint_dir(settings.data_dir, job.id)
        history = continued_history(job, read_checkpoint_meta(folder))
        resumed_from = history[-1]["epoch"] if history else 0
        heartbeat = Heartbeat(store, job, self.worker_id, settings.job_lease_s, settings.job_heartbeat_s)
        names: dict[str, str] = {}
        phase, last_epoch, started = "train", resumed_from, time.monotonic()
        latest: dict[str, Any] = {"phase": phase, "attempt": attempt}  # the last progress recorded

        def finish(state: str, version: str | None = None, error: str | None = None) -> None:
            if not store.finish(job.id, self.worker_id, attempt, state, version, error):
                log.warning("job %s: lease lost before its outcome (%s) was recorded", job.id, state)
                return
            log.info("job %s %s%s", job.id, state, f": {error}" if error else f" ({version})" if version else "")
            remove_job_files(settings.data_dir, job.id)

        def on_progress(record: dict[str, Any]) -> None:
            nonlocal phase, last_epoch, latest
            if record.get("phase") == "phase_two":  # D retrained against R's output: steps, no epochs
                latest = {**latest, "phase": "phase_two", "elapsed_s": round(time.monotonic() - started, 1),
                          "phase_two": {"step": record["phase_two_step"], "steps": record["phase_two_steps"]}}
                report(latest)
                return
            if options.get("reject_and_refine") and record["epoch"] <= last_epoch:
                phase = "refine"  # train() fine-tunes again from epoch 1 after dropping rejected frames
            last_epoch = record["epoch"]
            entry = {"attempt": attempt, "phase": phase,
                     **{k: record[k] for k in ("epoch", "step", "d_loss", "r_loss", "rec_loss", "kl_loss",
                                               "holdout_reconstruction", "separation_auc",
                                               "condition_1_improved", "condition_2_met", "seconds")}}
            history[:] = [h for h in history if (h.get("phase"), h.get("epoch")) != (phase, record["epoch"])]
            history.append(finite_json(entry))
            progress = {
                "phase": phase, "attempt": attempt, "epoch": record["epoch"], "max_epochs": record["max_epochs"],
                "step": record["step"],
                "losses": {"d": record["d_loss"], "r": record["r_loss"], "rec": record["rec_loss"], "kl": record["kl_loss"]},
                "holdout_reconstruction": record["holdout_reconstruction"],
                "separation_auc": record["separation_auc"],
                "stopping": {
                    "condition_1_improved": record["condition_1_improved"],
                    "condition_2_met": record["condition_2_met"],
                    "separation_target": train_config.separation_target,
                    "patience": train_config.patience,
                    "max_epochs": record["max_epochs"],
                    "time_budget_s": train_config.time_budget_s,
                },
                "epoch_seconds": record["seconds"],
                "elapsed_s": round(time.monotonic() - started, 1),
                "eta_s": record["eta_s"],
                "resumed_from_epoch": resumed_from,
            }
            latest = progress
            report(progress)

        def report(progress: dict[str, Any]) -> None:
            """Record progress on the job; stop training if the job was lost, cancelled or the worker stops."""
            status = store.record_progress(job.id, self.worker_id, attempt, settings.job_lease_s, progress, history)
            if status == "lost" or heartbeat.lost.is_set():
                raise LeaseLost(job.id)
            if status == "cancel" or heartbeat.cancelled.is_set():
                raise TrainingCancelled(job.id)
            if self.stopping.is_set():
                raise WorkerStopping(job.id)

        if attempt > 1:
            published = self._published_version(job)
            if published is not None:  # an earlier attempt died between publishing and recording it
                finish("succeeded", version=published)
                return
        try:
            options = job.options
            model_config, train_config, calibration_config = saved_configs(job.config)
            paths, names = self._footage(job)
        except Exception as exc:
            finish("failed", error=self._shown(f"{exc}", names))
            return
        heartbeat.start()
        try:
            if resumed_from:
                log.info("job %s: resuming after epoch %d", job.id, resumed_from)
            result = train(
                paths, settings.weights_dir, model_config, train_config, calibration_config=calibration_config,
                device=settings.device,
                resume=True, parent_version=options.get("parent_version"),
                reject_and_refine=bool(options.get("reject_and_refine")),
                progress=on_progress, show_progress_bar=False, checkpoint_dir=folder,
                # named in the manifest as it is published, so a retry after a death right after
                # publishing finds the version (_published_version) instead of publishing another
                training_job={"id": job.id, "attempts": attempt, "worker": self.worker_id,
                              "footage": [f["name"] for f in job.footage][:100]},
            )
        except TrainingCancelled:
            finish("cancelled", error="cancelled while training; nothing was published")
        except LeaseLost:
            log.warning("job %s: lease lost (another worker owns it now); stopped", job.id)
        except WorkerStopping:
            if store.release(job.id, self.worker_id, attempt, "worker stopped"):
                log.info("job %s handed back to the queue (checkpoint kept)", job.id)
        except FootageError as exc:
            finish("failed", error=self._shown(str(exc), names))
        except Exception as exc:
            log.exception("job %s: training failed", job.id)
            finish("failed", error=self._shown(f"training failed: {type(exc).__name__}: {exc}", names))
        else:
            assert result.version is not None
            finish("succeeded", version=result.version)
        finally:
            heartbeat.stop()


def run_worker(settings: Settings, once: bool = False) -> int:
    """`vad worker`: run jobs until SIGTERM/SIGINT (``once``: at most one job)."""
    worker = Worker(settings)
    if threading.current_thread() is threading.main_thread():
        worker.install_signal_handlers()
    return worker.run(once=once)

