#!/usr/bin/env python3
"""Entrypoint of the vad images: seed the weights volume with the bundled default, then run the command.

``python /opt/vad/docker/entrypoint.py vad serve ...`` copies the image's bundled versions
(``VAD_BUNDLED_WEIGHTS_DIR``, default ``/opt/vad/weights``) into ``VAD_WEIGHTS_DIR`` when that registry
holds no published version yet (a fresh named volume), then replaces itself with the command (so the
command is PID 1's child under ``init: true`` and gets the stop signal directly).

Several containers (server replicas, the worker) start on the same volume at once, so every version
is copied into a private staging folder next to its final place and renamed into place: a rename onto
a folder another container already placed fails (ENOTEMPTY/EEXIST) and the staging copy is dropped.
A reader (the registry) never sees a half-copied version. A registry that already has a version (the
bundled one, or one the worker trained) is never touched. Standard library only: it runs before
anything else and is tested without Docker (tests/deploy/test_images.py).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from pathlib import Path

VERSION_PATTERN = re.compile(r"^v\d{4,}$")  # model.registry.VERSION_PATTERN
ACTIVE_FILE = "ACTIVE"
DEFAULT_BUNDLED = "/opt/vad/weights"


def _versions(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name))


def seed_weights(target: str | os.PathLike[str] | None, bundled: str | os.PathLike[str]) -> list[str]:
    """Copy the bundled versions into ``target`` when it has none; the names copied (empty: nothing to do)."""
    if not target:
        return []
    target_dir, bundled_dir = Path(target), Path(bundled)
    if target_dir.resolve() == bundled_dir.resolve():
        return []
    target_dir.mkdir(parents=True, exist_ok=True)
    if _versions(target_dir):
        return []
    sources = _versions(bundled_dir)
    if not sources:
        print(f"vad entrypoint: no bundled weights in {bundled_dir}; {target_dir} stays empty until a "
              "version is published", file=sys.stderr)
        return []
    copied = []
    for source in sources:
        final = target_dir / source.name
        staging = target_dir / f".seed-{source.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        try:
            if final.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(final))
            os.rename(staging, final)  # fails on a non-empty folder placed by another container
            copied.append(source.name)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(staging, ignore_errors=True)
    active = bundled_dir / ACTIVE_FILE
    if copied and active.is_file() and not (target_dir / ACTIVE_FILE).exists():
        staging = target_dir / f".seed-{ACTIVE_FILE}-{os.getpid()}"
        shutil.copyfile(active, staging)
        os.replace(staging, target_dir / ACTIVE_FILE)
    if copied:
        print(f"vad entrypoint: seeded {target_dir} with the bundled {', '.join(copied)}", file=sys.stderr)
    return copied


def main(argv: list[str]) -> int:
    seed_weights(os.environ.get("VAD_WEIGHTS_DIR"), os.environ.get("VAD_BUNDLED_WEIGHTS_DIR", DEFAULT_BUNDLED))
    if not argv:
        print("vad entrypoint: no command given", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
