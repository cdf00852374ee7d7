"""VAD_ENCODING=torch through the server (issue 15 items 1 and 3): frames are batcher jobs, encoded
together in the inference thread (Batcher.score_frames -> model.scoring.prepare_streams), and every
stream and clip still gets the results of its own FrameStream with the OpenCV encoding. Runs on the
CPU here (the fixture model's motion channel is a frame difference, equal in both encodings); on a
GPU the same path encodes on the device."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from model import registry, scoring
from model.offline import scorer_for
from model.scoring import FrameStream
from service.batcher import Batcher
from service.metrics import Metrics
from service.model_store import ServingModel
from tests.service.svc_helpers import assert_same_decisions
from tests.service.test_server_http import post_file
from tests.support import png_bytes, synthetic_frames, write_video

SEEDS = (3, 4, 5, 6)


def expected(weights_dir: Path, frames) -> list[dict]:
    scorer = scorer_for(registry.load_version(weights_dir, "v0001"), encoding="opencv")
    return [r.to_dict(include_map=False) for r in FrameStream(scorer).score(frames)]


def test_streams_at_once_each_get_their_own_results(make_client, weights_dir: Path) -> None:
    client = make_client(encoding="torch", max_queue_delay_ms=20.0)
    assert client.app.state.services.store.current.scorer.encoding == "torch"
    footage = {seed: synthetic_frames(8, seed=seed, anomaly_from=5) for seed in SEEDS}
    replies: dict[int, list[dict]] = {}
    errors: list[BaseException] = []

    def one_stream(seed: int) -> None:
        try:
            with client.websocket_connect("/v1/stream") as ws:
                got = []
                for frame in footage[seed]:
                    ws.send_bytes(png_bytes(frame))
                    got.append(ws.receive_json())
                replies[seed] = got
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one_stream, args=(seed,)) for seed in SEEDS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for seed in SEEDS:
        assert [r["seq"] for r in replies[seed]] == list(range(8))
        assert_same_decisions(replies[seed], expected(weights_dir, footage[seed]))


def test_clip_with_the_torch_encoding(make_client, weights_dir: Path, tmp_path: Path) -> None:
    frames = synthetic_frames(40, seed=7, anomaly_from=30)
    clip = write_video(tmp_path / "clip.avi", frames)
    body = post_file(make_client(encoding="torch"), "/v1/clips", clip.read_bytes()).json()
    reference = post_file(make_client(encoding="opencv"), "/v1/clips", clip.read_bytes()).json()
    assert any(f["anomalous"] for f in reference["frames"])  # decisions that mean something
    assert_same_decisions(body["frames"], reference["frames"])


def test_chunks_of_a_batch_are_encoded_in_one_pass(weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks waiting together form one batch: one prepare_streams call encodes all of them."""
    loaded = registry.load_version(weights_dir, "v0001")
    model = ServingModel("v0001", {}, scorer_for(loaded, encoding="torch"), "cpu")
    passes: list[int] = []
    real = scoring.prepare_streams

    def counting(chunks):
        passes.append(len(chunks))
        return real(chunks)

    monkeypatch.setattr("service.batcher.prepare_streams", counting)
    footage = {seed: synthetic_frames(3, seed=seed) for seed in SEEDS}

    async def scenario() -> dict[int, list]:
        batcher = Batcher(max_batch_patches=10_000, max_queue_delay_s=0.5, max_queue=8, metrics=Metrics())
        await batcher.start()
        try:
            streams = {seed: FrameStream(model.scorer) for seed in SEEDS}
            results = await asyncio.gather(*(batcher.score_frames(model, streams[s], footage[s]) for s in SEEDS))
            return dict(zip(SEEDS, results))
        finally:
            await batcher.stop()

    got = asyncio.run(scenario())
    assert passes == [len(SEEDS)]  # one pass for all four streams' chunks
    for seed in SEEDS:
        assert_same_decisions([r.to_dict() for r in got[seed]], expected(weights_dir, footage[seed]))
