"""Browser tests of the web page: Debian's chromium driven headless by Playwright (no browser download:
``executable_path=/usr/bin/chromium``), against a real uvicorn server on a free loopback port.

When /usr/bin/chromium is missing, the session installs it with apt-get (root, non-interactive; runs
``apt-get update`` first when the plain install fails) and skips only when that fails. Screenshots
go to ``artifacts/ui/`` (git-ignored); their paths are listed at the end of the test run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from tests.support import LiveServer, publish_second_version

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
SCREENSHOTS: list[Path] = []


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=1200, check=False)


def _install_chromium() -> str | None:
    """Installs Debian's chromium; returns why it could not, or None."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    if os.geteuid() != 0:
        return "apt-get needs root and the tests do not run as root"
    try:
        result = _apt_get("install", "-y", "chromium")
        if result.returncode != 0:  # typically: package lists not fetched yet
            update = _apt_get("update")
            if update.returncode != 0:
                return f"apt-get update failed: {update.stderr.strip()[-300:]}"
            result = _apt_get("install", "-y", "chromium")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get failed: {exc}"
    if result.returncode != 0:
        return f"apt-get install chromium failed: {result.stderr.strip()[-300:]}"
    return None if CHROMIUM.exists() else "apt-get installed chromium but /usr/bin/chromium is missing"


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        reason = _install_chromium()
        if reason:
            pytest.skip(f"UI tests need Debian's chromium at {CHROMIUM}: {reason}")
    return CHROMIUM


# package scope: Playwright's sync API keeps an event loop running in the main thread while it is
# open, and a suite collected after this one (asyncio.run in tests/service) must not find it there
@pytest.fixture(scope="package")
def browser(chromium_path: Path) -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="UI tests need Playwright: pip install -e '.[test]'"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class PageProblems:
    """Uncaught page exceptions and CSP violations seen by a page (each test asserts there are none)."""

    def __init__(self, page: Any) -> None:
        self.items: list[str] = []
        page.on("pageerror", lambda exc: self.items.append(f"page error: {exc}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        text = message.text
        if message.type == "error" and ("Content Security Policy" in text or "Uncaught" in text):
            self.items.append(f"console: {text}")


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.problems = PageProblems(page)
    yield page
    context.close()


@pytest.fixture
def screenshot(request: pytest.FixtureRequest) -> Callable[[Any, str], Path]:
    """screenshot(page, name) -> artifacts/ui/<name>.png (full page), recorded in the report."""

    def take(page: Any, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        SCREENSHOTS.append(path)
        request.node.user_properties.append(("screenshot", str(path)))
        print(f"screenshot: {path}")
        return path

    return take


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SCREENSHOTS:
        terminalreporter.write_sep("-", "UI screenshots")
        for path in SCREENSHOTS:
            terminalreporter.write_line(str(path))


@pytest.fixture(autouse=True)
def _no_vad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("VAD_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def ui_weights(trained_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny trained version (v0001, ACTIVE) and a second version v0002 to switch to."""
    weights = Path(shutil.copytree(trained_weights, tmp_path_factory.mktemp("ui") / "weights"))
    publish_second_version(weights)
    return weights


@pytest.fixture
def live_server(ui_weights: Path, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """live_server(**settings) -> a started server on a private copy of ui_weights."""
    servers: list[LiveServer] = []

    def start(**overrides: object) -> LiveServer:
        weights = Path(shutil.copytree(ui_weights, tmp_path / f"weights{len(servers)}"))
        values: dict[str, object] = {
            "weights_dir": weights, "device": "cpu", "max_queue_delay_ms": 2.0,
            "data_dir": tmp_path / f"data{len(servers)}",  # training jobs' queue, when the server has one
        }
        values.update(overrides)
        server = LiveServer(Settings(**values)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
