"""Where training jobs keep their files, and where their footage may come from.

The server and the workers share one data folder (VAD_DATA_DIR):

    VAD_DATA_DIR/jobs.sqlite3                     the queue (``service/jobs/store.py``)
    VAD_DATA_DIR/uploads/<job id>/<uuid>.<ext>    uploaded footage (never the client's file name)
    VAD_DATA_DIR/checkpoints/<job id>/            epoch checkpoints (resume after a lost worker)

Uploads and checkpoints are removed once the job is finished. Footage named by path must lie under
the footage root (VAD_FOOTAGE_ROOT).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path, PurePath

from service.errors import InvalidJobRequest

DB_FILE = "jobs.sqlite3"
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def _checked_id(job_id: str) -> str:
    if not JOB_ID_PATTERN.match(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


def database_path(data_dir: str | Path) -> Path:
    """The queue's SQLite file."""
    return Path(data_dir) / DB_FILE


def upload_dir(data_dir: Path, job_id: str) -> Path:
    """The folder of a job's uploaded footage."""
    return Path(data_dir) / "uploads" / _checked_id(job_id)


def checkpoint_dir(data_dir: Path, job_id: str) -> Path:
    """The folder of a job's epoch checkpoints."""
    return Path(data_dir) / "checkpoints" / _checked_id(job_id)


def remove_job_files(data_dir: Path, job_id: str) -> None:
    """A finished job's uploads and checkpoints (the published version keeps what matters)."""
    for folder in (upload_dir(data_dir, job_id), checkpoint_dir(data_dir, job_id)):
        shutil.rmtree(folder, ignore_errors=True)


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
