"""A bounded soak on loopback: 8 WebSocket streams and 4 REST clients (3 posting frames, 1 posting
clips) against a `vad serve` process for VAD_SOAK_SECONDS (default 45). Held: zero 5xx (other than 503 overloaded), every
request and every frame answered, overload answered with 503 / `overloaded` (not with latency
growing without bound), and the server's resident memory flat after warm-up (< 10 % growth).

    VAD_SOAK_SECONDS=300 pytest tests/reliability/test_soak.py -s     # the longer run of docs/reliability.md
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from tests.reliability.helpers import avi_bytes, frames, png

SOAK_SECONDS = float(os.environ.get("VAD_SOAK_SECONDS", "45"))
WS_STREAMS, FRAME_CLIENTS, CLIP_CLIENTS = 8, 3, 1
WARM_UP_SHARE = 0.2


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (finished at, seconds) of scored work
    failures: list[str] = field(default_factory=list)  # unanswered requests, malformed replies, 5xx

    def add(self, kind: str, outcome: str, started: float, finished: float) -> None:
        with self.lock:
            self.outcomes[(kind, outcome)] += 1
            if outcome == "ok":
                self.latencies.append((finished, finished - started))

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


def _ws_stream(url: str, payloads: list[bytes], end: float, tally: Tally) -> None:
    try:
        with connect(f"{url}/v1/stream", open_timeout=30) as ws:
            ws.send('{"maps": false}')
            assert "options" in json.loads(ws.recv(timeout=30))
            seq = 0
            while time.monotonic() < end:
                started = time.monotonic()
                ws.send(payloads[seq % len(payloads)])
                reply = json.loads(ws.recv(timeout=60))
                if reply.get("seq") != seq:
                    tally.fail(f"ws reply out of order: {reply}")
                    return
                outcome = "ok" if "score" in reply else reply.get("error", {}).get("code", "malformed")
                if outcome not in ("ok", "overloaded"):
                    tally.fail(f"ws reply {reply}")
                tally.add("ws", outcome, started, time.monotonic())
                seq += 1
                if outcome == "overloaded":
                    time.sleep(0.05)  # back off a little, as a camera client would
    except Exception as exc:  # noqa: BLE001 - any of them is a frame left unanswered
        tally.fail(f"ws stream: {type(exc).__name__}: {exc}")


def _rest_client(url: str, path: str, payloads: list[bytes], end: float, tally: Tally) -> None:
    kind = path.split("?")[0]
    with httpx.Client(base_url=url, timeout=60) as http:
        i = 0
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                response = http.post(path, files={"file": ("upload", payloads[i % len(payloads)])})
            except httpx.HTTPError as exc:
                tally.fail(f"{kind}: {type(exc).__name__}: {exc}")
                return
            finished = time.monotonic()
            i += 1
            if response.status_code == 200:
                tally.add(kind, "ok", started, finished)
            elif response.status_code == 503 and response.json()["error"]["code"] == "overloaded" \
                    and response.headers.get("retry-after"):
                tally.add(kind, "overloaded", started, finished)
                time.sleep(0.05)  # a client honouring Retry-After would wait longer
            else:
                tally.fail(f"{kind}: {response.status_code} {response.text[:200]}")


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


@pytest.mark.slow
def test_soak(server_process, tmp_path: Path) -> None:
    server = server_process(max_queue=6, ws_max_pending_frames=4, max_queue_delay_ms=5.0)
    frame_payloads = [png(f) for f in frames(8, seed=21)]
    clip_payloads = [avi_bytes(tmp_path, count=16, seed=s) for s in (1, 2)]
    tally = Tally()
    started = time.monotonic()
    end = started + SOAK_SECONDS
    threads = [threading.Thread(target=_ws_stream, args=(server.ws_url, frame_payloads, end, tally), daemon=True)
               for _ in range(WS_STREAMS)]
    threads += [threading.Thread(target=_rest_client, args=(server.url, "/v1/frames?maps=false", frame_payloads, end, tally),
                                 daemon=True) for _ in range(FRAME_CLIENTS)]
    threads += [threading.Thread(target=_rest_client, args=(server.url, "/v1/clips?maps=false", clip_payloads, end, tally),
                                 daemon=True) for _ in range(CLIP_CLIENTS)]
    for thread in threads:
        thread.start()
    rss: list[tuple[float, int]] = []
    while time.monotonic() < end:
        rss.append((time.monotonic() - started, server.rss_kib()))
        time.sleep(1.0)
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client never got its answer"
    rss.append((time.monotonic() - started, server.rss_kib()))

    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    server_5xx = sum(s.value for family in text_string_to_metric_families(metrics)
                     if family.name == "vad_http_request_duration_seconds"
                     for s in family.samples if s.name.endswith("_count") and s.labels["status"].startswith("5")
                     and s.labels["status"] != "503")  # 503 is the overload answer; any other 5xx is a failure

    warm = [kib for t, kib in rss if t >= WARM_UP_SHARE * SOAK_SECONDS]
    growth = (max(warm) - warm[0]) / warm[0]
    third = SOAK_SECONDS / 3
    early = [s for t, s in tally.latencies if t - started < third]
    late = [s for t, s in tally.latencies if t - started >= 2 * third]
    counts = dict(sorted((f"{k}:{o}", n) for (k, o), n in tally.outcomes.items()))
    answered = sum(tally.outcomes.values())
    report = {
        "seconds": SOAK_SECONDS, "clients": {"ws_streams": WS_STREAMS, "frame_posters": FRAME_CLIENTS, "clip_posters": CLIP_CLIENTS},
        "answered": answered, "outcomes": counts, "failures": len(tally.failures), "server_5xx_not_503": server_5xx,
        "latency_ok_s": {"p50": round(_percentile([s for _, s in tally.latencies], 50), 4),
                         "p99": round(_percentile([s for _, s in tally.latencies], 99), 4),
                         "max": round(max((s for _, s in tally.latencies), default=0.0), 4),
                         "p95_first_third": round(_percentile(early, 95), 4), "p95_last_third": round(_percentile(late, 95), 4)},
        "rss_mib": {"after_warm_up": round(warm[0] / 1024, 1), "max_after_warm_up": round(max(warm) / 1024, 1),
                    "end": round(rss[-1][1] / 1024, 1), "growth_pct": round(100 * growth, 2)},
    }
    print("\nsoak: " + json.dumps(report))
    if os.environ.get("VAD_SOAK_REPORT"):
        Path(os.environ["VAD_SOAK_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")

    assert tally.failures == [], tally.failures[:5]
    assert server_5xx == 0
    assert sum(n for (k, o), n in tally.outcomes.items() if o == "ok") > 100
    overloaded = sum(n for (k, o), n in tally.outcomes.items() if o == "overloaded")
    assert overloaded > 0, "12 clients against VAD_MAX_QUEUE=6 never overloaded the server: no overload was tested"
    # Overload is refused, not queued: latency stays bounded instead of growing with the run.
    assert _percentile(late, 95) <= 3 * _percentile(early, 95) + 0.5, report["latency_ok_s"]
    assert report["latency_ok_s"]["max"] < 15, report["latency_ok_s"]
    assert growth < 0.10, report["rss_mib"]
