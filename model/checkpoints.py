"""Training checkpoints: what `--resume` and a retried training job continue from.

One safetensors file, ``checkpoint.safetensors``, replaced atomically (temp file + rename) after
every epoch: the networks being trained, the optimisers' moments, the parameters the stopping rule
keeps (best R, best D, and R_old, R after an early epoch, for phase two) and, in its metadata, the
loop state as JSON (epoch, step, history, the stopping rule's figures). One file, so a crash at any
moment leaves either the previous epoch's state or this one's, never half of each. Raw tensors
only, so nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT_FILE = "checkpoint.safetensors"
KEPT = "kept."  # prefix of the parameters the stopping rule keeps, in the same file
LEGACY_BEST_FILE = "best.safetensors"  # where checkpoints up to this change kept them

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]


@dataclass
class BestParameters:
    """What the stopping rule keeps: the best R (condition 1), the best D, and R_old (may be None)."""

    refiner: StateDict
    detector: StateDict
    refiner_old: StateDict | None


def _atomic_save(tensors: StateDict, path: Path, metadata: dict[str, str] | None = None) -> None:
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def _cpu(state: StateDict, prefix: str) -> StateDict:
    return {f"{prefix}{k}": v.detach().cpu().contiguous() for k, v in state.items()}


def _strip(tensors: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def save_checkpoint(
    folder: Path, networks: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
    meta: dict[str, Any], best: BestParameters,
) -> None:
    """The training state after an epoch and the parameters kept so far."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: StateDict = {}
    for name, module in networks.items():
        tensors.update(_cpu(module.state_dict(), f"{name}/"))
    for name, optimizer in optimizers.items():
        for index, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"opt.{name}/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    kept = {"refiner/": best.refiner, "detector/": best.detector, "refiner_old/": best.refiner_old or {}}
    for prefix, state in kept.items():
        # copies: a kept parameter may be the very tensor the network holds (safetensors refuses shared memory)
        tensors.update({k: v.clone() for k, v in _cpu(state, KEPT + prefix).items()})
    # one file, replaced at once: a crash never leaves a loop state without the parameters it kept
    _atomic_save(tensors, folder / CHECKPOINT_FILE, {"meta": json.dumps(meta)})


def read_checkpoint_meta(folder: Path) -> dict[str, Any] | None:
    """The loop state of the folder's checkpoint (epoch, step, history), None when there is none or
    it cannot be read (training then says so, or starts afresh)."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads(handle.metadata()["meta"])
    except Exception as exc:  # noqa: BLE001 - any damage means "no usable checkpoint"
        log.warning("checkpoint %s unreadable: %s", path, exc)
        return None


def load_checkpoint(
    folder: Path, networks: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
) -> tuple[dict[str, Any], BestParameters] | None:
    """Load networks and optimisers in place; returns the loop state and the kept parameters, or
    None when the folder has no checkpoint."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["meta"])
    tensors = load_file(str(path))
    for name, module in networks.items():
        module.load_state_dict(_strip(tensors, f"{name}/"))
    for name, optimizer in optimizers.items():
        state_dict = optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in _strip(tensors, f"opt.{name}/").items():
            index, field_name = key.split("/")
            state.setdefault(int(index), {})[field_name] = value
        state_dict["state"] = state
        optimizer.load_state_dict(state_dict)
    kept = _strip(tensors, KEPT)
    if not kept and (folder / LEGACY_BEST_FILE).is_file():  # a checkpoint written before they shared a file
        kept = load_file(str(folder / LEGACY_BEST_FILE))
    best = BestParameters(_strip(kept, "refiner/"), _strip(kept, "detector/"), _strip(kept, "refiner_old/") or None)
    return meta, best


def remove_checkpoints(folder: Path) -> None:
    """Delete a checkpoint folder and everything in it (after a version is published)."""
    if not folder.exists():
        return
    for path in sorted(folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    folder.rmdir()
