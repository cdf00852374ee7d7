"""The Cameras and Events views in a real browser against a real server: two file:// cameras under
VAD_FOOTAGE_ROOT (looped, the planted anomaly in every loop) are added, paused and removed from the
page; their latest frames and heatmaps show; the events they produce are listed as the API lists
them, filtered by camera, paged with "More", opened large, and new ones arrive over the SSE feed.

Event hysteresis is set to its quickest (open on 1 frame of 1, close after 1 clean frame, at most 3
frames each) so that a loop of the clip makes many events: enough for a second page within seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import synthetic_frames, write_video

pytestmark = pytest.mark.slow

API_KEY = "s3cret"


def open_page(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='true']")
    page.wait_for_selector("#model-badge[data-version='v0001']")


def image_loaded(page: Any, selector: str) -> bool:
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


@pytest.fixture
def camera_server(live_server: Any, tmp_path: Path) -> Any:
    root = tmp_path / "footage"
    root.mkdir()
    write_video(root / "anomaly.avi", synthetic_frames(40, seed=5, anomaly_from=20))
    server = live_server(
        api_key=API_KEY, camera_url_allow=["file://"], footage_root=root,
        event_open_frames=1, event_window_frames=1, event_close_frames=1, event_max_frames=3,
    )
    server.footage = root
    return server


def test_cameras_view_adds_pauses_and_removes_cameras(page: Any, camera_server: Any, screenshot: Any) -> None:
    server = camera_server
    open_page(page, server.url)
    page.click("#tabbtn-cameras")
    page.wait_for_selector("#cameras[data-available='true'][data-count='0']")
    assert "No cameras yet" in page.inner_text("#cameras")

    # without the API key: refused, in plain words
    page.fill("#camera-name", "gate-1")
    page.fill("#camera-url", f"file://{server.footage / 'anomaly.avi'}")
    page.fill("#camera-fps", "5")
    page.click("#camera-add")
    page.wait_for_selector("#cameras-error[data-code='unauthorized']")
    # with it: added, live, its latest frame and heatmap shown (the page polls while visible)
    page.fill("#api-key", API_KEY)
    page.click("#camera-add")
    camera = "#cameras li[data-camera='gate-1']"
    page.wait_for_selector(f"{camera}[data-state='live'][data-pictures='loaded']", timeout=60_000)
    assert page.locator("#cameras-error").is_hidden()
    assert image_loaded(page, f"{camera} img.latest >> nth=0") and image_loaded(page, f"{camera} img.latest >> nth=1")
    listed = httpx.get(f"{server.url}/v1/cameras").json()["cameras"]
    assert [c["name"] for c in listed] == ["gate-1"]
    assert page.inner_text(f"{camera} .url") == listed[0]["url"]
    assert "frames scored" in page.inner_text(f"{camera} .meta")
    # the pictures are refreshed: a later frame replaces the first one shown
    first = page.get_attribute(camera, "data-pictures-at")
    page.wait_for_function(
        "([sel, first]) => { const li = document.querySelector(sel); return li.dataset.picturesAt && li.dataset.picturesAt !== first; }",
        arg=[camera, first], timeout=30_000)

    # a URL the server may not open: its refusal in plain words, nothing added
    page.fill("#camera-name", "outside")
    page.fill("#camera-url", "file:///etc/hostname")
    page.click("#camera-add")
    page.wait_for_selector("#cameras-error[data-code='camera_url_refused']")
    assert "may not open this camera URL" in page.inner_text("#cameras-error")
    screenshot(page, "cameras-view")

    # pause and resume
    page.click(f"{camera} button[data-action='toggle']")
    page.wait_for_selector(f"{camera}[data-enabled='false'][data-state='disabled']")
    assert httpx.get(f"{server.url}/v1/cameras/gate-1").json()["enabled"] is False
    page.click(f"{camera} button[data-action='toggle']")
    page.wait_for_selector(f"{camera}[data-enabled='true'][data-state='live']", timeout=60_000)

    # remove: the first click only arms the button
    page.click(f"{camera} button[data-action='remove']")
    assert page.inner_text(f"{camera} button[data-action='remove']") == "Remove for good?"
    assert httpx.get(f"{server.url}/v1/cameras/gate-1").status_code == 200
    page.click(f"{camera} button[data-action='remove']")
    page.wait_for_selector(camera, state="detached")
    assert httpx.get(f"{server.url}/v1/cameras/gate-1").status_code == 404
    assert page.problems.items == []


def listed_ids(page: Any) -> list[str]:
    return page.eval_on_selector_all("#events li[data-event]", "items => items.map(li => li.dataset.event)")


def test_events_view_lists_filters_pages_and_updates_live(page: Any, camera_server: Any, screenshot: Any) -> None:
    server = camera_server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"file://{server.footage / 'anomaly.avi'}"
    for name in ("gate-1", "gate-2"):
        added = httpx.post(f"{server.url}/v1/cameras", json={"name": name, "url": url, "fps": 10}, headers=headers)
        assert added.status_code == 201, added.text

    # enough events for a second page (24 a page) before the view opens
    def events(**query: Any) -> dict[str, Any]:
        response = httpx.get(f"{server.url}/v1/events", params={"limit": 500, **query})
        assert response.status_code == 200, response.text
        return response.json()

    wait_until(lambda: len(events()["events"]) > 30, "30 events from the two cameras")
    open_page(page, server.url)
    page.click("#tabbtn-events")
    page.wait_for_selector("#events-live[data-state='open']")
    page.wait_for_selector("#events[data-available='true'] li[data-event]")
    first_page = listed_ids(page)
    api_ids = [e["id"] for e in events()["events"]]
    # the page shows the API's newest events in its order (live ones may have come in on top since)
    assert len(first_page) >= 24
    shown_from_api = [i for i in first_page if i in api_ids]
    assert shown_from_api == [i for i in api_ids if i in set(shown_from_api)]
    assert page.locator("#events-more").is_visible()
    page.click("#events-more")
    page.wait_for_function("n => document.querySelectorAll('#events li[data-event]').length >= n", arg=len(first_page) + 10)
    more = listed_ids(page)
    assert len(more) == len(set(more))  # no event twice (live additions and pages overlap)

    # live: an event opened after the listing arrives over SSE, without a reload
    known = set(listed_ids(page))
    page.wait_for_function(
        "known => [...document.querySelectorAll('#events li[data-event]')].some(li => !known.includes(li.dataset.event))",
        arg=list(known), timeout=60_000)

    # filter by camera: only gate-2's events, as the API lists them
    page.select_option("#events-camera", "gate-2")
    page.wait_for_function("() => document.querySelectorAll('#events li[data-event]').length > 0 && "
                           "[...document.querySelectorAll('#events li[data-event]')].every(li => li.dataset.camera === 'gate-2')")
    gate2 = {e["id"] for e in events(camera="gate-2")["events"]}
    filtered = listed_ids(page)
    assert set(filtered[-5:]) <= gate2  # the listing's older end came from the API (its top may be live)
    assert "for gate-2" in page.inner_text("#events-status")

    # snapshots load; a click shows the heatmap large with the event's figures
    item = f"#events li[data-event='{filtered[0]}']"
    page.wait_for_selector(f"{item}[data-snapshot='loaded']")
    page.click(f"{item} button.pick")
    page.wait_for_selector(f"#event-detail[data-event='{filtered[0]}'][data-heatmap='loaded']")
    assert image_loaded(page, "#event-heatmap") and page.eval_on_selector("#event-heatmap", "img => img.naturalWidth") > 0
    event = httpx.get(f"{server.url}/v1/events/{filtered[0]}").json()
    facts = page.inner_text("#event-facts")
    assert "gate-2" in facts and event["model_version"] in facts and str(event["peak_frame"]) in facts
    screenshot(page, "events-view")
    page.click("#event-detail-close")
    assert page.locator("#event-detail").is_hidden()
    assert page.problems.items == []
    page.goto("about:blank")  # closes the SSE feed before the server stops


def wait_until(condition: Any, what: str, limit_s: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {limit_s:.0f} s")
        time.sleep(0.2)
