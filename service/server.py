"""``vad serve``: run the app under uvicorn."""

from __future__ import annotations

import asyncio
from types import FrameType
from typing import Any

import torch
import uvicorn

from service.app import create_app
from service.deps import Services
from service.settings import Settings


def uvicorn_config(app: Any, settings: Settings, host: str, port: int, **extra: Any) -> uvicorn.Config:
    """The uvicorn configuration the server runs with (tests reuse it on a loopback port).

    The WebSocket frame limit is VAD_WS_MAX_MESSAGE_BYTES, so an over-size message is refused by the
    protocol layer (close 1009) before it is buffered; the app checks it again. A stop waits at most
    VAD_SHUTDOWN_GRACE_S for open requests: an event stream (SSE) never ends by itself, so without a
    bound one open browser tab would hold a stopping server forever.
    """
    options: dict[str, Any] = {
        "host": host, "port": port, "ws_max_size": settings.ws_max_message_bytes,
        "log_level": settings.log_level, "server_header": False,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
    }
    options.update(extra)
    return uvicorn.Config(app, **options)


class Server(uvicorn.Server):
    """uvicorn's server, telling the app as soon as a stop begins, so that event streams (SSE) end
    at once instead of holding the stop until VAD_SHUTDOWN_GRACE_S runs out."""

    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self.services = services

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        try:
            asyncio.get_running_loop().call_soon_threadsafe(self.services.events.bus.close)
        except RuntimeError:
            pass  # no loop running yet: nothing is streaming
        super().handle_exit(sig, frame)


def serve(host: str, port: int, weights_dir: str | None) -> None:
    overrides: dict[str, Any] = {"weights_dir": weights_dir} if weights_dir else {}
    settings = Settings(**overrides)
    if settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available()):
        from model.inference import dedicate_cpu_to_workers

        dedicate_cpu_to_workers()  # forward passes split over the cores, everything else single-threaded
    app = create_app(settings)
    Server(uvicorn_config(app, settings, host, port), app.state.services).run()
