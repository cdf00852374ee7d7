"""WS /v1/stream against hostile clients: text where binary is expected, malformed JSON, over-size
messages, more frames than the backlog holds (drops by policy, made certain by holding scoring at a
gate), a client that sends far faster than it reads, a client that vanishes mid-frame. Nothing here
depends on the machine's speed: figures (frames pushed, /healthz latency, RSS) are printed only."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service import ws_session
from tests.reliability.helpers import RawWebSocket, frames, metric_value, png


def receive_until_close(ws, limit: int = 200) -> tuple[list[dict], int]:  # noqa: ANN001
    """(JSON replies, close code) of a TestClient WebSocket, reading until the server closes."""
    replies = []
    for _ in range(limit):
        message = ws.receive()
        if message["type"] == "websocket.close":
            return replies, message["code"]
        replies.append(json.loads(message["text"]))
    raise AssertionError("the server never closed")


@pytest.mark.parametrize("offending, code", [
    ("iVBORw0KGgoAAAANSUhEUgAA", 1007),  # a base64 PNG sent as text
    ('{"maps": false', 1007),  # malformed JSON
    ("", 1007),
    (b"GIF89a\x01\x00\x01\x00", 1003),  # binary that is not PNG/JPEG
    (b"\x00" * 64, 1003),
], ids=["base64-text", "malformed-json", "empty-text", "gif", "zeros"])
def test_protocol_errors_close_after_answering_what_came_before(client, offending, code: int) -> None:
    good = [png(frame) for frame in frames(3, seed=2)]
    with client.websocket_connect("/v1/stream") as ws:
        for data in good:
            ws.send_bytes(data)
        ws.send_text('{"maps": false}')
        if isinstance(offending, bytes):
            ws.send_bytes(offending)
        else:
            ws.send_text(offending)
        replies, close_code = receive_until_close(ws)
    assert close_code == code
    # Every message before the offending one got its reply, in order, before the close.
    assert [r.get("seq") for r in replies] == [0, 1, 2, None], replies
    assert all("score" in r for r in replies[:3]) and "options" in replies[3]
    assert client.app.state.services.batcher.admitted == 0


def test_json_that_is_not_an_options_object_is_answered_and_the_stream_goes_on(client) -> None:
    with client.websocket_connect("/v1/stream") as ws:
        for text in ("[]", "null", "42", '"maps"', '{"maps": 1}', '{"fps": -1}', '{"fps": 1e999}',
                     '{"drop_policy": "none"}', '{"__proto__": {}}', '{"maps": false, "maps": "x"}'):
            ws.send_text(text)
            reply = ws.receive_json()
            assert set(reply) == {"error"} and reply["error"]["code"] == "invalid_control", (text, reply)
        ws.send_bytes(png(frames(1)[0]))
        assert ws.receive_json()["seq"] == 0


def test_messages_over_the_size_limit_close_1009(live_server, client) -> None:
    limit = 64 * 1024
    server = live_server(ws_max_message_bytes=limit)
    big = png(np.random.default_rng(0).integers(0, 256, (400, 400), dtype=np.uint8))
    assert len(big) > limit
    for message in (big, "x" * (limit + 1), b"\x89PNG" + bytes(10 * limit)):
        with connect(f"{server.ws_url}/v1/stream", max_size=None) as ws:
            ws.send(png(frames(1)[0]))
            assert "score" in json.loads(ws.recv(timeout=10))
            ws.send(message)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009, closed.value
    # The app checks again (a server run without uvicorn's limit, e.g. TestClient): same code.
    small = client.app.state.services.settings.ws_max_message_bytes
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(b"\x89PNG\r\n\x1a\n" + bytes(small))
        with pytest.raises(WebSocketDisconnect) as disconnect:
            ws.receive_json()
    assert disconnect.value.code == 1009
    assert httpx.get(f"{server.url}/healthz").status_code == 200


@pytest.mark.parametrize("policy", ["drop_oldest", "reject_newest"])
def test_a_full_backlog_drops_frames_by_policy(make_client, monkeypatch, policy: str) -> None:
    """Drops made certain by construction: scoring is held at a gate while 12 frames arrive, so at
    most 1 frame (the one being scored) + 4 (VAD_WS_MAX_PENDING_FRAMES) can wait for a score; the
    other 7 or 8 must be answered `overloaded`, whichever the policy picks, at any machine speed."""
    sent, pending = 12, 4
    client = make_client(ws_max_pending_frames=pending)
    services = client.app.state.services
    gate = threading.Event()
    real_decode = ws_session.decode_frame

    async def gated_decode(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        await asyncio.to_thread(gate.wait, 120)
        return await real_decode(*args, **kwargs)

    monkeypatch.setattr(ws_session, "decode_frame", gated_decode)
    good = [png(frame) for frame in frames(sent, seed=8)]
    try:
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({"maps": False, "drop_policy": policy}))
            assert ws.receive_json()["options"]["drop_policy"] == policy
            for data in good:
                ws.send_bytes(data)
            # The receiver has taken (nearly) every frame once this many were refused; the worker
            # holds at most one frame at the gate meanwhile, so nothing has been scored yet.
            deadline = time.monotonic() + 60
            while metric_value(services.metrics, "vad_overloaded_rejections_total", source="stream") < sent - pending - 1:
                assert time.monotonic() < deadline, "the backlog bound never refused a frame"
                time.sleep(0.02)
            assert metric_value(services.metrics, "vad_frames_scored_total", source="stream") == 0
            gate.set()
            replies = [ws.receive_json() for _ in range(sent)]
    finally:
        gate.set()
    assert [r["seq"] for r in replies] == list(range(sent))
    scored = [r["seq"] for r in replies if "score" in r]
    dropped = [r["seq"] for r in replies if r.get("error", {}).get("code") == "overloaded"]
    assert sorted(scored + dropped) == list(range(sent)), replies
    assert sent - pending - 1 <= len(dropped) <= sent - pending, (scored, dropped)
    for reply in replies:
        if "error" in reply:
            assert set(reply) == {"seq", "error"} and "dropped" in reply["error"]["message"], reply
    if policy == "drop_oldest":  # the newest frames are always kept
        assert scored[-pending:] == list(range(sent - pending, sent)), scored
    else:  # reject_newest: the first frames are always kept
        assert scored[:pending] == list(range(pending)), scored
    assert metric_value(services.metrics, "vad_overloaded_rejections_total", source="stream") == len(dropped)
    assert services.batcher.admitted == 0


def noise_png(side: int, seed: int) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8))


@pytest.mark.slow
def test_fast_sender_slow_reader_stays_bounded(server_process) -> None:
    """A client pushes ~256 KiB frames as fast as it can for a few seconds without reading a reply.
    The server reads no further than its bounds (backlog, unsent replies), its memory stays within a
    generous bound, it keeps answering /healthz meanwhile, and every frame sent gets its one reply,
    in order: a score or an `overloaded` drop (how many of each depends on the machine's speed; that
    the drop policy applies is proven by test_a_full_backlog_drops_frames_by_policy)."""
    server = server_process(ws_max_pending_frames=4)
    payloads = [noise_png(288, seed) for seed in range(4)]  # 288x288 noise: ~83 KB PNG, 324 patches
    payloads = [p + b"\x00" * (256 * 1024 - len(p)) for p in payloads]  # padded: trailing bytes are ignored
    with connect(f"{server.ws_url}/v1/stream", max_size=None) as warm:  # warm-up: allocator, batcher
        for p in payloads:
            warm.send(p)
        for _ in payloads:
            warm.recv(timeout=120)
    baseline = server.rss_kib()
    flood_seconds = 6.0
    sent = 0
    samples: list[int] = []
    stop = threading.Event()
    # A small receive buffer and at most 4 replies read ahead: the server's replies back up soon.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", server.port))
    ws = connect(f"{server.ws_url}/v1/stream", sock=sock, max_size=None, max_queue=4).__enter__()

    def flood() -> None:
        nonlocal sent
        try:
            while not stop.is_set():
                ws.send(payloads[sent % len(payloads)])
                sent += 1
        except ConnectionClosed:
            pass

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    started = time.monotonic()
    health_seconds = []
    while time.monotonic() - started < flood_seconds or len(samples) < 3:
        samples.append(server.rss_kib())
        t0 = time.perf_counter()
        # Answered while the hostile client pushes (a generous timeout: a slow machine is not a failure).
        assert httpx.get(f"{server.url}/healthz", timeout=60).status_code == 200
        health_seconds.append(time.perf_counter() - t0)
        time.sleep(0.25)
    sent_during_flood = sent
    stop.set()
    # Now read: the server resumes, the blocked send completes, and every frame gets exactly one reply.
    replies = []
    sender.join(timeout=120)
    assert not sender.is_alive(), "the flooding client's last send never completed"
    deadline = time.monotonic() + 300
    while len(replies) < sent and time.monotonic() < deadline:
        replies.append(json.loads(ws.recv(timeout=120)))
    ws.close()
    assert [r["seq"] for r in replies] == list(range(sent))
    dropped = sum(1 for r in replies if r.get("error", {}).get("code") == "overloaded")
    scored = sum(1 for r in replies if "score" in r)
    assert dropped + scored == sent, [r for r in replies if "score" not in r and r.get("error", {}).get("code") != "overloaded"][:3]
    growth_mib = (max(samples) - baseline) / 1024
    offered_mib = sent_during_flood * 256 / 1024
    print(f"\nflood (figures of this machine): {sent_during_flood} frames ({offered_mib:.0f} MiB) accepted by the socket "
          f"in {flood_seconds:.0f} s, {scored} scored, {dropped} dropped (drop_oldest); server RSS {baseline / 1024:.0f} MiB "
          f"-> max {max(samples) / 1024:.0f} MiB (+{growth_mib:.1f} MiB); /healthz max {max(health_seconds) * 1000:.0f} ms")
    # Bounded: the server holds at most its backlog + unsent replies + uvicorn's one-message buffer
    # (4 + 16 + 1 frames = ~5 MiB) plus socket buffers, however long the client keeps pushing; the
    # bound is generous (allocator slack), a server reading without bound would cross it.
    assert growth_mib < 64, growth_mib


def test_client_vanishing_mid_frame_leaves_nothing_behind(live_server) -> None:
    server = live_server()
    services = server.services
    good = png(frames(1)[0])
    for declared, scenario in ((1 << 20, "header then half a payload"), (len(good), "frames pending, then gone")):
        raw = RawWebSocket(server.port)
        for _ in range(6):
            raw.send_frame(good)
        if scenario.startswith("header"):
            raw.send_partial(declared, good[: len(good) // 2])
        raw.vanish()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if metric_value(services.metrics, "vad_websocket_connections") == 0 and services.batcher.admitted == 0:
                break
            time.sleep(0.05)
        assert metric_value(services.metrics, "vad_websocket_connections") == 0, scenario
        assert services.batcher.admitted == 0, scenario
    # The server carries on: a new stream is scored.
    with connect(f"{server.ws_url}/v1/stream") as ws:
        ws.send(good)
        assert "score" in json.loads(ws.recv(timeout=10))
