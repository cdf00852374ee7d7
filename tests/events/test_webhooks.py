"""Webhooks (service/events/webhooks.py) against a real HTTP receiver on 127.0.0.1: signed bodies,
order per URL, retries, a dead URL beside a live one, the bound of the outbox, and the outbox
surviving an app restart. Changes are published straight on an EventBus (no events core needed)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.bench.server_process import free_port
from service.events.bus import EventBus
from service.events.webhooks import WebhookOutbox, shown_url
from service.metrics import Metrics
from service.settings import Settings

SECRET = "s3cret-webhook-key"
WAIT_S = 60.0  # generous: the machine may be loaded


class Receiver:
    """A webhook receiver: answers the next status of ``statuses`` (then 200), after ``delay_s``,
    records every request whose signature verifies and counts those that do not."""

    def __init__(self, port: int = 0, statuses: list[int] | None = None, delay_s: float = 0.0) -> None:
        self.statuses = list(statuses or [])
        self.received: list[dict[str, Any]] = []  # bodies answered 2xx
        self.requests = 0
        self.bad_signatures = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay_s)  # a slow receiver: a delivery stays in flight a while
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                document = json.loads(body)
                with receiver.lock:
                    receiver.requests += 1
                    ok = (
                        hmac.compare_digest(self.headers.get("X-VAD-Signature", ""), expected)
                        and self.headers["Content-Type"] == "application/json"
                        and self.headers["X-VAD-Event"] == document["type"]
                        and self.headers["X-VAD-Delivery"] == document["delivery"]
                    )
                    status = 401 if not ok else receiver.statuses.pop(0) if receiver.statuses else 200
                    if not ok:
                        receiver.bad_signatures += 1
                    elif status == 200:
                        receiver.received.append(document)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ids(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(document["type"], document["event"]["id"]) for document in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(port: int = 0, statuses: list[int] | None = None) -> Receiver:
        started.append(Receiver(port, statuses))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def event(number: int) -> dict[str, Any]:
    return {
        "id": f"{number:032x}", "camera": "gate", "source": "camera", "state": "open",
        "start": "2024-05-01T14:02:11.000Z", "end": None, "peak_score": 0.5 + number / 100, "peak_frame": number,
        "model_version": "v0001", "frames": 3, "snapshot_url": f"/v1/events/{number:032x}/snapshot.jpg",
        "heatmap_url": f"/v1/events/{number:032x}/heatmap.png",
    }


def settings(tmp_path: Path, urls: list[str], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data", "weights_dir": tmp_path / "weights", "device": "cpu",
        "webhook_urls": urls, "webhook_secret": SECRET, "webhook_retry_initial_s": 0.05, "webhook_retry_max_s": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


def deliveries(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("vad_webhook_deliveries_total", {"outcome": outcome}) or 0.0


def waiting(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("vad_webhook_outbox") or 0.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (without blocking the loop) until ``condition()``; fail naming ``what`` after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def with_outbox(config: Settings, body: Callable[[WebhookOutbox, EventBus, Metrics], Awaitable[None]],
                start: bool = True) -> Metrics:
    """Run ``body`` with an outbox attached to a fresh bus (started unless ``start`` is False)."""
    metrics = Metrics()

    async def main() -> None:
        outbox, bus = WebhookOutbox(config, metrics), EventBus()
        outbox.attach(bus)
        if start:
            await outbox.start()
        try:
            await body(outbox, bus, metrics)
        finally:
            await outbox.stop()

    asyncio.run(main())
    return metrics


def test_opened_and_closed_are_delivered_signed_and_in_order(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers()

    async def body(outbox: WebhookOutbox, bus: EventBus, metrics: Metrics) -> None:
        for number in range(1, 4):
            bus.publish("opened", event(number))
            bus.publish("updated", event(number))  # not a webhook
            bus.publish("closed", {**event(number), "state": "closed", "end": "2024-05-01T14:02:40.000Z"})
        await until(lambda: len(receiver.ids()) == 6, "six deliveries")
        await until(lambda: waiting(metrics) == 0, "an empty outbox")

    metrics = with_outbox(settings(tmp_path, [receiver.url]), body)
    assert receiver.ids() == [(kind, f"{n:032x}") for n in range(1, 4) for kind in ("opened", "closed")]
    assert receiver.bad_signatures == 0 and receiver.requests == 6
    first = receiver.received[0]
    assert set(first) == {"type", "event", "delivery", "sent_at"}
    assert first["event"] == event(1) and len(first["delivery"]) == 32 and first["sent_at"].endswith("Z")
    assert receiver.received[1]["event"]["state"] == "closed"
    assert len({document["delivery"] for document in receiver.received}) == 6
    assert deliveries(metrics, "delivered") == 6 and deliveries(metrics, "failed") == 0


def test_failed_deliveries_are_retried_with_the_same_id_then_delivered(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    receiver = receivers(statuses=[500, 503, 500])

    async def body(outbox: WebhookOutbox, bus: EventBus, metrics: Metrics) -> None:
        bus.publish("opened", event(1))
        bus.publish("closed", event(1))
        await until(lambda: len(receiver.ids()) == 2, "both deliveries after the 5xx answers")
        await until(lambda: waiting(metrics) == 0, "an empty outbox")  # the receiver has the body before the app

    metrics = with_outbox(settings(tmp_path, [receiver.url]), body)
    assert receiver.ids() == [("opened", event(1)["id"]), ("closed", event(1)["id"])]  # the retries kept the order
    assert receiver.requests == 5 and receiver.bad_signatures == 0
    assert deliveries(metrics, "failed") == 3 and deliveries(metrics, "delivered") == 2
    assert deliveries(metrics, "dropped") == 0


def test_a_delivery_is_dropped_after_max_attempts(
    tmp_path: Path, receivers: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    receiver = receivers(statuses=[500, 500, 500])

    async def body(outbox: WebhookOutbox, bus: EventBus, metrics: Metrics) -> None:
        bus.publish("opened", event(1))
        bus.publish("closed", event(1))
        await until(lambda: len(receiver.ids()) == 1, "the delivery after the dropped one")

    metrics = with_outbox(settings(tmp_path, [receiver.url], webhook_max_attempts=3), body)
    assert receiver.ids() == [("closed", event(1)["id"])]
    assert deliveries(metrics, "dropped") == 1 and deliveries(metrics, "failed") == 3
    assert "dropped after 3 attempts: HTTP 500" in caplog.text
    assert SECRET not in caplog.text and "/hook" not in caplog.text  # URLs are logged as scheme://host:port


def test_a_dead_url_does_not_hold_up_a_live_one(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    live = receivers()
    with socket.socket() as hanging:  # accepts connections (backlog) and never answers
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(16)
        hanging_url = f"http://127.0.0.1:{hanging.getsockname()[1]}/hook"
        refused_url = f"http://127.0.0.1:{free_port()}/hook"

        async def body(outbox: WebhookOutbox, bus: EventBus, metrics: Metrics) -> None:
            for number in range(1, 6):
                bus.publish("opened", event(number))
            await until(lambda: len(live.ids()) == 5, "the live receiver's five deliveries")
            await until(lambda: deliveries(metrics, "delivered") == 5, "five deliveries counted")
            await until(lambda: deliveries(metrics, "failed") >= 1, "the refused URL's first failure")

        config = settings(tmp_path, [hanging_url, refused_url, live.url], webhook_timeout_s=120.0)
        metrics = with_outbox(config, body)
    assert live.ids() == [("opened", f"{n:032x}") for n in range(1, 6)]
    assert deliveries(metrics, "delivered") == 5


def test_the_bound_drops_the_oldest_waiting_deliveries(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    port = free_port()
    config = settings(tmp_path, [f"http://127.0.0.1:{port}/hook"], webhook_outbox_max=3)

    async def fill(outbox: WebhookOutbox, bus: EventBus, metrics: Metrics) -> None:
        for number in range(1, 6):
            bus.publish("opened", event(number))
        assert waiting(metrics) == 3

    metrics = with_outbox(config, fill, start=False)  # nothing sent: five published, three kept
    assert deliveries(metrics, "dropped") == 2
    receiver = receivers(port=port)

    async def drain(outbox: WebhookOutbox, bus: EventBus, metrics: Metrics) -> None:
        await until(lambda: len(receiver.ids()) == 3, "the three kept deliveries")

    with_outbox(config, drain)
    assert receiver.ids() == [("opened", f"{n:032x}") for n in (3, 4, 5)]


def test_deliveries_to_a_url_no_longer_configured_are_dropped(tmp_path: Path) -> None:
    old = settings(tmp_path, ["http://127.0.0.1:9/old"])

    async def publish(outbox: WebhookOutbox, bus: EventBus, metrics: Metrics) -> None:
        bus.publish("opened", event(1))

    with_outbox(old, publish, start=False)

    async def nothing(outbox: WebhookOutbox, bus: EventBus, metrics: Metrics) -> None:
        assert waiting(metrics) == 0

    metrics = with_outbox(settings(tmp_path, ["http://127.0.0.1:9/new"]), nothing)
    assert deliveries(metrics, "dropped") == 1


def test_the_outbox_survives_an_app_restart(tmp_path: Path, receivers: Callable[..., Receiver]) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app

    port = free_port()
    config = settings(tmp_path, [f"http://127.0.0.1:{port}/hook"], webhook_retry_initial_s=0.05)
    with TestClient(create_app(config)) as client:  # nothing listens yet: every attempt is refused
        bus = client.app.state.services.events.bus
        client.portal.call(bus.publish, "opened", event(1))
        client.portal.call(bus.publish, "closed", event(1))
        metrics: Metrics = client.app.state.services.metrics
        deadline = time.monotonic() + WAIT_S
        while deliveries(metrics, "failed") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert deliveries(metrics, "failed") >= 2 and waiting(metrics) == 2

    receiver = receivers(port=port)
    with TestClient(create_app(config)) as client:
        metrics = client.app.state.services.metrics
        deadline = time.monotonic() + WAIT_S
        while (len(receiver.ids()) < 2 or waiting(metrics) > 0) and time.monotonic() < deadline:
            time.sleep(0.02)  # the receiver has the body before the app has the answer
        assert receiver.ids() == [("opened", event(1)["id"]), ("closed", event(1)["id"])]
        assert client.get("/metrics").text.count('vad_webhook_deliveries_total{outcome="delivered"} 2.0') == 1
    assert receiver.bad_signatures == 0


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "example.com/hook", "http:///hook", "file:///etc/passwd"])
def test_webhook_urls_must_be_http_or_https(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValidationError, match="is not an http:// or https:// URL with a host"):
        settings(tmp_path, [url])


def test_logged_urls_show_no_credentials_or_token_paths() -> None:
    assert shown_url("https://user:pw@hooks.example.com:8443/services/T0/B0/XYZ?k=1") == "https://hooks.example.com:8443/..."
    assert shown_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
