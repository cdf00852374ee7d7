"""Faults: broken weight versions refused on activation while the old one serves on; a publish that
fails (read-only weights folder, disk full) fails its job and leaves nothing half-written; a server
restarted under a live stream closes it with 1012 and the client reconnects; no job is lost.

(A worker killed mid-job: tests/jobs/test_training_jobs.py::test_killed_worker_job_is_resumed_by_another.)
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from model import registry
from service.jobs.worker import Worker
from tests.reliability.helpers import assert_clean_error, assert_no_leak, avi_bytes, frames, metric_value, png


def _fix_checksum(folder: Path) -> None:
    """Make the manifest's sha256 match whatever model.safetensors now holds (so only the content
    check can refuse it)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["weights_sha256"] = registry._sha256(folder / "model.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))


class _Exploit:
    """Unpickling this would create the marker file."""

    marker = ""

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def tamper(folder: Path, how: str, tmp_path: Path) -> None:
    weights, manifest_path = folder / "model.safetensors", folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if how == "tensor byte flipped":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif how == "tensor file truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "manifest checksum changed":
        manifest["weights_sha256"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
    elif how == "manifest not JSON":
        manifest_path.write_text(manifest_path.read_text()[:200])
    elif how == "manifest model_config altered":
        manifest["model_config"]["latent_dim"] = 32
        manifest_path.write_text(json.dumps(manifest))
    elif how == "manifest calibration removed":
        del manifest["calibration"]
        manifest_path.write_text(json.dumps(manifest))
    elif how == "tensor file missing":
        weights.unlink()
    elif how == "pickle renamed to .safetensors":
        exploit = _Exploit()
        exploit.marker = str(tmp_path / "unpickled")
        weights.write_bytes(pickle.dumps({"refiner.enc.0.weight": exploit}))
        _fix_checksum(folder)
    elif how == "safetensors header claims 2^62 bytes":
        weights.write_bytes(struct.pack("<Q", 1 << 62) + b"{}" + bytes(64))
        _fix_checksum(folder)
    elif how == "tensors of the wrong shape":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        name = next(iter(tensors))
        tensors[name] = tensors[name].flatten()[:-1].clone()
        save_file(tensors, str(weights))
        _fix_checksum(folder)
    elif how == "tensor file replaced by a symlink":
        weights.unlink()
        weights.symlink_to("/etc/passwd")
    else:
        raise AssertionError(how)


TAMPERING = ["tensor byte flipped", "tensor file truncated", "manifest checksum changed", "manifest not JSON",
             "manifest model_config altered", "manifest calibration removed", "tensor file missing",
             "pickle renamed to .safetensors", "safetensors header claims 2^62 bytes", "tensors of the wrong shape",
             "tensor file replaced by a symlink"]


@pytest.mark.parametrize("how", TAMPERING)
def test_broken_version_is_refused_and_the_old_one_serves_on(make_client, weights_dir: Path, tmp_path: Path, how: str) -> None:
    client = make_client()
    frame = png(frames(1, seed=3)[0])
    before = client.post("/v1/frames", files={"file": ("f.png", frame)}).json()
    tamper(weights_dir / "v0002", how, tmp_path)
    response = client.post("/v1/models/v0002/activate")
    body = assert_clean_error(response, 422, "version_rejected")
    assert body["error"]["message"].startswith("v0002")
    assert not (tmp_path / "unpickled").exists(), "the pickle was unpickled"
    # The old version serves on: a real request, the same score as before; ACTIVE unchanged.
    after = client.post("/v1/frames", files={"file": ("f.png", frame)})
    assert after.status_code == 200 and after.json()["model_version"] == "v0001"
    assert after.json()["score"] == before["score"]
    assert client.get("/v1/models/active").json()["version"] == "v0001"
    assert registry.active_version(weights_dir) == "v0001"
    assert metric_value(client.app.state.services.metrics, "vad_model_reload_failures_total") == 1
    listing = client.get("/v1/models")
    assert listing.status_code == 200
    assert_no_leak(listing.text)
    # The untampered version still activates: the refusal was about the damage, not the server.
    assert client.post("/v1/models/v0001/activate").status_code == 200


def test_missing_manifest_or_folder_is_not_a_version(make_client, weights_dir: Path) -> None:
    client = make_client()
    (weights_dir / "v0002" / "manifest.json").unlink()
    for version in ("v0002", "v0003", "v9999"):
        assert_clean_error(client.post(f"/v1/models/{version}/activate"), 404, "version_not_found")
    assert client.post("/v1/frames", files={"file": ("f.png", png(frames(1)[0]))}).json()["model_version"] == "v0001"


# --- publishing that fails -------------------------------------------------------------------------

def _run(*args: str) -> bool:
    return subprocess.run(list(args), capture_output=True).returncode == 0


@pytest.fixture
def mounts() -> Iterator[Callable[..., Path]]:
    """mount(kind, source, target, size_kib) -> target: a tmpfs or read-only bind mount (root only;
    skipped where mounting is not allowed). Unmounted at teardown."""
    made: list[Path] = []

    def mount(kind: str, target: Path, source: Path | None = None) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs / read-only bind needs root")
        target.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            ok = _run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(target))
        else:
            ok = _run("mount", "--bind", str(source), str(target))
            if ok:
                made.append(target)
                ok = _run("mount", "-o", "remount,ro,bind", str(target))
                made.pop()
                if not ok:
                    _run("umount", str(target))
        if not ok:
            pytest.skip(f"this machine does not allow a {kind} mount")
        made.append(target)
        return target

    yield mount
    for target in reversed(made):
        if not _run("umount", str(target)):
            _run("umount", "-l", str(target))


def _submit_and_run_one_job(make_client, base_values: dict, weights: Path, tmp_path: Path) -> tuple[dict, object]:
    """Queue a job through the API, run it with an in-process worker; returns (job, client)."""
    client = make_client(weights_dir=weights)
    clip = avi_bytes(tmp_path, count=24, seed=12)
    response = client.post("/v1/training-jobs", files=[("files", ("cam.avi", clip, "video/x-msvideo"))],
                           data={"options": json.dumps({"epochs": 1})})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    worker = Worker(client.app.state.services.settings)
    assert worker.run_one()
    client.app.state.training.store  # noqa: B018 - same store the worker wrote to
    job = client.get(f"/v1/training-jobs/{job_id}")
    assert job.status_code == 200
    return job.json(), client


def _assert_nothing_half_written(weights: Path, client, before: list[str]) -> None:  # noqa: ANN001
    assert sorted(p.name for p in weights.iterdir()) == before  # no new entry, hidden (.publish-*) or not
    assert {"ACTIVE", "v0001", "v0002"} <= set(before)
    assert registry.list_versions(weights) == ["v0001", "v0002"]
    for version in ("v0001", "v0002"):
        registry.load_version(weights, version)  # both still verify
    listing = client.get("/v1/models").json()
    assert [v["version"] for v in listing["versions"]] == ["v0001", "v0002"]
    assert client.post("/v1/frames", files={"file": ("f.png", png(frames(1)[0]))}).json()["model_version"] == "v0001"


def test_publish_into_a_read_only_weights_folder_fails_the_job(make_client, base_values, weights_dir: Path,
                                                                 tmp_path: Path, mounts) -> None:
    read_only = mounts("ro-bind", tmp_path / "ro-weights", source=weights_dir)
    before = sorted(p.name for p in read_only.iterdir())
    job, client = _submit_and_run_one_job(make_client, base_values, read_only, tmp_path)
    assert job["state"] == "failed", job
    assert "Read-only file system" in job["error"], job["error"]
    assert_no_leak(json.dumps(job))
    _assert_nothing_half_written(read_only, client, before)
    print(f"\nread-only weights folder: job failed with {job['error']!r}")


def test_publish_onto_a_full_disk_fails_the_job(make_client, base_values, weights_dir: Path, tmp_path: Path, mounts) -> None:
    full = mounts("tmpfs", tmp_path / "small-weights")
    for entry in weights_dir.iterdir():
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, full / entry.name)
    stat = os.statvfs(full)
    used_kib = (stat.f_blocks - stat.f_bfree) * stat.f_frsize // 1024
    # Room for a manifest, not for a weights file (~36 KiB).
    assert _run("mount", "-o", f"remount,size={used_kib + 16}k", str(full))
    before = sorted(p.name for p in full.iterdir())
    job, client = _submit_and_run_one_job(make_client, base_values, full, tmp_path)
    assert job["state"] == "failed", job
    assert "No space left on device" in job["error"] or "os error 28" in job["error"], job["error"]
    assert_no_leak(json.dumps(job))
    _assert_nothing_half_written(full, client, before)
    print(f"\nfull tmpfs ({used_kib + 16} KiB): job failed with {job['error']!r}")


def test_publish_hitting_enospc_fails_the_job_simulated(make_client, base_values, weights_dir: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    """Where no tmpfs can be mounted: the weights write gets half its bytes out, then ENOSPC."""
    real_save = registry.save_file

    def save_then_fill_the_disk(tensors, path, metadata=None):  # noqa: ANN001, ANN202
        real_save(tensors, path, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(registry, "save_file", save_then_fill_the_disk)
    before = sorted(p.name for p in weights_dir.iterdir())
    job, client = _submit_and_run_one_job(make_client, base_values, weights_dir, tmp_path)
    assert job["state"] == "failed", job
    assert "No space left on device" in job["error"], job["error"]
    assert_no_leak(json.dumps(job))
    _assert_nothing_half_written(weights_dir, client, before)


# --- a server restarted under a live stream ---------------------------------------------------------

@pytest.mark.slow
def test_server_restart_mid_stream_closes_1012_and_the_client_reconnects(server_process, base_values, tmp_path: Path) -> None:
    first = server_process()
    clip = avi_bytes(tmp_path, count=24, seed=13)
    with httpx.Client(base_url=first.url, timeout=30) as http:
        queued = http.post("/v1/training-jobs", files=[("files", ("lobby.avi", clip, "video/x-msvideo"))],
                           data={"options": json.dumps({"epochs": 1})})
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["id"]
    good = [png(f) for f in frames(8, seed=4)]
    replies: list[dict] = []
    closed: list[ConnectionClosed] = []

    def stream() -> None:
        with connect(f"{first.ws_url}/v1/stream") as ws:
            try:
                for i in range(10_000):
                    ws.send(good[i % len(good)])
                    replies.append(json.loads(ws.recv(timeout=120)))
            except ConnectionClosed as exc:
                closed.append(exc)

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    deadline = time.monotonic() + 120  # a wait, not a speed limit: 20 replies on any machine
    while len(replies) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(replies) >= 20, "the stream never got going"
    first.stop()  # SIGTERM: a graceful restart
    client.join(timeout=120)
    assert closed, "the client was not told the server went away"
    code = closed[0].rcvd.code if closed[0].rcvd else None
    assert code in (1012, 1001), closed[0]
    assert [r["seq"] for r in replies] == list(range(len(replies)))  # every reply before the close, in order

    second = server_process(port=first.port)  # the same address: the client's retry finds it
    reconnected = None
    for _ in range(50):
        try:
            reconnected = connect(f"{first.ws_url}/v1/stream", open_timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    assert reconnected is not None
    with reconnected as ws:
        for data in good[:3]:
            ws.send(data)
        again = [json.loads(ws.recv(timeout=30)) for _ in range(3)]
    assert [r["seq"] for r in again] == [0, 1, 2] and all("score" in r for r in again)
    # The job queued before the restart is still there, and a worker runs it to the end.
    with httpx.Client(base_url=second.url, timeout=30) as http:
        job = http.get(f"/v1/training-jobs/{job_id}").json()
        assert job["state"] == "queued" and job["footage"][0]["name"] == "lobby.avi"
        from service.settings import Settings

        assert Worker(Settings(**base_values)).run_one()
        job = http.get(f"/v1/training-jobs/{job_id}").json()
    assert job["state"] == "succeeded", job
    print(f"\nrestart: {len(replies)} replies, then close {code}; reconnected; job {job['state']} as {job['version']}")
