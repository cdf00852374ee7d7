"""The deployment files, checked without Docker: docker-compose (Debian's) validates the compose files,
promtool the Prometheus configuration and rules, nginx -t the proxy configuration; the Dockerfiles'
COPY sources, entry points and commands are checked against the project; the Grafana provisioning,
the dashboard's metric names and the entrypoint's weight seeding are checked directly."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser
from service.jobs.form import MAX_TEXT_FIELD_BYTES
from service.metrics import Metrics
from service.multipart import MULTIPART_OVERHEAD_BYTES
from service.settings import Settings
from tests.deploy.conftest import REPO
from tests.deploy.stack_configs import derive_nginx_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile", "cuda": REPO / "docker" / "Dockerfile.cuda"}
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "vad.json"
ENTRYPOINT = REPO / "docker" / "entrypoint.py"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def compose_config(tools: dict[str, str], *files: Path) -> dict:
    arguments = [tools["docker-compose"], "--project-directory", str(REPO)]
    for path in files:
        arguments += ["-f", str(path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAD_", "COMPOSE_", "DOCKER_"))}
    result = run([*arguments, "config"], cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


# --- compose -------------------------------------------------------------------------------------------


def test_compose_file_is_valid_and_wires_the_stack(debian_tools) -> None:
    config = compose_config(debian_tools, COMPOSE)
    services = config["services"]
    assert set(services) >= {"server", "worker", "proxy", "prometheus", "grafana"}
    server, worker = services["server"], services["worker"]

    # Weights and jobs on named volumes shared by the server replicas and the worker.
    for name in ("vad-weights", "vad-data"):
        assert name in config["volumes"]
    mounts = {service: {v.split(":")[0]: v.split(":")[1] for v in services[service]["volumes"]}
              for service in ("server", "worker")}
    assert mounts["server"]["vad-weights"] == mounts["worker"]["vad-weights"] == server["environment"]["VAD_WEIGHTS_DIR"]
    assert mounts["server"]["vad-data"] == mounts["worker"]["vad-data"] == server["environment"]["VAD_DATA_DIR"]
    assert worker["environment"]["VAD_WEIGHTS_DIR"] == server["environment"]["VAD_WEIGHTS_DIR"]
    assert worker["environment"]["VAD_DATA_DIR"] == server["environment"]["VAD_DATA_DIR"]

    # Several replicas, none published (the proxy is the entry point), healthy before the proxy starts.
    assert server["deploy"]["replicas"] >= 2
    assert "ports" not in server and "container_name" not in server
    assert "8000" in [str(p) for p in server["expose"]]
    assert "readyz" in HEALTHCHECK.read_text() and server["healthcheck"]["test"][-1] == "/opt/vad/docker/healthcheck.py"
    assert "ports" not in worker
    assert services["proxy"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert [p["target"] for p in services["proxy"]["ports"]] == [80]

    # The mounted configuration files are the ones tested here.
    def mounted(service: str, target: str) -> Path:
        for volume in services[service]["volumes"]:
            source, destination = volume.split(":")[:2]
            if destination == target:
                return Path(source)
        raise AssertionError(f"{service} mounts nothing at {target}")

    assert mounted("proxy", "/etc/nginx/nginx.conf") == NGINX_CONF
    assert mounted("prometheus", "/etc/prometheus") == PROMETHEUS_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert mounted("grafana", "/etc/grafana/provisioning") == GRAFANA_DIR / "provisioning"
    assert mounted("grafana", "/etc/grafana/dashboards") == GRAFANA_DIR / "dashboards"

    # Upload limits: the server's settings and nginx's client_max_body_size agree (nginx lets through
    # everything the server may accept, so the client sees the server's JSON 413, and not much more).
    settings = Settings(max_upload_bytes=int(server["environment"]["VAD_MAX_UPLOAD_BYTES"]),
                        max_training_files=int(server["environment"]["VAD_MAX_TRAINING_FILES"]))
    assert settings.max_upload_bytes == Settings().max_upload_bytes  # the documented default
    limits = nginx_body_limits()
    upload = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    assert upload <= limits["server"] <= upload + 1024 * 1024
    training = settings.max_training_files * upload + 4 * MAX_TEXT_FIELD_BYTES
    assert training <= limits["/v1/training-jobs"] <= training + 1024 * 1024
    assert set(limits) == {"server", "/v1/training-jobs"}


def test_gpu_override_gives_server_and_worker_a_gpu(debian_tools) -> None:
    config = compose_config(debian_tools, COMPOSE, COMPOSE_GPU)
    for name in ("server", "worker"):
        service = config["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
        assert service["build"]["dockerfile"] == "docker/Dockerfile.cuda"
        assert service["environment"]["VAD_DEVICE"] == "cuda"
    assert config["services"]["server"]["deploy"]["replicas"] >= 2  # merged with the base file
    assert "deploy" not in config["services"]["prometheus"]


def test_compose_commands_and_build_targets_exist(debian_tools) -> None:
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_GPU)):
        config = compose_config(debian_tools, *files)
        for name in ("server", "worker"):
            service = config["services"][name]
            dockerfile = REPO / service["build"]["dockerfile"]
            assert Path(service["build"]["context"]) == REPO
            assert service["build"]["target"] in parse_dockerfile(dockerfile).stages
            check_vad_command(service["command"])


# --- Dockerfiles ---------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    parent: "Stage | None" = None
    instructions: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # image path -> repo file

    def last(self, keyword: str) -> str | None:
        stage: Stage | None = self
        while stage is not None:
            for kw, args in reversed(stage.instructions):
                if kw == keyword:
                    return args
            stage = stage.parent
        return None

    def image_file(self, path: str) -> Path | None:
        stage: Stage | None = self
        while stage is not None:
            if path in stage.files:
                return stage.files[path]
            stage = stage.parent
        return None


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: dict[str, Stage]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    parts = Path(path).parts
    for pattern in dockerignore_patterns():
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace("**/", "")):
                return True
    return False


def parse_dockerfile(path: Path) -> Dockerfile:
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                         if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name, default.strip('"'))
            if current is None:
                continue
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            current = Stage(name, base, stages.get(words[0]))
            stages[name] = current
            continue
        assert current is not None, f"{path}: {keyword} before FROM"
        current.instructions.append((keyword, rest))
        if keyword in ("COPY", "ADD"):
            words = shlex.split(rest)
            flags = [w for w in words if w.startswith("--")]
            sources, destination = [w for w in words if not w.startswith("--")][:-1], words[-1]
            if any(f.startswith("--from=") for f in flags):
                continue
            assert keyword == "COPY", f"{path}: use COPY, not ADD"
            for source in sources:
                target = REPO / source
                assert target.exists(), f"{path}: COPY source {source} is not in the repository"
                assert not ignored(source), f"{path}: COPY source {source} is excluded by .dockerignore"
                if target.is_file():
                    image_path = destination + target.name if destination.endswith("/") else destination
                    current.files[image_path] = target
    return Dockerfile(args, stages)


def exec_form(args: str) -> list[str]:
    command = json.loads(args)
    assert isinstance(command, list) and command, f"not an exec-form command: {args}"
    return command


def console_scripts() -> dict[str, str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def check_vad_command(command: list[str]) -> None:
    """`vad <subcommand> ...` names the console script and parses with the CLI's own parser."""
    assert command[0] in console_scripts(), f"{command[0]} is not a console script in pyproject.toml"
    assert console_scripts()[command[0]] == "service.cli:main"
    parsed = build_parser().parse_args(command[1:])
    assert parsed.command == command[1]


def check_python_command(stage: Stage, command: list[str]) -> None:
    assert command[0] in ("python", "python3")
    source = stage.image_file(command[1])
    assert source is not None, f"{command[1]} is not copied into stage {stage.name}"
    assert source.is_file()


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_commands_exist_in_the_project(variant: str) -> None:
    dockerfile = parse_dockerfile(DOCKERFILES[variant])
    stages = dockerfile.stages
    assert {"build", "runtime", "server", "worker"} <= set(stages)
    # Multi-stage: the runtime gets the venv from the build stage, not a compiler toolchain.
    assert any(kw == "COPY" and "--from=build" in args for kw, args in stages["runtime"].instructions)
    with (REPO / "pyproject.toml").open("rb") as f:
        torch_requirement = next(d for d in tomllib.load(f)["project"]["dependencies"] if d.startswith("torch"))
    assert dockerfile.args["TORCH_SPEC"] == torch_requirement.replace(" ", "")
    if variant == "cpu":
        assert dockerfile.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
        assert stages["runtime"].base.startswith("python:")
    else:
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", dockerfile.args["TORCH_INDEX_URL"])
        assert stages["runtime"].base.startswith("nvidia/cuda:") and stages["build"].base.startswith("nvidia/cuda:")
        cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", stages["runtime"].base)
        assert dockerfile.args["TORCH_INDEX_URL"].endswith(f"cu{cuda.group(1)}{cuda.group(2)}")
    assert "--index-url" in " ".join(args for kw, args in stages["build"].instructions if kw == "RUN")
    # The base is a build argument (the official image by default); the wheelhouse option is off by
    # default and stays in the build stage (tests/deploy/test_image.py builds with both).
    base_arg = "PYTHON_IMAGE" if variant == "cpu" else "CUDA_IMAGE"
    assert stages["build"].base == stages["runtime"].base == dockerfile.args[base_arg]
    assert dockerfile.args["WHEELS"] == ""
    assert "--no-index --find-links" in " ".join(args for kw, args in stages["build"].instructions if kw == "RUN")
    assert not any("wheels" in args for stage in stages.values() if stage.name != "build"
                   for kw, args in stage.instructions)

    for name in ("server", "worker"):
        stage = stages[name]
        user = stage.last("USER")
        assert user is not None and user.split(":")[0] not in ("root", "0"), f"{name} runs as root"
        entrypoint = exec_form(stage.last("ENTRYPOINT"))
        check_python_command(stage, entrypoint)
        assert stage.image_file(entrypoint[1]) == ENTRYPOINT
        check_vad_command(exec_form(stage.last("CMD")))
        env = " ".join(args for kw, args in stage.instructions + stages["runtime"].instructions if kw == "ENV")
        assert "VAD_BUNDLED_WEIGHTS_DIR=/opt/vad/weights" in env and "VAD_WEIGHTS_DIR=/var/lib/vad/weights" in env

    # The only weights in the image: the bundled default, where the entrypoint seeds from.
    copies = [(stage.name, args) for stage in stages.values() for kw, args in stage.instructions
              if kw == "COPY" and "weights" in args]
    assert copies == [("build", "weights/ /opt/vad/weights/"),
                      ("runtime", "--from=build /opt/vad/weights /opt/vad/weights")]
    for local_state in ("weights/ACTIVE", "weights/.checkpoints", "weights/.publish-x"):
        assert ignored(local_state), f"{local_state} would be baked into the image"

    server_health = stages["server"].last("HEALTHCHECK")
    assert server_health is not None and stages["worker"].last("HEALTHCHECK") is None
    health_command = exec_form(server_health.split(" CMD ", 1)[1].strip())
    check_python_command(stages["server"], health_command)
    assert stages["server"].image_file(health_command[1]) == HEALTHCHECK
    server_cmd = exec_form(stages["server"].last("CMD"))
    port = server_cmd[server_cmd.index("--port") + 1]
    assert stages["server"].last("EXPOSE") == port
    assert f"http://127.0.0.1:{port}/readyz" in HEALTHCHECK.read_text()


def test_bundled_weights_are_a_published_version() -> None:
    from model import registry

    versions = registry.list_versions(REPO / "weights")
    if not versions:
        pytest.skip("weights/ holds no published version yet (the bundled default is produced separately)")
    loaded = registry.load_version(REPO / "weights", versions[-1])  # verifies the manifest checksums
    assert loaded.version == versions[-1]


# --- entrypoint: seeding the weights volume ------------------------------------------------------------


def entrypoint(*command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VAD_")}
    return run([sys.executable, str(ENTRYPOINT), *command], env={**clean, **env})


def test_entrypoint_seeds_an_empty_volume_once_and_runs_the_command(trained_weights: Path, tmp_path: Path) -> None:
    from model import registry

    bundled = tmp_path / "bundled"
    __import__("shutil").copytree(trained_weights, bundled)
    (bundled / "ACTIVE").write_text("v0001\n")
    volume = tmp_path / "volume" / "weights"
    env = {"VAD_WEIGHTS_DIR": str(volume), "VAD_BUNDLED_WEIGHTS_DIR": str(bundled)}

    result = entrypoint("sh", "-c", 'ls "$VAD_WEIGHTS_DIR"; exit 3', env=env)
    assert result.returncode == 3, result.stderr  # the command's own status: the entrypoint exec'd it
    assert result.stdout.split() == ["ACTIVE", "v0001"]
    assert "seeded" in result.stderr
    assert registry.load_version(volume, "v0001").version == "v0001"  # checksums verified
    assert (volume / "ACTIVE").read_text() == "v0001\n"

    # A registry with a version (here: one the worker trained) is never touched again.
    (volume / "v0001").rename(volume / "v0002")
    (volume / "ACTIVE").write_text("v0002\n")
    result = entrypoint("true", env=env)
    assert result.returncode == 0 and "seeded" not in result.stderr
    assert sorted(p.name for p in volume.iterdir()) == ["ACTIVE", "v0002"]

    # No bundled weights: a warning, the command still runs.
    empty = tmp_path / "empty-volume"
    result = entrypoint("true", env={"VAD_WEIGHTS_DIR": str(empty), "VAD_BUNDLED_WEIGHTS_DIR": str(tmp_path / "none")})
    assert result.returncode == 0 and "no bundled weights" in result.stderr and list(empty.iterdir()) == []

    assert entrypoint(env=env).returncode == 2  # no command


def test_entrypoint_seeding_is_safe_when_replicas_start_together(trained_weights: Path, tmp_path: Path) -> None:
    volume = tmp_path / "weights"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VAD_")},
           "VAD_WEIGHTS_DIR": str(volume), "VAD_BUNDLED_WEIGHTS_DIR": str(trained_weights)}
    starts = [subprocess.Popen([sys.executable, str(ENTRYPOINT), "true"], env=env, stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    outcomes = [(p.wait(timeout=60), p.stderr.read()) for p in starts]
    assert all(code == 0 for code, _ in outcomes), outcomes
    assert sum("seeded" in err for _, err in outcomes) >= 1
    assert sorted(p.name for p in volume.iterdir()) == ["v0001"]  # no staging copies left behind
    for source in (trained_weights / "v0001").iterdir():
        assert (volume / "v0001" / source.name).read_bytes() == source.read_bytes()


def test_healthcheck_script_fails_when_not_ready(tmp_path: Path) -> None:
    import http.server
    import threading

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(503 if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/readyz"
        result = run([sys.executable, str(HEALTHCHECK)], env={**os.environ, "VAD_HEALTHCHECK_URL": url})
        assert result.returncode == 1 and "503" in result.stderr
    finally:
        server.shutdown()
        server.server_close()
    closed = run([sys.executable, str(HEALTHCHECK)], env={**os.environ, "VAD_HEALTHCHECK_URL": url})
    assert closed.returncode == 1


# --- Prometheus ----------------------------------------------------------------------------------------


def test_promtool_checks_the_config_rules_and_rule_tests(debian_tools) -> None:
    config = PROMETHEUS_DIR / "prometheus.yml"
    checked = run([debian_tools["promtool"], "check", "config", str(config)], cwd=PROMETHEUS_DIR)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "rules found" in checked.stdout  # the rule files were loaded
    rules = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
    assert rules
    checked = run([debian_tools["promtool"], "check", "rules", *map(str, rules)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for unit_tests in sorted((PROMETHEUS_DIR / "tests").glob("*.yml")):
        tested = run([debian_tools["promtool"], "test", "rules", str(unit_tests)], cwd=unit_tests.parent)
        assert tested.returncode == 0, tested.stdout + tested.stderr


def test_prometheus_discovers_every_server_replica_by_dns() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "vad-server")
    assert "static_configs" not in job
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["server"] and discovery["type"] == "A" and discovery["port"] == 8000
    assert job.get("metrics_path", "/metrics") == "/metrics"


# --- nginx ---------------------------------------------------------------------------------------------


def nginx_body_limits() -> dict[str, int]:
    """{"server": the server block's client_max_body_size, location: its own} in bytes."""
    limits: dict[str, int] = {}
    location = "server"
    for line in NGINX_CONF.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("location "):
            location = line.split()[-2]
        elif line == "}":
            location = "server"
        value = re.fullmatch(r"client_max_body_size\s+(\d+)([kKmMgG]?);", line)
        if value:
            limits[location] = int(value.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[value.group(2).lower()]
    return limits


def test_nginx_config_is_valid_and_proxies_websockets(debian_tools, tmp_path: Path) -> None:
    text = NGINX_CONF.read_text()
    assert re.search(r"server\s+server:8000\s+resolve;", text), "the upstream must follow the compose service"
    for directive in (r"proxy_set_header\s+Upgrade\s+\$http_upgrade;",
                      r"proxy_set_header\s+Connection\s+\$connection_upgrade;",
                      r"proxy_http_version\s+1\.1;",
                      r"location /v1/stream \{[^}]*proxy_read_timeout\s+3600s;",
                      r"proxy_request_buffering\s+off;"):
        assert re.search(directive, text), directive
    config = derive_nginx_config(tmp_path, listen_port=18080, upstreams=["127.0.0.1:18001", "127.0.0.1:18002"])
    checked = run([debian_tools["nginx"], "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")])
    assert checked.returncode == 0, checked.stderr


# --- Grafana -------------------------------------------------------------------------------------------


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    found = []
    for panel in dashboard["panels"]:
        for child in [panel, *panel.get("panels", [])]:
            for target in child.get("targets", []):
                found.append((child["title"], target["expr"]))
    return found


def exported_sample_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}[family.type]
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_grafana_provisioning_and_dashboard_use_the_service_metrics() -> None:
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "vad.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"

    dashboard = json.loads(DASHBOARD.read_text())
    expressions = dashboard_expressions(dashboard)
    titles = {title for title, _ in expressions}
    for wanted in ("Request rate by route", "Latency p50 / p95 / p99 by route", "Error rate by route",
                   "Frames scored per second", "Anomaly rate", "Queue wait p50 / p95 / p99",
                   "Batch size (patches per forward pass)", "Open streams", "Active model version",
                   "Failed model reloads", "Training jobs by state"):
        assert wanted in titles
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"]
    exported = exported_sample_names()
    for title, expr in expressions:
        for name in re.findall(r"\bvad_[a-z_]+", expr):
            assert name in exported, f"{title}: {name} is not a metric of service/metrics.py"
    latency = [expr for title, expr in expressions if title.startswith("Latency")]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(expr.startswith(f"histogram_quantile({quantile}, sum by (le, route)") for expr in latency)
