"""Security: no pickle anywhere, the API key on every state-changing route (found by enumerating the
app's routes), path traversal refused in version names, footage paths and job ids, client file
names never used as paths, no stack trace or server path in any error response, and the
dependencies checked against known vulnerabilities (pip-audit; skipped when its database is out of
reach)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.routing import APIRoute

from model import registry
from service.jobs.layout import upload_dir
from tests.reliability.helpers import REPO, assert_clean_error, assert_no_leak, avi_bytes, frames, http_response, png

KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
# POST routes that compute an answer from the request body and change nothing: open by design (the
# web page and cameras score without the key). Every other mutating route must require the key.
SCORING_ROUTES = {("POST", "/v1/clips"), ("POST", "/v1/frames")}
PATH_VALUES = {"version": "v0002", "job_id": "0" * 32, "name": "dock"}


# --- no pickle ---------------------------------------------------------------------------------------

UNSAFE_LOADING = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal|cloudpickle)\b", re.M), "a pickle-family import"),
    (re.compile(r"\btorch\.load\s*\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"\btorch\.jit\.load\s*\("), "torch.jit.load (TorchScript archives hold pickles)"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"\bread_pickle\s*\("), "pandas read_pickle"),
    (re.compile(r"\byaml\.(unsafe_)?load\s*\((?![^)]*Loader\s*=\s*yaml\.SafeLoader)"), "yaml.load without SafeLoader"),
]


def unsafe_loading(source: str) -> list[str]:
    return [what for pattern, what in UNSAFE_LOADING if pattern.search(source)]


def test_no_pickle_in_the_source() -> None:
    # The scanner itself finds what it looks for (so an empty result below means something).
    assert unsafe_loading("import pickle\n") == ["a pickle-family import"]
    assert unsafe_loading("state = torch.load(path)") == ["torch.load without weights_only=True"]
    assert unsafe_loading("state = torch.load(path, weights_only=True)") == []
    assert unsafe_loading("np.load(f, allow_pickle=True)") == ["numpy allow_pickle=True"]
    files = sorted(p for folder in ("model", "service") for p in (REPO / folder).rglob("*.py"))
    assert len(files) > 20
    found = {str(p.relative_to(REPO)): hits for p in files if (hits := unsafe_loading(p.read_text()))}
    assert found == {}
    weights_formats = {p.suffix for p in (REPO / "weights").rglob("*") if p.is_file()} - {".json", ".safetensors", ""}
    assert weights_formats == set(), f"bundled weights in a format other than safetensors: {weights_formats}"


def test_registry_loading_and_activation_never_unpickle(make_client, monkeypatch) -> None:
    import pickle

    import torch

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("unpickling was attempted")

    client = make_client()  # started before the traps: v0001 loaded normally
    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)
    registry.load_version(client.app.state.services.settings.weights_dir, "v0002")
    response = client.post("/v1/models/v0002/activate")
    assert response.status_code == 200, response.text
    assert client.post("/v1/frames", files={"file": ("f.png", png(frames(1)[0]))}).json()["model_version"] == "v0002"


# --- the API key -------------------------------------------------------------------------------------

def _api_routes(routes) -> list[APIRoute]:  # noqa: ANN001
    """Every APIRoute, including those of included routers (however FastAPI nests them)."""
    found = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        nested = getattr(route, "original_router", None) or getattr(route, "app", None)
        if nested is not None and hasattr(nested, "routes"):
            found += _api_routes(nested.routes)
    return found


def mutating_routes(app) -> list[tuple[str, str]]:  # noqa: ANN001
    """(method, path template) of every POST/PUT/PATCH/DELETE route, from the app's OpenAPI schema."""
    routes = {(method.upper(), path) for path, operations in app.openapi()["paths"].items()
              for method in operations if method.upper() in MUTATING}
    # A mutating route hidden from the schema would escape the check: there is none.
    hidden = [(r.path, r.methods) for r in _api_routes(app.routes) if not r.include_in_schema and r.methods & MUTATING]
    assert hidden == [], hidden
    return sorted(routes)


def test_every_state_changing_route_requires_the_api_key(make_client, tmp_path: Path) -> None:
    client = make_client(api_key=KEY)
    routes = mutating_routes(client.app)
    # The enumeration sees the routes it must (so it cannot pass by finding none).
    assert {("POST", "/v1/models/{version}/activate"), ("POST", "/v1/training-jobs"),
            ("DELETE", "/v1/training-jobs/{job_id}"), ("POST", "/v1/cameras"), ("PATCH", "/v1/cameras/{name}"),
            ("DELETE", "/v1/cameras/{name}")} | SCORING_ROUTES <= set(routes), routes
    checked = []
    for method, template in routes:
        path = template.format(**PATH_VALUES)
        if (method, template) in SCORING_ROUTES:
            upload = avi_bytes(tmp_path, count=8) if template == "/v1/clips" else png(frames(1)[0])
            assert client.request(method, path, files={"file": ("upload", upload)}).status_code == 200
            continue
        response = client.request(method, path)
        assert_clean_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_clean_error(client.request(method, path, headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
        assert_clean_error(client.request(method, path, headers={"Authorization": f"Basic {KEY}"}), 401, "unauthorized")
        assert_clean_error(client.request(method, path, headers={"Authorization": "Bearer "}), 401, "unauthorized")
        checked.append((method, template))
    assert len(checked) == len(routes) - len(SCORING_ROUTES)
    # Nothing happened: the active version and the (empty) job queue are as they were.
    assert client.get("/v1/models/active").json()["version"] == "v0001"
    assert client.get("/v1/training-jobs").json() == {"jobs": []}
    # With the key, the same request gets past the check.
    assert client.post("/v1/models/v0002/activate", headers=AUTH).status_code == 200


def test_api_key_is_checked_before_the_body_is_read(live_server) -> None:
    server = live_server(api_key=KEY)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        # 200 MB announced, none sent: the answer must not wait for the body.
        sock.sendall(b"POST /v1/training-jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 200000000\r\n\r\n")
        head, body = http_response(sock)
    assert head.startswith(b"HTTP/1.1 401") and b"www-authenticate: bearer" in head.lower(), head
    assert json.loads(body)["error"]["code"] == "unauthorized", body


# --- path traversal ----------------------------------------------------------------------------------

BAD_VERSIONS = ["..", "../weights", "v0001/../v0002", "..%2F..%2Fetc", "v0001\x00", "v1", "V0001", "v0001 ",
                "/etc/passwd", "....//", "v0001/model.safetensors", "~", "v" + "9" * 300, "v0001%00", "%2e%2e"]


def test_path_traversal_in_version_names_is_refused(make_client, weights_dir: Path) -> None:
    client = make_client(api_key=KEY)
    (weights_dir.parent / "manifest.json").write_text("{}")  # bait one level up
    for name in BAD_VERSIONS:
        response = client.post(f"/v1/models/{quote(name, safe='')}/activate", headers=AUTH)
        assert_clean_error(response, 404)
        assert response.json()["error"]["code"] in ("version_not_found", "not_found"), (name, response.text)
        with pytest.raises(registry.VersionNotFound):
            registry.load_version(weights_dir, name)
    assert client.get("/v1/models/active").json()["version"] == "v0001"
    assert registry.active_version(weights_dir) == "v0001"


def _form(paths: list[str]) -> list:
    return [("paths", (None, json.dumps(paths))), ("options", (None, "{}"))]


def test_path_traversal_in_footage_paths_and_job_ids_is_refused(make_client, tmp_path: Path) -> None:
    root = tmp_path / "footage"
    root.mkdir()
    (root / "cam0.avi").write_bytes(avi_bytes(tmp_path, count=24))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.avi").write_bytes(avi_bytes(tmp_path, count=24, seed=3))
    (root / "escape").symlink_to(outside)
    (root / "link.avi").symlink_to(outside / "secret.avi")
    client = make_client(footage_root=root)
    for path in ["../outside/secret.avi", "cam0.avi/../../outside/secret.avi", str(outside / "secret.avi"),
                 "escape/secret.avi", "link.avi", "escape", "/etc/passwd", "..\\outside\\secret.avi", "cam0.avi\x00",
                 "", ".", "./", "~/secret.avi", "%2e%2e/outside/secret.avi", "a" * 5000]:
        response = client.post("/v1/training-jobs", files=_form([path]))
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request", (path, response.text)
        message = response.json()["error"]["message"]
        if str(tmp_path) not in path:  # the client's own absolute path may be echoed; nothing else
            assert_no_leak(response.text)
        assert str(outside) not in message.replace(path, "")  # a symlink's target is never revealed
    assert client.get("/v1/training-jobs").json() == {"jobs": []}
    # A job id with a path in it never reaches the job routes (the router finds no route: not_found);
    # any other is looked up as an id and is not a job (job_not_found).
    for job_id, code in [("../../etc/passwd", "not_found"), ("..", "not_found"), ("0" * 31, "job_not_found"),
                         ("0" * 32 + "/..", "not_found"), ("%2e%2e", "job_not_found"), ("A" * 32, "job_not_found")]:
        assert_clean_error(client.get(f"/v1/training-jobs/{quote(job_id, safe='')}"), 404, code)
        assert_clean_error(client.delete(f"/v1/training-jobs/{quote(job_id, safe='')}"), 404, code)
    accepted = client.post("/v1/training-jobs", files=_form(["cam0.avi"]))
    assert accepted.status_code == 202, accepted.text


def test_training_upload_names_are_never_used_as_paths(make_client, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    client = make_client()
    clip = avi_bytes(tmp_path, count=24)
    names = ["../../../../tmp/evil.avi", "/etc/cron.d/evil", "..\\..\\evil.avi", "x" * 3000 + ".avi", "a\x01b.avi"]
    response = client.post("/v1/training-jobs", files=[("files", (name, clip, "video/x-msvideo")) for name in names])
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    job = client.get(f"/v1/training-jobs/{job_id}").json()
    shown = [f["name"] for f in job["footage"]]
    assert shown[:4] == ["evil.avi", "evil", "evil.avi", "x" * 200]
    assert shown[4].endswith("b.avi") and shown[4].isprintable()
    stored = [Path(f["path"]) for f in client.app.state.training.store.get(job_id).footage]
    folder = upload_dir(client.app.state.services.settings.data_dir, job_id)
    for path in stored:
        assert path.parent == folder and re.fullmatch(r"[0-9a-f]{32}\.avi", path.name), path
        assert path.read_bytes() == clip
    assert not Path("/tmp/evil.avi").exists() and not Path("/etc/cron.d/evil").exists()
    assert not (tmp_path / "evil.avi").exists()


# --- no stack traces or server paths in responses ---------------------------------------------------

def test_error_responses_carry_no_stack_trace_or_server_path(make_client, weights_dir: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    client = make_client(api_key=KEY, max_image_bytes=10_000)
    image = png(frames(1)[0])
    requests = [  # (method, path, request, the status and error code it must get)
        ("GET", "/nothing", {}, 404, "not_found"), ("DELETE", "/v1/frames", {}, 405, "method_not_allowed"),
        ("GET", "/v1/frames?maps=perhaps", {}, 405, "method_not_allowed"),
        ("POST", "/v1/frames?maps=perhaps", {"files": {"file": ("f.png", image)}}, 422, "invalid_request"),
        ("POST", "/v1/frames", {"content": b"x" * 20_000, "headers": {"Content-Type": "image/png"}}, 413, "too_large"),
        ("POST", "/v1/clips", {"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415,
         "unsupported_media_type"),
        ("POST", "/v1/clips", {"content": b"RIFF\0\0\0\0AVI junk", "headers": {"Content-Type": "video/avi"}}, 422,
         "undecodable"),
        ("POST", "/v1/models/v0042/activate", {"headers": AUTH}, 404, "version_not_found"),
        ("POST", "/v1/training-jobs", {"headers": AUTH, "files": _form(["x.avi"])}, 422, "invalid_request"),
        ("POST", "/v1/training-jobs", {"headers": AUTH, "files": [("options", (None, '{"epochs": "many"}'))]}, 422,
         "invalid_request"),
        ("GET", "/v1/training-jobs?state=nonsense", {}, 422, "invalid_request"),
        ("GET", "/v1/training-jobs/" + "0" * 32, {}, 404, "job_not_found"),
        ("POST", "/v1/frames", {"content": b"", "headers": {"Content-Type": "image/png", "Content-Length": "nope"}}, 400,
         "bad_request"),
    ]
    for method, path, kwargs, status, code in requests:
        assert_clean_error(client.request(method, path, **kwargs), status, code)

    # A version whose weights cannot be read: the loader's OSError names a server path; the reply must not.
    (weights_dir / "v0002" / "model.safetensors").unlink()
    (weights_dir / "v0002" / "model.safetensors").mkdir()
    assert_clean_error(client.post("/v1/models/v0002/activate", headers=AUTH), 422, "version_rejected")
    listing = client.get("/v1/models")
    assert listing.status_code == 200
    assert_no_leak(listing.text)

    # Bugs: an exception naming a server file, from the scoring path (REST, NDJSON, WebSocket).
    services = client.app.state.services

    async def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError(f'File "{REPO}/service/pipeline.py", line 1: boom in /tmp/secret')

    monkeypatch.setattr(services.batcher, "score", broken)
    response = client.post("/v1/frames", files={"file": ("f.png", image)})
    assert_clean_error(response, 500, "internal")
    clip = avi_bytes(tmp_path, count=8)
    assert_clean_error(client.post("/v1/clips", files={"file": ("c.avi", clip)}), 500, "internal")
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(image)
        reply = ws.receive_text()
    assert_no_leak(reply)
    assert json.loads(reply)["error"]["code"] == "internal"


# --- known vulnerabilities in the dependencies -------------------------------------------------------

# Advisories reviewed and accepted (id -> why). Empty: nothing is waived.
ACCEPTED_ADVISORIES: dict[str, str] = {}


def test_dependencies_have_no_known_vulnerabilities(tmp_path: Path) -> None:
    if shutil.which("pip-audit") is None and subprocess.run([sys.executable, "-m", "pip_audit", "--version"],
                                                            capture_output=True).returncode != 0:
        pytest.skip("pip-audit is not installed (pip install -e '.[test]' installs it)")
    output = tmp_path / "audit.json"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pip_audit", "--local", "--skip-editable", "--progress-spinner", "off",
             "--format", "json", "--output", str(output), "--timeout", "20"],
            capture_output=True, text=True, timeout=240,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("pip-audit: the vulnerability service did not answer within 240 s")
    offline_signs = ("ConnectionError", "NameResolutionError", "Max retries exceeded", "timed out", "Temporary failure")
    if run.returncode != 0 and not output.exists():
        if any(sign in run.stderr for sign in offline_signs):
            pytest.skip(f"pip-audit: the vulnerability service is unreachable ({run.stderr.strip().splitlines()[-1][:200]})")
        raise AssertionError(f"pip-audit failed: {run.stderr[-2000:]}")
    report = json.loads(output.read_text())
    dependencies = report["dependencies"]
    audited = [d for d in dependencies if "skip_reason" not in d]
    if not audited:
        reasons = {d["skip_reason"].split(":")[0] for d in dependencies}
        pytest.skip(f"pip-audit could audit none of {len(dependencies)} installed packages (the PyPI JSON API or "
                    f"OSV is not reachable from here): {sorted(reasons)[:2]}")
    found = [(d["name"], d["version"], v["id"], v.get("fix_versions")) for d in audited for v in d.get("vulns", [])
             if v["id"] not in ACCEPTED_ADVISORIES]
    print(f"\npip-audit: {len(audited)} of {len(dependencies)} packages audited, {len(found)} known vulnerabilities")
    assert found == [], found
