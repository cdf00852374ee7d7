"""Deployment tests: the real programs the stack runs (Debian's docker-compose, Prometheus with promtool,
nginx), installed once per session by ``debian_tools`` when missing, and helpers to run them on loopback.

The install needs root and apt-get (the CI container has both); without them, or when apt-get fails,
the tests that need the programs are skipped with the reason. Service start-up of the packages is
blocked during the install (policy-rc.d), so no nginx or Prometheus daemon is left running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
# Debian package -> the programs the tests run from it.
DEBIAN_PACKAGES: dict[str, tuple[str, ...]] = {
    "docker-compose": ("docker-compose",),
    "prometheus": ("prometheus", "promtool"),
    "nginx": ("nginx",),
}
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"])
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
APT_TIMEOUT_S = 900


def which(tool: str) -> str | None:
    return shutil.which(tool, path=SEARCH_PATH)


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stderr.strip() or result.stdout.strip())[-600:]


def _needs_update(packages: list[str]) -> bool:
    policy = _run(["apt-cache", "policy", *packages], timeout=120)
    blocks = policy.stdout.split("\n")
    known = {line.rstrip(":").strip() for line in blocks if line and not line.startswith(" ")}
    return policy.returncode != 0 or "Candidate: (none)" in policy.stdout or not set(packages) <= known


def apt_install(packages: list[str]) -> str | None:
    """Install ``packages`` with apt-get; None on success, else why not."""
    if os.name != "posix" or os.geteuid() != 0:
        return "not root, so apt-get cannot install them"
    if which("apt-get") is None:
        return "apt-get is not available"
    created_policy = False
    try:
        if _needs_update(packages):
            update = _run(["apt-get", "update"], timeout=APT_TIMEOUT_S)
            if update.returncode != 0:
                return f"apt-get update failed: {_tail(update)}"
        if not POLICY_RC_D.exists():  # keep the packages' postinst from starting nginx / prometheus daemons
            POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
            POLICY_RC_D.chmod(0o755)
            created_policy = True
        install = _run(
            ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *packages],
            timeout=APT_TIMEOUT_S,
        )
        if install.returncode != 0:
            return f"apt-get install {' '.join(packages)} failed: {_tail(install)}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get failed: {exc}"
    finally:
        if created_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    return None


@pytest.fixture(scope="session")
def debian_tools() -> dict[str, str]:
    """{program: path} for docker-compose, prometheus, promtool and nginx, installed when missing."""
    missing = sorted(pkg for pkg, tools in DEBIAN_PACKAGES.items() if any(which(t) is None for t in tools))
    if missing:
        started = time.monotonic()
        problem = apt_install(missing)
        if problem:
            pytest.skip(f"Debian packages {', '.join(missing)} are needed: {problem}")
        print(f"\ninstalled {', '.join(missing)} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    tools = {tool: which(tool) for tools in DEBIAN_PACKAGES.values() for tool in tools}
    absent = [tool for tool, path in tools.items() if path is None]
    if absent:
        pytest.skip(f"{', '.join(absent)} not found after installing {', '.join(DEBIAN_PACKAGES)}")
    return {tool: str(path) for tool, path in tools.items()}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Programs started by a test, each logging to its own file, stopped (by pid) at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                       stdin=subprocess.DEVNULL)
        self.started.append((name, process, log))
        return process

    def check_running(self) -> None:
        for name, process, _ in self.started:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.logs(name)}")

    def logs(self, name: str | None = None, tail: int = 3000) -> str:
        parts = []
        for entry_name, _, log in self.started:
            if name in (None, entry_name):
                text = log.read_text(errors="replace") if log.exists() else ""
                parts.append(f"--- {entry_name} ---\n{text[-tail:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for _, process, _ in reversed(self.started):
            if process.poll() is None:
                process.terminate()
        for _, process, _ in reversed(self.started):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    started = Processes(tmp_path_factory.mktemp("logs"))
    yield started
    started.stop_all()


def wait_until(condition: Callable[[], object], timeout_s: float, what: str,
               on_timeout: Callable[[], str] | None = None, interval_s: float = 0.2) -> object:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` (and context) after timeout."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(interval_s)
    context = on_timeout() if on_timeout else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})\n{context}")


def vad_command() -> list[str]:
    """The `vad` console script of this environment (as pyproject installs it), else `python -m service.cli`."""
    script = Path(sys.executable).with_name("vad")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
