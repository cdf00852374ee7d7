"""The soak: 8 WebSocket streams and 4 REST clients (3 posting frames, 1 posting 16-frame clips), all in
closed loops, against a `vad serve` process on loopback with VAD_MAX_QUEUE=6 and
VAD_WS_MAX_PENDING_FRAMES=4, for a given time. It PRINTS what it measured (answers by kind and
outcome, latency of scored work p50 / p99 / max and p95 of the first and last third, the server's
resident memory after warm-up -> max -> end); speed and memory are figures of the machine it ran on,
not pass/fail criteria. It exits 1 only on a correctness failure (a request or frame left
unanswered, a malformed or out-of-order reply, a 5xx other than the 503 overload answer).

    .venv/bin/python -m tests.reliability.soak                      # 45 s, the tiny model of the suite
    .venv/bin/python -m tests.reliability.soak --seconds 300 --report soak.json

Without --weights it trains the reliability suite's tiny model (16 px patches, 64x96 frames) into a
temporary folder first (a few seconds). tests/reliability/test_soak.py runs the same load for a few
seconds and asserts only what holds at any speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from tests.reliability.helpers import ServerProcess, avi_bytes, frames, png, write_video

WS_STREAMS, FRAME_CLIENTS, CLIP_CLIENTS = 8, 3, 1
WARM_UP_SHARE = 0.2
# Settings of the server under load (on top of weights_dir / data_dir / device).
SOAK_SETTINGS: dict[str, Any] = {"max_queue": 6, "ws_max_pending_frames": 4, "max_queue_delay_ms": 5.0}
BACK_OFF_S = 0.05  # a client answered `overloaded` waits this long (a camera would honour Retry-After)


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (finished at, seconds) of scored work
    failures: list[str] = field(default_factory=list)  # unanswered requests, malformed replies, 5xx
    answered_by_client: Counter = field(default_factory=Counter)  # client name -> answers received

    def add(self, client: str, kind: str, outcome: str, started: float, finished: float) -> None:
        with self.lock:
            self.outcomes[(kind, outcome)] += 1
            self.answered_by_client[client] += 1
            if outcome == "ok":
                self.latencies.append((finished, finished - started))

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


@dataclass
class SoakRun:
    seconds: float
    started: float
    tally: Tally
    clients: list[str]  # every client's name
    unfinished: list[str]  # clients still waiting for an answer when the run was collected
    rss: list[tuple[float, int]]  # (seconds since start, KiB) of the server, sampled every second
    baseline_rss_kib: int  # after the serial warm-up, before the load
    server_5xx: float  # 5xx other than 503, by the server's own request histogram


def _ws_stream(name: str, url: str, payloads: list[bytes], end: float, tally: Tally) -> None:
    try:
        with connect(f"{url}/v1/stream", open_timeout=60) as ws:
            ws.send('{"maps": false}')
            ack = json.loads(ws.recv(timeout=60))
            if "options" not in ack:
                tally.fail(f"{name}: control message answered {ack}")
                return
            seq = 0
            while seq == 0 or time.monotonic() < end:  # at least one frame, however late the thread started
                started = time.monotonic()
                ws.send(payloads[seq % len(payloads)])
                reply = json.loads(ws.recv(timeout=120))
                if reply.get("seq") != seq:
                    tally.fail(f"{name}: reply out of order (expected seq {seq}): {reply}")
                    return
                outcome = "ok" if "score" in reply else reply.get("error", {}).get("code", "malformed")
                if outcome not in ("ok", "overloaded"):
                    tally.fail(f"{name}: reply {reply}")
                tally.add(name, "ws", outcome, started, time.monotonic())
                seq += 1
                if outcome == "overloaded":
                    time.sleep(BACK_OFF_S)
    except Exception as exc:  # noqa: BLE001 - any of them is a frame left unanswered
        tally.fail(f"{name}: {type(exc).__name__}: {exc}")


def _rest_client(name: str, url: str, path: str, payloads: list[bytes], end: float, tally: Tally) -> None:
    kind = path.split("?")[0]
    with httpx.Client(base_url=url, timeout=120) as http:
        i = 0
        while i == 0 or time.monotonic() < end:  # at least one request
            started = time.monotonic()
            try:
                response = http.post(path, files={"file": ("upload", payloads[i % len(payloads)])})
            except httpx.HTTPError as exc:
                tally.fail(f"{name}: {type(exc).__name__}: {exc}")
                return
            finished = time.monotonic()
            i += 1
            if response.status_code == 200 and "score" in response.text:
                tally.add(name, kind, "ok", started, finished)
            elif response.status_code == 503 and response.json().get("error", {}).get("code") == "overloaded" \
                    and response.headers.get("retry-after", "").isdigit():
                tally.add(name, kind, "overloaded", started, finished)
                time.sleep(BACK_OFF_S)
            else:
                tally.fail(f"{name}: {response.status_code} {response.headers.get('retry-after')} {response.text[:200]}")


def server_5xx_not_503(url: str) -> float:
    """5xx answers other than 503 (the overload answer), from the server's request histogram."""
    metrics = httpx.get(f"{url}/metrics", timeout=60).text
    return sum(s.value for family in text_string_to_metric_families(metrics)
               if family.name == "vad_http_request_duration_seconds"
               for s in family.samples if s.name.endswith("_count") and s.labels["status"].startswith("5")
               and s.labels["status"] != "503")


def warm_up(server: ServerProcess, frame: bytes, clip: bytes) -> None:
    """One request of each kind, one at a time: the allocator, the batcher and the decoders are warm
    before the baseline is read."""
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for path, data in (("/v1/frames?maps=false", frame), ("/v1/clips?maps=false", clip)):
            response = http.post(path, files={"file": ("upload", data)})
            assert response.status_code == 200, (path, response.status_code, response.text[:300])
    with connect(f"{server.ws_url}/v1/stream", open_timeout=60) as ws:
        ws.send(frame)
        assert "score" in json.loads(ws.recv(timeout=120))


def run(server: ServerProcess, seconds: float, media_dir: Path) -> SoakRun:
    """The load for ``seconds``; returns what happened. Every client sends at least once and is waited
    for (up to 5 minutes) after the end, so an unanswered request shows up as unfinished."""
    frame_payloads = [png(f) for f in frames(8, seed=21)]
    clip_payloads = [avi_bytes(media_dir, count=16, seed=s) for s in (1, 2)]
    warm_up(server, frame_payloads[0], clip_payloads[0])
    baseline = server.rss_kib()
    tally = Tally()
    started = time.monotonic()
    end = started + seconds
    targets: list[tuple[str, Any, tuple]] = []
    for i in range(WS_STREAMS):
        targets.append((f"ws-{i}", _ws_stream, (server.ws_url, frame_payloads, end, tally)))
    for i in range(FRAME_CLIENTS):
        targets.append((f"frames-{i}", _rest_client, (server.url, "/v1/frames?maps=false", frame_payloads, end, tally)))
    for i in range(CLIP_CLIENTS):
        targets.append((f"clips-{i}", _rest_client, (server.url, "/v1/clips?maps=false", clip_payloads, end, tally)))
    threads = {name: threading.Thread(target=target, args=(name, *args), daemon=True) for name, target, args in targets}
    for thread in threads.values():
        thread.start()
    rss: list[tuple[float, int]] = []
    while time.monotonic() < end or any(t.is_alive() for t in threads.values()):
        rss.append((time.monotonic() - started, server.rss_kib()))
        if time.monotonic() > end + 300:
            break
        time.sleep(1.0)
    rss.append((time.monotonic() - started, server.rss_kib()))
    unfinished = [name for name, thread in threads.items() if thread.is_alive()]
    return SoakRun(seconds, started, tally, list(threads), unfinished, rss, baseline, server_5xx_not_503(server.url))


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def figures(result: SoakRun) -> dict[str, Any]:
    """What the run measured, for printing: counts, latency of scored work, server RSS."""
    tally = result.tally
    third = result.seconds / 3
    latencies = [s for _, s in tally.latencies]
    early = [s for t, s in tally.latencies if t - result.started < third]
    late = [s for t, s in tally.latencies if t - result.started >= 2 * third]
    warm = [kib for t, kib in result.rss if t >= WARM_UP_SHARE * result.seconds] or [result.rss[-1][1]]
    return {
        "seconds": result.seconds,
        "clients": {"ws_streams": WS_STREAMS, "frame_posters": FRAME_CLIENTS, "clip_posters": CLIP_CLIENTS},
        "answered": sum(tally.outcomes.values()),
        "scored": sum(n for (_, o), n in tally.outcomes.items() if o == "ok"),
        "overloaded": sum(n for (_, o), n in tally.outcomes.items() if o == "overloaded"),
        "outcomes": dict(sorted((f"{k}:{o}", n) for (k, o), n in tally.outcomes.items())),
        "failures": len(tally.failures), "unfinished_clients": len(result.unfinished),
        "server_5xx_not_503": result.server_5xx,
        "latency_ok_s": {"p50": round(_percentile(latencies, 50), 4), "p99": round(_percentile(latencies, 99), 4),
                         "max": round(max(latencies, default=0.0), 4),
                         "p95_first_third": round(_percentile(early, 95), 4),
                         "p95_last_third": round(_percentile(late, 95), 4)},
        "rss_mib": {"before_load": round(result.baseline_rss_kib / 1024, 1),
                    "after_warm_up": round(warm[0] / 1024, 1), "max_after_warm_up": round(max(warm) / 1024, 1),
                    "end": round(result.rss[-1][1] / 1024, 1),
                    "growth_after_warm_up_pct": round(100 * (max(warm) - warm[0]) / warm[0], 2)},
    }


def tiny_weights(root: Path) -> Path:
    """The reliability suite's tiny model (tests/reliability/conftest.py), trained on synthetic footage."""
    from model.config import TrainConfig
    from model.train import train
    from tests.support import TINY_JOB_TRAINING, TINY_MODEL

    clip = write_video(root / "normal.avi", frames(24, seed=11), "MJPG")
    weights = root / "weights"
    train([clip], weights, TINY_MODEL, TrainConfig(**TINY_JOB_TRAINING), device="cpu", show_progress_bar=False)
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=45.0, help="length of the load (default 45)")
    parser.add_argument("--weights", type=Path, help="a weights registry to serve (default: train the tiny model)")
    parser.add_argument("--report", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="vad-soak-") as scratch:
        root = Path(scratch)
        weights = args.weights or tiny_weights(root)
        values = {"weights_dir": str(weights), "data_dir": str(root / "data"), "device": "cpu", **SOAK_SETTINGS}
        server = ServerProcess(values, root / "server.log").start()
        try:
            result = run(server, args.seconds, root)
        finally:
            server.stop()
        report = figures(result)
        print(json.dumps(report, indent=2))
        if args.report:
            args.report.write_text(json.dumps(report, indent=2) + "\n")
        problems = result.tally.failures + [f"{name}: never answered" for name in result.unfinished]
        if result.server_5xx:
            problems.append(f"{result.server_5xx:.0f} answers were 5xx other than 503")
        for problem in problems[:20]:
            print(f"FAILED: {problem}", file=sys.stderr)
        if problems:
            print(server.log()[-3000:], file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
