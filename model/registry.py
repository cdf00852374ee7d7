"""Versioned weights: ``weights/vNNNN/model.safetensors`` + ``manifest.json``.

Publishing writes a hidden temporary folder, fsyncs every file and the folder, then renames it to the
next free version number, so a crash mid-publish leaves no visible version and an existing version is
never overwritten. Loading checks the manifest, the file's sha256 and every tensor's shape before any
weight reaches a network; safetensors holds raw tensors only, so nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import __version__
from model.config import BUNDLED_WEIGHTS_DIR as BUNDLED_WEIGHTS_DIR  # the registry shipped with the code (defined there: torch-free)
from model.config import ConfigError, ModelConfig
from model.manifest import VersionManifest
from model.networks import Detector, Refiner
from model.scoring import Calibration

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
ACTIVE_FILE = "ACTIVE"
MANIFEST_FORMAT = 1
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")
MAX_VERSION_CHARS = 32  # a longer name is no version (and would overflow a file name)


class RegistryError(Exception):
    """A version is missing, malformed or fails verification."""


class VersionNotFound(RegistryError):
    pass


@dataclass
class LoadedVersion:
    version: str
    manifest: dict[str, Any]  # as published (what the API shows)
    parsed_manifest: VersionManifest  # its configs and calibration, typed
    refiner: Refiner
    detector: Detector

    @property
    def config(self) -> ModelConfig:
        return self.parsed_manifest.model_config

    @property
    def calibration(self) -> Calibration:
        return self.parsed_manifest.calibration


def validate_version_name(version: str) -> str:
    if len(version) > MAX_VERSION_CHARS or not VERSION_PATTERN.match(version):
        raise VersionNotFound(f"{version!r} is not a version name (expected vNNNN, e.g. v0001)")
    return version


def list_versions(weights_dir: str | Path) -> list[str]:
    """Published versions, oldest first."""
    root = Path(weights_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
    return sorted(names, key=lambda name: int(name[1:]))


def latest_version(weights_dir: str | Path) -> str | None:
    versions = list_versions(weights_dir)
    return versions[-1] if versions else None


def read_active_file(weights_dir: str | Path) -> tuple[str, int] | None:
    """What ``weights_dir/ACTIVE`` says right now: (the name written in it, the file's mtime in ns),
    or None when there is no ACTIVE file or it holds no version name. The mtime tells a rewrite of
    the same name (a new activation of it) from an unchanged file."""
    pointer = Path(weights_dir) / ACTIVE_FILE
    try:
        with pointer.open() as handle:
            name = handle.read().strip()
            mtime_ns = os.fstat(handle.fileno()).st_mtime_ns
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return (name, mtime_ns) if VERSION_PATTERN.match(name) else None


def active_version(weights_dir: str | Path) -> str | None:
    """The version named in ``weights_dir/ACTIVE`` (set by activation), else the newest one."""
    named = read_active_file(weights_dir)
    if named is not None and (Path(weights_dir) / named[0]).is_dir():
        return named[0]
    return latest_version(weights_dir)


def set_active_version(weights_dir: str | Path, version: str) -> None:
    """Record the active version atomically (temp file + rename), so the CLI and restarts agree."""
    validate_version_name(version)
    pointer = Path(weights_dir) / ACTIVE_FILE
    temporary = pointer.with_name(ACTIVE_FILE + ".tmp")
    temporary.write_text(version + "\n")
    os.replace(temporary, pointer)


def read_manifest(weights_dir: str | Path, version: str) -> dict[str, Any]:
    path = Path(weights_dir) / validate_version_name(version) / MANIFEST_FILE
    if not path.is_file():
        raise VersionNotFound(f"version {version} not found in {weights_dir}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{version}: manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise RegistryError(f"{version}: manifest.json is not a format-{MANIFEST_FORMAT} manifest")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def state_tensors(refiner: Refiner, detector: Detector) -> dict[str, torch.Tensor]:
    tensors = {f"refiner.{k}": v for k, v in refiner.state_dict().items()}
    tensors.update({f"detector.{k}": v for k, v in detector.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def publish(
    weights_dir: str | Path,
    refiner: Refiner,
    detector: Detector,
    manifest: VersionManifest,
) -> str:
    """Write a new version atomically and return its name. Never touches an existing version."""
    root = Path(weights_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=root))
    try:
        weights_path = staging / WEIGHTS_FILE
        save_file(state_tensors(refiner, detector), str(weights_path))
        written = {
            "format": MANIFEST_FORMAT,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "package_version": __version__,
            **manifest.to_dict(),
            "weights_sha256": _sha256(weights_path),
        }
        # mkdtemp makes 0700: a version must be readable by the server's user (another user in
        # containers), like any published file
        staging.chmod(0o755)
        weights_path.chmod(0o644)
        while True:
            last = latest_version(root)
            version = f"v{(int(last[1:]) + 1) if last else 1:04d}"
            written["version"] = version
            (staging / MANIFEST_FILE).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
            _fsync_tree(staging)
            try:
                # rename() onto an existing non-empty folder fails, so two publishers never share a name.
                os.rename(staging, root / version)
            except OSError:
                if (root / version).exists():
                    continue
                raise
            _fsync_dir(root)
            return version
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def update_manifest(weights_dir: str | Path, version: str, updates: dict[str, Any]) -> None:
    """Add figures (e.g. Ped2 results) to a manifest: written to a temp file, then renamed over."""
    manifest = read_manifest(weights_dir, version)
    manifest.update(updates)
    path = Path(weights_dir) / version / MANIFEST_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_version(weights_dir: str | Path, version: str, device: str | torch.device = "cpu") -> LoadedVersion:
    """Verify and load one version: manifest, checksum, tensor names and shapes."""
    manifest = read_manifest(weights_dir, version)
    folder = Path(weights_dir) / version
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise RegistryError(f"{version}: {WEIGHTS_FILE} is missing")
    if _sha256(weights_path) != manifest.get("weights_sha256"):
        raise RegistryError(f"{version}: {WEIGHTS_FILE} does not match the manifest's sha256")
    try:
        parsed = VersionManifest.from_dict(manifest)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise RegistryError(f"{version}: manifest has no valid model_config/calibration ({exc})") from exc
    config = parsed.model_config
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise RegistryError(f"{version}: {WEIGHTS_FILE} is not a safetensors file ({exc})") from exc
    refiner, detector = Refiner(config), Detector(config)
    for prefix, network in (("refiner.", refiner), ("detector.", detector)):
        expected = network.state_dict()
        found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if set(found) != set(expected):
            missing = sorted(set(expected) - set(found))[:3]
            extra = sorted(set(found) - set(expected))[:3]
            raise RegistryError(f"{version}: tensors do not match the model (missing {missing}, unexpected {extra})")
        for name, tensor in found.items():
            if tensor.shape != expected[name].shape:
                raise RegistryError(
                    f"{version}: tensor {prefix}{name} has shape {tuple(tensor.shape)}, "
                    f"the model needs {tuple(expected[name].shape)}"
                )
        network.load_state_dict(found)
    return LoadedVersion(version, manifest, parsed, refiner.to(device).eval(), detector.to(device).eval())
