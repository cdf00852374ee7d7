"""A camera's latest pictures, left in the data folder for the replicas that do not run it.

The latest scored frame lives in the memory of the replica that runs the camera. A page behind one
port shared by `vad serve --processes N`, or behind a balancer over replicas on one data volume, asks
whichever replica it reaches. So while other replicas are live, the owner also writes the camera's
``latest.jpg`` and ``latest-heatmap.png`` to ``VAD_DATA_DIR/cameras/latest/`` at most every
``EVERY_S``. Each file is replaced atomically (a temporary file, then a rename), so a reader never
sees half a picture. Another replica serves the file while it is under ``FRESH_S`` old. Where the
data folder is not shared (hosts with volumes of their own), there is no such file and the answer is
409 ``camera_elsewhere``, naming the owner, as before.
"""

from __future__ import annotations

from pathlib import Path

from service.cameras.store import NAME_PATTERN
from service.files import write_atomically

EVERY_S = 1.0  # the page refreshes every 2 s
FRESH_S = 10.0  # older: the owner stopped writing (the camera stopped, moved, or the owner is gone)
KINDS = {"jpeg": "latest.jpg", "heatmap": "latest-heatmap.png"}


class SharedLatest:
    """The pictures' folder: ``write`` by the owner, ``read`` by the others, ``remove`` when a camera
    is deleted or stops."""

    def __init__(self, data_dir: str | Path) -> None:
        self.folder = Path(data_dir) / "cameras" / "latest"

    def path(self, name: str, kind: str) -> Path:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"not a camera name: {name!r}")
        return self.folder / f"{name}.{KINDS[kind]}"

    def write(self, name: str, pictures: dict[str, bytes]) -> None:
        """Replace the camera's pictures (``{kind: bytes}``), each atomically. Blocking."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for kind, data in pictures.items():
            write_atomically(self.path(name, kind), data)

    def read(self, name: str, kind: str, now: float) -> bytes | None:
        """The picture if it was written in the last FRESH_S seconds (by this host's clock), else None. Blocking."""
        target = self.path(name, kind)
        try:
            if target.stat().st_mtime < now - FRESH_S:
                return None
            return target.read_bytes()
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        for kind in KINDS:
            self.path(name, kind).unlink(missing_ok=True)
