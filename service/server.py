"""``vad serve``: run the app under uvicorn."""

from __future__ import annotations

from typing import Any

import torch
import uvicorn

from service.app import create_app
from service.settings import Settings


def uvicorn_config(app: Any, settings: Settings, host: str, port: int, **extra: Any) -> uvicorn.Config:
    """The uvicorn configuration the server runs with (tests reuse it on a loopback port).

    The WebSocket frame limit is VAD_WS_MAX_MESSAGE_BYTES, so an over-size message is refused by the
    protocol layer (close 1009) before it is buffered; the app checks it again.
    """
    options: dict[str, Any] = {
        "host": host, "port": port, "ws_max_size": settings.ws_max_message_bytes,
        "log_level": settings.log_level, "server_header": False,
    }
    options.update(extra)
    return uvicorn.Config(app, **options)


def serve(host: str, port: int, weights_dir: str | None) -> None:
    overrides: dict[str, Any] = {"weights_dir": weights_dir} if weights_dir else {}
    settings = Settings(**overrides)
    if settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available()):
        from model.inference import dedicate_cpu_to_workers

        dedicate_cpu_to_workers()  # forward passes split over the cores, everything else single-threaded
    uvicorn.Server(uvicorn_config(create_app(settings), settings, host, port)).run()
