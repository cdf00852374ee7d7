"""`vad bench --peer torchserve`: the TorchServe handler scores exactly as the service's FrameStream
(imported directly, no TorchServe needed), a missing Java skips the peer with the reason, and (with
VAD_TEST_PEER=1, out of the default run: it installs TorchServe into ~/.cache/vad-bench and starts
a JVM, a few minutes the first time) a smoke run of the whole comparison:

    VAD_TEST_PEER=1 .venv/bin/pytest tests/speed/test_peer.py -q
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from model import registry
from model.offline import iter_frame_results, scorer_for
from model.scoring import FrameStream
from service.bench import peer_torchserve
from service.bench.footage import Footage, write_clip
from service.bench.torchserve_handler import SEQUENCE_ID_HEADER, PatchScoringHandler
from tests.support import jpeg_bytes, synthetic_frames


class FakeContext:
    """What the handler uses of TorchServe's ts.context.Context: request headers, response statuses."""

    def __init__(self, headers: list[dict[str, str]]) -> None:
        self.headers = headers
        self.statuses: dict[int, int] = {}

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.headers[idx].get(key)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = code


@pytest.fixture
def handler_for(trained_weights: Path) -> Iterator[Any]:
    threads = torch.get_num_threads()

    def make(requests: str) -> PatchScoringHandler:
        handler = PatchScoringHandler()
        handler.load(trained_weights, registry.active_version(trained_weights), requests, threads=1)
        return handler

    yield make
    torch.set_num_threads(threads)  # the handler sets its worker's threads: give the test process its own back


def test_stream_frames_are_scored_as_each_streams_frame_stream(trained_weights: Path, handler_for: Any) -> None:
    handler = handler_for("frames")
    footage = {"a": synthetic_frames(6, seed=1), "b": synthetic_frames(6, seed=2, anomaly_from=2)}
    encoded = {name: [jpeg_bytes(f) for f in frames] for name, frames in footage.items()}
    # batches as TorchServe's batching might form them: streams interleaved, a stream twice in one batch
    batches = [[("a", 0), ("b", 0)], [("a", 1), ("a", 2), ("b", 1)], [("b", 2)], [("b", 3), ("a", 3), ("b", 4), ("a", 4)],
               [("a", 5), ("b", 5)]]
    served: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for batch in batches:
        context = FakeContext([{SEQUENCE_ID_HEADER: name} for name, _ in batch])
        replies = handler.handle([{"body": encoded[name][i]} for name, i in batch], context)
        assert len(replies) == len(batch) and context.statuses == {}
        for (name, _), reply in zip(batch, replies):
            served[name].append(json.loads(reply))

    reference_scorer = scorer_for(registry.load_version(trained_weights, handler.version, "cpu"), "cpu")
    for name, replies in served.items():
        decoded = np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) for b in encoded[name]])
        stream = FrameStream(reference_scorer)
        expected = [stream.score(decoded[i : i + 1])[0] for i in range(len(decoded))]
        assert [r["index"] for r in replies] == list(range(6))
        assert [r["anomalous"] for r in replies] == [e.anomalous for e in expected]
        np.testing.assert_allclose([r["score"] for r in replies], [e.score for e in expected], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array([r["map"] for r in replies]), np.stack([e.map for e in expected]), atol=2e-4)
        assert replies[0]["model_version"] == handler.version


def test_a_clip_is_scored_as_vad_detect_scores_it(trained_weights: Path, handler_for: Any, tmp_path: Path) -> None:
    handler = handler_for("clips")
    clip = write_clip(tmp_path / "clip.avi", synthetic_frames(20, seed=5, anomaly_from=10))
    (reply,) = handler.handle([{"body": clip.read_bytes()}], FakeContext([{}]))
    body = json.loads(reply)

    from model.data import read_footage

    decoded = read_footage(clip)
    expected = list(iter_frame_results(handler.scorer, decoded.gray, decoded.fps))
    assert body["frame_count"] == len(expected) == 20
    assert body["anomalous_frames"] == [e.index for e in expected if e.anomalous]
    np.testing.assert_allclose([f["score"] for f in body["frames"]], [e.score for e in expected], rtol=1e-5, atol=1e-5)


def test_an_undecodable_request_is_refused_alone(handler_for: Any) -> None:
    handler = handler_for("frames")
    good = jpeg_bytes(synthetic_frames(1, seed=3)[0])
    context = FakeContext([{SEQUENCE_ID_HEADER: "x"}, {SEQUENCE_ID_HEADER: "y"}])
    replies = [json.loads(r) for r in handler.handle([{"body": b"not an image"}, {"body": good}], context)]
    assert context.statuses == {0: 422} and "error" in replies[0]
    assert "score" in replies[1] and replies[1]["index"] == 0


def test_without_java_the_peer_is_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch, trained_weights: Path) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(peer_torchserve.shutil, "which", lambda *args, **kwargs: None)

    def no_install(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing is installed when Java is missing")

    monkeypatch.setattr(peer_torchserve, "peer_environment", no_install)
    service = {"service": {"frames_per_s": 1.0}, "streams": [], "max_realtime_streams": 0}
    out = peer_torchserve.peer_section("torchserve", trained_weights, registry.active_version(trained_weights),
                                       Footage(None, None, 4), service, quick=True, stream_seconds=1.0)
    assert out["skipped"].startswith("no java on PATH") and "openjdk-17" in out["skipped"]
    assert "compare" not in out


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VAD_TEST_PEER") != "1",
                    reason="starts TorchServe (installed into ~/.cache/vad-bench on first use): set VAD_TEST_PEER=1")
def test_quick_bench_with_the_torchserve_peer(trained_weights: Path, tmp_path: Path) -> None:
    from service.cli import main

    problem = peer_torchserve.java_problem()
    if problem:
        pytest.skip(problem)
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--no-ablation", "--peer", "torchserve", "--weights", str(trained_weights),
                 "--json", str(out)]) == 0
    peer = json.loads(out.read_text())["peer"]
    if "skipped" in peer:
        pytest.skip(f"the peer could not run here: {peer['skipped']}")
    assert peer["clips"]["frames_per_s"] > 0
    assert [s["k"] for s in peer["streams"]] == [1, 2]
    assert all(s["dropped"] == 0 for s in peer["streams"])  # every frame answered with a score
    assert peer["peak_rss_mb"] > peer["peak_rss_mb_parts"]["frontend"] > 0
    compare = peer["compare"]
    assert compare["clips_frames_per_s"]["ratio"] > 0 and compare["peak_rss_mb"]["ratio"] > 0
    assert set(compare["p99_ms_by_k"]) == {"service_websocket", "service_http_frames", "peer_http_frames"}
