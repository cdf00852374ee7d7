"""Events end to end through a real app: frames of synthetic footage with a planted anomaly scored by
the served model (tests/conftest.py served_weights) through the batcher and fed to a SourceEvents;
the event stored, published, listed, paged, its pictures decoding; a restart keeps events and closes
the one a crash left open; Server-Sent Events to a real HTTP client against uvicorn."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from service.deps import Services
from service.events.store import EventRecord, iso_utc
from service.pipeline import BatchedStream
from tests.support import LiveServer, synthetic_frames

T0 = float(int(time.time()) - 3600)  # capture time of frame 0 (unix seconds): recent, so retention keeps it
FPS = 10.0
ANOMALY = (20, 40)  # the planted anomaly's frames [from, until)
WAIT_S = 60.0


async def feed(services: Services, name: str, frames: np.ndarray, finish: bool = True) -> None:
    """Score ``frames`` as one stream and report each to the events of source ("stream", name)."""
    model = services.store.require()
    scorer = BatchedStream(model, services.batcher, services.metrics, "stream")
    events = services.events.source("stream", name)
    for index, gray in enumerate(frames):
        result = await scorer.score_frame(gray, index, FPS)
        await events.observe(gray, result, model, T0 + index / FPS)
    if finish:
        await events.finish()


def planted(seed: int = 901, count: int = 60) -> np.ndarray:
    return synthetic_frames(count, seed=seed, anomaly_from=ANOMALY[0], anomaly_until=ANOMALY[1])


def only_event(client: Any) -> dict[str, Any]:
    body = client.get("/v1/events").json()
    assert len(body["events"]) == 1, body
    return body["events"][0]


def metric(client: Any, name: str, source: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{source="{source}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not found")


def test_planted_anomaly_becomes_one_event_with_pictures(make_client: Callable[..., Any]) -> None:
    client = make_client()
    services: Services = client.app.state.services
    client.portal.call(feed, services, "lobby", planted())

    event = only_event(client)
    start_frame = round((datetime.fromisoformat(event["start"]).timestamp() - T0) * FPS)
    assert event["camera"] == "lobby" and event["source"] == "stream" and event["state"] == "closed"
    assert abs(start_frame - ANOMALY[0]) <= 3, event
    assert ANOMALY[0] <= event["peak_frame"] < ANOMALY[1] + 3 and event["peak_score"] > services.store.require().threshold
    assert ANOMALY[1] - ANOMALY[0] - 3 <= event["frames"] <= ANOMALY[1] - ANOMALY[0] + 8, event
    assert event["model_version"] == "v0001" and event["end"] is not None
    assert client.get(f"/v1/events/{event['id']}").json() == event
    assert metric(client, "vad_events_opened_total", "stream") == 1
    assert metric(client, "vad_events_closed_total", "stream") == 1

    snapshot = client.get(event["snapshot_url"])
    assert snapshot.status_code == 200 and snapshot.headers["content-type"] == "image/jpeg"
    gray = cv2.imdecode(np.frombuffer(snapshot.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert gray.shape == (64, 96)
    heatmap = client.get(event["heatmap_url"])
    assert heatmap.status_code == 200 and heatmap.headers["content-type"] == "image/png"
    colour = cv2.imdecode(np.frombuffer(heatmap.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert colour.shape == (64, 96, 3)
    assert not np.array_equal(colour[..., 0], colour[..., 2])  # the map is drawn in colour over the grey frame


def test_updates_are_published_while_open(make_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import service.events.recorder as recorder

    monkeypatch.setattr(recorder, "UPDATE_INTERVAL_S", 0.0)  # every change of frames or peak goes out
    client = make_client()
    services: Services = client.app.state.services
    changes: list[tuple[str, dict[str, Any]]] = []
    services.events.bus.add_listener(lambda kind, event: changes.append((kind, event)))
    client.portal.call(feed, services, "hall", planted())

    kinds = [kind for kind, _ in changes]
    assert kinds[0] == "opened" and kinds[-1] == "closed" and kinds.count("updated") == len(kinds) - 2 > 3
    frames = [event["frames"] for kind, event in changes if kind != "closed"]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)  # only real changes are published
    assert changes[-1][1] == client.get(f"/v1/events/{changes[0][1]['id']}").json()


def test_normal_footage_makes_no_event_and_no_file(make_client: Callable[..., Any], data_dir: Path) -> None:
    client = make_client()
    client.portal.call(feed, client.app.state.services, "quiet", synthetic_frames(40, seed=900))
    assert client.get("/v1/events").json() == {"events": [], "next_cursor": None}
    assert not (data_dir / "events").exists()


def test_an_open_event_is_readable_and_closed_by_shutdown(make_client: Callable[..., Any]) -> None:
    client = make_client()
    services: Services = client.app.state.services
    client.portal.call(feed, services, "door", planted(count=30), False)  # the anomaly goes on
    event = only_event(client)
    assert event["state"] == "open" and event["end"] is None
    assert client.get(event["snapshot_url"]).headers["cache-control"] == "no-cache"
    client.__exit__(None, None, None)  # shutdown: the recorder closes what its sources left open

    again = make_client()
    closed = only_event(again)
    assert closed["id"] == event["id"] and closed["state"] == "closed" and closed["end"] is not None


def test_restart_keeps_events_and_closes_one_left_open_by_a_crash(make_client: Callable[..., Any]) -> None:
    first = make_client()
    first.portal.call(feed, first.app.state.services, "cam-a", planted())
    kept = only_event(first)
    crashed = EventRecord(id=uuid.uuid4().hex, camera="cam-b", source="camera", state="open", start_at=T0 + 100,
                          end_at=None, last_at=T0 + 107.5, peak_score=3.0, peak_frame=12, model_version="v0001",
                          frames=75)
    first.app.state.services.events.store.save(crashed)  # as a server that died would have left it

    second = make_client()
    events = second.get("/v1/events").json()["events"]
    assert [e["id"] for e in events] == [crashed.id, kept["id"]]
    assert events[0]["state"] == "closed" and events[0]["end"] == iso_utc(T0 + 107.5)
    assert events[1] == kept
    assert metric(second, "vad_events_closed_total", "camera") == 1


def test_listing_filters_pages_and_refuses_bad_values(make_client: Callable[..., Any]) -> None:
    client = make_client()
    store = client.app.state.services.events.store
    ids = []
    for i in range(7):
        event = EventRecord(id=uuid.uuid4().hex, camera=f"cam{i % 2}", source="camera", state="closed",
                            start_at=T0 + 60 * i, end_at=T0 + 60 * i + 5, last_at=T0 + 60 * i + 5, peak_score=2.0,
                            peak_frame=i, model_version="v0001", frames=50)
        store.save(event)
        ids.append(event.id)

    pages, cursor = [], None
    while True:
        body = client.get("/v1/events", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        pages.append([e["id"] for e in body["events"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids[6:3:-1], ids[3:0:-1], ids[:1]]
    body = client.get("/v1/events", params={"camera": "cam0", "since": iso_utc(T0 + 60),
                                            "until": str(T0 + 300)}).json()
    assert [e["id"] for e in body["events"]] == [ids[4], ids[2]]
    assert client.get("/v1/events", params={"source": "clip"}).json()["events"] == []

    for params, name in [({"limit": "0"}, "limit"), ({"limit": "501"}, "limit"), ({"limit": "ten"}, "limit"),
                         ({"since": "yesterday"}, "since"), ({"until": "nan"}, "until"),
                         ({"since": str(T0 + 10), "until": str(T0)}, "until"), ({"cursor": "bm9wZQ"}, "cursor"),
                         ({"source": "satellite"}, "source"), ({"camera": ""}, "camera")]:
        response = client.get("/v1/events", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["code"] == "bad_request"
        assert response.json()["error"]["message"].startswith(f"{name}:"), response.json()


def test_unknown_events_are_404(make_client: Callable[..., Any]) -> None:
    client = make_client()
    for path in (f"/v1/events/{uuid.uuid4().hex}", f"/v1/events/{uuid.uuid4().hex}/snapshot.jpg",
                 f"/v1/events/{uuid.uuid4().hex}/heatmap.png", "/v1/events/not-an-id", "/v1/events/..%2Fjobs"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


# -- Server-Sent Events against a real server -----------------------------------------------------


def sse_messages(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Messages of an SSE stream as {field: value}; comments come as {"comment": text}."""
    message: dict[str, str] = {}
    for line in lines:
        if line == "":
            if message:
                yield message
            message = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            message[name] = value.removeprefix(" ")


def on_server_loop(server: LiveServer, coroutine: Any) -> Future[Any]:
    return asyncio.run_coroutine_threadsafe(coroutine, server.server.servers[0].get_loop())


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def streamed_event(listening: LiveServer, making: LiveServer) -> list[dict[str, str]]:
    """The SSE messages ``listening`` sends while ``making``'s source "gate" scores the planted
    anomaly, up to the event's ``closed``."""
    received: list[dict[str, str]] = []
    with httpx.stream("GET", f"{listening.url}/v1/events/stream", timeout=WAIT_S) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        messages = sse_messages(response.iter_lines())
        assert next(messages) == {"comment": "subscribed"}
        fed = on_server_loop(making, feed(making.services, "gate", planted()))
        for message in messages:
            if "event" in message:
                received.append(message)
            if message.get("event") == "closed":
                break
    fed.result(timeout=WAIT_S)
    return received


def test_sse_delivers_opened_and_closed(live_server: Callable[..., LiveServer]) -> None:
    server = live_server()
    bus = server.services.events.bus
    received = streamed_event(server, server)
    kinds = [m["event"] for m in received]
    assert kinds[0] == "opened" and kinds[-1] == "closed" and set(kinds) <= {"opened", "updated", "closed"}
    events = [json.loads(m["data"]) for m in received]
    assert all(m["id"] == events[0]["id"] for m in received)
    assert events[0]["state"] == "open" and events[-1]["state"] == "closed"
    stored = httpx.get(f"{server.url}/v1/events/{events[0]['id']}").json()
    assert stored == events[-1]
    wait_until(lambda: not bus._queues, "the stream's subscription to end after the client left")


def test_sse_heartbeat_and_disconnect(live_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch) -> None:
    import service.routes.events as routes

    monkeypatch.setattr(routes, "HEARTBEAT_S", 0.2)
    server = live_server()
    bus = server.services.events.bus
    with httpx.stream("GET", f"{server.url}/v1/events/stream", timeout=WAIT_S) as response:
        messages = sse_messages(response.iter_lines())
        assert next(messages) == {"comment": "subscribed"}
        assert next(messages) == {"retry": "3000"}  # how soon an EventSource reconnects
        assert next(messages) == {"comment": "heartbeat"}
        assert len(bus._queues) == 1
    wait_until(lambda: not bus._queues, "the stream's subscription to end after the client left")


def test_sse_carries_the_events_of_another_replica(live_server: Callable[..., LiveServer]) -> None:
    """Two servers on one database (as behind a load balancer, or `vad serve --processes 2`): a stream
    on B receives the event A's source makes, relayed through the database (service/events/relay.py)."""
    a, b = live_server(), live_server()
    received = streamed_event(b, a)
    events = [json.loads(m["data"]) for m in received]
    kinds = [m["event"] for m in received]
    assert kinds[0] == "opened" and kinds.count("opened") == 1 and kinds.count("closed") == 1  # each change once
    assert events[-1]["state"] == "closed" and all(m["id"] == events[0]["id"] for m in received)
    assert httpx.get(f"{b.url}/v1/events/{events[0]['id']}").json() == events[-1]
