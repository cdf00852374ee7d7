"""From a camera to an alert, all real: an HTTP MJPEG camera plays footage with a planted anomaly to a
uvicorn server, which opens and closes one event per anomaly, stores its pictures, streams the changes
over Server-Sent Events and posts them, signed, to a webhook receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from tests.cameras.conftest import FPS
from tests.cameras.mjpeg import MjpegCamera
from tests.cameras.test_cameras import WAIT_S, decodes
from tests.events.test_webhooks import SECRET, Receiver
from tests.jobs.helpers import wait_for
from tests.support import synthetic_frames

ANOMALY_FRAMES = 20  # the planted anomaly lasts frames 20..39 of each 60-frame loop: 2 s at 10 fps


class SseClient:
    """Reads GET /v1/events/stream in a thread, keeping every (event kind, event)."""

    def __init__(self, url: str) -> None:
        self.changes: list[tuple[str, dict[str, Any]]] = []
        self.opened = threading.Event()
        self._client = httpx.Client(timeout=None)
        self._thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self._thread.start()

    def _read(self, url: str) -> None:
        kind = None
        try:
            with self._client.stream("GET", url) as response:
                self.opened.set()
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        kind = line[len("event: "):]
                    elif line.startswith("data: ") and kind:
                        self.changes.append((kind, json.loads(line[len("data: "):])))
        except httpx.HTTPError:
            pass  # closed by the test

    def close(self) -> None:
        self._client.close()
        self._thread.join(30)


def test_a_camera_anomaly_becomes_an_event_on_sse_and_a_signed_webhook(live_server: Callable[..., Any]) -> None:
    camera = MjpegCamera(synthetic_frames(60, seed=901, anomaly_from=20, anomaly_until=40), FPS)
    receiver = Receiver()
    server = live_server(webhook_urls=[receiver.url], webhook_secret=SECRET, webhook_retry_initial_s=0.1)
    sse = SseClient(f"{server.url}/v1/events/stream")
    try:
        assert sse.opened.wait(60)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.post("/v1/cameras", json={"name": "dock", "url": camera.url, "fps": FPS}).status_code == 201
            closed = wait_for(
                lambda: [e for e in http.get("/v1/events", params={"camera": "dock"}).json()["events"]
                         if e["state"] == "closed"],
                120, what="the planted anomaly's event to close")
            event = closed[-1]
            assert event["source"] == "camera" and event["model_version"] == "v0001"
            seconds = datetime.fromisoformat(event["end"]).timestamp() - datetime.fromisoformat(event["start"]).timestamp()
            # start and end within a few frames of the anomaly's (frames the camera's sampling dropped aside)
            assert abs(seconds - (ANOMALY_FRAMES - 1) / FPS) <= 0.6, event
            assert decodes(http.get(event["snapshot_url"]).content).ndim == 2
            assert decodes(http.get(event["heatmap_url"]).content).shape[2] == 3

            wait_for(lambda: ("closed", event["id"]) in [(k, e["id"]) for k, e in sse.changes], WAIT_S, what="SSE: closed")
            assert [k for k, e in sse.changes if e["id"] == event["id"]][0] == "opened"
            wait_for(lambda: ("closed", event["id"]) in receiver.ids(), WAIT_S, what="the webhook: closed")
            assert ("opened", event["id"]) in receiver.ids() and receiver.bad_signatures == 0
            delivered = next(d for d in receiver.received if d["type"] == "closed" and d["event"]["id"] == event["id"])
            assert delivered["event"] == {**event, **{k: delivered["event"][k] for k in ("snapshot_url", "heatmap_url")}}
            assert http.delete("/v1/cameras/dock").status_code == 204
    finally:
        sse.close()
        camera.close()
        receiver.server.shutdown()
