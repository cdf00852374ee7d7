"""The web page at / in a real browser (headless chromium): upload a clip and inspect the timeline and
heatmap, stream a video file over the WebSocket, switch model versions, see API errors in plain words.

Assertions read what the page draws: data attributes it sets (frame/segment counts, heatmap state)
and canvas pixels (the red anomalous shading on the timeline, hot heatmap colours on the frame).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import synthetic_frames, write_video

pytestmark = pytest.mark.slow

# pixels of the given canvas matching a colour test, counted in the page
COUNT_PIXELS = """([selector, test]) => {
  const canvas = document.querySelector(selector);
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const match = {
    anomalousMark: (r, g, b) => r === 220 && g === 38 && b === 38,
    hot: (r, g, b) => r > 180 && r - g > 70 && r - b > 90,
    tinted: (r, g, b) => Math.max(r, g, b) - Math.min(r, g, b) > 8,
  }[test];
  let n = 0;
  for (let i = 0; i < data.length; i += 4) if (match(data[i], data[i + 1], data[i + 2])) n++;
  return n;
}"""


def anomalous_frames() -> np.ndarray:
    # 40 frames: normal motion, then a large bright block crossing fast from frame 20 on
    return synthetic_frames(40, seed=5, anomaly_from=20)


@pytest.fixture(scope="module")
def clip_avi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MJPG in AVI (tests/conftest.py write_video): chromium cannot play it -> the server's thumbnails."""
    return write_video(tmp_path_factory.mktemp("ui-clips") / "anomaly.avi", anomalous_frames())


def write_webm(path: Path, frames: np.ndarray) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP80"), 10.0, (frames.shape[2], frames.shape[1]))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write VP8 WebM")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def clip_webm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VP8 in WebM: chromium decodes it, so the frame is drawn under the heatmap."""
    return write_webm(tmp_path_factory.mktemp("ui-clips") / "anomaly.webm", anomalous_frames())


@pytest.fixture(scope="module")
def live_webm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s of VP8 WebM with the bright block crossing fast in every frame: whichever frames the page
    samples (that depends on the machine's speed), any two in a row show the anomaly."""
    return write_webm(tmp_path_factory.mktemp("ui-clips") / "live.webm", synthetic_frames(40, seed=5, anomaly_from=0))


def canvas_matches_frame(page: Any, frame: np.ndarray) -> float:
    """The correlation between the frame canvas as shown (gray levels) and ``frame`` scaled to it, both
    slightly blurred (the thumbnail went through two JPEG encodings and a 5x upscale): about 0.9 for
    the frame itself, about 0.7 for another background with the same walkers, about 0 for a dark field."""
    shot = cv2.imdecode(np.frombuffer(page.locator("#frame-canvas").screenshot(), np.uint8), cv2.IMREAD_GRAYSCALE)
    expected = cv2.resize(frame, (shot.shape[1], shot.shape[0]), interpolation=cv2.INTER_LINEAR)
    blurred = [cv2.GaussianBlur(image, (9, 9), 0).ravel().astype(float) for image in (shot, expected)]
    return float(np.corrcoef(*blurred)[0, 1])


def open_page(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='true']")
    page.wait_for_selector("#model-badge[data-version='v0001']")


def upload(page: Any, clip: Path) -> None:
    page.set_input_files("#clip-file", str(clip))
    page.click("#clip-submit")
    page.wait_for_selector("#clip-results[data-state='done']", timeout=60_000)


def test_page_is_served_with_a_strict_csp(tmp_path: Path, ui_weights: Path) -> None:
    settings = Settings(weights_dir=ui_weights, device="cpu", api_key="s3cret")
    with TestClient(create_app(settings)) as client:
        page = client.get("/")  # no API key needed, even when one is set
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        for directive in ("default-src 'self'", "connect-src 'self' ws: wss:", "img-src 'self' blob: data:",
                          "media-src 'self' blob:"):
            assert directive in csp
        assert "unsafe-inline" not in csp and "http" not in csp
        assert '<script type="module" src="/static/js/main.js">' in page.text
        script = client.get("/static/js/main.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert script.headers["content-security-policy"] == csp
        assert client.get("/static/app.css").headers["content-type"].startswith("text/css")
        missing = client.get("/static/nope.js")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert client.get("/static/../app.py").status_code == 404
        assert "/" not in client.get("/openapi.json").json()["paths"]


def test_clip_upload_draws_timeline_segments_and_heatmap(
    page: Any, live_server: Any, clip_avi: Path, clip_webm: Path, screenshot: Any
) -> None:
    server = live_server()
    open_page(page, server.url)
    # the side panel: active model, its calibration, the versions, training jobs (404 here: explained)
    page.wait_for_selector("#model-active[data-version='v0001']")
    assert "threshold τ" in page.inner_text("#model-active")
    assert "reject band" in page.inner_text("#model-active")
    page.wait_for_selector("#versions button[data-version='v0002']")
    page.wait_for_selector("#jobs[data-available]", state="attached")
    if page.locator("#jobs").get_attribute("data-available") == "false":
        assert "does not run training jobs" in page.inner_text("#jobs-status")
    else:  # a queued job (no worker runs here) is listed by the next poll, with a Cancel button
        with clip_avi.open("rb") as footage:
            queued = httpx.post(f"{server.url}/v1/training-jobs", files={"files": ("normal.avi", footage, "video/x-msvideo")})
        assert queued.status_code == 202, queued.text
        job = queued.json()["id"]
        page.wait_for_selector(f"#jobs li[data-job='{job}'][data-state='queued'] button[data-cancel]", timeout=15_000)

    # 1) AVI/MJPG: the browser cannot play it -> the page asks for thumbnails and draws them under the maps
    thumbnail_requests: list[str] = []
    page.on("request", lambda request: thumbnail_requests.append(request.url) if "thumbnails=" in request.url else None)
    upload(page, clip_avi)
    assert len(thumbnail_requests) == 1 and "thumbnails=anomalous" in thumbnail_requests[0]
    results = page.locator("#clip-results")
    assert results.get_attribute("data-frames") == "40"
    segments = int(results.get_attribute("data-segments"))
    assert segments >= 1
    assert page.locator("#segments button[data-segment]").count() == segments
    starts = [int(v) for v in page.eval_on_selector_all("#segments button[data-segment]", "bs => bs.map(b => b.dataset.start)")]
    late = [k for k, start in enumerate(starts) if start >= 15]
    assert late, starts  # the block crossing from frame 20 on is found (frame 0 has no motion input)
    assert page.evaluate(COUNT_PIXELS, ["#timeline", "anomalousMark"]) > 0  # anomalous shading drawn
    page.wait_for_selector("#frame-canvas[data-heatmap='drawn'][data-background='thumbnail']")
    assert page.evaluate(COUNT_PIXELS, ["#frame-canvas", "hot"]) > 0  # the peak frame's map is hot
    assert "cannot play" in page.inner_text("#frame-note") and "thumbnail" in page.inner_text("#frame-note")
    # a normal frame: what is on the canvas is that frame (not a dark field with a map on it)
    page.focus("#timeline")
    page.keyboard.press("Home")
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    page.wait_for_selector("#frame-canvas[data-frame='5'][data-background='thumbnail'][data-thumbnail='5']")
    assert canvas_matches_frame(page, anomalous_frames()[5]) > 0.8  # the frame, under its (faint) map
    page.uncheck("#frame-overlay")  # the heatmap box off: the thumbnail alone
    page.wait_for_selector("#frame-canvas[data-frame='5'][data-heatmap='none'][data-background='thumbnail']")
    assert canvas_matches_frame(page, anomalous_frames()[5]) > 0.8
    screenshot(page, "clip-avi-thumbnail-alone")
    page.check("#frame-overlay")
    # clicking a segment jumps to its first frame
    page.click(f"#segments button[data-segment='{late[0]}']")
    page.wait_for_selector(f"#clip-results[data-selected='{starts[late[0]]}']")
    page.wait_for_selector(f"#frame-canvas[data-frame='{starts[late[0]]}'][data-heatmap='drawn'][data-background='thumbnail']")
    screenshot(page, "clip-avi-thumbnails")

    # 2) WebM/VP8: decoded by the browser, the frame is drawn under the heatmap
    upload(page, clip_webm)
    assert len(thumbnail_requests) == 1  # a clip the browser plays comes without thumbnails
    assert results.get_attribute("data-frames") == "40"
    assert int(results.get_attribute("data-segments")) >= 1
    page.wait_for_selector("#frame-canvas[data-heatmap='drawn'][data-background='video']")
    assert page.evaluate(COUNT_PIXELS, ["#frame-canvas", "hot"]) > 0
    # scrubbing back to a normal frame: still a frame + map, and the timeline cursor moves
    page.focus("#timeline")
    page.keyboard.press("Home")
    page.wait_for_selector("#frame-canvas[data-frame='0'][data-background='video']")
    last = page.locator("#segments button[data-segment]").last
    start = last.get_attribute("data-start")
    last.click()
    page.wait_for_selector(f"#frame-canvas[data-frame='{start}'][data-background='video']")
    page.check("#timeline-zoom")  # y axis around tau: the reject band becomes visible
    screenshot(page, "clip-webm-overlay")
    assert page.problems.items == []


def test_long_clip_stays_light(page: Any, live_server: Any, tmp_path: Path, screenshot: Any) -> None:
    """3000 frames (5 min at 10 fps): the timeline is decimated to the canvas, the page's DOM stays small."""
    frames = synthetic_frames(3000, seed=7, anomaly_from=1500)
    frames[1800:] = synthetic_frames(1200, seed=8)  # the anomaly ends: one long segment in the middle
    clip = write_video(tmp_path / "long.avi", frames)
    server = live_server()
    open_page(page, server.url)
    page.uncheck("#clip-maps")
    upload(page, clip)
    results = page.locator("#clip-results")
    assert results.get_attribute("data-frames") == "3000"
    segments = int(results.get_attribute("data-segments"))
    assert segments >= 1
    assert page.locator("#segments li").count() <= 301  # capped list, the timeline shows them all
    assert page.evaluate("() => document.getElementsByTagName('*').length") < 1000
    assert page.evaluate(COUNT_PIXELS, ["#timeline", "anomalousMark"]) > 0
    assert "No anomaly maps" in page.inner_text("#frame-note")
    for key in ("End", "Home", "ArrowRight"):
        page.focus("#timeline")
        page.keyboard.press(key)
    page.wait_for_selector("#clip-results[data-selected='1']")
    screenshot(page, "clip-long")
    assert page.problems.items == []


def test_live_stream_sends_frames_and_shows_replies(
    page: Any, live_server: Any, live_webm: Path, screenshot: Any
) -> None:
    """How many frames the page samples and the server scores depends on the machine's speed; what
    is asserted does not: at least one frame sent and answered, every reply on the wire once and in
    order, the page's counters matching the wire, the stream ending with the file."""
    server = live_server()
    open_page(page, server.url)
    wire_replies: list[dict] = []  # what came back over /v1/stream, as seen on the wire

    def watch(ws: Any) -> None:
        if ws.url.endswith("/v1/stream"):
            ws.on("framereceived", lambda payload: wire_replies.append(json.loads(payload)))

    page.on("websocket", watch)
    page.click("#tabbtn-live")
    page.set_input_files("#live-file", str(live_webm))
    page.wait_for_selector("#live-start:not([disabled])")
    page.uncheck("#live-loop")  # the 4 s clip plays once; the stream stops once its frames are answered
    page.click("#live-start")
    page.wait_for_selector("#live-stats[data-state='streaming']")
    page.wait_for_selector("#live-stats[data-state='stopped']", timeout=120_000)
    assert "The file has ended." in page.inner_text("#live-status")
    stats = page.locator("#live-stats")
    replies, sent = int(stats.get_attribute("data-replies")), int(stats.get_attribute("data-sent"))
    frame_replies = [r for r in wire_replies if "seq" in r]
    seqs = [r["seq"] for r in frame_replies]
    # The server numbers the frames it receives: one reply each, in order, none skipped, never more
    # than the page sent (fewer only if the page stopped waiting, 5 s after the file ended).
    assert seqs and seqs == list(range(len(seqs))), seqs
    assert len(seqs) <= sent
    assert all("score" in r or r["error"]["code"] == "overloaded" for r in frame_replies), frame_replies
    scored = [r for r in frame_replies if "score" in r]
    assert 1 <= replies <= len(scored)  # the page counted the scored replies it got before it stopped
    assert float(stats.get_attribute("data-latency-ms")) > 0
    page.wait_for_selector("#live-canvas[data-heatmap='drawn']", state="attached")
    # The block crosses every frame: the page sends up to 4 frames before it needs a reply, at any
    # speed, so a frame with motion input (seq >= 1) is scored and shown as anomalous.
    assert int(stats.get_attribute("data-anomalous")) >= 1, [(r["seq"], r.get("anomalous")) for r in scored]
    assert page.evaluate(COUNT_PIXELS, ["#live-canvas", "tinted"]) > 0  # the map over the gray frame
    assert "round trip" in page.inner_text("#live-stats")
    assert page.locator("#live-error").is_hidden()
    screenshot(page, "live-stream")
    assert page.problems.items == []


def test_api_errors_are_shown_in_plain_words(
    page: Any, live_server: Any, tmp_path: Path, screenshot: Any
) -> None:
    server = live_server(api_key="s3cret")
    open_page(page, server.url)
    # not a video: 415 unsupported_media_type
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not video frames\n" * 20)
    page.set_input_files("#clip-file", str(notes))
    page.click("#clip-submit")
    error = page.locator("#clip-error")
    error.wait_for(state="visible")
    assert error.get_attribute("data-code") == "unsupported_media_type"
    assert "This file is not a video the server recognises." in error.inner_text()
    assert page.locator("#clip-results").is_hidden()

    # switching versions: without the key, with a wrong one, with the right one (sessionStorage only)
    page.click("#versions button[data-version='v0002']")
    versions_error = page.locator("#versions-error")
    versions_error.wait_for(state="visible")
    assert "needs the server's API key" in versions_error.inner_text()
    screenshot(page, "errors-plain-words")
    page.fill("#api-key", "wrong")
    page.click("#versions button[data-version='v0002']")
    page.wait_for_selector("#versions-error[data-code='forbidden']")
    assert "not accepted" in versions_error.inner_text()
    page.fill("#api-key", "s3cret")
    page.click("#versions button[data-version='v0002']")
    page.wait_for_selector("#model-badge[data-version='v0002']")
    assert versions_error.is_hidden()
    assert "Now serving v0002" in page.inner_text("#versions-status")
    page.wait_for_selector("#model-active[data-version='v0002']")
    assert page.evaluate("sessionStorage.getItem('vad.apiKey')") == "s3cret"
    assert page.evaluate("localStorage.length") == 0
    assert page.problems.items == []
