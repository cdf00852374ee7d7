"""Phase two: D retrained against R's own output, so that D(R(X)) detects (Zaheer et al., "Old is
Gold", CVPR 2020).

After the adversarial phase D has learned "refined or real": it calls nearly every refined patch
fake, anomalous or not, so D(R(X)) ranks test patches by little more than chance (docs/model.md).
Here R is frozen and D alone is trained again, with every sample passed through R except the small
raw share, so "was refined" stops being a cue and D must judge *what* R produced:

- normal (label 1): R_new(X), weight 0.9; X itself, weight 0.1;
- anomalous (label 0), each kind an equal share of weight 0.999, every one through R_new:
  ``average``: R_new((R_old(Xi) + R_old(Xj)) / 2), two poor reconstructions blended (OGNet's negative);
  ``speed``: a moving patch with its motion channel multiplied by a factor (the same scene, faster);
  ``motion_swap``: a patch's appearance with the motion of another place or time;
  ``paste``: a region of another patch cut into this one (appearance out of place);
- and R_old(X) itself, weight 0.001.

R_new is the R kept by the stopping rule (its best reconstruction), R_old the R after an early epoch.
D's parameters are averaged over the steps (an exponential moving average): without it, D's
ranking of test patches swings by 10+ points of AUC from one hundred steps to the next.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from model.config import NEGATIVE_KINDS, TrainConfig
from model.data import PatchSampler
from model.networks import Detector, Refiner

MOTION_KINDS = frozenset({"speed", "motion_swap"})  # need a motion channel
APPEARANCE_KINDS = ("average", "paste")
GOOD_REFINED_WEIGHT = 0.9
GOOD_RAW_WEIGHT = 0.1
BAD_OLD_WEIGHT = 0.001
BAD_REFINED_WEIGHT = 1.0 - BAD_OLD_WEIGHT

RefineFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PhaseTwoBatch:
    """One batch of D's phase two: inputs, their labels (1 = normal), weights and kinds."""

    inputs: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor  # each side (normal, anomalous) sums to 1
    kinds: list[str]  # per row: "refined", "raw", a NEGATIVE_KINDS name or "old"


def usable_kinds(kinds: tuple[str, ...], has_motion: bool) -> tuple[str, ...]:
    """The negative kinds that apply to the input: motion kinds need a motion channel; where none of
    ``kinds`` applies (the default ``speed`` on appearance-only input), the appearance kinds."""
    usable = tuple(k for k in kinds if has_motion or k not in MOTION_KINDS)
    return usable or APPEARANCE_KINDS


class NegativeMaker:
    """Raw pseudo-anomalies of each kind, before R_new sees them (all from normal footage)."""

    def __init__(self, sampler: PatchSampler, refine_old: RefineFn, speedup: tuple[float, float], seed: int) -> None:
        self.sampler = sampler
        self.refine_old = refine_old
        self.speedup = speedup
        self.rng = np.random.default_rng(seed)

    def make(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """``count`` pseudo-anomalies of ``kind`` for the normal patches ``x``, on ``x``'s device
        (sampled patches are moved there at once, not patch by patch)."""
        count = x.shape[0]
        if kind == "average":
            old = self.refine_old(x)
            return (old + old[torch.from_numpy(self.rng.permutation(count))]) / 2
        if kind == "speed":
            return self.sampler.sample_sped_up(count, self.speedup).to(x.device)
        if kind == "motion_swap":
            swapped = x.clone()
            swapped[:, 1:] = self.sampler.sample_moving(count)[:, 1:]
            return swapped
        if kind == "paste":
            return self._paste(x, self.sampler.sample(count).to(x.device))
        raise ValueError(f"unknown negative kind {kind!r} (one of {NEGATIVE_KINDS})")

    def _paste(self, x: torch.Tensor, donors: torch.Tensor) -> torch.Tensor:
        """A rectangle of a third to two thirds of the side, from a random place of a donor patch."""
        out = x.clone()
        size = x.shape[-1]
        for i in range(x.shape[0]):
            h, w = self.rng.integers(size // 3, 2 * size // 3 + 1, 2)
            sy, sx, dy, dx = (int(v) for v in self.rng.integers(0, [size - h + 1, size - w + 1] * 2))
            out[i, :, dy : dy + h, dx : dx + w] = donors[i, :, sy : sy + h, sx : sx + w]
        return out


def phase_two_batch(
    x: torch.Tensor, refine_new: RefineFn, refine_old: RefineFn, maker: NegativeMaker, kinds: tuple[str, ...]
) -> PhaseTwoBatch:
    """The samples, labels and weights of one step for normal patches ``x`` (module docstring)."""
    count = x.shape[0]
    with torch.no_grad():
        parts = [refine_new(x), x] + [refine_new(maker.make(kind, x)) for kind in kinds] + [refine_old(x)]
    names = ["refined", "raw", *kinds, "old"]
    good = torch.tensor([GOOD_REFINED_WEIGHT, GOOD_RAW_WEIGHT])
    bad = torch.tensor([BAD_REFINED_WEIGHT / max(1, len(kinds))] * len(kinds) + [BAD_OLD_WEIGHT])
    if not kinds:  # nothing but R_old(X) on the anomalous side
        bad = torch.ones(1)
    per_part = torch.cat([good, bad]) / count
    weights = per_part.repeat_interleave(count).to(x.device)
    labels = torch.cat([torch.ones(2 * count), torch.zeros((len(kinds) + 1) * count)]).to(x.device)
    rows = [name for name in names for _ in range(count)]
    return PhaseTwoBatch(torch.cat(parts), labels, weights, rows)


def weighted_detector_loss(logits: torch.Tensor, batch: PhaseTwoBatch) -> torch.Tensor:
    """Binary cross-entropy, each sample by its weight; the two sides count equally."""
    losses = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
    return (losses * batch.weights).sum() / 2


@dataclass
class PhaseTwoReport:
    steps: int
    seconds: float
    negatives: list[str]
    holdout_separation: float  # ROC AUC of D(R_new(X)) against D(R_new(negatives)), held-out patches
    holdout_separation_before: float

    def to_dict(self) -> dict[str, object]:
        return {
            "steps": self.steps, "seconds": round(self.seconds, 1), "negatives": self.negatives,
            "holdout_separation": round(self.holdout_separation, 4),
            "holdout_separation_before": round(self.holdout_separation_before, 4),
        }


@torch.inference_mode()
def holdout_separation(
    refiner_new: Refiner, detector: Detector, patches: torch.Tensor, negatives: torch.Tensor
) -> float:
    """How well D(R_new(.)) tells held-out normal patches from held-out pseudo-anomalies (ROC AUC)."""
    was_training = detector.training
    detector.eval()
    normal = detector(refiner_new(patches)[0])
    anomalous = detector(refiner_new(negatives)[0])
    detector.train(was_training)
    labels = np.r_[np.ones(len(normal)), np.zeros(len(anomalous))]
    return float(roc_auc_score(labels, torch.cat([normal, anomalous]).float().cpu().numpy()))


def retrain_detector(
    refiner_new: Refiner, refiner_old: Refiner, detector: Detector, sampler: PatchSampler,
    holdout_sampler: PatchSampler, cfg: TrainConfig, device: torch.device, deadline: float | None = None,
    progress: Callable[[int, int], None] | None = None, verbose: bool = False,
) -> tuple[Detector, PhaseTwoReport]:
    """Phase two on a copy of ``detector``; R_new and R_old stay frozen. Stops at ``deadline``
    (time.monotonic()) if it comes first. Returns the averaged D and what it measured."""
    started = time.monotonic()
    # R stays frozen because it only ever runs without autograd (phase_two_batch, holdout_separation);
    # its modules are not switched to requires_grad=False, which would outlive this call (a
    # reject-and-refine fine-tuning starts from this very R and must train it)
    refiner_new, refiner_old = refiner_new.to(device).eval(), refiner_old.to(device).eval()
    detector = copy.deepcopy(detector).to(device).train()
    kinds = usable_kinds(tuple(cfg.phase_two_negatives), sampler.has_motion)

    def new(batch: torch.Tensor) -> torch.Tensor:
        return refiner_new(batch)[0]

    def old(batch: torch.Tensor) -> torch.Tensor:
        return refiner_old(batch)[0]

    maker = NegativeMaker(sampler, old, cfg.pseudo_speedup, cfg.seed + 11)
    holdout_maker = NegativeMaker(holdout_sampler, old, cfg.pseudo_speedup, cfg.seed + 13)
    with torch.no_grad():
        held = holdout_sampler.sample(cfg.holdout_patches // 2).to(device)
        held_negatives = torch.cat([holdout_maker.make(kind, part) for kind, part in
                                    zip(kinds, held.chunk(max(1, len(kinds))))]) if kinds else old(held)
    before = holdout_separation(refiner_new, detector, held, held_negatives)
    averaged = AveragedModel(detector, multi_avg_fn=get_ema_multi_avg_fn(cfg.phase_two_ema), use_buffers=True)
    optimizer = torch.optim.Adam(detector.parameters(), lr=cfg.phase_two_learning_rate, betas=(0.5, 0.999))
    steps = 0
    bar = tqdm(range(cfg.phase_two_steps), desc="phase two (D)", unit="step", disable=not verbose, leave=False)
    for steps in bar:
        if deadline is not None and time.monotonic() >= deadline:
            break
        x = sampler.sample(cfg.phase_two_batch_size).to(device)
        batch = phase_two_batch(x, new, old, maker, kinds)
        loss = weighted_detector_loss(detector(batch.inputs), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        averaged.update_parameters(detector)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if progress is not None:
            progress(steps + 1, cfg.phase_two_steps)
    else:
        steps = cfg.phase_two_steps
    result = averaged.module
    after = holdout_separation(refiner_new, result, held, held_negatives)
    report = PhaseTwoReport(steps, time.monotonic() - started, list(kinds), after, before)
    if verbose:
        tqdm.write(f"phase two: {steps} steps, held-out separation of D(R(X)) from R-passed negatives "
                   f"{before:.3f} -> {after:.3f}")
    return result.cpu().eval(), report
