"""`vad serve --processes 2` for real: two serving processes behind one port, each a replica on the
shared database; /metrics adds up what both served whichever answers; a child killed with SIGKILL is
replaced while the other serves on; a stop ends them all and removes the metrics folder; a child that
cannot start stops the server with its error. Waits have generous limits and the assertions are on
what happened, not on when."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import httpx
import pytest

from service.database import database_for
from service.settings import Settings
from tests.jobs.helpers import wait_for
from tests.reliability.helpers import ServerProcess
from tests.service.svc_helpers import metric_families, sample_value
from tests.support import synthetic_frames

WAIT_S = 120.0  # two servers and the test share two cores
FRAMES = 12


def children(server: ServerProcess) -> set[int]:
    """The parent's live child processes (Linux /proc), multiprocessing's resource tracker left out."""
    return set(server.processes()[1:])


def live_replicas(values: dict[str, Any]) -> set[str]:
    with database_for(Settings(**values)).read() as db:
        return {row["id"] for row in db.execute("SELECT id FROM replicas").fetchall()}


def frames_scored(server: ServerProcess) -> float | None:
    families = metric_families(httpx.get(f"{server.url}/metrics", timeout=30).text)
    return sample_value(families, "vad_frames_scored", "vad_frames_scored_total", source="frame")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the server's child processes from Linux /proc")
def test_two_processes_share_the_port_and_metrics_and_a_killed_one_is_replaced(tmp_path: Path, served_weights: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    values = {"weights_dir": str(served_weights), "data_dir": str(tmp_path / "data"), "device": "cpu",
              "serve_processes": 2, "replica_id": "proc", "replica_lease_s": 3.0}
    server = ServerProcess(values, tmp_path / "serve.log")
    server.env["TMPDIR"] = str(scratch)  # where the parent makes its metrics folder
    server.start()
    try:
        # both children serve: each is a live replica, and new connections reach both
        wait_for(lambda: live_replicas(values) == {"proc-0", "proc-1"}, WAIT_S, what="both children's heartbeats")
        answered: set[str] = set()
        wait_for(lambda: answered.add(httpx.get(f"{server.url}/readyz", timeout=30).json()["replica"]) or len(answered) == 2,
                 WAIT_S, what="/readyz answered by both children")

        # what both served adds up in /metrics, whichever child answers the scrape
        frame = cv2.imencode(".png", synthetic_frames(1, seed=3)[0])[1].tobytes()
        for _ in range(FRAMES):  # each on a new connection: the kernel picks the child
            response = httpx.post(f"{server.url}/v1/frames", content=frame, headers={"Content-Type": "image/png"}, timeout=60)
            assert response.status_code == 200, response.text
        assert [frames_scored(server) for _ in range(4)] == [FRAMES] * 4

        # kill -9 one child: the parent starts another (a new replica), the other serves on meanwhile
        before = children(server)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
        wait_for(lambda: len(children(server)) == 2 and victim not in children(server), WAIT_S,
                 what="a child in place of the killed one")
        wait_for(lambda: len(live_replicas(values)) == 2 and all(
            httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200 for _ in range(4)), WAIT_S,
            what="the new child's heartbeat and readiness")
        assert frames_scored(server) == FRAMES  # a dead child's counters still count

        # a stop ends every child and removes the metrics folder
        survivors = children(server)
        assert server.stop() == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in survivors)
        assert list(scratch.glob("vad-metrics-*")) == []
    finally:
        server.stop()


def test_a_child_that_cannot_start_stops_the_server_with_its_error(tmp_path: Path, served_weights: Path) -> None:
    values = {"weights_dir": str(served_weights), "data_dir": str(tmp_path / "data"), "device": "cpu",
              "serve_processes": 2, "camera_url_allow": ["nope"]}  # refused only once the app is built, in a child
    server = ServerProcess(values, tmp_path / "serve.log")
    with pytest.raises(RuntimeError, match=r"exited \(2\)"):
        server.start(timeout_s=WAIT_S)
    log = server.log()
    assert "vad serve: error: VAD_CAMERA_URL_ALLOW: 'nope'" in log
    assert "before it was ready" in log


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the server's child processes from Linux /proc")
def test_children_stop_when_the_parent_is_killed(tmp_path: Path, served_weights: Path) -> None:
    values = {"weights_dir": str(served_weights), "data_dir": str(tmp_path / "data"), "device": "cpu", "serve_processes": 2}
    server = ServerProcess(values, tmp_path / "serve.log").start()
    try:
        wait_for(lambda: len(children(server)) == 2, WAIT_S, what="two children")
        orphans = children(server)
        server.stop(signal.SIGKILL)
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in orphans), WAIT_S,
                 what="the children to stop once their parent is gone")
    finally:
        server.stop()


def test_the_parent_loads_neither_torch_nor_the_app() -> None:
    """The parent only checks the settings and keeps the children: what `vad serve --processes N` imports
    before it starts them (torch alone would add some 250 MB to it)."""
    probe = ("import sys; from service.cli import build_parser; from service.settings import Settings; "
             "import service.processes; Settings(); build_parser().parse_args(['serve', '--processes', '2']); "
             "print(sorted(m for m in ('torch', 'cv2', 'service.app', 'service.server') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stderr
