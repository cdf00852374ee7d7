"""HTTP endpoints through FastAPI's TestClient: happy paths, every bad input, errors' JSON shape."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from model import registry
from model.offline import scorer_for
from model.scoring import FrameStream
from tests.service.svc_helpers import (
    assert_same_decisions, jpeg_header_only, metric_families, png_header_only, sample_value,
)
from tests.support import (
    HEIGHT, PATCHES_PER_FRAME, WIDTH, jpeg_bytes, png_bytes, publish_smoothed, synthetic_frames, write_video,
)

FRAME_KEYS = {"index", "timestamp_s", "score", "anomalous", "uncertain", "map"}


def post_file(client, path: str, data: bytes, name: str = "upload.bin", **kwargs):
    return client.post(path, files={"file": (name, data, "application/octet-stream")}, **kwargs)


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text


PLANTED_FROM = 12  # clip_file's planted anomaly: frames 12..19


@pytest.fixture
def clip_file(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.avi", synthetic_frames(20, seed=5, anomaly_from=PLANTED_FROM))


# --- health ------------------------------------------------------------------------------------


def test_health_and_readiness(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model_version": "v0001", "replica": client.app.state.replica.id}


def test_not_ready_without_a_published_version(make_client, tmp_path: Path) -> None:
    client = make_client(weights_dir=tmp_path / "empty")
    assert client.get("/healthz").status_code == 200
    assert_error(client.get("/readyz"), 503, "not_ready")
    assert client.get("/readyz").headers["retry-after"] == "1"
    assert_error(client.get("/v1/models/active"), 503, "not_ready")
    assert_error(post_file(client, "/v1/frames", png_bytes(synthetic_frames(1)[0])), 503, "not_ready")
    assert client.get("/v1/models").json() == {"active": None, "versions": []}


def test_unknown_route_and_method_are_json_errors(client) -> None:
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/frames"), 405, "method_not_allowed")


# --- frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize("encode", [png_bytes, jpeg_bytes], ids=["png", "jpeg"])
def test_frame_scores_like_the_model(client, weights_dir: Path, encode) -> None:
    frame = synthetic_frames(1, seed=3)[0]
    data = encode(frame)
    response = post_file(client, "/v1/frames", data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == FRAME_KEYS | {"model_version", "threshold"}
    assert body["model_version"] == "v0001" and body["index"] == 0 and body["timestamp_s"] == 0
    assert np.array(body["map"]).shape == (HEIGHT // 16, WIDTH // 16)
    # The same decoded pixels scored directly by the model give the same numbers.
    import cv2

    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    loaded = registry.load_version(weights_dir, "v0001")
    (expected,) = FrameStream(scorer_for(loaded)).score(gray[None])
    assert body["score"] == pytest.approx(expected.score, rel=1e-5, abs=1e-6)
    assert body["threshold"] == loaded.calibration.threshold
    assert (body["anomalous"], body["uncertain"]) == (expected.anomalous, expected.uncertain)


def test_frame_raw_body_and_maps_false(client) -> None:
    data = png_bytes(synthetic_frames(1)[0])
    response = client.post("/v1/frames?maps=false", content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    assert "map" not in response.json()


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (os.urandom(4096), 415, "unsupported_media_type"),
        (b"", 422, "empty_upload"),
        (b"GIF89a" + bytes(100), 415, "unsupported_media_type"),
        (png_header_only(100_000, 100_000), 422, "limit_exceeded"),
        (jpeg_header_only(60_000, 60_000), 422, "limit_exceeded"),
        (png_bytes(synthetic_frames(1)[0])[:80], 422, "undecodable"),
        (b"\xff\xd8\xff\xe0\x00", 422, "undecodable"),
        (png_bytes(np.zeros((8, 8), np.uint8)), 422, "frame_too_small"),
    ],
    ids=["random", "empty", "gif", "huge-png", "huge-jpeg", "truncated-png", "truncated-jpeg", "too-small"],
)
def test_frame_bad_input(client, data: bytes, status: int, code: str) -> None:
    assert_error(post_file(client, "/v1/frames", data), status, code)


def test_frame_too_large_wrong_type_and_missing_field(make_client) -> None:
    client = make_client(max_image_bytes=1000)
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 96), dtype=np.uint8))
    assert len(big) > 1000
    assert_error(post_file(client, "/v1/frames", big), 413, "too_large")
    assert_error(client.post("/v1/frames", content=b'{"a": 1}', headers={"Content-Type": "application/json"}),
                 415, "unsupported_media_type")
    assert_error(client.post("/v1/frames", files={"other": ("x.png", b"123")}), 422, "missing_file")
    assert_error(client.post("/v1/frames", content=b"--x\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=x"}),
                 400, "bad_request")


def test_overloaded_gets_503_with_retry_after(make_client, tmp_path: Path) -> None:
    client = make_client(max_queue=1, retry_after_s=3)
    batcher = client.app.state.services.batcher
    with batcher.admit("test"):  # the only admission is taken
        response = post_file(client, "/v1/frames", png_bytes(synthetic_frames(1)[0]))
        clip = post_file(client, "/v1/clips", write_video(tmp_path / "c.avi", synthetic_frames(3)).read_bytes())
    assert_error(response, 503, "overloaded")
    assert_error(clip, 503, "overloaded")
    assert response.headers["retry-after"] == "3"
    assert post_file(client, "/v1/frames", png_bytes(synthetic_frames(1)[0])).status_code == 200
    families = metric_families(client.get("/metrics").text)
    assert sample_value(families, "vad_overloaded_rejections", "vad_overloaded_rejections_total", source="frame") == 1


# --- clips -------------------------------------------------------------------------------------


def test_clip_json(client, clip_file: Path) -> None:
    response = post_file(client, "/v1/clips", clip_file.read_bytes(), name="../../etc/passwd")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"model_version", "threshold", "fps", "frame_count", "anomalous_frames", "frames", "timings",
                         "damaged", "decode_errors"}
    assert body["model_version"] == "v0001" and body["frame_count"] == 20 and body["fps"] == 10.0
    assert body["damaged"] is False and body["decode_errors"] == 0
    assert [f["index"] for f in body["frames"]] == list(range(20))
    assert all(set(f) == FRAME_KEYS for f in body["frames"])
    assert body["anomalous_frames"] == [f["index"] for f in body["frames"] if f["anomalous"]]
    assert set(body["timings"]) == {"upload_s", "decode_s", "score_s", "total_s"}
    no_maps = post_file(client, "/v1/clips?maps=false", clip_file.read_bytes()).json()
    assert all("map" not in f for f in no_maps["frames"])
    assert [f["score"] for f in no_maps["frames"]] == [f["score"] for f in body["frames"]]
    upload_dir = client.app.state.services.upload_dir
    assert list(upload_dir.iterdir()) == []  # no upload outlives its request


@pytest.mark.parametrize("how", ["accept", "query"])
def test_clip_ndjson(client, clip_file: Path, how: str) -> None:
    import json

    kwargs = {"headers": {"Accept": "application/x-ndjson"}} if how == "accept" else {"params": {"stream": "true"}}
    response = post_file(client, "/v1/clips", clip_file.read_bytes(), **kwargs)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 21
    assert [line["type"] for line in lines] == ["frame"] * 20 + ["summary"]
    assert [line["index"] for line in lines[:-1]] == list(range(20))
    summary = lines[-1]
    assert summary["frame_count"] == 20 and summary["model_version"] == "v0001"
    assert summary["anomalous_frames"] == [line["index"] for line in lines[:-1] if line["anomalous"]]
    json_body = post_file(client, "/v1/clips", clip_file.read_bytes()).json()
    assert [line["score"] for line in lines[:-1]] == [f["score"] for f in json_body["frames"]]


def test_clip_bad_input(make_client, clip_file: Path, tmp_path: Path) -> None:
    client = make_client(max_upload_bytes=200_000)
    data = clip_file.read_bytes()
    assert_error(post_file(client, "/v1/clips", os.urandom(5000)), 415, "unsupported_media_type")
    assert_error(post_file(client, "/v1/clips", b""), 422, "empty_upload")
    assert_error(post_file(client, "/v1/clips", png_bytes(synthetic_frames(1)[0])), 415, "unsupported_media_type")
    assert_error(post_file(client, "/v1/clips", data[:400]), 422, "undecodable")
    corrupt = data[:300] + os.urandom(len(data) - 300)
    assert post_file(client, "/v1/clips", corrupt).status_code in (422,)
    assert_error(post_file(client, "/v1/clips", os.urandom(300_000)), 413, "too_large")

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(100):
            yield b"RIFF\x00\x00\x00\x00AVI " + bytes(4084)

    assert_error(client.post("/v1/clips", content=chunks(), headers={"Content-Type": "video/x-msvideo"}), 413, "too_large")
    assert list(client.app.state.services.upload_dir.iterdir()) == []


def test_clip_limits(make_client, clip_file: Path, tmp_path: Path) -> None:
    data = clip_file.read_bytes()
    assert_error(post_file(make_client(max_frames=5), "/v1/clips", data), 422, "limit_exceeded")
    assert_error(post_file(make_client(max_pixels=64 * 95), "/v1/clips", data), 422, "limit_exceeded")
    small = write_video(tmp_path / "small.avi", np.zeros((3, 12, 12), np.uint8))
    client = make_client()
    assert_error(post_file(client, "/v1/clips", small.read_bytes()), 422, "frame_too_small")
    # A container declaring 12000x12000 frames is refused from its header, before any frame is decoded.
    huge = b"YUV4MPEG2 W12000 H12000 F10:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(5000)
    response = post_file(client, "/v1/clips", huge)
    assert_error(response, 422, "limit_exceeded")
    assert "12000x12000" in response.json()["error"]["message"]


def test_clip_parity_with_vad_detect(client, clip_file: Path, weights_dir: Path) -> None:
    from model.offline import detect_file

    expected = detect_file(clip_file, weights_dir)
    # the model tells the planted anomaly apart, so flags and ranks below compare decisions, not noise
    assert expected["anomalous_frames"] and set(expected["anomalous_frames"]) >= set(range(PLANTED_FROM, 20))
    body = post_file(client, "/v1/clips", clip_file.read_bytes()).json()
    assert body["model_version"] == expected["model_version"]
    assert body["threshold"] == expected["threshold"] and body["fps"] == expected["fps"]
    assert body["frame_count"] == expected["frame_count"]
    assert body["anomalous_frames"] == expected["anomalous_frames"]
    assert_same_decisions(body["frames"], expected["frames"])
    for got, want in zip(body["frames"], expected["frames"], strict=True):
        assert (got["index"], got["timestamp_s"]) == (want["index"], want["timestamp_s"])
        np.testing.assert_allclose(got["map"], want["map"], atol=2e-4)


def test_clip_in_small_chunks_is_smoothed_across_them(make_client, clip_file: Path, weights_dir: Path) -> None:
    """With a causal window of 4 frames and chunks of 3, every window but the first spans chunks:
    the served scores and flags are those of the clip scored at once."""
    from model.data import read_footage

    version = publish_smoothed(weights_dir, "v0001", 4)
    registry.set_active_version(weights_dir, version)
    client = make_client(clip_chunk_frames=3)
    body = post_file(client, "/v1/clips?maps=false", clip_file.read_bytes()).json()
    assert body["model_version"] == version and body["frame_count"] == 20
    loaded = registry.load_version(weights_dir, version)
    assert loaded.calibration.smoothing_frames == 4
    whole = [r.to_dict(include_map=False) for r in FrameStream(scorer_for(loaded)).score(read_footage(clip_file).gray)]
    assert any(f["anomalous"] for f in whole) and not all(f["anomalous"] for f in whole)
    assert_same_decisions(body["frames"], whole)


# --- models ------------------------------------------------------------------------------------


def test_list_and_activate(client, weights_dir: Path) -> None:
    listing = client.get("/v1/models").json()
    assert listing["active"] == "v0001"
    assert [(v["version"], v["active"]) for v in listing["versions"]] == [("v0001", True), ("v0002", False)]
    assert listing["versions"][1]["manifest"]["parent_version"] == "v0001"
    active = client.get("/v1/models/active").json()
    assert active["version"] == "v0001" and active["device"] == "cpu" and active["manifest"]["version"] == "v0001"
    frame = png_bytes(synthetic_frames(1)[0])
    before = post_file(client, "/v1/frames", frame).json()
    response = client.post("/v1/models/v0002/activate")
    assert response.status_code == 200, response.text
    assert response.json() == {"version": "v0002", "previous": "v0001", "changed": True, "device": "cpu"}
    after = post_file(client, "/v1/frames", frame).json()
    assert after["model_version"] == "v0002" and after["score"] != before["score"]
    assert registry.active_version(weights_dir) == "v0002"  # persisted
    again = client.post("/v1/models/v0002/activate").json()
    assert again["changed"] is False


def test_activate_unknown_version(client) -> None:
    assert_error(client.post("/v1/models/v0099/activate"), 404, "version_not_found")
    assert_error(client.post("/v1/models/latest/activate"), 404, "version_not_found")


@pytest.mark.parametrize("tamper", ["bytes", "resigned"])
def test_corrupt_version_is_refused_and_old_keeps_serving(client, weights_dir: Path, tamper: str) -> None:
    import hashlib
    import json
    import shutil

    shutil.copytree(weights_dir / "v0001", weights_dir / "v0003")
    weights = weights_dir / "v0003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if tamper == "bytes":
        data[-10] ^= 0xFF  # a flipped weight: the checksum no longer matches
    else:
        data[:8] = (2**40).to_bytes(8, "little")  # a broken header, with a checksum that matches it
    weights.write_bytes(bytes(data))
    if tamper == "resigned":
        manifest_path = weights_dir / "v0003" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["weights_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        manifest_path.write_text(json.dumps(manifest))
    response = client.post("/v1/models/v0003/activate")
    assert_error(response, 422, "version_rejected")
    assert "v0003" in response.json()["error"]["message"]
    served = post_file(client, "/v1/frames", png_bytes(synthetic_frames(1)[0]))
    assert served.status_code == 200 and served.json()["model_version"] == "v0001"
    assert client.get("/v1/models/active").json()["version"] == "v0001"
    assert registry.active_version(weights_dir) == "v0001"
    families = metric_families(client.get("/metrics").text)
    assert sample_value(families, "vad_model_reload_failures", "vad_model_reload_failures_total") == 1.0


def test_api_key_guards_activation_only(make_client) -> None:
    client = make_client(api_key="s3cret-key")
    assert_error(client.post("/v1/models/v0002/activate"), 401, "unauthorized")
    assert client.post("/v1/models/v0002/activate").headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/v1/models/v0002/activate", headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    assert_error(client.post("/v1/models/v0002/activate", headers={"Authorization": "Basic s3cret-key"}), 401, "unauthorized")
    ok = client.post("/v1/models/v0002/activate", headers={"Authorization": "Bearer s3cret-key"})
    assert ok.status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert post_file(client, "/v1/frames", png_bytes(synthetic_frames(1)[0])).status_code == 200


def test_cors_closed_by_default(make_client) -> None:
    headers = {"Origin": "https://example.org"}
    assert "access-control-allow-origin" not in make_client().get("/healthz", headers=headers).headers
    opened = make_client(cors_origins=["https://example.org"])
    assert opened.get("/healthz", headers=headers).headers["access-control-allow-origin"] == "https://example.org"


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_exposition(make_client, clip_file: Path) -> None:
    client = make_client(skip_unchanged=False)  # every patch of every frame goes through the networks
    assert post_file(client, "/v1/frames", png_bytes(synthetic_frames(1)[0])).status_code == 200
    assert post_file(client, "/v1/clips", clip_file.read_bytes()).status_code == 200
    assert post_file(client, "/v1/frames", b"").status_code == 422
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = metric_families(response.text)
    for name in ("vad_http_request_duration_seconds", "vad_batch_queue_wait_seconds",
                 "vad_inference_duration_seconds", "vad_batch_size_patches", "vad_batch_size_jobs"):
        assert families[name].type == "histogram", name
    count = "vad_http_request_duration_seconds_count"
    assert sample_value(families, "vad_http_request_duration_seconds", count, route="/v1/frames", method="POST", status="200") == 1
    assert sample_value(families, "vad_http_request_duration_seconds", count, route="/v1/frames", method="POST", status="422") == 1
    assert sample_value(families, "vad_http_request_duration_seconds", count, route="/v1/clips", method="POST", status="200") == 1
    assert sample_value(families, "vad_frames_scored", "vad_frames_scored_total", source="clip") == 20
    assert sample_value(families, "vad_frames_scored", "vad_frames_scored_total", source="frame") == 1
    patches = sample_value(families, "vad_batch_size_patches", "vad_batch_size_patches_sum")
    assert patches == 21 * PATCHES_PER_FRAME  # every scored patch went through a batch
    assert sample_value(families, "vad_active_model_info", "vad_active_model_info", version="v0001", device="cpu") == 1
    assert sample_value(families, "vad_websocket_connections", "vad_websocket_connections") == 0
    assert families["vad_model_reload_failures"].type == "counter"


def test_follow_latest_activates_the_newest_version_and_skips_a_broken_one(make_client, weights_dir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import time

    polls: list[str | None] = []  # what each follow-latest poll found
    latest_version = registry.latest_version
    monkeypatch.setattr(registry, "latest_version", lambda *args: polls.append(latest_version(*args)) or polls[-1])
    client = make_client(follow_latest=True, follow_interval_s=0.05)
    deadline = time.monotonic() + 10
    while client.get("/v1/models/active").json()["version"] != "v0002" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/v1/models/active").json()["version"] == "v0002"
    shutil.copytree(weights_dir / "v0001", weights_dir / "v0003")
    (weights_dir / "v0003" / "model.safetensors").write_bytes(b"tampered")

    def counters() -> tuple[float | None, float | None]:
        families = metric_families(client.get("/metrics").text)
        return (sample_value(families, "vad_model_reload_failures", "vad_model_reload_failures_total"),
                sample_value(families, "vad_model_reloads", "vad_model_reloads_total"))

    deadline = time.monotonic() + 30  # the follower has tried v0003 (and refused it) once the failure counts
    while counters()[0] != 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    later = len(polls) + 5
    while len(polls) < later and time.monotonic() < deadline + 30:  # five more polls find v0003: no retry
        time.sleep(0.05)
    assert polls[-5:] == ["v0003"] * 5
    assert counters() == (1.0, 2.0)
    assert client.get("/v1/models/active").json()["version"] == "v0002"


def test_a_replica_follows_active_and_retries_a_refused_version_only_when_active_is_rewritten(
        make_client, weights_dir: Path) -> None:
    """ACTIVE written by another replica: followed at the next read; a version that fails here is
    reported (converged false, last_error, gauge 0), not retried while ACTIVE is unchanged, and tried
    again once ACTIVE is rewritten, even with the same name."""
    import shutil
    import time

    client = make_client(active_poll_s=0.05)

    def wait_for(check) -> None:
        deadline = time.monotonic() + 30
        while not check():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def failures_and_gauge() -> tuple[float | None, float | None]:
        families = metric_families(client.get("/metrics").text)
        return (sample_value(families, "vad_model_reload_failures", "vad_model_reload_failures_total"),
                sample_value(families, "vad_active_version_converged", "vad_active_version_converged"))

    registry.set_active_version(weights_dir, "v0002")  # as another replica's activation would
    wait_for(lambda: client.get("/v1/models/active").json()["version"] == "v0002")
    assert failures_and_gauge() == (0.0, 1.0)
    shutil.copytree(weights_dir / "v0001", weights_dir / "v0003")
    good = (weights_dir / "v0003" / "model.safetensors").read_bytes()
    (weights_dir / "v0003" / "model.safetensors").write_bytes(b"damaged")
    registry.set_active_version(weights_dir, "v0003")
    wait_for(lambda: client.get("/v1/models/active").json()["wanted"] == "v0003")
    status = client.get("/v1/models/active").json()
    assert (status["version"], status["converged"]) == ("v0002", False)
    assert "v0003" in status["last_error"] and "sha256" in status["last_error"]
    assert failures_and_gauge() == (1.0, 0.0)
    (weights_dir / "v0003" / "model.safetensors").write_bytes(good)  # repaired, ACTIVE unchanged
    time.sleep(0.5)  # ten reads of the same ACTIVE: no retry
    assert failures_and_gauge() == (1.0, 0.0)
    assert client.get("/v1/models/active").json()["version"] == "v0002"
    time.sleep(0.01)  # a later mtime for the rewrite
    registry.set_active_version(weights_dir, "v0003")
    wait_for(lambda: client.get("/v1/models/active").json()["version"] == "v0003")
    status = client.get("/v1/models/active").json()
    assert (status["wanted"], status["converged"], status["last_error"]) == ("v0003", True, None)
    assert failures_and_gauge() == (1.0, 1.0)
