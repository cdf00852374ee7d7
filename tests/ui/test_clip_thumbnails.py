"""POST /v1/clips?thumbnails=: small JPEGs of the frames for clients (the web page) that cannot decode
the clip themselves. Through the real app (TestClient: lifespan, batcher, OpenCV decoding): which
frames come back in each mode, that they decode, their size, the bound, and the NDJSON lines."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.results import FrameResult
from service.app import create_app
from service.schemas import ThumbnailMode
from service.settings import Settings
from service.thumbnails import MAX_THUMBNAILS, THUMBNAIL_SIDE, ThumbnailPicker
from tests.support import synthetic_frames, write_video


@pytest.fixture(scope="module")
def client(ui_weights: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(weights_dir=ui_weights, device="cpu", max_queue_delay_ms=2.0))) as client:
        yield client


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 frames of 64 x 96, the bright block crossing from frame 20 on (as the page tests use)."""
    return write_video(tmp_path_factory.mktemp("thumbs") / "short.avi", synthetic_frames(40, seed=5, anomaly_from=20))


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """450 frames scaled up to 256 x 384 (thumbnails shrink to 240 px), the block crossing frames 300-329."""
    frames = synthetic_frames(450, seed=6, anomaly_from=300, anomaly_until=330)
    big = np.stack([cv2.resize(f, (384, 256), interpolation=cv2.INTER_NEAREST) for f in frames])
    return write_video(tmp_path_factory.mktemp("thumbs") / "long.avi", big)


def post_clip(client: TestClient, clip: Path, query: str, ndjson: bool = False) -> Any:
    headers = {"Accept": "application/x-ndjson"} if ndjson else {}
    with clip.open("rb") as handle:
        response = client.post(f"/v1/clips?maps=false&{query}", files={"file": (clip.name, handle)}, headers=headers)
    assert response.status_code == 200, response.text
    return response


def decoded(thumbnail: dict[str, Any]) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(base64.b64decode(thumbnail["jpeg"], validate=True), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None, thumbnail["index"]
    return image


def test_no_thumbnails_by_default(client: TestClient, short_clip: Path) -> None:
    body = post_clip(client, short_clip, "").json()
    assert "thumbnails" not in body and "processed_size" not in body and "thumbnail_count" not in body
    assert "thumbnails" not in post_clip(client, short_clip, "thumbnails=none").json()


def test_all_of_a_short_clip(client: TestClient, short_clip: Path) -> None:
    body = post_clip(client, short_clip, "thumbnails=all").json()
    assert [t["index"] for t in body["thumbnails"]] == list(range(40))
    assert body["thumbnail_count"] == 40
    assert body["processed_size"] == {"width": 96, "height": 64}  # the tiny model scores frames 64 rows high: as they are
    for thumbnail in body["thumbnails"]:
        image = decoded(thumbnail)
        assert image.shape == (64, 96)  # smaller than THUMBNAIL_SIDE: kept as is, in gray levels
    # the thumbnail is the frame: the block's bright pixels are where the frame has them
    assert decoded(body["thumbnails"][25]).max() > 200 and decoded(body["thumbnails"][5]).max() < 200


def test_anomalous_frames_and_a_sample_of_a_long_clip(client: TestClient, long_clip: Path) -> None:
    body = post_clip(client, long_clip, "thumbnails=anomalous").json()
    indices = [t["index"] for t in body["thumbnails"]]
    assert indices == sorted(set(indices)) and len(indices) == body["thumbnail_count"] <= MAX_THUMBNAILS
    flagged = body["anomalous_frames"]
    assert any(i >= 300 for i in flagged), flagged
    sample = set(range(0, 450, -(-450 // (MAX_THUMBNAILS // 2))))  # every 5th frame of the 450 declared
    off_sample = [i for i in flagged if i not in sample]
    # the sample, plus the anomalous frames off it while their half of the bound lasts
    assert indices == sorted(sample | set(off_sample[: MAX_THUMBNAILS // 2]))
    image = decoded(body["thumbnails"][0])
    assert image.shape == (160, THUMBNAIL_SIDE)  # 256 x 384 shrunk to a longer side of 240
    assert body["processed_size"] == {"width": 96, "height": 64}  # the tiny model scores frames 64 rows high


def test_all_of_a_long_clip_is_bounded(client: TestClient, long_clip: Path) -> None:
    body = post_clip(client, long_clip, "thumbnails=all").json()
    indices = [t["index"] for t in body["thumbnails"]]
    stride = -(-450 // MAX_THUMBNAILS)  # 3: 150 thumbnails spanning the clip
    assert indices == list(range(0, 450, stride))
    assert len(indices) <= MAX_THUMBNAILS


def test_ndjson_thumbnail_lines_follow_their_frames(client: TestClient, short_clip: Path) -> None:
    lines = [json.loads(line) for line in post_clip(client, short_clip, "thumbnails=anomalous", ndjson=True).text.splitlines()]
    kinds = [line["type"] for line in lines]
    assert kinds[-1] == "summary" and kinds.count("frame") == 40
    for position, line in enumerate(lines):
        if line["type"] == "thumbnail":
            previous = lines[position - 1]
            assert previous["type"] == "frame" and previous["index"] == line["index"]
            assert decoded(line).shape == (64, 96)
    thumbnails = [line for line in lines if line["type"] == "thumbnail"]
    assert len(thumbnails) == 40 == lines[-1]["thumbnail_count"]  # 40 frames: all are in the even sample
    assert lines[-1]["processed_size"] == {"width": 96, "height": 64}
    assert "thumbnails" not in lines[-1]


def test_a_bad_mode_is_refused(client: TestClient, short_clip: Path) -> None:
    with short_clip.open("rb") as handle:
        response = client.post("/v1/clips?thumbnails=some", files={"file": (short_clip.name, handle)})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert "thumbnails" in response.json()["error"]["message"]
    schema = client.get("/openapi.json").json()
    parameters = schema["paths"]["/v1/clips"]["post"]["parameters"]
    assert any(p["name"] == "thumbnails" for p in parameters)


def result(index: int, anomalous: bool) -> FrameResult:
    return FrameResult(index, index / 10, 0.0, anomalous, False, np.zeros((1, 1), np.float32))


@pytest.mark.parametrize("mode", [ThumbnailMode.all, ThumbnailMode.anomalous])
def test_the_bound_holds_when_the_clip_outruns_its_declared_count(mode: ThumbnailMode) -> None:
    """A container that under-declares (an estimate) and a clip of anomalies only: never over the bound."""
    picker = ThumbnailPicker(mode, expected=100)
    picked = [i for i in range(5000) if picker.wants(result(i, anomalous=True))]
    assert len(picked) == MAX_THUMBNAILS == picker.count
    assert picked[0] == 0
