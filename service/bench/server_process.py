"""`vad serve` in its own process on a free loopback port: started and waited for until /readyz
answers, its resident memory readable from /proc, stopped by signal. The bench measures a real
server with it, and the reliability tests use it for memory figures and restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import httpx

REPO = Path(__file__).resolve().parents[2]  # where `python -m service.cli` imports this checkout


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status_kib(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status (``VmRSS``, ``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise OSError(f"no {field} for process {pid}")


def child_pids(pid: int, skip_tracker: bool = True) -> list[int]:
    """The child processes of ``pid`` (Linux /proc: every one of its threads' ``children`` file, the main
    thread's first); with ``skip_tracker``, multiprocessing's resource tracker (a child whose command
    line names ``resource_tracker``) left out. Empty when /proc cannot tell (the process gone, not Linux)."""
    try:
        tasks = sorted((int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()), key=lambda tid: (tid != pid, tid))
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        try:
            found += [int(child) for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    if skip_tracker:
        found = [child for child in found if not _is_resource_tracker(child)]
    return found


def _is_resource_tracker(pid: int) -> bool:
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile: listed as it would be without skip_tracker
        return False


class ServerProcess:
    """``python -m service.cli serve --host 127.0.0.1 --port PORT [--weights DIR]``.

    ``env``: the process's whole environment (default: this process's), so the caller decides which
    VAD_* settings it sees; ``log_path``: where its stdout and stderr go (appended; default: a
    temporary file removed at ``stop``); ``port``: default a free one. Also a context manager.
    """

    def __init__(self, env: Mapping[str, str] | None = None, log_path: Path | None = None, port: int | None = None,
                 weights_dir: Path | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.port = port or free_port()
        self.url, self.ws_url = f"http://127.0.0.1:{self.port}", f"ws://127.0.0.1:{self.port}"
        self.weights_dir = weights_dir
        self._temporary_log = log_path is None
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="vad-serve-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server was not started"
        return self.process.pid

    def start(self, timeout_s: float = 120.0) -> "ServerProcess":
        """Launches the server and returns once /readyz answers 200; stops it and raises RuntimeError
        (with the log's tail) when it exits or is not ready within ``timeout_s``."""
        command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.weights_dir is not None:
            command += ["--weights", str(self.weights_dir)]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                problem = f"the server exited ({self.process.returncode})"
                break
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                problem = f"the server was not ready within {timeout_s} s"
                break
            time.sleep(0.1)
        tail = self.log()[-3000:]
        self.stop()
        raise RuntimeError(f"{problem}: {tail}")

    def log(self) -> str:
        """What the server has written so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def processes(self) -> list[int]:
        """The server's pid and, under VAD_SERVE_PROCESSES > 1, its serving children's (Linux /proc;
        multiprocessing's resource tracker is not one of them)."""
        return [self.pid, *child_pids(self.pid)]

    def rss_kib(self) -> int:
        """Resident memory now (VmRSS) of the server's processes together, KiB."""
        return sum(proc_status_kib(pid, "VmRSS") for pid in self.processes())

    def peak_rss_mb(self) -> float | None:
        """Peak resident memory so far (VmHWM; the sum of each process's peak), MB; None when /proc cannot tell."""
        try:
            return round(sum(proc_status_kib(pid, "VmHWM") for pid in self.processes()) / 1024, 1)
        except OSError:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        """Sends ``sig`` (killing it after ``timeout_s``), waits for the exit; returns the exit status
        (None when it was never started). Stopping twice is harmless."""
        returncode = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(sig)
                try:
                    self.process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            returncode = self.process.returncode
        if self._temporary_log:
            self.log_path.unlink(missing_ok=True)
        return returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
