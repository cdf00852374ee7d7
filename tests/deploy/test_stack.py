"""The observability stack for real, on loopback: two `vad serve` processes (a tiny trained model, one
shared weights registry and job folder, like the compose volumes) behind nginx running the shipped
deploy/nginx/nginx.conf, scraped by a Prometheus running the shipped deploy/prometheus configuration and
rules (static targets instead of the compose DNS discovery, 1 s scrapes). REST and WebSocket traffic goes
through nginx; then every PromQL expression of the Grafana dashboard must return data from Prometheus.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import synthetic_frames, write_video
from tests.deploy.conftest import REPO, Processes, free_port, vad_command, wait_until
from tests.deploy.stack_configs import derive_nginx_config, derive_prometheus_config

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "vad.json"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
# Values for Grafana's variables when the dashboard's expressions run outside Grafana.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "5m", "instance": ".*"}
pytestmark = pytest.mark.slow


@dataclass
class Stack:
    servers: list[str]  # http://127.0.0.1:port of each `vad serve`
    proxy: str  # nginx
    prometheus: str
    processes: Processes
    camera_clip: Path  # a clip under the servers' VAD_FOOTAGE_ROOT, for a camera

    @property
    def proxy_ws(self) -> str:
        return self.proxy.replace("http://", "ws://")

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]


def png(frame) -> bytes:
    ok, data = cv2.imencode(".png", frame)
    assert ok
    return data.tobytes()


@pytest.fixture(scope="module")
def stack(debian_tools: dict[str, str], trained_weights: Path, processes: Processes,
          tmp_path_factory: pytest.TempPathFactory) -> Stack:
    root = tmp_path_factory.mktemp("stack")
    weights = Path(shutil.copytree(trained_weights, root / "volumes" / "weights"))
    data = root / "volumes" / "data"
    server_ports = [free_port(), free_port()]
    proxy_port, prometheus_port = free_port(), free_port()
    footage = root / "volumes" / "footage"
    footage.mkdir(parents=True)
    write_video(footage / "camera.avi", synthetic_frames(20, seed=13))  # what the dashboard's camera plays
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAD_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", VAD_DEVICE="cpu", VAD_LOG_LEVEL="warning",
               VAD_WEIGHTS_DIR=str(weights), VAD_DATA_DIR=str(data), VAD_MAX_QUEUE_DELAY_MS="2",
               VAD_JOB_POLL_INTERVAL_S="1", VAD_FOOTAGE_ROOT=str(footage), VAD_CAMERA_URL_ALLOW='["file://"]')
    for index, port in enumerate(server_ports):
        processes.start(f"server{index + 1}", [*vad_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
                        env=env, cwd=root)

    nginx_dir = root / "nginx"
    nginx_conf = derive_nginx_config(nginx_dir, proxy_port, [f"127.0.0.1:{p}" for p in server_ports])
    processes.start("nginx", [debian_tools["nginx"], "-p", str(nginx_dir), "-c", str(nginx_conf),
                              "-e", str(nginx_dir / "error.log"), "-g", "daemon off;"])
    prometheus_dir = root / "prometheus"
    prometheus_listen = f"127.0.0.1:{prometheus_port}"
    prometheus_conf = derive_prometheus_config(prometheus_dir, [f"127.0.0.1:{p}" for p in server_ports],
                                               prometheus_listen)
    checked = subprocess.run([debian_tools["promtool"], "check", "config", str(prometheus_conf)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    processes.start("prometheus", [
        debian_tools["prometheus"], f"--config.file={prometheus_conf}", f"--storage.tsdb.path={prometheus_dir / 'data'}",
        f"--web.listen-address={prometheus_listen}", "--log.level=warn",
    ], cwd=prometheus_dir)

    stack = Stack([f"http://127.0.0.1:{p}" for p in server_ports], f"http://127.0.0.1:{proxy_port}",
                  f"http://{prometheus_listen}", processes, footage / "camera.avi")

    def ready() -> bool:
        processes.check_running()
        return all(httpx.get(f"{url}/readyz", timeout=2).status_code == 200 for url in stack.servers)

    wait_until(ready, 120, "both vad servers ready", processes.logs)

    def targets_up() -> bool:
        processes.check_running()
        response = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=2).json()
        health = {t["labels"]["instance"]: t["health"] for t in response["data"]["activeTargets"]
                  if t["labels"]["job"] == "vad-server"}
        return len(health) == 2 and set(health.values()) == {"up"}

    wait_until(targets_up, 60, "Prometheus scraping both servers", processes.logs)
    return stack


@pytest.fixture(scope="module")
def traffic(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """REST and WebSocket traffic through nginx; the responses, for the tests to inspect."""
    folder = tmp_path_factory.mktemp("traffic")
    frames = synthetic_frames(12, seed=3, anomaly_from=6)
    clip = write_video(folder / "clip.avi", frames[:8])
    seen: dict[str, Any] = {}
    with httpx.Client(base_url=stack.proxy, timeout=60) as http:
        seen["frames"] = [http.post("/v1/frames", files={"file": ("f.png", png(frame))}) for frame in frames]
        seen["clip"] = http.post("/v1/clips?maps=false", files={"file": ("c.avi", clip.read_bytes())})
        seen["junk"] = http.post("/v1/frames", files={"file": ("f.png", b"not an image")})
        # Over nginx's default 1 MiB body limit: it must reach the server (which refuses the bytes as a
        # video it does not recognise), not be cut off by the proxy.
        seen["large"] = http.post("/v1/clips", files={"file": ("c.avi", b"\0" * (3 * 1024 * 1024))})
        seen["metrics"] = http.get("/metrics")
        seen["models"] = http.get("/v1/models/active")
    with connect(f"{stack.proxy_ws}/v1/stream", open_timeout=30) as ws:
        for frame in frames[:6]:
            ws.send(png(frame))
        seen["stream"] = [json.loads(ws.recv(timeout=60)) for _ in range(6)]
    return seen


def test_rest_and_websocket_through_nginx_reach_both_replicas(stack: Stack, traffic: dict[str, Any]) -> None:
    assert [r.status_code for r in traffic["frames"]] == [200] * 12
    assert {r.json()["model_version"] for r in traffic["frames"]} == {"v0001"}
    assert traffic["clip"].status_code == 200 and traffic["clip"].json()["frame_count"] == 8
    assert traffic["junk"].status_code == 415 and traffic["junk"].json()["error"]["code"] == "unsupported_media_type"
    assert traffic["large"].status_code == 415, traffic["large"].text[:300]
    assert traffic["large"].json()["error"]["code"] == "unsupported_media_type"
    assert traffic["metrics"].status_code == 404  # scraped per replica, not through the proxy
    assert traffic["models"].json()["version"] == "v0001"
    assert [reply["seq"] for reply in traffic["stream"]] == list(range(6))
    assert all("score" in reply for reply in traffic["stream"]), traffic["stream"]

    # nginx balanced the single-frame requests over both replicas (each replica's own /metrics).
    for url in stack.servers:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        counts = re.findall(r'vad_http_request_duration_seconds_count\{[^}]*route="/v1/frames"[^}]*status="200"\} (\S+)', text)
        assert counts and sum(map(float, counts)) > 0, f"{url} got no /v1/frames request"


def test_server_healthcheck_script_passes_against_a_ready_server(stack: Stack) -> None:
    env = {**os.environ, "VAD_HEALTHCHECK_URL": f"{stack.servers[0]}/readyz"}
    result = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def substitute_variables(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr}"
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for child in [panel, *panel.get("panels", [])]:
            for target in child.get("targets", []):
                queries.append((f"{child['title']} [{target.get('legendFormat', '')}]", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(selector, label) -> the label's values
            definition = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            selector, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition).groups()
            queries.append((f"variable ${variable['name']}", f"count by ({label}) ({selector})"))
    return queries


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def test_every_dashboard_query_returns_data(stack: Stack, traffic: dict[str, Any], tmp_path: Path) -> None:
    queries = dashboard_queries()
    clip = write_video(tmp_path / "clip.avi", synthetic_frames(8, seed=12))
    assert len(queries) >= 20
    with connect(f"{stack.proxy_ws}/v1/stream", open_timeout=30) as ws:  # an open stream while we look
        for frame in synthetic_frames(3, seed=9):
            ws.send(png(frame))
            assert "score" in json.loads(ws.recv(timeout=60))
        # a camera on the first server, for the cameras row (removed at the end)
        camera = {"name": "dashboard", "url": stack.camera_clip.as_uri(), "fps": 5}
        assert httpx.post(f"{stack.servers[0]}/v1/cameras", json=camera, timeout=60).status_code == 201
        with httpx.Client(base_url=stack.proxy, timeout=60) as http:  # fresh samples for the rate windows
            for frame in synthetic_frames(4, seed=11):
                assert http.post("/v1/frames", files={"file": ("f.png", png(frame))}).status_code == 200
            # the clip of the traffic fixture may be older than the 1m rate window on a loaded machine
            assert http.post("/v1/clips?maps=false", files={"file": ("c.avi", clip.read_bytes())}).status_code == 200
        wait_until(lambda: [float(s["value"][1]) for s in stack.query("sum(vad_websocket_connections)")] == [1.0],
                   30, "Prometheus to see the open stream", stack.processes.logs)

        missing: dict[str, str] = {}

        def all_answer() -> bool:
            missing.clear()
            for title, expr in queries:
                result = stack.query(substitute_variables(expr))
                if not result or not finite(result):
                    missing[title] = f"{expr} -> {result}"
            return not missing

        p99_by_route = dict(queries)["Latency p50 / p95 / p99 by route [p99 {{route}}]"]

        def all_answer_with_both_routes() -> bool:
            # rate() needs two scrapes of the fresh requests: wait for them, not only for any data
            if not all_answer():
                return False
            routes = {s["metric"]["route"] for s in stack.query(substitute_variables(p99_by_route))}
            if not {"/v1/frames", "/v1/clips"} <= routes:
                missing["p99 by route"] = f"routes so far: {sorted(routes)}"
                return False
            return True

        try:
            wait_until(all_answer_with_both_routes, 60, "every dashboard query to return data", interval_s=1)
        except AssertionError:
            pytest.fail("dashboard queries without data:\n" + "\n".join(f"{t}: {m}" for t, m in missing.items()))

        results = {title: stack.query(substitute_variables(expr)) for title, expr in queries}
    by_title = {title.split(" [")[0]: result for title, result in results.items()}
    assert float(by_title["Open streams"][0]["value"][1]) == 1.0
    assert float(by_title["Server replicas up"][0]["value"][1]) == 2.0
    assert {s["metric"]["version"] for s in by_title["Active model version"]} == {"v0001"}
    assert len(by_title["Active model version"]) == 2  # one per replica
    assert float(by_title["Failed model reloads"][0]["value"][1]) == 0.0
    assert {s["metric"]["state"] for s in by_title["Training jobs by state"]} >= {"queued", "running", "succeeded"}
    routes = {s["metric"]["route"] for s in results["Latency p50 / p95 / p99 by route [p99 {{route}}]"]}
    assert {"/v1/frames", "/v1/clips"} <= routes
    assert {s["metric"]["state"] for s in by_title["Cameras by state"] if float(s["value"][1]) > 0} == {"live"}
    assert httpx.delete(f"{stack.servers[0]}/v1/cameras/dashboard", timeout=60).status_code == 204

    # A refused image (415) shows in the 4xx share of its route. A counter series' first sample carries
    # no increase for rate(), so junk keeps coming until both replicas' 415 series have moved.
    error_share = next(expr for title, expr in queries if title == "Error rate by route [4xx {{route}}]")

    def client_errors_seen() -> bool:
        assert httpx.post(f"{stack.proxy}/v1/frames", files={"file": ("f.png", b"junk")}, timeout=30).status_code == 415
        shares = {s["metric"]["route"]: float(s["value"][1]) for s in stack.query(substitute_variables(error_share))}
        return shares.get("/v1/frames", 0.0) > 0

    wait_until(client_errors_seen, 30, "the 4xx share of /v1/frames to rise", interval_s=1.1)


def test_prometheus_evaluates_the_shipped_rules(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules) else []

    rules = wait_until(evaluated, 20, "the rules to be evaluated")
    assert all(rule["health"] == "ok" for rule in rules), [r for r in rules if r["health"] != "ok"]
    firing = [rule["name"] for rule in rules if rule["type"] == "alerting" and rule["state"] != "inactive"]
    assert firing == [], firing  # a healthy stack raises no alert
    assert {rule["name"] for rule in rules} >= {"VadServerDown", "VadNoActiveModel", "VadModelReloadFailed"}
