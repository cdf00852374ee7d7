"""The latest pictures a camera's owner leaves for the other replicas (service/cameras/shared_latest.py):
read back while fresh, not once stale or removed, replaced whole (no temporary file left), and only
under a camera's name."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from service.cameras.shared_latest import FRESH_S, SharedLatest


def test_fresh_pictures_are_read_stale_or_removed_ones_are_not(tmp_path: Path) -> None:
    shared = SharedLatest(tmp_path)
    now = time.time()
    assert shared.read("gate", "jpeg", now) is None  # nothing written yet
    shared.write("gate", {"jpeg": b"first", "heatmap": b"map"})
    shared.write("gate", {"jpeg": b"second"})
    assert shared.read("gate", "jpeg", now) == b"second" and shared.read("gate", "heatmap", now) == b"map"
    assert sorted(p.name for p in shared.folder.iterdir()) == ["gate.latest-heatmap.png", "gate.latest.jpg"]
    old = now - FRESH_S - 1
    os.utime(shared.path("gate", "jpeg"), (old, old))  # the owner stopped writing
    assert shared.read("gate", "jpeg", now) is None and shared.read("gate", "heatmap", now) == b"map"
    shared.remove("gate")
    assert shared.read("gate", "heatmap", now) is None and list(shared.folder.iterdir()) == []
    shared.remove("gate")  # twice: nothing to do


def test_only_camera_names_make_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a camera name"):
        SharedLatest(tmp_path).path("../escape", "jpeg")
