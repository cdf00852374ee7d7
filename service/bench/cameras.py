"""How many cameras one server watches: K cameras playing Ped2 test clips in a loop (file:// under
the footage root, 10 fps each) are added to a running `vad serve`; a trial measures, over a window,
each camera's frames scored per second, the capture-to-score lag (vad_camera_lag_seconds) and the
server's memory. A server holds K cameras when every camera is scored at >= 95% of its rate and the
p99 lag is under 1 s; K grows until it does not. Memory per camera: the RSS over the no-camera
RSS, divided by K, at the largest K held."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.bench.footage import CAMERA_FPS
from service.bench.server_process import ServerProcess
from service.bench.timing import say

LAG_LIMIT_S = 1.0
MIN_RATE_SHARE = 0.95  # each camera scores at least this share of its frames per second
SETTLE_S = 3.0  # after all cameras are live, before the window opens


def _camera_samples(server: ServerProcess) -> dict[str, dict[str, float]]:
    """Per camera: frames scored, lag observations, and those at or under LAG_LIMIT_S."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            camera = sample.labels.get("camera")
            if camera is None:
                continue
            entry = out.setdefault(camera, {"scored": 0.0, "lags": 0.0, "within": 0.0})
            if sample.name == "vad_camera_frames_scored_total":
                entry["scored"] = sample.value
            elif sample.name == "vad_camera_lag_seconds_count":
                entry["lags"] = sample.value
            elif sample.name == "vad_camera_lag_seconds_bucket" and float(sample.labels["le"]) == LAG_LIMIT_S:
                entry["within"] = sample.value
    return out


def _set_cameras(http: httpx.Client, clips: list[Path], k: int) -> None:
    """Exactly cameras cam0..cam{k-1}, each looping one of ``clips``, all live."""
    present = {c["name"] for c in http.get("/v1/cameras").json()["cameras"]}
    for index in range(k):
        name = f"cam{index}"
        if name not in present:
            url = clips[index % len(clips)].resolve().as_uri()
            response = http.post("/v1/cameras", json={"name": name, "url": url, "fps": CAMERA_FPS})
            response.raise_for_status()
    deadline = time.monotonic() + 120
    while any(c["state"] != "live" for c in http.get("/v1/cameras").json()["cameras"]):
        if time.monotonic() > deadline:
            raise RuntimeError("bench cameras did not all go live within 120 s")
        time.sleep(0.5)


def camera_trial(server: ServerProcess, http: httpx.Client, clips: list[Path], k: int, seconds: float) -> dict[str, Any]:
    _set_cameras(http, clips, k)
    time.sleep(SETTLE_S)
    before, started = _camera_samples(server), time.monotonic()
    time.sleep(seconds)
    after, elapsed = _camera_samples(server), time.monotonic() - started
    rates, lags, within = [], 0.0, 0.0
    for name in (f"cam{i}" for i in range(k)):
        first, last = before.get(name, {}), after[name]
        rates.append((last["scored"] - first.get("scored", 0.0)) / elapsed)
        lags += last["lags"] - first.get("lags", 0.0)
        within += last["within"] - first.get("within", 0.0)
    share_within = within / lags if lags else 0.0
    held = min(rates) >= MIN_RATE_SHARE * CAMERA_FPS and share_within >= 0.99
    result = {
        "cameras": k, "fps_per_camera_min": round(min(rates), 2), "fps_per_camera_mean": round(sum(rates) / k, 2),
        "lag_within_1s_share": round(share_within, 4), "held": held, "rss_mb": round(server.rss_kib() / 1024, 1),
    }
    say(f"cameras K={k}: {result['fps_per_camera_min']}..{result['fps_per_camera_mean']} fps/camera, "
        f"{share_within:.2%} of frames scored within {LAG_LIMIT_S:g} s of capture, RSS {result['rss_mb']} MB, "
        f"held {held}")
    return result


def cameras_section(server: ServerProcess, clips: list[Path], quick: bool, seconds: float) -> dict[str, Any]:
    """``cameras``: the trials, ``max_cameras_held`` and ``rss_mb_per_camera`` (the server must run with
    VAD_CAMERA_URL_ALLOW='["file://"]' and VAD_FOOTAGE_ROOT above ``clips``)."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        idle_rss_mb = server.rss_kib() / 1024
        trials, k = [], 1
        while True:
            trial = camera_trial(server, http, clips, k, seconds)
            trials.append(trial)
            if not trial["held"] or quick or k >= 64:
                break
            k = k + 1 if k < 4 else k + max(1, k // 4)
        for camera in http.get("/v1/cameras").json()["cameras"]:
            http.delete(f"/v1/cameras/{camera['name']}")
    held = [t for t in trials if t["held"]]
    best = max(held, key=lambda t: t["cameras"]) if held else None
    out = {
        "cameras": trials,
        "max_cameras_held": best["cameras"] if best else 0,
        "cameras_rule": (f"every camera scored at >= {MIN_RATE_SHARE:.0%} of {CAMERA_FPS:g} frames/s and >= 99% of "
                         f"frames within {LAG_LIMIT_S:g} s of capture (p99 lag < {LAG_LIMIT_S:g} s)"),
        "rss_mb_idle": round(idle_rss_mb, 1),
        "rss_mb_per_camera": round((best["rss_mb"] - idle_rss_mb) / best["cameras"], 1) if best else None,
    }
    say(f"cameras held: {out['max_cameras_held']} at 10 fps; {out['rss_mb_per_camera']} MB per camera")
    return out
