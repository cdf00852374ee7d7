"""Events from clip uploads (POST /v1/clips?events=NAME) and WebSocket streams that opt in
({"events": NAME}): the served model's planted anomaly becomes one event under that name, with its
source; nothing is recorded without the option."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.events.test_events_api import ANOMALY, planted
from tests.jobs.helpers import wait_for
from tests.support import png_bytes, write_video


def events_of(client: Any, name: str) -> list[dict[str, Any]]:
    return client.get("/v1/events", params={"camera": name}).json()["events"]


def assert_planted_event(event: dict[str, Any], name: str, source: str) -> None:
    assert event["camera"] == name and event["source"] == source and event["state"] == "closed", event
    assert ANOMALY[0] <= event["peak_frame"] < ANOMALY[1] + 3, event
    assert ANOMALY[1] - ANOMALY[0] - 3 <= event["frames"] <= ANOMALY[1] - ANOMALY[0] + 8, event


@pytest.mark.parametrize("ndjson", [False, True])
def test_a_clip_upload_records_its_events_when_asked(make_client: Callable[..., Any], tmp_path: Path, ndjson: bool) -> None:
    client = make_client()
    clip = write_video(tmp_path / "dock.avi", planted()).read_bytes()
    files = {"file": ("dock.avi", clip, "video/x-msvideo")}

    plain = client.post("/v1/clips", files=files, params={"maps": "false"})
    assert plain.status_code == 200 and "events" not in plain.json()
    assert client.get("/v1/events").json()["events"] == []  # not asked: nothing recorded

    params = {"maps": "false", "events": "dock-upload", **({"stream": "true"} if ndjson else {})}
    response = client.post("/v1/clips", files=files, params=params)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()] if ndjson else [response.json()]
    summary = lines[-1]
    assert not ndjson or summary["type"] == "summary"
    (event,) = events_of(client, "dock-upload")
    assert summary["events"] == [event["id"]]
    assert_planted_event(event, "dock-upload", "clip")
    assert client.get(event["snapshot_url"]).status_code == 200


def test_a_bad_events_name_is_refused(client: Any, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "c.avi", planted(count=8)).read_bytes()
    response = client.post("/v1/clips", files={"file": ("c.avi", clip, "video/x-msvideo")}, params={"events": "../x"})
    assert response.status_code == 422 and "events" in response.text


def test_a_stream_records_events_once_it_opts_in(make_client: Callable[..., Any]) -> None:
    frames = planted()
    client = make_client(ws_max_pending_frames=len(frames))  # nothing dropped: every frame observed
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text('{"events": "lobby-cam"}')
        assert ws.receive_json()["options"]["events"] == "lobby-cam"
        for frame in frames:
            ws.send_bytes(png_bytes(frame))
        replies = [ws.receive_json() for _ in frames]
    assert [r["seq"] for r in replies] == list(range(len(frames)))

    def closed() -> list[dict[str, Any]]:
        return [e for e in events_of(client, "lobby-cam") if e["state"] == "closed"]

    # the stream's end closes its event (in the session's teardown): wait for it
    wait_for(lambda: len(closed()) == 1, 60, what="the stream's event closed")
    assert_planted_event(closed()[0], "lobby-cam", "stream")


def test_a_stream_without_the_option_records_nothing(client: Any) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text('{"events": "Not allowed!"}')
        assert ws.receive_json()["error"]["code"] == "invalid_control"
        for frame in planted(count=30):
            ws.send_bytes(png_bytes(frame))
            ws.receive_json()
    assert client.get("/v1/events").json()["events"] == []
