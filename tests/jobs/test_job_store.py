"""The job store's guarantees (atomic claims, leases, fencing), on each database (``database_url``:
the SQLite file, then a real PostgreSQL server), and the pure helpers: the auto-activation rule,
footage-root path checks, how a resumed attempt continues the history."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from service.errors import InvalidJobRequest
from service.jobs.activation import auto_decision
from service.jobs.form import display_name
from service.jobs.layout import resolve_footage_path
from service.database.base import Database
from service.jobs.store import SqlJobStore, new_job_id
from service.jobs.worker import continued_history


@pytest.fixture
def store(make_database: Callable[[], Database]) -> SqlJobStore:
    return SqlJobStore(make_database())


def add_jobs(store: SqlJobStore, count: int) -> list[str]:
    ids = [new_job_id() for _ in range(count)]
    for job_id in ids:
        store.submit(job_id, {}, {}, [{"source": "path", "name": "a.avi", "path": "/x/a.avi"}])
    return ids


def test_readers_do_not_create_the_queue(store: SqlJobStore, tmp_path: Path) -> None:
    assert store.list() == [] and store.get(new_job_id()) is None and store.reap(3) == []
    assert store.counts() == {s: 0 for s in ("queued", "running", "succeeded", "failed", "cancelled")}
    assert not (tmp_path / "data").exists() and not store.exists()  # no file, no PostgreSQL tables
    add_jobs(store, 1)
    assert store.exists() and store.counts()["queued"] == 1


def test_concurrent_claims_hand_out_each_job_once(store: SqlJobStore, make_database: Callable[[], Database]) -> None:
    ids = add_jobs(store, 60)
    claimed: dict[str, list[str]] = {}
    lock = threading.Lock()
    start = threading.Barrier(6)

    def worker(name: str) -> None:
        mine = SqlJobStore(make_database())  # its own store object and connections, as another process would
        start.wait()
        while True:
            job, _ = mine.claim(name, lease_s=60, max_attempts=3)
            if job is None:
                return
            with lock:
                claimed.setdefault(job.id, []).append(name)
            assert mine.finish(job.id, name, job.attempts, "succeeded", version="v0001")

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed) == sorted(ids)
    assert all(len(names) == 1 for names in claimed.values()), {k: v for k, v in claimed.items() if len(v) > 1}
    assert len({n for names in claimed.values() for n in names}) > 1  # the claims really were concurrent
    assert all(job.attempts == 1 and job.state == "succeeded" for job in store.list(limit=100))


class ManualClock:
    """The store's clock (its ``time.time()``), moved by the test: a lease expires when the test says
    so, not when a loaded machine happens to take longer than the lease between two calls."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now


def test_expired_lease_requeues_then_fails_after_max_attempts(store: SqlJobStore, monkeypatch) -> None:
    from service.jobs import store as job_store

    clock = ManualClock()
    monkeypatch.setattr(job_store, "time", clock)
    (job_id,) = add_jobs(store, 1)
    first, _ = store.claim("a", lease_s=30, max_attempts=2)
    assert first is not None and first.id == job_id and first.attempts == 1 and first.state == "running"
    assert store.claim("b", lease_s=30, max_attempts=2)[0] is None  # leased: nobody else gets it
    clock.now += 20
    assert store.heartbeat(job_id, "a", 1, lease_s=30) == "ok"  # renewed: 30 s from now
    clock.now += 25
    assert store.claim("b", lease_s=30, max_attempts=2)[0] is None  # still within the renewed lease
    clock.now += 10
    second, reaped = store.claim("b", lease_s=30, max_attempts=2)
    assert reaped == [] and second is not None and second.attempts == 2 and second.worker_id == "b"
    assert [e["event"] for e in second.events] == ["queued", "claimed", "lease_expired", "claimed"]
    # The first worker is fenced off: its writes change nothing.
    assert store.heartbeat(job_id, "a", 1, lease_s=60) == "lost"
    assert store.record_progress(job_id, "a", 1, 60, {"epoch": 9}, []) == "lost"
    assert store.finish(job_id, "a", 1, "succeeded", version="v0009") is False
    assert store.get(job_id).state == "running" and store.get(job_id).progress is None
    clock.now += 31
    (failed,) = store.reap(max_attempts=2)
    assert failed.id == job_id and failed.state == "failed" and "gave up after 2 attempt(s)" in failed.error
    assert store.claim("c", lease_s=1, max_attempts=2)[0] is None


def test_cancel_release_and_activation_marks(store: SqlJobStore) -> None:
    queued, running, other = add_jobs(store, 3)
    assert store.request_cancel(queued).state == "cancelled"
    job, _ = store.claim("a", lease_s=60, max_attempts=3)
    assert job.id == running
    assert store.request_cancel(running).cancel_requested is True
    assert store.heartbeat(running, "a", 1, 60) == "cancel"
    assert store.record_progress(running, "a", 1, 60, {"epoch": 1}, [{"epoch": 1}]) == "cancel"
    assert store.finish(running, "a", 1, "cancelled", error="cancelled")
    job, _ = store.claim("b", lease_s=60, max_attempts=3)
    assert job.id == other and store.release(other, "b", 1, "worker stopped")
    assert store.get(other).state == "queued" and store.get(other).attempts == 0  # a clean stop is not an attempt
    job, _ = store.claim("c", lease_s=60, max_attempts=3)
    assert store.finish(other, "c", 1, "succeeded", version="v0002")
    assert [j.id for j in store.pending_activation()] == [other]
    assert store.set_activation(other, {"decision": "manual"}) and not store.set_activation(other, {"decision": "x"})
    assert store.pending_activation() == []


def test_auto_decision_rule() -> None:
    def manifest(rec, mode="appearance+motion", patch=16):
        return {"validation": {"holdout_reconstruction": rec}, "model_config": {"input_mode": mode, "patch_size": patch}}

    assert auto_decision(manifest(0.01), None)[0] is True
    assert auto_decision(manifest(0.01), manifest(0.02))[0] is True
    assert auto_decision(manifest(0.02), manifest(0.02))[0] is True  # no worse
    assert auto_decision(manifest(0.03), manifest(0.02))[0] is False
    assert auto_decision(manifest(None), manifest(0.02))[0] is False
    assert auto_decision(manifest(float("nan")), manifest(0.02))[0] is False
    assert auto_decision(manifest(0.01), manifest(None))[0] is True
    assert auto_decision(manifest(0.01, mode="appearance"), manifest(0.02))[0] is False
    assert auto_decision(manifest(0.01, patch=30), manifest(0.02))[0] is False


def test_footage_paths_stay_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "cam").mkdir(parents=True)
    (root / "cam" / "a.avi").write_bytes(b"x")
    (tmp_path / "secret.avi").write_bytes(b"x")
    (root / "link.avi").symlink_to(tmp_path / "secret.avi")
    (root / "inner.avi").symlink_to(root / "cam" / "a.avi")
    assert resolve_footage_path(root, "cam/a.avi") == ((root / "cam" / "a.avi").resolve(), "cam/a.avi")
    assert resolve_footage_path(root, str(root / "cam")) == ((root / "cam").resolve(), "cam")
    assert resolve_footage_path(root, "inner.avi")[1] == "cam/a.avi"
    for bad in ["../secret.avi", "cam/../../secret.avi", str(tmp_path / "secret.avi"), "link.avi", "cam/nope.avi",
                ".", "cam/..", "a\x00b"]:
        with pytest.raises(InvalidJobRequest):
            resolve_footage_path(root, bad)
    with pytest.raises(InvalidJobRequest, match="VAD_FOOTAGE_ROOT"):
        resolve_footage_path(None, "cam/a.avi")


def test_display_names_are_never_paths() -> None:
    assert display_name("../../etc/passwd", 0) == "passwd"
    assert display_name("C:\\videos\\lobby.avi", 0) == "lobby.avi"
    assert display_name("", 2) == "upload 3"
    assert display_name("a\nb.avi", 0) == "ab.avi"


def test_resumed_history_follows_the_checkpoint() -> None:
    from service.jobs.store import Job

    job = Job(id="j", state="running", options={}, config={}, footage=[], created_at=0, updated_at=0, attempts=2,
              history=[{"attempt": 1, "phase": "train", "epoch": e} for e in (1, 2, 3)])
    meta = {"epoch": 4, "history": [{"epoch": e, "step": e} for e in (1, 2, 3, 4)]}
    history = continued_history(job, meta)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [h["attempt"] for h in history[:3]] == [1, 1, 1] and history[3]["recovered"] is True
    assert [h["epoch"] for h in continued_history(job, {"epoch": 2, "history": []})] == [1, 2]
    assert continued_history(job, None) == []
