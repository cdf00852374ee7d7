"""The CPU server image, built and run for real (docker/Dockerfile) without Docker or a registry.

buildah (Debian's package) builds the image with ``--isolation chroot`` on a local base image made from
a Debian bookworm minbase root file system (debootstrap, with python3 and python3-venv; cached in
~/.cache/vad-tests/), with the wheelhouse build option (``--build-arg WHEELS=/wheels``): the project's
wheel and its dependencies downloaded on the host (torch from this machine's disk), since neither base
images nor the PyTorch index can be reached here. ``buildah run --isolation chroot`` then runs the
image's own entrypoint and ``vad serve`` command (host and port moved to a free loopback port; it
shares the host's network), and the test checks from outside: /readyz, one clip scored, /metrics.
The containers and images it made are removed afterwards; the cached root file system is kept.

Slow (a 1.8 GB image; about three minutes here), so it runs only when asked:

    VAD_TEST_IMAGES=1 .venv/bin/python -m pytest tests/deploy/test_image.py

Skipped with the reason where buildah or debootstrap cannot be installed (one apt-get try per
machine: the failure is remembered in ~/.cache/vad-tests/image-tools-unavailable.txt; delete it to
retry).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import REPO, apt_install, free_port, wait_until, which
from tests.support import synthetic_frames, write_video

pytestmark = pytest.mark.skipif(
    os.environ.get("VAD_TEST_IMAGES") != "1",
    reason="builds and runs the CPU image (~3 min, 1.8 GB): VAD_TEST_IMAGES=1 pytest tests/deploy/test_image.py",
)

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vad-tests"
UNAVAILABLE = CACHE / "image-tools-unavailable.txt"
SUITE = "bookworm"
BASE_PYTHON = "3.11"  # bookworm's python3: the wheelhouse is downloaded for it
BASE_TAR = CACHE / f"debian-{SUITE}-minbase-python3.tar"
MIRROR = os.environ.get("VAD_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the build context of docker/Dockerfile needs (the rest is excluded by .dockerignore anyway).
CONTEXT = ("pyproject.toml", "README.md", ".dockerignore", "model", "service", "weights", "docker")
TAG = f"vad-test-{os.getpid()}"


def run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}"
    return result


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    """Paths of buildah and debootstrap, installed with apt-get once when missing."""
    wanted = {"buildah": "buildah", "debootstrap": "debootstrap"}
    missing = [package for package, tool in wanted.items() if which(tool) is None]
    if missing:
        if UNAVAILABLE.exists():
            pytest.skip(f"{UNAVAILABLE.read_text().strip()} (remembered in {UNAVAILABLE}; delete it to retry)")
        problem = apt_install(missing)
        if problem is None and any(which(tool) is None for tool in wanted.values()):
            problem = f"{', '.join(missing)} installed, but the programs are not on PATH"
        if problem:
            CACHE.mkdir(parents=True, exist_ok=True)
            UNAVAILABLE.write_text(f"buildah and debootstrap are needed: {problem}\n")
            pytest.skip(f"buildah and debootstrap are needed: {problem}")
    return {tool: str(which(tool)) for tool in wanted.values()}


def _unmount_under(root: Path) -> None:
    """debootstrap mounts /proc and /sys in the target; a failed run may leave them (never rm -r those)."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m == str(root) or m.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, timeout=60)


def debian_rootfs(debootstrap: str) -> Path:
    """A tarball of a Debian minbase root file system with python3 and python3-venv (cached)."""
    if BASE_TAR.exists():
        return BASE_TAR
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / f"rootfs-{os.getpid()}"
    try:
        run([debootstrap, "--variant=minbase", "--include=python3,python3-venv", SUITE, str(root), MIRROR],
            timeout=900)
        _unmount_under(root)
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftovers).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = BASE_TAR.with_suffix(f".{os.getpid()}.partial")
        run(["tar", "-C", str(root), "-cf", str(partial), "."], timeout=300)
        partial.rename(BASE_TAR)
    finally:
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
    return BASE_TAR


def build_context(target: Path) -> Path:
    """A copy of the repository's build context with a wheelhouse in docker/wheels/."""
    target.mkdir(parents=True)
    for name in CONTEXT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    wheels = target / "docker" / "wheels"
    for stale in wheels.glob("*.whl"):  # whatever a developer left in the repository's wheelhouse
        stale.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "-q", "-w", str(wheels), str(target)], timeout=600, cwd=target)
    project = next(wheels.glob("vad_alocc-*.whl"))
    run([*pip, "download", "-q", "-d", str(wheels), "--only-binary=:all:", "--python-version", BASE_PYTHON,
         f"vad-alocc[onnx,postgres] @ {project.as_uri()}", "setuptools>=68", "wheel"], timeout=900)
    shutil.rmtree(target / "build", ignore_errors=True)  # setuptools' build folder, not context
    return target


class Buildah:
    """The images and containers this test makes, removed (by name) at teardown."""

    def __init__(self, buildah: str) -> None:
        self.buildah = buildah
        self.images: list[str] = []
        self.containers: list[str] = []

    def __call__(self, *args: str, timeout: float = 300) -> str:
        return run([self.buildah, *args], timeout=timeout).stdout.strip()

    def container(self, image: str, name: str) -> str:
        self.containers.append(name)
        return self("from", "--pull-never", "--name", name, image)

    def image(self, name: str) -> str:
        self.images.append(name)
        return name

    def cleanup(self) -> None:
        for name in reversed(self.containers):
            subprocess.run([self.buildah, "rm", name], capture_output=True, timeout=120, check=False)
        for name in reversed(self.images):
            subprocess.run([self.buildah, "rmi", "-f", name], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def buildah(tools: dict[str, str]) -> Iterator[Buildah]:
    made = Buildah(tools["buildah"])
    yield made
    made.cleanup()


def serve_command(config: dict, port: int) -> list[str]:
    """The image's ENTRYPOINT + CMD, on 127.0.0.1:port (buildah run shares the host's network)."""
    command = [*config["Entrypoint"], *config["Cmd"]]
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    return command


def test_cpu_server_image_builds_on_a_debian_base_and_serves(
        tools: dict[str, str], buildah: Buildah, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()

    def step(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = now - since
        return now

    # 1. The base: Debian bookworm minbase (+ python3, python3-venv), imported as a local image.
    cached = BASE_TAR.exists()
    tarball = debian_rootfs(tools["debootstrap"])
    mark = step("debootstrap (cached)" if cached else "debootstrap", started)
    base = buildah.image(f"localhost/{TAG}-base:{SUITE}")
    working = buildah.container("scratch", f"{TAG}-base-import")
    buildah("add", working, str(tarball), "/")
    buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", working)
    buildah("commit", "-q", working, base, timeout=600)
    mark = step("import base", mark)

    # 2. The build context with a wheelhouse: the project's wheel and its dependencies (torch from disk).
    context = build_context(tmp_path / "context")
    mark = step("wheelhouse", mark)

    # 3. The CPU server image, offline, on that base.
    server = buildah.image(f"localhost/{TAG}-server:test")
    buildah("bud", "--isolation", "chroot", "--format", "docker", "--layers=false", "--pull-never",
            "-f", str(context / "docker" / "Dockerfile"), "--target", "server",
            "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", "WHEELS=/wheels",
            "-t", server, str(context), timeout=1800)
    mark = step("buildah bud", mark)

    inspected = json.loads(buildah("inspect", "--type", "image", server))
    config = inspected["Docker"]["config"]
    assert config["User"] == "vad:vad" and config["Healthcheck"]["Test"][-1] == "/opt/vad/docker/healthcheck.py"
    assert "8000/tcp" in config["ExposedPorts"]
    container = buildah.container(server, f"{TAG}-server")
    # The wheelhouse stayed in the build stage; the venv has the CPU torch of the wheelhouse.
    probe = buildah("run", "--isolation", "chroot", container, "--", "sh", "-c",
                    "test ! -e /wheels && id -u && python -c 'import torch; print(torch.__version__)'")
    assert probe.splitlines()[0] == "10001" and "+cpu" in probe.splitlines()[-1], probe

    # 4. Run the image's command, check it from outside, stop it.
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [buildah.buildah, "run", "--isolation", "chroot", container, "--", *serve_command(config, port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"vad serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            return httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200

        wait_until(ready, 240, "/readyz 200 from the container", lambda: log_path.read_text()[-4000:], 0.5)
        mark = step("vad serve ready", mark)
        frames = synthetic_frames(12, seed=3, anomaly_from=6)
        clip = write_video(tmp_path / "clip.avi", frames[:8])
        with httpx.Client(base_url=base_url, timeout=120) as http:
            scored = http.post("/v1/clips?maps=false", files={"file": ("c.avi", clip.read_bytes())})
            assert scored.status_code == 200, scored.text
            body = scored.json()
            assert body["frame_count"] == 8 and body["model_version"], body
            metrics = http.get("/metrics")
            assert metrics.status_code == 200
            samples = [line.rsplit(" ", 1) for line in metrics.text.splitlines() if line.startswith("vad_")]
            names = {name.split("{")[0] for name, _ in samples}
            assert "vad_http_request_duration_seconds_count" in names, sorted(names)
            scored_frames = sum(float(value) for name, value in samples if name.startswith("vad_frames_scored_total"))
            assert scored_frames >= 8, sorted(names)
        assert "seeded /var/lib/vad/weights with the bundled" in log_path.read_text()  # the entrypoint ran
        mark = step("clip + metrics", mark)
    finally:
        if process.poll() is None:
            process.terminate()  # buildah run passes the signal on to the command
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base_url}/readyz", timeout=2)
    step("stop", mark)

    total = time.monotonic() - started
    with capsys.disabled():
        print(f"\nimage test: {total:.0f} s in all; "
              + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()), file=sys.stderr)
