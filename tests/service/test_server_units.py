"""Units below the routes: the batcher, header parsing and sniffing, settings, serve()."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from service.batcher import Batcher
from service.errors import LimitExceeded, Overloaded, Undecodable, UnsupportedMedia
from service.metrics import Metrics
from service.model_store import ServingModel
from service.settings import Settings
from service.video import check_frame_size, image_size, sniff_video
from tests.service.svc_helpers import jpeg_header_only, png_header_only
from tests.support import jpeg_bytes, png_bytes


class FakeScorer:
    """raw_scores returns the model's id in every row, and records each forward pass."""

    def __init__(self, model_id: float, calls: list) -> None:
        self.model_id = model_id
        self.calls = calls

    def raw_scores(self, patches: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        self.calls.append((self.model_id, patches[:, 0, 0, 0].tolist()))
        out = torch.zeros(patches.shape[0], 3)
        out[:, 0] = self.model_id
        out[:, 1] = patches[:, 0, 0, 0]
        return out


def fake_model(model_id: float, calls: list) -> ServingModel:
    return ServingModel(f"v{int(model_id):04d}", {}, FakeScorer(model_id, calls), "cpu")  # type: ignore[arg-type]


def job(tag: float, patches: int) -> torch.Tensor:
    return torch.full((patches, 1, 2, 2), tag)


def run_batcher(coro_factory, **kwargs):
    async def main():
        batcher = Batcher(metrics=Metrics(), **{"max_batch_patches": 100, "max_queue_delay_s": 0.05, "max_queue": 8, **kwargs})
        await batcher.start()
        try:
            return await coro_factory(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_batches_never_mix_models_and_results_go_back_to_their_job() -> None:
    calls: list = []
    a, b = fake_model(1, calls), fake_model(2, calls)

    async def scenario(batcher: Batcher):
        submissions = [(a, 10.0), (b, 20.0), (a, 11.0), (b, 21.0), (a, 12.0)]
        return await asyncio.gather(*(batcher.score(model, job(tag, 3)) for model, tag in submissions)), submissions

    results, submissions = run_batcher(scenario)
    for (model, tag), raw in zip(submissions, results):
        assert raw.shape == (3, 3)
        assert raw[:, 0].tolist() == [model.scorer.model_id] * 3  # scored by its own model
        assert raw[:, 1].tolist() == [tag] * 3  # its own rows
    assert len(calls) == 2  # one batch per model
    for model_id, tags in calls:
        assert {int(t) // 10 for t in tags} == {int(model_id)}
    assert calls[0] == (1, [10.0] * 3 + [11.0] * 3 + [12.0] * 3)


def test_batch_size_limit_and_arrival_order() -> None:
    calls: list = []
    model = fake_model(1, calls)

    async def scenario(batcher: Batcher):
        sizes = [10, 10, 10, 40, 5]
        return await asyncio.gather(*(batcher.score(model, job(float(i), n)) for i, n in enumerate(sizes)))

    results = run_batcher(scenario, max_batch_patches=25)
    assert [r.shape[0] for r in results] == [10, 10, 10, 40, 5]
    batches = [sorted(set(tags)) for _, tags in calls]
    # [0, 1] fill 20 of 25; 2 would overflow; 3 (40 > 25) runs alone; the 5-patch job never overtakes it.
    assert batches == [[0.0, 1.0], [2.0], [3.0], [4.0]]


def test_admission_limit() -> None:
    async def scenario(batcher: Batcher):
        first, second = batcher.admit("test"), batcher.admit("test")
        with pytest.raises(Overloaded):
            batcher.admit("test")
        first.release()
        first.release()  # idempotent
        with batcher.admit("test"):
            assert batcher.admitted == 2
        second.release()
        return batcher.admitted

    assert run_batcher(scenario, max_queue=2) == 0


def test_cancelled_job_is_skipped() -> None:
    calls: list = []
    model = fake_model(1, calls)

    async def scenario(batcher: Batcher):
        doomed = asyncio.ensure_future(batcher.score(model, job(7.0, 4)))
        await asyncio.sleep(0)
        doomed.cancel()
        kept = await batcher.score(model, job(8.0, 2))
        return kept

    kept = run_batcher(scenario)
    assert kept[:, 1].tolist() == [8.0, 8.0]
    assert all(7.0 not in tags for _, tags in calls)


# --- headers and sniffing ----------------------------------------------------------------------


def test_image_size_from_headers() -> None:
    frame = np.zeros((37, 53), np.uint8)
    assert image_size(png_bytes(frame)) == (53, 37)
    assert image_size(jpeg_bytes(frame)) == (53, 37)
    assert image_size(png_header_only(70_000, 3)) == (70_000, 3)
    assert image_size(jpeg_header_only(1234, 567)) == (1234, 567)
    progressive = jpeg_header_only(10, 20).replace(b"\xff\xc0", b"\xff\xc2")
    assert image_size(progressive) == (10, 20)
    with pytest.raises(Undecodable):
        image_size(b"\xff\xd8\xff\xda" + bytes(20))  # a scan before any frame header
    with pytest.raises(UnsupportedMedia):
        image_size(b"BM" + bytes(60))


def test_frame_size_limits() -> None:
    check_frame_size(96, 64, 96 * 64, 16)
    with pytest.raises(LimitExceeded):
        check_frame_size(97, 64, 96 * 64, 16)


@pytest.mark.parametrize(
    ("head", "container"),
    [
        (b"RIFF\x00\x00\x00\x00AVI LIST", "avi"),
        (b"\x00\x00\x00\x20ftypisom", "mp4"),
        (b"\x1a\x45\xdf\xa3\x01", "matroska"),
        (b"OggS\x00", "ogg"),
        (b"G" + bytes(187) + b"G" + bytes(10), "mpeg-ts"),
    ],
)
def test_sniff_video(head: bytes, container: str) -> None:
    assert sniff_video(head)[0] == container


@pytest.mark.parametrize("head", [b"G" + bytes(300), b"%PDF-1.7", b"\x89PNG\r\n\x1a\n", struct.pack(">I", 7) * 4])
def test_sniff_video_refuses(head: bytes) -> None:
    with pytest.raises(UnsupportedMedia):
        sniff_video(head)


# --- settings and serve() ----------------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAD_MAX_QUEUE", "7")
    monkeypatch.setenv("VAD_API_KEY", "")
    monkeypatch.setenv("VAD_CORS_ORIGINS", '["https://a.example"]')
    monkeypatch.setenv("VAD_MAX_QUEUE_DELAY_MS", "2.5")
    settings = Settings()
    assert settings.max_queue == 7 and settings.api_key is None
    assert settings.cors_origins == ["https://a.example"] and settings.max_queue_delay_s == 0.0025
    assert Settings(max_queue=3).max_queue == 3  # explicit values win over the environment
    monkeypatch.setenv("VAD_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("VAD_DEVICE", "cpu")
    monkeypatch.setenv("VAD_MAX_BATCH_PATCHES", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_serve_runs_uvicorn_with_the_settings(monkeypatch: pytest.MonkeyPatch, weights_dir) -> None:
    import uvicorn

    from service import server

    captured = {}
    monkeypatch.setenv("VAD_WS_MAX_MESSAGE_BYTES", "12345")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: captured.setdefault("config", self.config))
    server.serve(Settings(weights_dir=weights_dir), "127.0.0.1", 8123)
    config = captured["config"]
    assert (config.host, config.port, config.ws_max_size) == ("127.0.0.1", 8123, 12345)
    assert config.app.state.services.settings.weights_dir == weights_dir


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "server.md").read_text()
    missing = [name for name in Settings.model_fields if f"`VAD_{name.upper()}`" not in docs]
    assert missing == []


@pytest.mark.parametrize(("value", "device", "on"), [
    ("auto", "cpu", True), ("auto", "cuda", False), ("auto", "cuda:1", False),
    ("true", "cuda", True), ("false", "cpu", False),
])
def test_unchanged_patch_test_by_setting_and_device(value: str, device: str, on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.model_store import skips_unchanged_patches

    monkeypatch.setenv("VAD_SKIP_UNCHANGED", value)
    assert skips_unchanged_patches(Settings().skip_unchanged, device) is on


def test_the_cpu_store_scores_with_the_unchanged_patch_test_by_default(weights_dir) -> None:
    from service.model_store import ModelStore

    store = ModelStore(Settings(weights_dir=weights_dir, device="cpu"), Metrics())
    assert store.scorer_options["skip"] is not None
