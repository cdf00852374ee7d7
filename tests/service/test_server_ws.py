"""WS /v1/stream through FastAPI's TestClient: order, motion state, options, error replies, close
codes and the drop policies."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from starlette.websockets import WebSocketDisconnect

from model import registry
from model.offline import scorer_for
from model.scoring import FrameStream
from tests.service.svc_helpers import assert_same_decisions, png_header_only
from tests.support import HEIGHT, WIDTH, png_bytes, synthetic_frames


def test_replies_in_order_with_stream_state(make_client, weights_dir: Path) -> None:
    frames = synthetic_frames(10, seed=11, anomaly_from=6)  # frames 6..9: the planted anomaly
    client = make_client(ws_max_pending_frames=len(frames))  # all sent before any reply is read: none dropped
    with client.websocket_connect("/v1/stream") as ws:
        for frame in frames:
            ws.send_bytes(png_bytes(frame))
        replies = [ws.receive_json() for _ in frames]
    assert [r["seq"] for r in replies] == list(range(10))
    assert [r["index"] for r in replies] == list(range(10))
    assert all(r["model_version"] == "v0001" and np.array(r["map"]).shape == (HEIGHT // 16, WIDTH // 16) for r in replies)
    # A stream keeps its previous frame: the scores, flags and ranking are those of the whole
    # sequence scored at once, not of each frame alone (whose motion channel would be empty).
    scorer = scorer_for(registry.load_version(weights_dir, "v0001"))
    expected = [r.to_dict(include_map=False) for r in FrameStream(scorer).score(frames)]
    assert [f["anomalous"] for f in expected[6:]] == [True] * 4  # decisions that mean something
    alone = [FrameStream(scorer).score(frame[None])[0] for frame in frames]
    assert_same_decisions(replies, expected)
    assert [r["score"] for r in replies[1:]] != pytest.approx([a.score for a in alone[1:]], rel=1e-5, abs=1e-6)


def test_control_options_and_error_replies(client) -> None:
    frame = png_bytes(synthetic_frames(1)[0])
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text('{"maps": false, "fps": 5}')
        assert ws.receive_json() == {"options": {"maps": False, "drop_policy": "drop_oldest", "fps": 5.0, "events": None}}
        ws.send_bytes(frame)
        first = ws.receive_json()
        assert first["seq"] == 0 and "map" not in first and "error" not in first
        ws.send_bytes(png_bytes(synthetic_frames(1)[0])[:70])  # a PNG that does not decode
        assert ws.receive_json()["error"]["code"] == "undecodable"
        ws.send_bytes(png_header_only(50_000, 50_000))
        huge = ws.receive_json()
        assert huge["seq"] == 2 and huge["error"]["code"] == "limit_exceeded"
        ws.send_bytes(b"")
        assert ws.receive_json() == {"seq": 3, "error": {"code": "empty_upload", "message": "the image is empty"}}
        for bad in ("[1, 2]", '"maps"', '{"colour": true}', '{"maps": "yes"}', '{"drop_policy": "random"}', '{"fps": 0}'):
            ws.send_text(bad)
            reply = ws.receive_json()
            assert set(reply) == {"error"} and reply["error"]["code"] == "invalid_control", bad
        ws.send_bytes(frame)  # the stream carries on after every error
        last = ws.receive_json()
        assert last["seq"] == 4 and last["index"] == 4 and last["timestamp_s"] == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("message", "code"),
    [("text:{not json", 1007), ("bytes:random", 1003), ("bytes:big", 1009), ("text:big", 1009)],
)
def test_close_codes(make_client, message: str, code: int) -> None:
    client = make_client(ws_max_message_bytes=16_000)
    kind, _, what = message.partition(":")
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(png_bytes(synthetic_frames(1)[0]))
        assert ws.receive_json()["seq"] == 0
        if kind == "text":
            ws.send_text("[" * 20_000 if what == "big" else what)
        else:
            ws.send_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20_000) if what == "big" else os.urandom(2000))
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == code


def test_closes_1013_when_no_model(make_client, tmp_path: Path) -> None:
    client = make_client(weights_dir=tmp_path / "empty")
    with client.websocket_connect("/v1/stream") as ws:
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 1013


class _Gate:
    """Blocks the model's forward pass until opened, to hold a frame 'in flight'."""

    def __init__(self, scorer) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self._original = scorer.raw_scores

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.opened.wait(20), "gate never opened"
        return self._original(*args, **kwargs)


def _rejections(client) -> float:
    registry_ = client.app.state.services.metrics.registry
    return registry_.get_sample_value("vad_overloaded_rejections_total", {"source": "stream"}) or 0.0


@pytest.mark.parametrize(("policy", "dropped"), [("drop_oldest", 1), ("reject_newest", 3)])
def test_drop_policy(make_client, monkeypatch: pytest.MonkeyPatch, policy: str, dropped: int) -> None:
    client = make_client(ws_max_pending_frames=2)
    scorer = client.app.state.services.store.current.scorer
    gate = _Gate(scorer)
    monkeypatch.setattr(scorer, "raw_scores", gate)
    frames = [png_bytes(f) for f in synthetic_frames(4, seed=2)]
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_text(f'{{"drop_policy": "{policy}"}}')
        assert ws.receive_json()["options"]["drop_policy"] == policy
        ws.send_bytes(frames[0])
        assert gate.entered.wait(20)  # frame 0 is being scored; frames 1-3 queue behind it
        for data in frames[1:]:
            ws.send_bytes(data)
        deadline = time.monotonic() + 20
        while _rejections(client) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.opened.set()
        replies = [ws.receive_json() for _ in frames]
    assert [r["seq"] for r in replies] == [0, 1, 2, 3]
    errors = {r["seq"]: r["error"]["code"] for r in replies if "error" in r}
    assert errors == {dropped: "overloaded"}


def test_overloaded_reply_when_queue_full(make_client) -> None:
    client = make_client(max_queue=1)
    frame = png_bytes(synthetic_frames(1)[0])
    with client.websocket_connect("/v1/stream") as ws:
        with client.app.state.services.batcher.admit("test"):
            ws.send_bytes(frame)
            assert ws.receive_json() == {
                "seq": 0, "error": {"code": "overloaded", "message": "the server is at its limit of 1 scoring requests; retry shortly"}
            }
        ws.send_bytes(frame)
        assert "score" in ws.receive_json()


def test_stream_moves_to_an_activated_version(client) -> None:
    frames = [png_bytes(f) for f in synthetic_frames(3, seed=4)]
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(frames[0])
        assert ws.receive_json()["model_version"] == "v0001"
        assert client.post("/v1/models/v0002/activate").status_code == 200
        ws.send_bytes(frames[1])
        moved = ws.receive_json()
        assert moved["model_version"] == "v0002" and moved["seq"] == 1
    gauge = client.app.state.services.metrics.registry.get_sample_value("vad_websocket_connections")
    assert gauge == 0
