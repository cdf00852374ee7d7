"""Training jobs end to end: a real uvicorn server (loopback port) and real `vad worker` processes
sharing a data folder, a registry and the queue (the SQLite file in the data folder, then a
PostgreSQL database: ``job_env``), with tiny models so each job takes seconds."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx

from model import registry
from tests.conftest import synthetic_frames, write_video
from tests.jobs.helpers import follow, wait_for

KEY = "s3cret-key"


def submit(http: httpx.Client, files: list[Path] | None = None, names: list[str] | None = None,
           paths: list[str] | None = None, options: dict | None = None, **kwargs) -> httpx.Response:
    parts = [("files", ((names or [])[i] if names else f.name, f.read_bytes(), "video/x-msvideo"))
             for i, f in enumerate(files or [])]
    data = {}
    if paths is not None:
        data["paths"] = json.dumps(paths)
    if options is not None:
        data["options"] = json.dumps(options)
    if not parts:  # force multipart/form-data without files
        parts = [("options", (None, data.pop("options", "{}")))]
        parts += [(k, (None, v)) for k, v in data.items()]
        data = {}
    return http.post("/v1/training-jobs", files=parts, data=data, **kwargs)


def metric(http: httpx.Client, name: str, **labels: str) -> float | None:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_upload_train_publish_activate(job_env) -> None:
    server = job_env.start_server()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/v1/models/active").json()["version"] == "v0001"
        response = submit(http, files=job_env.clips, names=["lobby cam 1.avi", "../../etc/passwd"],
                          options={"epochs": 2, "input_mode": "appearance+motion"})
        assert response.status_code == 202, response.text
        body = response.json()
        assert set(body) == {"id", "state"} and body["state"] == "queued"
        job_id = body["id"]
        # Stored under generated names in the data folder, never the client's.
        stored = sorted(p.name for p in (job_env.data / "uploads" / job_id).iterdir())
        assert len(stored) == 2 and all(re.fullmatch(r"[0-9a-f]{32}\.avi", name) for name in stored), stored
        assert not any("passwd" in str(p) or "lobby" in str(p) for p in job_env.root.rglob("*"))
        queued = http.get(f"/v1/training-jobs/{job_id}").json()
        assert queued["state"] == "queued" and queued["attempts"] == 0
        assert [f["name"] for f in queued["footage"]] == ["lobby cam 1.avi", "passwd"]

        worker = job_env.start_worker()
        seen: list[dict] = []
        job = follow(http, job_id, seen=seen, workers=[worker])
        assert job["state"] == "succeeded", job
        assert job["version"] == "v0002" and job["attempts"] == 1 and job["error"] is None
        progress = job["progress"]
        assert progress["epoch"] == 2 and progress["max_epochs"] == 2 and progress["step"] > 0
        assert set(progress["losses"]) == {"d", "r", "rec", "kl"}
        assert {"condition_1_improved", "condition_2_met", "separation_target", "patience"} <= set(progress["stopping"])
        assert "eta_s" in progress and progress["eta_s"] >= 0
        # the last progress written is phase two's (D retrained after the epochs), epoch figures kept
        assert progress["phase"] == "phase_two" and progress["phase_two"]["step"] == progress["phase_two"]["steps"] > 0
        assert [h["epoch"] for h in job["history"]] == [1, 2]
        assert {e["event"] for e in job["events"]} >= {"queued", "claimed", "succeeded"}
        # uploads and checkpoints are removed once the outcome is recorded (a moment after it)
        wait_for(lambda: not (job_env.data / "uploads" / job_id).exists()
                 and not (job_env.data / "checkpoints" / job_id).exists(), timeout=10,
                 what="the finished job's files removed")

        listed = http.get("/v1/models").json()
        assert [v["version"] for v in listed["versions"]] == ["v0001", "v0002"]
        manifest = listed["versions"][1]["manifest"]
        assert manifest["training_job"]["id"] == job_id
        assert manifest["model_config"]["patch_size"] == 16  # the server's VAD_TRAINING_MODEL_CONFIG
        assert listed["active"] == "v0001"  # manual policy: nothing changes by itself
        decided = follow(http, job_id, timeout=10, until=lambda j: j["activation"] is not None)
        assert decided["activation"]["decision"] == "manual"
        assert http.get("/v1/models/active").json()["version"] == "v0001"

        activated = http.post("/v1/models/v0002/activate")
        assert activated.status_code == 200 and activated.json()["previous"] == "v0001"
        assert http.get("/v1/models/active").json()["version"] == "v0002"

        assert http.get("/v1/training-jobs").json()["jobs"][0]["id"] == job_id
        assert http.get("/v1/training-jobs", params={"state": "queued"}).json()["jobs"] == []
        wait_for(lambda: metric(http, "vad_training_jobs", state="succeeded") == 1.0, 5, what="succeeded gauge")
        assert metric(http, "vad_training_jobs", state="running") == 0.0
        print(f"\nprogress snapshots seen: {[p['epoch'] for p in seen]}")


def test_killed_worker_job_is_resumed_by_another(job_env) -> None:
    """kill -9 mid-training: the lease expires, a second worker resumes from the epoch checkpoint."""
    slow = {**job_env.values["training_config"], "patches_per_epoch": 1024}  # ~0.5 s per epoch
    server = job_env.start_server(training_config=slow)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = submit(http, paths=["cam0.avi", "frames"], options={"epochs": 8})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        first = job_env.start_worker(training_config=slow)
        running = follow(http, job_id, until=lambda j: (j["progress"] or {}).get("epoch", 0) >= 1, workers=[first])
        # A second worker, idle until then: the job is leased to the first one.
        second = job_env.start_worker(training_config=slow)
        running = follow(http, job_id, until=lambda j: (j["progress"] or {}).get("epoch", 0) >= 2, workers=[first])
        assert "claimed job" not in second.log()
        first.kill()
        killed_at_epoch = running["progress"]["epoch"]
        after_kill = http.get(f"/v1/training-jobs/{job_id}").json()
        assert after_kill["state"] == "running", "the job finished before the worker was killed: make it longer"
        assert after_kill["attempts"] == 1
        assert registry.list_versions(job_env.weights) == ["v0001"]  # nothing published mid-training

        job = follow(http, job_id, timeout=120, workers=[first, second])
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    epochs = [h["epoch"] for h in job["history"]]
    assert epochs == list(range(1, 9)), job["history"]
    by_attempt = {a: [h["epoch"] for h in job["history"] if h["attempt"] == a] for a in (1, 2)}
    assert by_attempt[1][:killed_at_epoch] == list(range(1, killed_at_epoch + 1))
    assert by_attempt[2] and by_attempt[2][0] > 1, "the second attempt restarted from scratch"
    assert job["progress"]["resumed_from_epoch"] >= killed_at_epoch
    assert [e["event"] for e in job["events"]].count("lease_expired") == 1
    assert registry.list_versions(job_env.weights) == ["v0001", "v0002"]
    manifest = registry.read_manifest(job_env.weights, "v0002")
    assert [h["epoch"] for h in manifest["history"]] == list(range(1, 9))  # the resumed run's full history
    assert manifest["training_job"] == {**manifest["training_job"], "id": job_id, "attempts": 2}
    assert "claimed job" in second.log() and f"resuming after epoch {job['progress']['resumed_from_epoch']}" in second.log()
    print(f"\nkilled after epoch {killed_at_epoch}; attempt 2 ran epochs {by_attempt[2]}")


def test_two_workers_run_each_job_exactly_once(job_env) -> None:
    server = job_env.start_server()
    options = [{"epochs": 1}, {"epochs": 1, "parent_version": "v0001"}, {"epochs": 2, "reject_and_refine": True},
               {"epochs": 1, "time_budget_s": 600}]
    jobs = len(options)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        ids = []
        for i in range(jobs):
            response = submit(http, paths=[f"cam{i % 2}.avi"], options=options[i])
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        workers = [job_env.start_worker(), job_env.start_worker()]
        finished = [follow(http, job_id, timeout=120, workers=workers) for job_id in ids]
    assert [j["state"] for j in finished] == ["succeeded"] * jobs, finished
    assert all(j["attempts"] == 1 for j in finished)
    versions = [j["version"] for j in finished]
    assert len(set(versions)) == jobs
    assert registry.list_versions(job_env.weights) == ["v0001"] + sorted(versions)
    trained_by = [registry.read_manifest(job_env.weights, v)["training_job"]["id"] for v in sorted(versions)]
    assert sorted(trained_by) == sorted(ids)  # one version per job: no job was trained twice
    claims = re.findall(r"claimed job ([0-9a-f]{32})", "".join(w.log() for w in workers))
    assert sorted(claims) == sorted(ids), claims
    manifests = [registry.read_manifest(job_env.weights, j["version"]) for j in finished]
    assert manifests[1]["parent_version"] == "v0001"  # a fine-tune of v0001
    assert [(h["phase"], h["epoch"]) for h in finished[2]["history"]] == [("train", 1), ("train", 2), ("refine", 1)]
    assert manifests[2]["reject_and_refine"]["frames_before"] > 0
    assert manifests[3]["train_config"]["time_budget_s"] == 600
    per_worker = [len(re.findall(r"claimed job", w.log())) for w in workers]
    print(f"\njobs per worker: {per_worker}")


def test_cancel_and_bad_footage(job_env, tmp_path: Path) -> None:
    slow = {**job_env.values["training_config"], "patches_per_epoch": 1024}
    server = job_env.start_server(training_config=slow)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        # A queued job is cancelled at once, and its uploads removed.
        queued = submit(http, files=[job_env.clips[0]]).json()["id"]
        cancelled = http.delete(f"/v1/training-jobs/{queued}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert not (job_env.data / "uploads" / queued).exists()
        assert http.delete(f"/v1/training-jobs/{queued}").status_code == 409
        assert http.delete("/v1/training-jobs/" + "0" * 32).status_code == 404

        # A running job stops at its next epoch and publishes nothing.
        long_job = submit(http, paths=["cam1.avi"], options={"epochs": 200}).json()["id"]
        worker = job_env.start_worker(training_config=slow)
        follow(http, long_job, until=lambda j: (j["progress"] or {}).get("epoch", 0) >= 1, workers=[worker])
        requested = http.delete(f"/v1/training-jobs/{long_job}")
        assert requested.status_code == 202 and requested.json()["cancel_requested"] is True
        job = follow(http, long_job, timeout=30, workers=[worker])
        assert job["state"] == "cancelled" and job["version"] is None, job
        assert job["progress"]["epoch"] < 200
        assert registry.list_versions(job_env.weights) == ["v0001"]
        # the worker records the outcome first, then removes the job's files (a worker that lost its
        # lease must not delete its successor's checkpoint), so the folder goes a moment later
        wait_for(lambda: not (job_env.data / "checkpoints" / long_job).exists(), timeout=10,
                 what="the cancelled job's checkpoint folder removed")

        # Bad footage fails the job with the client's file name, never a server path.
        garbage = tmp_path / "garbage.bin"
        garbage.write_bytes(b"RIFF\x00\x10\x00\x00AVI LIST" + os.urandom(4000))
        short = write_video(tmp_path / "short.avi", synthetic_frames(2, seed=1))
        bad = {
            "corrupt clip.avi": submit(http, files=[garbage], names=["corrupt clip.avi"]).json()["id"],
            "two frames.avi": submit(http, files=[short], names=["two frames.avi"]).json()["id"],
        }
        for name, job_id in bad.items():
            job = follow(http, job_id, timeout=30, workers=[worker])
            assert job["state"] == "failed", job
            assert name in job["error"], job["error"]
            assert str(job_env.data) not in job["error"] and job_id not in job["error"]
            assert not re.search(r"[0-9a-f]{32}", job["error"]), job["error"]
            print(f"\n{name}: {job['error']}")
        assert registry.list_versions(job_env.weights) == ["v0001"]
        # The gauge is refreshed by the server's poll (VAD_JOB_POLL_INTERVAL_S).
        wait_for(lambda: metric(http, "vad_training_jobs", state="failed") == 2.0, 5, what="failed gauge")
        assert metric(http, "vad_training_jobs", state="cancelled") == 2.0

        # SIGTERM: the worker hands its job back at the next epoch (checkpoint kept) and exits.
        handed_back = submit(http, paths=["cam0.avi"], options={"epochs": 200}).json()["id"]
        follow(http, handed_back, until=lambda j: (j["progress"] or {}).get("epoch", 0) >= 1, workers=[worker])
        assert worker.stop() == 0
        job = http.get(f"/v1/training-jobs/{handed_back}").json()
        assert job["state"] == "queued" and job["attempts"] == 0 and job["events"][-1]["event"] == "released", job
        assert (job_env.data / "checkpoints" / handed_back / "checkpoint.safetensors").is_file()
        assert http.delete(f"/v1/training-jobs/{handed_back}").status_code == 200
        assert not (job_env.data / "checkpoints" / handed_back).exists()


def test_refused_submissions(job_env, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = write_video(outside / "secret.avi", synthetic_frames(24, seed=9))
    (job_env.footage / "escape").symlink_to(outside)
    server = job_env.start_server(api_key=KEY, max_upload_bytes=200_000)
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert submit(http, files=[job_env.clips[0]]).status_code == 401
        assert submit(http, files=[job_env.clips[0]], headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert submit(http, paths=["cam0.avi"]).status_code == 401
        assert http.get("/v1/training-jobs").json()["jobs"] == []
        assert not (job_env.data / "uploads").exists() or not any((job_env.data / "uploads").iterdir())

        for path in ["../outside/secret.avi", "cam0.avi/../../outside/secret.avi", str(secret), "escape/secret.avi",
                     "escape", "nothere.avi", "", "."]:
            response = submit(http, paths=[path], headers=auth)
            assert response.status_code == 422, (path, response.text)
            assert response.json()["error"]["code"] == "invalid_request"
        for options, needle in [
            ({"epochs": 2, "learning_rate": 1}, "learning_rate"), ({"epochs": 0}, "epochs"),
            ({"epochs": "3"}, "epochs"), ({"input_mode": "rgb"}, "input_mode"),
            ({"reject_and_refine": "yes"}, "reject_and_refine"), ({"parent_version": "v0042"}, "parent_version"),
            ({"parent_version": "../v1"}, "parent_version"), ({"time_budget_s": -1}, "time_budget_s"),
        ]:
            response = submit(http, paths=["cam0.avi"], options=options, headers=auth)
            assert response.status_code == 422, (options, response.text)
            assert needle in response.json()["error"]["message"], response.text
        not_json = http.post("/v1/training-jobs", files=[("paths", (None, '["cam0.avi"]')), ("options", (None, "{epochs"))],
                             headers=auth)
        assert not_json.status_code == 422 and "options" in not_json.json()["error"]["message"]
        assert submit(http, headers=auth).status_code == 422  # no footage
        unknown_field = http.post("/v1/training-jobs", files=[("clips", ("a.avi", b"x"))], headers=auth)
        assert unknown_field.status_code == 422 and "clips" in unknown_field.text
        big = tmp_path / "big.avi"
        big.write_bytes(b"RIFF" + bytes(300_000))
        assert submit(http, files=[big], headers=auth).status_code == 413
        assert http.post("/v1/training-jobs", json={"paths": ["cam0.avi"]}, headers=auth).status_code == 415
        assert http.get("/v1/training-jobs/nope").status_code == 404
        assert http.get("/v1/training-jobs").json()["jobs"] == []  # nothing was queued by any of these
        assert not any((job_env.data / "uploads").iterdir())  # and nothing stored

        accepted = submit(http, paths=["cam0.avi", "frames"], options={"epochs": 3}, headers=auth)
        assert accepted.status_code == 202, accepted.text
        assert http.delete(f"/v1/training-jobs/{accepted.json()['id']}").status_code == 401
        assert http.delete(f"/v1/training-jobs/{accepted.json()['id']}", headers=auth).status_code == 200

    no_root = job_env.start_server(footage_root=None)
    with httpx.Client(base_url=no_root.url, timeout=30) as http:
        response = submit(http, paths=["cam0.avi"])
        assert response.status_code == 422 and "VAD_FOOTAGE_ROOT" in response.json()["error"]["message"]


def test_auto_activation_policy(job_env) -> None:
    """auto: a new version whose held-out reconstruction is no worse than the active one's is
    activated (validated and smoke-tested); a worse one is kept aside."""
    registry.update_manifest(job_env.weights, "v0001", {
        "validation": {**registry.read_manifest(job_env.weights, "v0001")["validation"], "holdout_reconstruction": 0.0}
    })
    server = job_env.start_server(activation_policy="auto")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        worker = job_env.start_worker()
        kept = follow(http, submit(http, paths=["cam0.avi"]).json()["id"], workers=[worker])
        assert kept["state"] == "succeeded" and kept["version"] == "v0002"
        kept = follow(http, kept["id"], timeout=10, until=lambda j: j["activation"] is not None)
        assert kept["activation"]["decision"] == "kept", kept["activation"]
        assert http.get("/v1/models/active").json()["version"] == "v0001"

        # Make the kept version the active one, with a poor figure: the next job's version beats it.
        registry.update_manifest(job_env.weights, "v0002", {
            "validation": {**registry.read_manifest(job_env.weights, "v0002")["validation"], "holdout_reconstruction": 1e9}
        })
        assert http.post("/v1/models/v0002/activate").status_code == 200
        assert http.get("/v1/models/active").json()["manifest"]["validation"]["holdout_reconstruction"] == 1e9

        done = follow(http, submit(http, paths=["cam1.avi"]).json()["id"], workers=[worker])
        assert done["version"] == "v0003"
        done = follow(http, done["id"], timeout=10, until=lambda j: j["activation"] is not None)
        assert done["activation"]["decision"] == "activated", done["activation"]
        assert http.get("/v1/models/active").json()["version"] == "v0003"
        assert registry.active_version(job_env.weights) == "v0003"
        assert metric(http, "vad_training_job_activations_total", decision="activated") == 1.0
        assert metric(http, "vad_training_job_activations_total", decision="kept") == 1.0
