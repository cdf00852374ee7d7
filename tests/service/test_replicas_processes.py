"""Two real `vad serve` replicas on one database (the SQLite file both open, then a real PostgreSQL
server) sharing four file cameras and a webhook URL: a replica started later gets its fair share,
each camera runs on exactly one replica, the other serves its latest pictures from the shared data
folder (SQLite) or names its owner (PostgreSQL, a data folder each), each event reaches the webhook
receiver once; a replica
killed with SIGKILL has its cameras and open events taken over by the other; a clean stop gives
everything back. Waits have generous limits and the assertions are on what happened, not on when."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from service.database import database_for
from service.settings import Settings
from tests.events.test_webhooks import SECRET, Receiver
from tests.jobs.helpers import wait_for
from tests.reliability.helpers import ServerProcess
from tests.service.svc_helpers import metric_families, sample_value
from tests.support import synthetic_frames, write_video

LEASE_S = 3.0  # VAD_REPLICA_LEASE_S: a heartbeat every second
CAMERAS = [f"cam{i}" for i in range(4)]
WAIT_S = 120.0  # generous: two servers and the test share two cores


class Deployment:
    """The replicas' shared settings, the servers started, and the database they share (read directly)."""

    def __init__(self, root: Path, weights: Path, database_url: str | None, hook: str) -> None:
        footage = root / "footage"
        footage.mkdir()
        # 12 s a loop at 5 fps: normal, the planted anomaly for 4 s, normal: one event per loop and camera
        clip = write_video(footage / "planted.avi", synthetic_frames(60, seed=901, anomaly_from=20, anomaly_until=40))
        self.urls = {name: f"file://{clip}" for name in CAMERAS}
        self.values: dict[str, Any] = {
            "weights_dir": str(weights), "data_dir": str(root / "data"), "device": "cpu", "max_queue_delay_ms": 2.0,
            "footage_root": str(footage), "camera_url_allow": ["file://"], "replica_lease_s": LEASE_S,
            "webhook_urls": [hook], "webhook_secret": SECRET, "webhook_retry_initial_s": 0.2,
        }
        if database_url is not None:
            self.values["database_url"] = database_url
        self.database = database_for(Settings(**self.values))
        self.root = root
        self.servers: list[ServerProcess] = []

    @property
    def shared_data(self) -> bool:
        """On SQLite the replicas share the data folder (the database is in it), as on one host; on
        PostgreSQL each has its own, as on hosts with volumes of their own."""
        return "database_url" not in self.values

    def start(self, replica: str) -> ServerProcess:
        values = {**self.values, "replica_id": replica}
        if not self.shared_data:
            values["data_dir"] = str(self.root / f"data-{replica}")
        server = ServerProcess(values, self.root / f"{replica}.log")
        self.servers.append(server)
        return server.start()

    def rows(self, sql: str, *parameters: Any) -> list[dict[str, Any]]:
        with self.database.read() as db:
            return [dict(row) for row in db.execute(sql, parameters).fetchall()]


@pytest.fixture
def deployment(tmp_path: Path, served_weights: Path, database_url: str | None) -> Iterator[tuple[Deployment, Receiver]]:
    receiver = Receiver(delay_s=0.5)  # slow: a delivery is in flight long enough for the other replica to look
    deployment = Deployment(tmp_path, served_weights, database_url, receiver.url)
    yield deployment, receiver
    for server in deployment.servers:
        server.stop()
    receiver.close()


def ok(response: httpx.Response) -> httpx.Response | None:
    return response if response.status_code == 200 else None


def views(server: ServerProcess) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{server.url}/v1/cameras", timeout=30)
    assert response.status_code == 200, response.text
    return {view["name"]: view for view in response.json()["cameras"]}


def metric(server: ServerProcess, family: str, sample: str, **labels: str) -> float | None:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return sample_value(metric_families(text), family, sample, **labels)


def runs(server: ServerProcess, camera: str) -> bool:
    """Whether ``server`` scores ``camera`` (its per-camera metrics exist only where it runs)."""
    return metric(server, "vad_camera_frames_scored", "vad_camera_frames_scored_total", camera=camera) is not None


def split(servers: list[ServerProcess], expected: dict[str, int]) -> dict[str, str] | None:
    """{camera: owner} once every replica agrees on it, every camera is live on its owner and the
    owners hold ``expected`` cameras each; else None (not yet)."""
    seen = [views(server) for server in servers]
    owners = {name: view["owner"] for name, view in seen[0].items()}
    if any({name: view["owner"] for name, view in other.items()} != owners for other in seen[1:]):
        return None
    if dict(Counter(owners.values())) != expected:
        return None
    by_id = {server.env["VAD_REPLICA_ID"]: view for server, view in zip(servers, seen)}
    if any(by_id[owner][name]["state"] != "live" for name, owner in owners.items()):
        return None
    return owners


def test_replicas_share_cameras_and_webhooks_and_take_over_from_a_killed_one(
    deployment: tuple[Deployment, Receiver],
) -> None:
    started = time.monotonic()
    setup, receiver = deployment
    a = setup.start("replica-a")
    with httpx.Client(base_url=a.url, timeout=30) as http:
        for name in CAMERAS:
            assert http.post("/v1/cameras", json={"name": name, "url": setup.urls[name], "fps": 5}).status_code == 201
    wait_for(lambda: split([a], {"replica-a": 4}), WAIT_S, what="replica a alone to run all four cameras")

    # a second replica: a gives up its surplus, b claims it (ceil(4 / 2) = 2 each)
    b = setup.start("replica-b")
    owners = wait_for(lambda: split([a, b], {"replica-a": 2, "replica-b": 2}), WAIT_S, what="a 2 / 2 split")
    servers = {"replica-a": a, "replica-b": b}
    for name, owner in owners.items():  # each camera is scored by exactly one replica
        other = "replica-b" if owner == "replica-a" else "replica-a"
        assert runs(servers[owner], name) and not runs(servers[other], name), (name, owner)
        assert metric(servers[owner], "vad_replica_cameras", "vad_replica_cameras") == 2
        wait_for(lambda: httpx.get(f"{servers[owner].url}/v1/cameras/{name}/latest.jpg", timeout=30).status_code == 200,
                 WAIT_S, what=f"{name}'s latest frame on its replica")
        if setup.shared_data:  # the other replica serves the pictures the owner leaves in the data folder
            for picture, kind in (("latest.jpg", "image/jpeg"), ("latest-heatmap.png", "image/png")):
                shared = wait_for(lambda: ok(httpx.get(f"{servers[other].url}/v1/cameras/{name}/{picture}", timeout=30)),
                                  WAIT_S, what=f"{name}'s {picture} on the replica not running it")
                assert shared.headers["content-type"] == kind and cv2.imdecode(np.frombuffer(shared.content, np.uint8),
                                                                              cv2.IMREAD_UNCHANGED) is not None
        else:  # no shared folder: the other replica names the owner
            elsewhere = httpx.get(f"{servers[other].url}/v1/cameras/{name}/latest.jpg", timeout=30)
            assert elsewhere.status_code == 409 and elsewhere.json()["error"]["code"] == "camera_elsewhere"
            assert owner in elsewhere.json()["error"]["message"]

    # events of both replicas' cameras, each delivered once although both replicas send the outbox
    def closed_events() -> list[dict[str, Any]]:
        listing = httpx.get(f"{a.url}/v1/events", params={"limit": 200}, timeout=30).json()["events"]
        return [event for event in listing if event["state"] == "closed"]

    wait_for(lambda: {owners[e["camera"]] for e in closed_events()} == {"replica-a", "replica-b"}, WAIT_S,
             what="closed events from the cameras of both replicas")
    done = closed_events()
    wait_for(lambda: {("closed", e["id"]) for e in done} <= set(receiver.ids()), WAIT_S, what="their webhooks")
    delivered = receiver.ids()
    assert [pair for pair, count in Counter(delivered).items() if count > 1] == []  # nothing sent twice
    assert len({document["delivery"] for document in receiver.received}) == len(receiver.received)
    assert all(("opened", e["id"]) in delivered for e in done) and receiver.bad_signatures == 0

    # kill -9 b: a takes its cameras once b's lease has run out, and closes what b left open
    killed_at = time.time()
    os.kill(b.pid, signal.SIGKILL)
    b.process.wait(timeout=30)
    wait_for(lambda: split([a], {"replica-a": 4}), WAIT_S, what="replica a to take over b's cameras")
    assert all(runs(a, name) for name in CAMERAS) and metric(a, "vad_replica_cameras", "vad_replica_cameras") == 4
    wait_for(lambda: not setup.rows("SELECT id FROM events WHERE state = 'open' AND replica = ?", "replica-b"),
             WAIT_S, what="b's open events to be closed")
    wait_for(lambda: not setup.rows("SELECT id FROM webhook_outbox WHERE claimed_by = ?", "replica-b"),
             WAIT_S, what="b's webhook claims to be taken over")
    before_kill = [e for e in closed_events() if datetime.fromisoformat(e["start"]).timestamp() < killed_at]
    wait_for(lambda: {("closed", e["id"]) for e in before_kill} <= set(receiver.ids()), WAIT_S,
             what="every event that started before the kill delivered closed (at least once)")
    wait_for(lambda: setup.rows("SELECT id FROM replicas") == [{"id": "replica-a"}], WAIT_S, what="b's row swept as dead")

    # a clean stop: the cameras are given back and the replica leaves, at once
    assert a.stop() in (0, -signal.SIGTERM)  # uvicorn exits by the signal once shut down (-9: it was killed)
    assert setup.rows("SELECT name FROM cameras WHERE owner IS NOT NULL") == []
    assert setup.rows("SELECT id FROM replicas") == []
    assert setup.rows("SELECT id FROM events WHERE state = 'open'") == []
    print(f"\ntwo replicas, four cameras, a kill -9 and a takeover: {time.monotonic() - started:.1f} s")
