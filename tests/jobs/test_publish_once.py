"""A worker that dies right after publishing a job's version (before it could record the job as done)
leaves the job to be retried; the retry must find that version and not publish a second one."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model import registry
from service.app import create_app
from service.jobs import store as job_store
from service.jobs.worker import Worker
from tests.support import synthetic_frames, write_video


class _Clock:
    """The job store's clock (its ``time.time()``), moved by the test to expire a lease."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now


class WorkerDied(BaseException):
    """The worker process ends here (a BaseException: no handler of the worker records anything)."""


def test_a_version_published_just_before_the_worker_died_is_not_published_again(
    job_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(job_store, "time", clock)
    settings = job_env.settings()
    before = registry.list_versions(job_env.weights)
    clip = write_video(tmp_path / "cam.avi", synthetic_frames(24, seed=12)).read_bytes()
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/training-jobs", files=[("files", ("cam.avi", clip, "video/x-msvideo"))],
                               data={"options": '{"epochs": 1}'})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        published: list[str] = []
        publish = registry.publish

        def publish_then_die(*args, **kwargs):
            published.append(publish(*args, **kwargs))
            if len(published) == 1:
                raise WorkerDied
            return published[-1]

        monkeypatch.setattr(registry, "publish", publish_then_die)
        with pytest.raises(WorkerDied):
            Worker(settings, worker_id="first").run_one()
        assert len(published) == 1 and registry.list_versions(job_env.weights) == [*before, published[0]]
        assert client.get(f"/v1/training-jobs/{job_id}").json()["state"] == "running"

        clock.now += settings.job_lease_s + 1  # the first worker's lease runs out: the job is retried
        assert Worker(settings, worker_id="second").run_one()
        job = client.get(f"/v1/training-jobs/{job_id}").json()
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 2
    assert registry.list_versions(job_env.weights) == [*before, published[0]], "the retry published again"
    assert published == published[:1]
    assert job["version"] == published[0]
