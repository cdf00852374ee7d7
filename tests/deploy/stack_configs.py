"""Test copies of the shipped nginx and Prometheus configurations, for programs on loopback.

Only what cannot exist outside the compose network is replaced: the compose DNS names become loopback
addresses, the container paths become temporary ones. Every replaced line must be found exactly once,
so the shipped file cannot drift away from what the tests run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"


def _replace_once(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} matched {count} times in the shipped configuration"
    return new


def derive_nginx_config(folder: Path, listen_port: int, upstreams: list[str]) -> Path:
    """deploy/nginx/nginx.conf listening on 127.0.0.1:listen_port, balancing over ``upstreams``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = NGINX_CONF.read_text()
    text = _replace_once(text, r"^pid\s+\S+;", f"pid {folder / 'nginx.pid'};")
    text = _replace_once(text, r"^error_log\s+\S+", f"error_log {folder / 'error.log'}")
    text = _replace_once(text, r"^\s*access_log\s+\S+", f"    access_log {folder / 'access.log'}")
    text = _replace_once(text, r"^\s*listen\s+80;", f"        listen 127.0.0.1:{listen_port};")
    servers = "\n".join(f"        server {address};" for address in upstreams)
    text = _replace_once(text, r"^\s*server\s+server:8000\s+resolve;", servers)
    temp_paths = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in
                           ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = _replace_once(text, r"^http \{", "http {\n" + temp_paths)
    if os.geteuid() == 0:  # workers would switch to 'nobody', who cannot enter pytest's private tmp folders
        text = "user root;\n" + text
    config = folder / "nginx.conf"
    config.write_text(text)
    return config


def derive_prometheus_config(folder: Path, server_targets: list[str], listen: str,
                             scrape_interval: str = "1s") -> Path:
    """deploy/prometheus/prometheus.yml with static loopback targets instead of the DNS discovery of
    'server', a short scrape interval, and the shipped rule files next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval,
                            scrape_timeout=scrape_interval)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    server_job = jobs["vad-server"]
    assert [d["names"] for d in server_job.pop("dns_sd_configs")] == [["server"]]
    server_job["static_configs"] = [{"targets": server_targets}]
    jobs["prometheus"]["static_configs"] = [{"targets": [listen]}]
    shutil.copytree(PROMETHEUS_DIR / "rules", folder / "rules", dirs_exist_ok=True)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
