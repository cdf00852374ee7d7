"""Against a real uvicorn server on a loopback port (httpx + the websockets client): streaming,
protocol-level limits, batching across concurrent streams, and hot swaps under load."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from model.offline import detect_file
from service.video import VideoSource
from tests.service.svc_helpers import assert_same_decisions, histogram_buckets, metric_families, sample_value
from tests.support import PATCHES_PER_FRAME, png_bytes, synthetic_frames, write_video


def test_http_and_websocket_basics(live_server, tmp_path: Path) -> None:
    server = live_server(ws_max_message_bytes=16_000)
    clip = write_video(tmp_path / "clip.avi", synthetic_frames(12, seed=1))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").status_code == 200
        frame = http.post("/v1/frames", files={"file": ("f.png", png_bytes(synthetic_frames(1)[0]))})
        assert frame.status_code == 200 and frame.json()["model_version"] == "v0001"
        body = http.post("/v1/clips", files={"file": ("c.avi", clip.read_bytes())}).json()
        assert body["frame_count"] == 12
        bad = http.post("/v1/clips", files={"file": ("c.avi", b"not a video at all")})
        assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_media_type"

    async def websocket_checks() -> None:
        frames = [png_bytes(f) for f in synthetic_frames(4, seed=2)]
        async with connect(f"{server.ws_url}/v1/stream") as ws:
            for data in frames:
                await ws.send(data)
            replies = [json.loads(await ws.recv()) for _ in frames]
            assert [r["seq"] for r in replies] == [0, 1, 2, 3]
            await ws.send(b"\x89PNG\r\n\x1a\n" + bytes(40_000))  # over the limit: refused by the protocol layer
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        async with connect(f"{server.ws_url}/v1/stream") as ws:
            await ws.send("{oops")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007

    asyncio.run(websocket_checks())


def test_ndjson_frames_arrive_before_the_clip_is_decoded(live_server, tmp_path: Path, monkeypatch) -> None:
    """Decoding of the third chunk onward waits until the client has received the first frame line;
    a server that buffered the response would leave the gate closed (and the test would fail)."""
    server = live_server(clip_chunk_frames=4)
    clip = write_video(tmp_path / "clip.avi", synthetic_frames(24, seed=3))
    first_line_seen = threading.Event()
    gate_open_at_read: list[bool] = []
    original = VideoSource.read

    def gated_read(self, count):
        if len(gate_open_at_read) >= 2:
            first_line_seen.wait(timeout=5)
        gate_open_at_read.append(first_line_seen.is_set())
        return original(self, count)

    monkeypatch.setattr(VideoSource, "read", gated_read)
    lines = []
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/clips", files={"file": ("c.avi", clip.read_bytes())},
                         headers={"Accept": "application/x-ndjson"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(json.loads(line))
                first_line_seen.set()
    assert [line["type"] for line in lines] == ["frame"] * 24 + ["summary"]
    assert len(gate_open_at_read) >= 7  # 24 frames in chunks of 4, plus the read that finds the end
    assert gate_open_at_read[-1], "the last chunk was decoded before any frame line reached the client"


def test_concurrent_streams_share_batches(live_server) -> None:
    server = live_server(max_queue_delay_ms=100, skip_unchanged=False)  # every patch of every frame is batched
    streams, frames_each = 4, 6

    async def one_stream(index: int) -> list[dict]:
        frames = [png_bytes(f) for f in synthetic_frames(frames_each, seed=10 + index)]
        async with connect(f"{server.ws_url}/v1/stream") as ws:
            replies = []
            for data in frames:  # one frame at a time: each reply before the next frame
                await ws.send(data)
                replies.append(json.loads(await ws.recv()))
            return replies

    async def run() -> list[list[dict]]:
        return await asyncio.gather(*(one_stream(i) for i in range(streams)))

    results = asyncio.run(run())
    for replies in results:
        assert [r["seq"] for r in replies] == list(range(frames_each))
        assert all("score" in r for r in replies)
    families = metric_families(httpx.get(f"{server.url}/metrics").text)
    patches = histogram_buckets(families, "vad_batch_size_patches")
    jobs = histogram_buckets(families, "vad_batch_size_jobs")
    batches = patches[float("inf")]
    # One stream frame is 24 patches; batches over 32 patches held frames of several streams.
    shared = batches - patches[32.0]
    print(f"\nbatches={batches:.0f} shared(>32 patches)={shared:.0f} jobs-per-batch buckets={jobs}")
    assert sample_value(families, "vad_batch_size_patches", "vad_batch_size_patches_sum") == streams * frames_each * PATCHES_PER_FRAME
    assert shared > 0
    assert jobs[float("inf")] - jobs[1.0] > 0
    assert batches < streams * frames_each


SWAPS = ("v0002", "v0001", "v0002", "v0001", "v0002")  # activated in turn; v0001 serves first


def test_hot_swap_under_load(live_server, tmp_path: Path, weights_dir: Path) -> None:
    """Two clients post clips and one streams frames while versions are activated in turn. Each
    activation waits until a clip and a stream frame sent after it have been scored, so the test
    holds at any speed. Every clip must be scored wholly by one version, one active while it ran,
    with that version's offline scores, flags and ranking; the stream must follow the activations
    in order."""
    server = live_server(max_queue_delay_ms=20)
    clip = write_video(tmp_path / "clip.avi", synthetic_frames(10, seed=7, anomaly_from=6))
    clip_bytes = clip.read_bytes()
    reference = {version: detect_file(clip, weights_dir, version=version, include_maps=False)["frames"]
                 for version in ("v0001", "v0002")}
    assert not np.allclose([f["score"] for f in reference["v0001"]], [f["score"] for f in reference["v0002"]])
    assert any(f["anomalous"] for f in reference["v0001"])
    versions = ("v0001", *SWAPS)  # versions[e]: the version active after e activations
    started: list[str] = []  # activations sent
    finished: list[str] = []  # activations answered 200
    failures: list[str] = []
    clips: list[tuple[int, int, str]] = []  # (activations finished when sent, started when answered, version)
    stream: list[tuple[int, int, str]] = []

    async def run() -> None:
        done = asyncio.Event()

        async def clip_client(http: httpx.AsyncClient) -> None:
            while not done.is_set():
                sent = len(finished)
                response = await http.post("/v1/clips?maps=false", files={"file": ("c.avi", clip_bytes)})
                if response.status_code != 200:
                    failures.append(f"clip {response.status_code} {response.text[:200]}")
                    continue
                body = response.json()
                version = body["model_version"]
                clips.append((sent, len(started), version))
                try:
                    assert_same_decisions(body["frames"], reference[version])
                except AssertionError as exc:
                    failures.append(f"clip scored by {version} is not {version}'s: {exc}")

        async def stream_client() -> None:
            frames = [png_bytes(f) for f in synthetic_frames(5, seed=8)]
            async with connect(f"{server.ws_url}/v1/stream") as ws:
                n = 0
                while not done.is_set():
                    sent = len(finished)
                    await ws.send(frames[n % len(frames)])
                    reply = json.loads(await ws.recv())
                    if "error" in reply or reply["seq"] != n:
                        failures.append(f"stream reply {reply}")
                    stream.append((sent, len(started), reply.get("model_version", "?")))
                    n += 1

        async def swapper(http: httpx.AsyncClient) -> None:
            try:
                for version in SWAPS:
                    started.append(version)
                    response = await http.post(f"/v1/models/{version}/activate")
                    if response.status_code != 200:
                        failures.append(f"activate {version}: {response.status_code} {response.text}")
                        return
                    finished.append(version)
                    epoch = len(finished)
                    deadline = time.monotonic() + 120
                    while not (any(c[0] >= epoch for c in clips) and any(f[0] >= epoch for f in stream)):
                        if time.monotonic() > deadline or failures:
                            failures.append(f"no clip and stream frame scored after activating {version} within 120 s")
                            return
                        await asyncio.sleep(0.01)
            finally:
                done.set()

        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            await asyncio.gather(clip_client(http), clip_client(http), stream_client(), swapper(http))

    asyncio.run(run())
    assert failures == []
    # every reply came from a version active while its request was in flight
    for sent, answered, version in clips + stream:
        assert version in versions[sent : answered + 1], (sent, answered, version)
    # the stream followed the activations in order, one version after the other
    followed = [version for i, (_, _, version) in enumerate(stream) if i == 0 or stream[i - 1][2] != version]
    assert followed == list(versions), followed
    assert {version for _, _, version in clips} == {"v0001", "v0002"}
    print(f"\nclips {len(clips)}, stream frames {len(stream)}")
