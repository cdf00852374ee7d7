"""What the service, job, reliability and web-page suites share: the tiny model they serve, a real
uvicorn server in a thread, a registry's second version, and settings as a subprocess's environment."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi.testclient import TestClient

from model import registry
from model.config import ModelConfig
from service.app import create_app
from service.server import uvicorn_config
from service.settings import Settings

TINY_MODEL = ModelConfig(
    input_mode="appearance+motion", patch_size=16, stride=16, latent_dim=8,
    refiner_channels=(4, 8, 8), detector_channels=(4, 8, 8),
)
# What jobs train with (VAD_TRAINING_CONFIG); patience is high so a job runs the epochs it asks for.
TINY_JOB_TRAINING = dict(patches_per_epoch=256, batch_size=32, max_epochs=1, holdout_patches=64,
                         detector_polish_epochs=0, patience=1000, phase_two_steps=50)

# Manifest fields a new version gets from publish itself, never from the version it is made from.
_PUBLISH_OWN_FIELDS = ("format", "created_at", "package_version", "weights_sha256", "version")


def inherited_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A version's manifest minus what ``registry.publish`` writes itself."""
    return {k: v for k, v in manifest.items() if k not in _PUBLISH_OWN_FIELDS}


def publish_second_version(weights: Path, detector_bias_shift: float = 0.0) -> None:
    """Publish v0002 from v0001's networks (D's bias shifted, so its scores differ, when asked) and
    keep v0001 active."""
    loaded = registry.load_version(weights, "v0001")
    with torch.no_grad():
        loaded.detector.head.bias += detector_bias_shift
    fields = {**inherited_manifest(loaded.manifest), "parent_version": "v0001"}
    assert registry.publish(weights, loaded.refiner, loaded.detector, fields) == "v0002"
    registry.set_active_version(weights, "v0001")


def settings_env(values: dict[str, Any]) -> dict[str, str]:
    """Settings field values as the VAD_* environment variables a `vad serve` / `vad worker` reads."""
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


class LiveServer:
    """create_app(settings) under uvicorn in a thread on a free loopback port; ``wrap`` may put an
    ASGI wrapper (e.g. a byte counter) around the app."""

    def __init__(self, settings: Settings, wrap: Callable[[Any], Any] | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        served = wrap(self.app) if wrap else self.app
        self.server = uvicorn.Server(uvicorn_config(served, settings, "127.0.0.1", self.port, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def services(self) -> Any:  # service.deps.Services
        return self.app.state.services

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


def started_clients(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """For a fixture: make(**settings) -> a started TestClient (lifespan run); all closed after."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def started_servers(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., LiveServer]]:
    """For a fixture: start(wrap=None, **settings) -> a started LiveServer; all stopped after."""
    servers: list[LiveServer] = []

    def start(wrap: Callable[[Any], Any] | None = None, **overrides: Any) -> LiveServer:
        server = LiveServer(make_settings(**overrides), wrap).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
