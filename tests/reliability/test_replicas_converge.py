"""Replicas agree on the active version: two real `vad serve` processes on one registry (the served
registry: v0001 ACTIVE, v0002). An activation on replica A rewrites ACTIVE; replica B reads ACTIVE
every VAD_ACTIVE_POLL_S and switches within the documented bound (poll interval + one activation,
<= 15 s by default). A version that fails on B leaves B on its version, reported as not converged
with the reason, and is not retried until ACTIVE is rewritten."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from model import registry
from tests.reliability.helpers import ServerProcess, frames, png
from tests.service.svc_helpers import metric_families, sample_value

DEFAULT_BOUND_S = 15.0  # docs/server.md: VAD_ACTIVE_POLL_S (5 s) + one activation, on this registry's model
SLACK_S = 15.0  # two shared cores running two servers and the test


def active(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/models/active", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def metric(server: ServerProcess, family: str, sample: str) -> float | None:
    return sample_value(metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text), family, sample)


def converged(server: ServerProcess) -> float | None:
    return metric(server, "vad_active_version_converged", "vad_active_version_converged")


def failures(server: ServerProcess) -> float | None:
    return metric(server, "vad_model_reload_failures", "vad_model_reload_failures_total")


def wait_until(check: Callable[[], bool], limit_s: float) -> float:
    """Seconds until ``check()`` holds (polled every 0.1 s); fails past ``limit_s``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < limit_s, f"not within {limit_s} s"
        time.sleep(0.1)
    return time.monotonic() - started


def activate(server: ServerProcess, version: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{version}/activate", timeout=60)


def test_an_activation_on_one_replica_reaches_the_other_within_the_bound(server_process, weights_dir: Path) -> None:
    a, b = server_process(), server_process()  # the default VAD_ACTIVE_POLL_S
    for server in (a, b):
        status = active(server)
        assert (status["version"], status["wanted"], status["converged"], status["last_error"]) == ("v0001", "v0001", True, None)
        assert converged(server) == 1
    assert activate(a, "v0002").status_code == 200
    activated = time.monotonic()
    assert active(a)["version"] == "v0002" and active(a)["converged"] is True
    assert registry.active_version(weights_dir) == "v0002"
    wait_until(lambda: active(b)["version"] == "v0002", DEFAULT_BOUND_S + SLACK_S)
    seconds = time.monotonic() - activated
    print(f"\nreplica B served v0002 {seconds:.2f} s after replica A's activation (bound {DEFAULT_BOUND_S} s)")
    status = active(b)
    assert (status["wanted"], status["converged"], status["last_error"]) == ("v0002", True, None)
    assert converged(b) == 1 and failures(b) == 0
    assert metric(b, "vad_model_reloads", "vad_model_reloads_total") == 2  # v0001 at start, then v0002


def test_a_version_that_fails_on_one_replica_is_reported_not_half_switched(
    server_process, weights_dir: Path, tmp_path: Path,
) -> None:
    """Replica B sees the shared registry through links, except v0003, which reaches it damaged (as a
    copy that went wrong on its storage would): A verifies v0003 and writes ACTIVE, B refuses it."""
    shutil.copytree(weights_dir / "v0001", weights_dir / "v0003")
    view = tmp_path / "replica-b-view"
    view.mkdir()
    for name in ("ACTIVE", "v0001", "v0002"):
        (view / name).symlink_to(weights_dir / name)
    shutil.copytree(weights_dir / "v0003", view / "v0003")
    damaged = view / "v0003" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF  # no longer the manifest's sha256
    damaged.write_bytes(bytes(data))
    poll_s = 1.0
    a = server_process(active_poll_s=poll_s)
    b = server_process(active_poll_s=poll_s, weights_dir=str(view))
    assert active(b)["version"] == "v0001" and active(b)["converged"] is True

    assert activate(a, "v0003").status_code == 200  # verified and smoke-tested on A, then ACTIVE = v0003
    seconds = wait_until(lambda: active(b)["wanted"] == "v0003", DEFAULT_BOUND_S + SLACK_S)
    status = active(b)
    print(f"\nreplica B reported v0003 refused after {seconds:.2f} s: {status['last_error']}")
    assert status["version"] == "v0001" and status["converged"] is False
    assert "v0003" in status["last_error"] and "sha256" in status["last_error"]
    assert "/" not in status["last_error"].replace("<weights>", "")  # no server path
    assert converged(b) == 0 and failures(b) == 1
    assert "ACTIVE names v0003 but this replica keeps serving v0001" in b.log()
    served = httpx.post(f"{b.url}/v1/frames", files={"file": ("f.png", png(frames(1)[0]))}, timeout=30)
    assert served.status_code == 200 and served.json()["model_version"] == "v0001"
    time.sleep(5 * poll_s)  # five more reads of the unchanged ACTIVE: no retry
    assert failures(b) == 1 and active(b)["converged"] is False

    # A refuses a version that fails on it before writing ACTIVE: nobody sees it
    shutil.copytree(weights_dir / "v0001", weights_dir / "v0004")
    (weights_dir / "v0004" / "model.safetensors").write_bytes(b"damaged")
    assert activate(a, "v0004").status_code == 422
    assert registry.read_active_file(weights_dir)[0] == "v0003"

    # the next activation (ACTIVE rewritten) is followed again
    assert activate(a, "v0002").status_code == 200
    seconds = wait_until(lambda: active(b)["version"] == "v0002", DEFAULT_BOUND_S + SLACK_S)
    print(f"replica B served v0002 {seconds:.2f} s after it was activated on A")
    status = active(b)
    assert (status["wanted"], status["converged"], status["last_error"]) == ("v0002", True, None)
    assert converged(b) == 1 and converged(a) == 1

