"""Training jobs on the server side: the submission form, option and path checks, the effective
training configuration, the public view of a job, and the watcher that applies the activation policy.

The worker (``service/worker.py``, ``vad worker``) does the training; both meet in the job store
(``service/job_store.py``) and in the data folder:

    VAD_DATA_DIR/jobs.sqlite3               the queue
    VAD_DATA_DIR/uploads/<job id>/<uuid>.<ext>   uploaded footage (never the client's file name)
    VAD_DATA_DIR/checkpoints/<job id>/      epoch checkpoints (resume after a lost worker)

Uploads and checkpoints are removed once the job is finished.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from model import registry
from model.config import ConfigError, ModelConfig, TrainConfig
from service.errors import (
    BadRequest, EmptyUpload, InvalidJobRequest, JobFinished, JobNotFound, ServiceError, UnsupportedMedia,
    UploadTooLarge,
)
from service.job_store import Job, JobFinishedError, JobNotFoundError, JobStore, SqliteJobStore, new_job_id
from service.metrics import Metrics
from service.model_store import ModelStore
from service.settings import Settings
from service.uploads import FLUSH_BYTES, MULTIPART_OVERHEAD_BYTES, _declared_length
from service.video import SNIFF_BYTES, sniff_video

log = logging.getLogger("vad.training")

DEFAULT_INPUT_MODE = "appearance+flow"  # the `vad train` default
FILE_FIELDS = (b"files", b"file")
TEXT_FIELDS = (b"paths", b"options")
MAX_TEXT_FIELD_BYTES = 64 * 1024
MAX_NAME_CHARS = 200
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
# Suffixes an upload may keep when its first bytes match no known container (FFmpeg probes content).
SAFE_VIDEO_SUFFIXES = frozenset({
    ".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".ogv", ".wmv",
    ".asf", ".y4m", ".gif", ".h264", ".h265", ".3gp",
})


# -- the data folder ------------------------------------------------------------------------------

def _checked_id(job_id: str) -> str:
    if not JOB_ID_PATTERN.match(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


def upload_dir(data_dir: Path, job_id: str) -> Path:
    return Path(data_dir) / "uploads" / _checked_id(job_id)


def checkpoint_dir(data_dir: Path, job_id: str) -> Path:
    return Path(data_dir) / "checkpoints" / _checked_id(job_id)


def remove_job_files(data_dir: Path, job_id: str) -> None:
    """A finished job's uploads and checkpoints (the published version keeps what matters)."""
    for folder in (upload_dir(data_dir, job_id), checkpoint_dir(data_dir, job_id)):
        shutil.rmtree(folder, ignore_errors=True)


def open_job_store(settings: Settings) -> JobStore:
    return SqliteJobStore.in_data_dir(settings.data_dir)


# -- options and configuration --------------------------------------------------------------------

class TrainingOptions(BaseModel):
    """The ``options`` form field: every key optional, unknown keys refused."""

    model_config = ConfigDict(extra="forbid")

    input_mode: Literal["appearance", "appearance+motion", "appearance+flow"] | None = None
    epochs: StrictInt | None = Field(None, ge=1, le=10_000, description="TrainConfig.max_epochs")
    time_budget_s: StrictFloat | StrictInt | None = Field(None, gt=0, le=30 * 86_400)
    reject_and_refine: StrictBool = False
    parent_version: str | None = Field(None, pattern=r"^v\d{4,}$")


def _validation_message(prefix: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()))
        problems.append(f"{prefix}.{where}: {error.get('msg', 'invalid')}" if where else f"{prefix}: {error.get('msg')}")
    return "; ".join(problems) or f"{prefix}: invalid"


def parse_options(text: str | None) -> TrainingOptions:
    if text is None or not text.strip():
        return TrainingOptions()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJobRequest(f"options: not JSON ({exc.msg})") from exc
    if not isinstance(value, dict):
        raise InvalidJobRequest("options: must be a JSON object")
    try:
        return TrainingOptions.model_validate(value)
    except ValidationError as exc:
        raise InvalidJobRequest(_validation_message("options", exc)) from exc


def parse_paths(text: str | None) -> list[str]:
    if text is None or not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJobRequest(f"paths: not JSON ({exc.msg})") from exc
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise InvalidJobRequest("paths: must be a JSON list of non-empty strings")
    return value


def resolve_footage_path(root: Path | None, value: str) -> tuple[Path, str]:
    """(the real path, the name shown in messages) of ``value`` under the footage root.

    Refused: no root configured, NUL bytes, any ``..`` component, and anything whose real path
    (symlinks followed) is not inside the root's real path, or that does not exist.
    """
    if root is None:
        raise InvalidJobRequest("paths: not accepted, the server has no footage root (VAD_FOOTAGE_ROOT)")
    if "\x00" in value or len(value) > 4096:
        raise InvalidJobRequest("paths: invalid path")
    pure = PurePath(value)
    if ".." in pure.parts or ".." in value.replace("\\", "/").split("/"):
        raise InvalidJobRequest(f"paths: {value!r} contains '..' (paths must stay under the footage root)")
    real_root = Path(root).resolve()
    candidate = Path(value) if pure.is_absolute() else real_root / value
    real = candidate.resolve()
    if real != real_root and not real.is_relative_to(real_root):
        raise InvalidJobRequest(f"paths: {value!r} is outside the footage root")
    if real == real_root:
        raise InvalidJobRequest(f"paths: {value!r} is the footage root itself; name a clip or frame folder in it")
    if not real.exists():
        raise InvalidJobRequest(f"paths: {value!r}: no such file or folder under the footage root")
    return real, real.relative_to(real_root).as_posix()


def job_config(settings: Settings, options: TrainingOptions) -> dict[str, Any]:
    """The ModelConfig and TrainConfig a job trains with, fixed at submission (so a resumed attempt
    trains exactly what its checkpoint was made with): the `vad train` defaults, then the server's
    VAD_TRAINING_MODEL_CONFIG / VAD_TRAINING_CONFIG, then the job's options. A fine-tune takes its
    parent's model configuration."""
    try:
        if options.parent_version:
            try:
                manifest = registry.read_manifest(settings.weights_dir, options.parent_version)
                model_config = ModelConfig.from_saved(manifest["model_config"])
            except (registry.RegistryError, KeyError, TypeError) as exc:
                raise InvalidJobRequest(f"options.parent_version: {exc}") from exc
            if options.input_mode and options.input_mode != model_config.input_mode:
                raise InvalidJobRequest(
                    f"options.input_mode: {options.input_mode} differs from {options.parent_version}'s "
                    f"{model_config.input_mode} (a fine-tune keeps its parent's input)"
                )
        else:
            fields = {"input_mode": DEFAULT_INPUT_MODE, **settings.training_model_config}
            if options.input_mode:
                fields["input_mode"] = options.input_mode
            model_config = ModelConfig.from_dict(fields)
        train_fields = dict(settings.training_config)
        if options.epochs is not None:
            train_fields["max_epochs"] = options.epochs
        if options.time_budget_s is not None:
            train_fields["time_budget_s"] = float(options.time_budget_s)
        train_config = TrainConfig(**train_fields)
    except ConfigError as exc:
        raise InvalidJobRequest(f"options: {exc}") from exc
    return {
        "model_config": model_config.to_dict(),
        "train_config": json.loads(json.dumps(asdict(train_config), default=list)),
    }


def configs_of(job: Job) -> tuple[ModelConfig, TrainConfig]:
    train_fields = dict(job.config["train_config"])
    if "reject_band" in train_fields:
        train_fields["reject_band"] = tuple(train_fields["reject_band"])
    return ModelConfig.from_saved(job.config["model_config"]), TrainConfig(**train_fields)


# -- the submission form --------------------------------------------------------------------------

def display_name(filename: str | None, index: int) -> str:
    """The client's file name for messages only: its last component, printable, bounded."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:MAX_NAME_CHARS] or f"upload {index + 1}"


@dataclass
class ReceivedFile:
    path: Path
    name: str  # the client's name: shown in messages, never used as a path
    size: int
    container: str | None


@dataclass
class TrainingForm:
    files: list[ReceivedFile] = field(default_factory=list)
    text: dict[str, str] = field(default_factory=dict)


class _FormParser:
    """python-multipart callbacks turned into a list of events, handled (with file writes off the
    loop) after each body chunk."""

    def __init__(self, boundary: bytes) -> None:
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        })
        self.events: list[tuple[str, Any]] = []
        self.finished = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        shown = None if filename is None else filename.decode("utf-8", "replace")
        self.events.append(("begin", (options.get(b"name", b""), shown)))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.events.append(("data", bytes(data[start:end])))

    def _part_end(self) -> None:
        self.events.append(("end", None))

    def _end(self) -> None:
        self.finished = True

    def feed(self, chunk: bytes) -> list[tuple[str, Any]]:
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body ({exc})") from exc
        events, self.events = self.events, []
        return events


class _FileWriter:
    def __init__(self, directory: Path, client_name: str | None, index: int) -> None:
        self.directory = directory
        self.stem = uuid.uuid4().hex
        self.name = display_name(client_name, index)
        self.client_suffix = Path(self.name).suffix.lower()
        self.partial = directory / f"{self.stem}.part"
        self.handle = open(self.partial, "xb")  # noqa: SIM115 - closed in finish()/abort()
        self.size = 0
        self.head = bytearray()
        self.buffer = bytearray()

    async def write(self, piece: bytes) -> None:
        if len(self.head) < SNIFF_BYTES:
            self.head.extend(piece[: SNIFF_BYTES - len(self.head)])
        self.size += len(piece)
        self.buffer.extend(piece)
        if len(self.buffer) >= FLUSH_BYTES:
            data = bytes(self.buffer)
            self.buffer.clear()
            await asyncio.to_thread(self.handle.write, data)

    async def finish(self) -> ReceivedFile:
        if self.buffer:
            await asyncio.to_thread(self.handle.write, bytes(self.buffer))
            self.buffer.clear()
        await asyncio.to_thread(self.handle.close)
        if self.size == 0:
            raise EmptyUpload(f"{self.name}: the file is empty")
        try:
            container, suffix = sniff_video(bytes(self.head))
        except ServiceError:
            # Not a container we recognise: kept under a neutral name; decoding it is the job's
            # business, and a file OpenCV cannot read fails the job with a message naming it.
            container, suffix = None, self.client_suffix if self.client_suffix in SAFE_VIDEO_SUFFIXES else ".bin"
        final = self.directory / f"{self.stem}{suffix}"
        os.replace(self.partial, final)
        return ReceivedFile(final, self.name, self.size, container)

    def abort(self) -> None:
        self.handle.close()
        self.partial.unlink(missing_ok=True)


async def receive_training_form(request: Request, directory: Path, settings: Settings) -> TrainingForm:
    """Stream the multipart body: files (field ``files``, or ``file``) to generated names in
    ``directory``, each within VAD_MAX_UPLOAD_BYTES while it streams; ``paths`` and ``options`` as text.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UnsupportedMedia("send multipart/form-data with 'files' and/or 'paths', and 'options'")
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    file_limit = settings.max_upload_bytes
    body_limit = settings.max_training_files * (file_limit + MULTIPART_OVERHEAD_BYTES) + 4 * MAX_TEXT_FIELD_BYTES
    declared = _declared_length(request)
    if declared is not None and declared > body_limit:
        raise UploadTooLarge(f"the request is over the limit of {body_limit} bytes "
                             f"({settings.max_training_files} files of {file_limit} bytes)")
    parser = _FormParser(boundary)
    form = TrainingForm()
    writer: _FileWriter | None = None
    text_name: str | None = None
    text_value = bytearray()
    body_size = 0
    try:
        async for chunk in request.stream():
            body_size += len(chunk)
            if body_size > body_limit:
                raise UploadTooLarge(f"the request is over the limit of {body_limit} bytes")
            for kind, value in parser.feed(chunk):
                if kind == "begin":
                    name, filename = value
                    if name in FILE_FIELDS:
                        if len(form.files) >= settings.max_training_files:
                            raise InvalidJobRequest(
                                f"more than {settings.max_training_files} files (VAD_MAX_TRAINING_FILES)"
                            )
                        writer = await asyncio.to_thread(_FileWriter, directory, filename, len(form.files))
                    elif name in TEXT_FIELDS:
                        text_name = name.decode()
                        if text_name in form.text:
                            raise InvalidJobRequest(f"the form field {text_name!r} is given twice")
                        text_value.clear()
                    else:
                        shown = name.decode("utf-8", "replace")[:50]
                        raise InvalidJobRequest(f"unknown form field {shown!r} (expected 'files', 'paths', 'options')")
                elif kind == "data":
                    if writer is not None:
                        if writer.size + len(value) > file_limit:
                            raise UploadTooLarge(
                                f"{writer.name}: over the limit of {file_limit} bytes (VAD_MAX_UPLOAD_BYTES)"
                            )
                        await writer.write(value)
                    elif text_name is not None:
                        text_value.extend(value)
                        if len(text_value) > MAX_TEXT_FIELD_BYTES:
                            raise InvalidJobRequest(f"the form field {text_name!r} is over {MAX_TEXT_FIELD_BYTES} bytes")
                elif kind == "end":
                    if writer is not None:
                        current, writer = writer, None
                        form.files.append(await current.finish())
                    elif text_name is not None:
                        try:
                            form.text[text_name] = text_value.decode("utf-8")
                        except UnicodeDecodeError as exc:
                            raise InvalidJobRequest(f"the form field {text_name!r} is not UTF-8") from exc
                        text_name = None
        if not parser.finished:
            raise BadRequest("the multipart body is truncated")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return form


# -- the public view ------------------------------------------------------------------------------

def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="milliseconds")


def public_job(job: Job, settings: Settings, detail: bool = True) -> dict[str, Any]:
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


# -- activation policy ----------------------------------------------------------------------------

def _figure(validation: Any, key: str) -> float | None:
    if not isinstance(validation, dict):
        return None
    value = validation.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def auto_decision(new_manifest: dict[str, Any], active_manifest: dict[str, Any] | None) -> tuple[bool, str]:
    """The ``auto`` rule: activate when the new version's held-out reconstruction error (condition 1
    of the stopping rule, ``manifest["validation"]["holdout_reconstruction"]``, lower is better) is no
    higher than the active version's, both versions seeing the same input (input mode and patch size).
    Activate too when nothing is active or the active version has no such figure; keep the active
    one when the new version has none."""
    new_rec = _figure(new_manifest.get("validation"), "holdout_reconstruction")
    if new_rec is None:
        return False, "the new version has no finite validation.holdout_reconstruction"
    if active_manifest is None:
        return True, "no version was active"
    same_input = all(
        (new_manifest.get("model_config") or {}).get(key) == (active_manifest.get("model_config") or {}).get(key)
        for key in ("input_mode", "patch_size")
    )
    if not same_input:
        return False, "input mode or patch size differs from the active version: figures not comparable, activate manually"
    active_rec = _figure(active_manifest.get("validation"), "holdout_reconstruction")
    if active_rec is None:
        return True, "the active version has no validation.holdout_reconstruction"
    if new_rec <= active_rec:
        return True, f"held-out reconstruction {new_rec:.6g} <= active {active_rec:.6g}"
    return False, f"held-out reconstruction {new_rec:.6g} > active {active_rec:.6g}"


class TrainingService:
    """The server's side of training jobs: submission, queries, cancellation, and a watcher that
    sweeps expired leases, refreshes the vad_training_jobs gauge and applies VAD_ACTIVATION_POLICY to
    newly succeeded jobs. Nothing touches the data folder until the first job is submitted."""

    def __init__(self, settings: Settings, metrics: Metrics, models: ModelStore, store: JobStore | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models = models
        self.store = store or open_job_store(settings)
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.metrics.set_training_jobs({state: 0 for state in ("queued", "running", "succeeded", "failed", "cancelled")})
        self._watcher = asyncio.create_task(self._watch(), name="vad-training-watcher")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
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
        assert job.version is not None
        decision: dict[str, Any] = {"policy": self.settings.activation_policy, "version": job.version}
        if self.settings.activation_policy == "manual":
            decision.update(decision="manual", reason="VAD_ACTIVATION_POLICY=manual: activate it with "
                            f"POST /v1/models/{job.version}/activate")
        else:
            current = self.models.current
            try:
                manifest = await asyncio.to_thread(registry.read_manifest, self.settings.weights_dir, job.version)
            except registry.RegistryError as exc:
                manifest, decision["decision"], decision["reason"] = None, "refused", str(exc)
            if manifest is not None:
                if current is not None and current.version == job.version:
                    decision.update(decision="activated", reason="already active")
                else:
                    activate, reason = auto_decision(manifest, current.manifest if current else None)
                    decision.update(decision="activated" if activate else "kept", reason=reason,
                                    active_before=current.version if current else None)
                    if activate:
                        try:
                            await self.models.activate(job.version)
                        except ServiceError as exc:
                            decision.update(decision="refused", reason=f"{reason}; activation refused: {exc.message}")
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
