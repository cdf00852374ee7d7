"""The model being served, and how it is swapped.

A ``ServingModel`` is immutable. Every request (and every WebSocket frame) takes a reference to the
current one when it starts and scores with it to the end, so an activation never changes the model
under a request in flight; the old model is freed when its last request lets go of it.

Activation loads and verifies the version (registry checksum and tensor shapes), scores one
synthetic frame as a smoke test, and only then swaps the reference and records the version in the
registry's ACTIVE file. A version that fails leaves the old one serving and counts as a failed reload.

Replicas agree through ACTIVE, the one source of truth: every replica reads it every
``VAD_ACTIVE_POLL_S`` and, when it names another version than the one served, switches through the same
activation (without rewriting ACTIVE). A version that fails there leaves the replica on its current
version, reported as not converged (``status()``, the ``vad_active_version_converged`` gauge, a log
line); it is tried again only when ACTIVE is rewritten (a new activation, even of the same version).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model import registry
from model.cpu_features import detect_cpu_features
from model.devices import resolve_device
from model.offline import scorer_for
from model.scoring import Calibration, FrameStream, PatchScorer, SkipUnchanged
from service.background import cancel_and_wait
from service.errors import NotReady, ServiceError, UnknownVersion, VersionRejected
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("vad.server")

SMOKE_FRAME_SIDE = 2  # the smoke frame is this many patches on each side


@dataclass(frozen=True, eq=False)
class ServingModel:
    version: str
    manifest: dict[str, Any]
    scorer: PatchScorer
    device: str
    loaded_at: float = field(default_factory=time.time)

    @property
    def calibration(self) -> Calibration:
        assert self.scorer.calibration is not None
        return self.scorer.calibration

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    @property
    def patch_size(self) -> int:
        return self.scorer.config.patch_size

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "device": self.device,
            "threshold": self.threshold,
            "input_mode": self.scorer.config.input_mode,
            "patch_size": self.patch_size,
            "stride": self.scorer.config.stride,
            "loaded_at": self.loaded_at,
            "manifest": json_safe(self.manifest),
        }


def json_safe(value: Any) -> Any:
    """A manifest with NaN/inf figures (e.g. an undefined AUC) as strict JSON: those become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def smoke_test(scorer: PatchScorer) -> None:
    """Score one synthetic frame end to end; raise VersionRejected unless the result is finite."""
    side = scorer.config.patch_size * SMOKE_FRAME_SIDE
    ramp = np.linspace(0, 255, side * side, dtype=np.float32).reshape(side, side)
    frame = ramp.astype(np.uint8)[None]
    results = FrameStream(scorer).score(frame)
    if len(results) != 1 or not math.isfinite(results[0].score) or not np.isfinite(results[0].map).all():
        raise VersionRejected("the smoke test produced a non-finite score")


ABSOLUTE_PATH = re.compile(r"(?<![\w.<>])/(?:[^\s/'\"():,]+/)*[^\s/'\"():,]*")


def public_message(message: str, weights_dir: Path) -> str:
    """A registry or loader message fit for a client: the weights folder is named ``<weights>``
    and any other absolute server path is reduced to ``<path>/<its last component>``."""
    for folder in sorted({str(weights_dir), str(Path(weights_dir).resolve())}, key=len, reverse=True):
        if len(folder) > 1:
            message = message.replace(folder, "<weights>")
    return ABSOLUTE_PATH.sub(lambda m: "<path>/" + m.group(0).rstrip("/").rpartition("/")[2], message)


def load_serving_model(
    weights_dir: Path, version: str, device: str, options: dict[str, Any] | None = None,
) -> ServingModel:
    """Load, verify and smoke-test one version. Blocking (runs in a thread). ``options``: PatchScorer
    keyword arguments (skip, precision, cuda_graphs, backend)."""
    try:
        loaded = registry.load_version(weights_dir, version, device)
    except registry.VersionNotFound as exc:
        raise UnknownVersion(public_message(str(exc), weights_dir)) from exc
    except registry.RegistryError as exc:
        raise VersionRejected(public_message(str(exc), weights_dir)) from exc
    except (RuntimeError, ValueError, OSError) as exc:  # e.g. tensors that do not fit the device
        raise VersionRejected(public_message(f"{version}: could not be loaded ({exc})", weights_dir)) from exc
    scorer = scorer_for(loaded, device, **(options or {}))
    try:
        smoke_test(scorer)
    except VersionRejected as exc:
        raise VersionRejected(f"{version}: {exc.message}") from exc
    except Exception as exc:
        raise VersionRejected(public_message(
            f"{version}: the smoke test failed ({type(exc).__name__}: {exc})", weights_dir)) from exc
    return ServingModel(version, loaded.manifest, scorer, device)


def skips_unchanged_patches(setting: bool | str, device: str) -> bool:
    """VAD_SKIP_UNCHANGED on ``device``: ``auto`` is on for the CPU and off for CUDA, where the test's
    small per-frame steps cost more than the networks they save (docs/speed.md)."""
    return setting if isinstance(setting, bool) else not device.startswith("cuda")


class ModelStore:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.weights_dir = Path(settings.weights_dir)
        self.device = str(resolve_device(settings.device))
        if self.device == "cpu":  # what VAD_PRECISION can use here (bf16/int8 hardware)
            log.info("%s; VAD_PRECISION=%s", detect_cpu_features().summary(), settings.precision)
        self.follow_latest = settings.follow_latest
        self.follow_interval_s = settings.follow_interval_s
        skip = skips_unchanged_patches(settings.skip_unchanged, self.device)
        self.scorer_options: dict[str, Any] = {
            "skip": SkipUnchanged(settings.skip_level, settings.skip_share) if skip else None,
            "precision": settings.precision,
            "cuda_graphs": settings.cuda_graphs,
            "backend": settings.inference_backend,
            "flow": settings.flow_preset,
            "encoding": settings.encoding,
        }
        self.metrics = metrics
        self._current: ServingModel | None = None
        self._lock: asyncio.Lock | None = None  # created in start(), on the serving loop
        self._refused: set[str] = set()  # versions follow-latest will not retry
        self._follower: asyncio.Task[None] | None = None
        self.active_poll_s = settings.active_poll_s
        self._poller: asyncio.Task[None] | None = None
        # Convergence on ACTIVE: what it named at the last read, and the ACTIVE file (name, mtime)
        # whose version failed here with why (not retried until ACTIVE is rewritten).
        self._wanted: str | None = None
        self._failed_file: tuple[str, int] | None = None
        self._last_error: str | None = None

    @property
    def current(self) -> ServingModel | None:
        return self._current

    def require(self) -> ServingModel:
        model = self._current
        if model is None:
            raise NotReady("no model is loaded")
        return model

    async def start(self) -> None:
        self._lock = asyncio.Lock()
        await self.converge()  # loads the version ACTIVE names (a failure is reported, not retried)
        if self._current is None:
            version = await asyncio.to_thread(registry.active_version, self.weights_dir)
            if version is None:
                log.warning("no published version in %s: not ready until one is activated", self.weights_dir)
            elif version != self._wanted:  # no ACTIVE file, or it names a missing folder: the newest version
                try:
                    await self.activate(version, persist=False)
                except ServiceError as exc:
                    log.error("could not load the active version %s: %s", version, exc.message)
                self._report_convergence()
        if self.active_poll_s > 0:
            self._poller = asyncio.create_task(self._poll_active(), name="vad-active-poll")
        if self.follow_latest:
            self._follower = asyncio.create_task(self._follow(), name="vad-follow-latest")

    async def stop(self) -> None:
        for task in (self._poller, self._follower):
            await cancel_and_wait(task)
        self._poller = self._follower = None

    def status(self) -> dict[str, Any]:
        """Convergence on ACTIVE: ``wanted`` (the version ACTIVE named at the last read; None without
        an ACTIVE file), ``converged`` (this replica serves it, or there is nothing to follow) and
        ``last_error`` (why the wanted version failed here; None once served)."""
        served = self._current.version if self._current else None
        return {"wanted": self._wanted, "converged": self._wanted is None or served == self._wanted,
                "last_error": self._last_error}

    async def converge(self) -> None:
        """Read ACTIVE once and, when it names another version than the one served, switch to it
        (verified and smoke-tested, ACTIVE not rewritten). A version that fails is reported and not
        tried again until ACTIVE is rewritten."""
        if self._lock is None:
            raise NotReady("the model store is not started")
        async with self._lock:  # read under the lock: an activation in progress here finishes first
            named = await asyncio.to_thread(registry.read_active_file, self.weights_dir)
            self._wanted = named[0] if named else None
            served = self._current.version if self._current else None
            if named is None or named[0] == served:
                self._failed_file = self._last_error = None
            elif named != self._failed_file:
                try:
                    await self._activate_locked(named[0], persist=False)
                    self._failed_file = self._last_error = None
                except ServiceError as exc:
                    self._failed_file, self._last_error = named, exc.message
                    log.error("ACTIVE names %s but this replica keeps serving %s: %s", named[0], served or "nothing",
                              exc.message)
            self._report_convergence()

    def _report_convergence(self) -> None:
        self.metrics.active_converged.set(1 if self.status()["converged"] else 0)

    async def _poll_active(self) -> None:
        while True:
            await asyncio.sleep(self.active_poll_s)
            try:
                await self.converge()
            except Exception:
                log.exception("reading ACTIVE failed")

    async def activate(self, version: str, persist: bool = True) -> tuple[ServingModel, str | None]:
        """Load, verify, smoke-test and swap in ``version``; returns (new model, previous version)."""
        if self._lock is None:
            raise NotReady("the model store is not started")
        async with self._lock:
            return await self._activate_locked(version, persist)

    async def _activate_locked(self, version: str, persist: bool) -> tuple[ServingModel, str | None]:
        """activate() with the lock held. ``persist``: rewrite ACTIVE once the version is serving."""
        previous = self._current
        if previous is not None and previous.version == version:
            model = previous
        else:
            try:
                model = await asyncio.to_thread(load_serving_model, self.weights_dir, version, self.device, self.scorer_options)
            except ServiceError as exc:
                if isinstance(exc, VersionRejected):
                    self._refused.add(version)
                self.metrics.failed_reloads.inc()
                log.warning("activation of %s refused: %s", version, exc.message)
                raise  # before ACTIVE is written: the other replicas never see a version that failed here
        if persist:
            await asyncio.to_thread(registry.set_active_version, self.weights_dir, version)
            # this replica wrote ACTIVE: it is converged at once, not at its next poll
            self._wanted, self._failed_file, self._last_error = version, None, None
        if model is not previous:
            self._current = model
            self.metrics.set_active_model(model.version, model.device)
            self.metrics.model_reloads.inc()
            log.info("serving %s on %s", model.version, model.device)
        self._report_convergence()
        return model, previous.version if previous else None

    def list_versions(self) -> list[dict[str, Any]]:
        """Every published version with its manifest (or why it cannot be read). Blocking."""
        current = self._current.version if self._current else None
        entries = []
        for version in registry.list_versions(self.weights_dir):
            entry: dict[str, Any] = {"version": version, "active": version == current}
            try:
                entry["manifest"] = json_safe(registry.read_manifest(self.weights_dir, version))
            except registry.RegistryError as exc:
                entry["manifest"] = None
                entry["error"] = public_message(str(exc), self.weights_dir)
            entries.append(entry)
        return entries

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.follow_interval_s)
            try:
                latest = await asyncio.to_thread(registry.latest_version, self.weights_dir)
                current = self._current.version if self._current else None
                if latest and latest != current and latest not in self._refused:
                    await self.activate(latest)
            except ServiceError:
                pass  # counted and logged by activate(); the old model keeps serving
            except Exception:
                log.exception("follow-latest poll failed")
