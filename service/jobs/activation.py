"""The activation policy (VAD_ACTIVATION_POLICY): what happens to the version a training job
published. ``manual`` leaves it to POST /v1/models/{version}/activate; ``auto`` activates it when
``auto_decision`` says it is no worse than the active version."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from model import registry
from service.errors import ServiceError
from service.jobs.store import Job
from service.model_store import ModelStore
from service.settings import Settings


def _figure(validation: Any, key: str) -> float | None:
    if not isinstance(validation, dict):
        return None
    value = validation.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def auto_decision(new_manifest: dict[str, Any], active_manifest: dict[str, Any] | None) -> tuple[bool, str]:
    """The ``auto`` rule: activate when the new version's held-out reconstruction error (condition 1
    of the stopping rule, ``manifest["validation"]["holdout_reconstruction"]``, lower is better) is no
    higher than the active version's, both versions seeing the same input (input mode and patch size).
    Activate too when nothing is active or the active version has no such figure; keep the active
    one when the new version has none."""
    new_rec = _figure(new_manifest.get("validation"), "holdout_reconstruction")
    if new_rec is None:
        return False, "the new version has no finite validation.holdout_reconstruction"
    if active_manifest is None:
        return True, "no version was active"
    same_input = all(
        (new_manifest.get("model_config") or {}).get(key) == (active_manifest.get("model_config") or {}).get(key)
        for key in ("input_mode", "patch_size")
    )
    if not same_input:
        return False, "input mode or patch size differs from the active version: figures not comparable, activate manually"
    active_rec = _figure(active_manifest.get("validation"), "holdout_reconstruction")
    if active_rec is None:
        return True, "the active version has no validation.holdout_reconstruction"
    if new_rec <= active_rec:
        return True, f"held-out reconstruction {new_rec:.6g} <= active {active_rec:.6g}"
    return False, f"held-out reconstruction {new_rec:.6g} > active {active_rec:.6g}"


async def apply_policy(job: Job, settings: Settings, models: ModelStore) -> dict[str, Any]:
    """Apply the policy to a succeeded job's version (activating it when the policy says so); returns
    the decision to record on the job: policy, version, decision (manual, activated, kept or refused)
    and the reason."""
    assert job.version is not None
    decision: dict[str, Any] = {"policy": settings.activation_policy, "version": job.version}
    if settings.activation_policy == "manual":
        decision.update(decision="manual", reason="VAD_ACTIVATION_POLICY=manual: activate it with "
                        f"POST /v1/models/{job.version}/activate")
        return decision
    current = models.current
    try:
        manifest = await asyncio.to_thread(registry.read_manifest, settings.weights_dir, job.version)
    except registry.RegistryError as exc:
        decision.update(decision="refused", reason=str(exc))
        return decision
    if current is not None and current.version == job.version:
        decision.update(decision="activated", reason="already active")
        return decision
    activate, reason = auto_decision(manifest, current.manifest if current else None)
    decision.update(decision="activated" if activate else "kept", reason=reason,
                    active_before=current.version if current else None)
    if activate:
        try:
            await models.activate(job.version)
        except ServiceError as exc:
            decision.update(decision="refused", reason=f"{reason}; activation refused: {exc.message}")
    return decision
