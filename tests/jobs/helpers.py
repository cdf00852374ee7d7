"""Helpers for the training-job tests: a real uvicorn server on a free loopback port (in a thread),
real `vad worker` subprocesses, and polling."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from service.app import create_app
from service.server import uvicorn_config
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]


class LiveServer:
    """create_app(settings) under uvicorn in a thread, on a free 127.0.0.1 port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, "127.0.0.1", self.port, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


def settings_env(values: dict[str, Any]) -> dict[str, str]:
    """Settings field values as the VAD_* environment variables a worker reads."""
    env = {}
    for name, value in values.items():
        if isinstance(value, (dict, list)):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"VAD_{name.upper()}"] = text
    return env


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
