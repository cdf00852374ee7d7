"""A `vad serve` told to stop while a browser holds its event stream open stops at once: the stop
ends every SSE stream (service/server.py Server, EventBus.close); VAD_SHUTDOWN_GRACE_S bounds what
else may hold it (WebSocket and NDJSON responses)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx

from tests.jobs.helpers import wait_for
from tests.reliability.helpers import ServerProcess


def test_the_server_stops_with_an_event_stream_open(served_weights: Path, tmp_path: Path) -> None:
    values = {"weights_dir": served_weights, "data_dir": tmp_path / "data", "device": "cpu", "shutdown_grace_s": 60.0}
    server = ServerProcess(values, tmp_path / "server.log").start()
    opened = threading.Event()

    def listen() -> None:
        try:
            with httpx.stream("GET", f"{server.url}/v1/events/stream", timeout=None) as response:
                opened.set()
                for _ in response.iter_lines():
                    pass
        except httpx.HTTPError:
            pass  # the server closed the stream as it stopped

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        wait_for(opened.is_set, 60, what="the event stream open")
        server.process.send_signal(signal.SIGTERM)
        # a generous bound, not a speed figure: without the grace period it never exits
        wait_for(lambda: server.process.poll() is not None, 120, what="the server to exit")
        # uvicorn ends by raising the signal it caught again: -SIGTERM is a clean stop
        assert server.process.returncode in (0, -signal.SIGTERM), server.log()
        assert "timeout graceful shutdown exceeded" not in server.log()  # the stream ended at once
    finally:
        server.stop()
    listener.join(30)
    assert not listener.is_alive()
