"""Helpers for the training-job tests: real `vad worker` subprocesses, and polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support import settings_env

REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """`python -m service.cli worker` as its own process, its output in a log file."""

    def __init__(self, values: dict[str, Any], log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAD_")}
        env.update(settings_env(values))
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"], cwd=REPO, env=env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no cleanup, no lease release."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 20) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        return self.process.returncode


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


TERMINAL = ("succeeded", "failed", "cancelled")


def follow(http: httpx.Client, job_id: str, timeout: float = 90, until: Callable[[dict], bool] | None = None,
           seen: list[dict] | None = None, workers: list[WorkerProcess] | None = None) -> dict:
    """Poll GET /v1/training-jobs/{id} until ``until(job)`` (default: a final state)."""
    until = until or (lambda job: job["state"] in TERMINAL)
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/v1/training-jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if seen is not None and job["progress"] and (not seen or seen[-1] != job["progress"]):
            seen.append(job["progress"])
        if until(job):
            return job
        if time.monotonic() > deadline:
            logs = "\n".join(w.log()[-3000:] for w in workers or [])
            raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}\n{logs}")
        time.sleep(0.1)
