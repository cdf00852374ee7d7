"""Cameras the server watches itself, with real cameras: FFmpeg publishing a clip over RTSP
(tests/cameras/rtsp_relay.py), an HTTP MJPEG camera (tests/cameras/mjpeg.py) and looped files.
No timing assertions: wait-until loops with generous limits."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fastapi.testclient import TestClient

from service.app import create_app
from tests.cameras.conftest import FPS
from tests.cameras.mjpeg import MjpegCamera
from tests.cameras.rtsp_relay import RtspCamera
from tests.jobs.helpers import wait_for
from tests.support import synthetic_frames

SECRET = "hunter2"  # the password in camera URLs, never to be seen again
WAIT_S = 60.0  # each wait-until loop's limit


def camera(client: TestClient, name: str) -> dict[str, Any]:
    response = client.get(f"/v1/cameras/{name}")
    assert response.status_code == 200, response.text
    assert SECRET not in response.text
    return response.json()


def in_state(client: TestClient, name: str, state: str, frames_over: int = -1) -> dict[str, Any] | None:
    view = camera(client, name)
    return view if view["state"] == state and view["frames_scored"] > frames_over else None


def decodes(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return image


def test_rtsp_and_mjpeg_cameras_are_scored_survive_a_drop_and_raise_events(
    make_client: Callable[..., TestClient], planted_clip: Path, ffmpeg: str
) -> None:
    rtsp = RtspCamera(planted_clip).start()
    mjpeg = MjpegCamera(synthetic_frames(40, seed=900), FPS)
    try:
        client = make_client()
        url = rtsp.url.replace("rtsp://", f"rtsp://viewer:{SECRET}@")
        added = client.post("/v1/cameras", json={"name": "gate", "url": url})
        assert added.status_code == 201, added.text
        assert added.json()["url"] == rtsp.url.replace("rtsp://", "rtsp://viewer:***@")
        assert added.json()["fps"] == FPS and added.json()["enabled"] is True
        assert client.post("/v1/cameras", json={"name": "yard", "url": mjpeg.url, "fps": 5}).status_code == 201

        wait_for(lambda: in_state(client, "gate", "live", 5), WAIT_S, what="the RTSP camera to go live and be scored")
        wait_for(lambda: in_state(client, "yard", "live", 5), WAIT_S, what="the MJPEG camera to go live and be scored")
        jpeg = client.get("/v1/cameras/gate/latest.jpg")
        assert jpeg.headers["content-type"] == "image/jpeg" and decodes(jpeg.content).shape[:2] == (64, 96)
        heatmap = client.get("/v1/cameras/yard/latest-heatmap.png")
        assert heatmap.headers["content-type"] == "image/png" and decodes(heatmap.content).shape == (64, 96, 3)

        # the planted anomaly (2 s of every 6 s loop) becomes an event of this camera
        events = wait_for(lambda: client.get("/v1/events", params={"camera": "gate"}).json().get("events"), WAIT_S,
                          what="an event from the RTSP camera's planted anomaly")
        assert events[0]["camera"] == "gate" and events[0]["source"] == "camera"

        # the RTSP camera drops: reconnecting, while the MJPEG camera goes on; back: live again
        rtsp.stop()
        dropped = wait_for(lambda: in_state(client, "gate", "reconnecting"), WAIT_S, what="the dropped camera to reconnect")
        assert dropped["last_error"] and SECRET not in dropped["last_error"]
        yard = camera(client, "yard")["frames_scored"]
        wait_for(lambda: camera(client, "yard")["frames_scored"] >= yard + 10, WAIT_S, what="the other camera to go on")
        assert camera(client, "yard")["state"] == "live"
        rtsp.start()  # the same port
        scored = camera(client, "gate")["frames_scored"]
        back = wait_for(lambda: in_state(client, "gate", "live", scored + 3), WAIT_S, what="the camera to come back live")
        assert back["reconnects"] >= 1

        metrics = client.get("/metrics").text
        assert 'vad_camera_state{camera="gate",state="live"} 1.0' in metrics
        assert 'vad_camera_frames_scored_total{camera="yard"}' in metrics
        assert 'vad_camera_reconnects_total{camera="gate"}' in metrics
        assert 'vad_camera_lag_seconds_count{camera="gate"}' in metrics
        listing = client.get("/v1/cameras")
        assert [c["name"] for c in listing.json()["cameras"]] == ["gate", "yard"]
        for text in (listing.text, metrics):
            assert SECRET not in text

        assert client.delete("/v1/cameras/gate").status_code == 204
        assert client.get("/v1/cameras/gate").status_code == 404
        assert 'camera="gate"' not in client.get("/metrics").text
    finally:
        rtsp.stop()
        mjpeg.close()


def test_refused_cameras_say_why(make_client: Callable[..., TestClient], footage_root: Path, tmp_path: Path,
                                 normal_clip: Path) -> None:
    disabled = make_client(camera_url_allow=[], data_dir=tmp_path / "other")  # not a second replica of the next
    refused = disabled.post("/v1/cameras", json={"name": "a", "url": "rtsp://127.0.0.1/cam"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "cameras_disabled"
    assert "VAD_CAMERA_URL_ALLOW is empty" in refused.json()["error"]["message"]

    client = make_client(max_cameras=2, api_key="k")
    auth = {"Authorization": "Bearer k"}
    outside = tmp_path / "outside.avi"
    outside.write_bytes(normal_clip.read_bytes())
    (footage_root / "clip.avi").write_bytes(normal_clip.read_bytes())
    for url, status, code in [
        (f"rtsp://admin:{SECRET}@10.1.2.3/cam", 403, "camera_url_refused"),        # host not allowed
        ("ftp://127.0.0.1/cam", 403, "camera_url_refused"),                       # scheme
        (f"file://{outside}", 403, "camera_url_refused"),                         # outside the root
        (f"file://{footage_root}/../outside.avi", 403, "camera_url_refused"),
        ("http://127.0.0.1:notaport/", 422, "invalid_camera_url"),
    ]:
        response = client.post("/v1/cameras", json={"name": "a", "url": url}, headers=auth)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (url, response.text)
        assert SECRET not in response.text
    assert "VAD_CAMERA_URL_ALLOW" in client.post(
        "/v1/cameras", json={"name": "a", "url": "rtsp://10.1.2.3/"}, headers=auth).json()["error"]["message"]

    for body in ({"name": "Bad Name", "url": "rtsp://127.0.0.1/"}, {"name": "a", "url": "rtsp://127.0.0.1/", "fps": 0},
                 {"name": "a", "url": "rtsp://127.0.0.1/", "fps": 61}, {"name": "a"},
                 {"name": "a", "url": "rtsp://127.0.0.1/", "extra": 1}):
        assert client.post("/v1/cameras", json=body, headers=auth).status_code == 422, body
    assert client.post("/v1/cameras", json={"name": "a", "url": "rtsp://127.0.0.1/"}).status_code == 401

    first = {"name": "a", "url": f"file://{footage_root}/clip.avi", "enabled": False}
    assert client.post("/v1/cameras", json=first, headers=auth).json()["state"] == "disabled"
    taken = client.post("/v1/cameras", json=first, headers=auth)
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "camera_exists")
    assert client.post("/v1/cameras", json={**first, "name": "b"}, headers=auth).status_code == 201
    full = client.post("/v1/cameras", json={**first, "name": "c"}, headers=auth)
    assert (full.status_code, full.json()["error"]["code"]) == (409, "too_many_cameras")
    assert "VAD_MAX_CAMERAS" in full.json()["error"]["message"]
    unknown = client.get("/v1/cameras/nope")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "camera_not_found")
    assert client.patch("/v1/cameras/nope", json={"fps": 5}, headers=auth).status_code == 404
    assert client.patch("/v1/cameras/a", json={"url": "ftp://x/"}, headers=auth).status_code == 403
    assert client.get("/v1/cameras/a/latest.jpg").json()["error"]["code"] == "no_frame_yet"


def _silent_server() -> tuple[socket.socket, int]:
    """A TCP port that accepts connections and never answers (a camera that hangs)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return listener, listener.getsockname()[1]


def test_unreachable_cameras_and_a_vanished_file(make_client: Callable[..., TestClient], footage_root: Path,
                                                 normal_clip: Path) -> None:
    silent, silent_port = _silent_server()
    refused = socket.create_server(("127.0.0.1", 0))
    refused_port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    clip = footage_root / "loop.avi"
    clip.write_bytes(normal_clip.read_bytes())
    try:
        client = make_client(camera_open_timeout_s=1.0)
        for name, url in (("silent", f"rtsp://127.0.0.1:{silent_port}/cam"),
                          ("refused", f"http://user:{SECRET}@127.0.0.1:{refused_port}/video.mjpg"),
                          ("demo", f"file://{clip}")):
            assert client.post("/v1/cameras", json={"name": name, "url": url, "fps": 20}).status_code == 201
        for name in ("silent", "refused"):
            view = wait_for(lambda: in_state(client, name, "reconnecting"), WAIT_S, what=f"{name} to be retried")
            assert "could not open" in view["last_error"] and SECRET not in view["last_error"]
        wait_for(lambda: camera(client, "refused")["reconnects"] >= 2, WAIT_S, what="a second reconnect")
        looped = wait_for(lambda: in_state(client, "demo", "live", 50), WAIT_S, what="the file to loop (40 frames)")
        assert looped["reconnects"] == 0  # looping a file is not reconnecting

        clip.unlink()  # the file leaves the footage root: a permanent failure at its next loop
        failed = wait_for(lambda: in_state(client, "demo", "failed"), WAIT_S, what="the vanished file to fail the camera")
        assert "no such file under the footage root" in failed["last_error"]
    finally:
        silent.close()


def test_cameras_come_back_after_a_restart(make_settings: Callable[..., Any], footage_root: Path,
                                           normal_clip: Path) -> None:
    (footage_root / "clip.avi").write_bytes(normal_clip.read_bytes())
    settings = make_settings()
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/cameras", json={"name": "demo", "url": f"file://{footage_root}/clip.avi"}).status_code == 201
        assert client.post("/v1/cameras", json={"name": "off", "url": "rtsp://127.0.0.1/x", "enabled": False}).status_code == 201
        assert client.patch("/v1/cameras/demo", json={"fps": 20}).json()["fps"] == 20
    with TestClient(create_app(settings)) as client:
        views = {c["name"]: c for c in client.get("/v1/cameras").json()["cameras"]}
        assert set(views) == {"demo", "off"}
        assert views["off"]["state"] == "disabled" and views["demo"]["fps"] == 20
        wait_for(lambda: in_state(client, "demo", "live", 3), WAIT_S, what="the restored camera to go live")
    narrower = make_settings(camera_url_allow=["rtsp://127.0.0.1"])  # file:// no longer allowed
    with TestClient(create_app(narrower)) as client:
        view = camera(client, "demo")
        assert view["state"] == "failed" and "file URLs are not allowed" in view["last_error"]
