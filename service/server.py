"""``vad serve``: run the app under uvicorn."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
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
    at once instead of holding the stop until VAD_SHUTDOWN_GRACE_S runs out. ``on_started`` is called
    once it accepts connections (a serving process tells its parent so)."""

    def __init__(self, config: uvicorn.Config, services: Services, on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.services = services
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        try:
            asyncio.get_running_loop().call_soon_threadsafe(self.services.events.bus.close)
        except RuntimeError:
            pass  # no loop running yet: nothing is streaming
        super().handle_exit(sig, frame)


def build_server(settings: Settings, host: str, port: int, share_of_cores: int = 1,
                 on_started: Callable[[], None] | None = None) -> Server:
    """The app and its uvicorn server. On the CPU the forward passes are split over this process's
    share of the cores (1 / ``share_of_cores`` of torch's threads) and everything else runs single-threaded."""
    if settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available()):
        from model.inference import dedicate_cpu_to_workers

        torch.set_num_threads(max(1, torch.get_num_threads() // share_of_cores))
        dedicate_cpu_to_workers()
    app = create_app(settings)
    return Server(uvicorn_config(app, settings, host, port), app.state.services, on_started)


def serve(settings: Settings, host: str, port: int) -> None:
    """``vad serve`` in this process (one serving process; several: service/processes.py)."""
    build_server(settings, host, port).run()
