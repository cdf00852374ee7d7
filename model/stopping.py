"""When training stops: the paper's stopping rule on held-out figures, and the time budget.

The paper: save R when its reconstruction is best, keep training until D separates well, keep the
best parameters of each. Made concrete by StoppingRule on the figures ``holdout_figures`` measures on
held-out normal patches after every epoch. ``time_budget_s`` is a deadline for the whole run, split
by Deadlines into the share the epochs may use and what phase two and calibration keep.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from model.config import TrainConfig
from model.losses import detector_loss
from model.networks import Detector, Refiner

# Shares of the time budget kept for what follows the epochs: phase two and calibration (only
# calibration when phase two is off). A budget is a deadline, so the epochs give way early.
PHASE_TWO_BUDGET_SHARE = 0.15
CALIBRATION_BUDGET_SHARE = 0.05


class TimeBudgetError(ValueError):
    """The time budget ended before any R was evaluated: nothing usable to publish."""


@dataclass
class Deadlines:
    """When (time.monotonic()) the epochs and phase two must have ended; None = no budget."""

    epochs: float | None
    phase_two: float | None

    @classmethod
    def from_budget(cls, started: float, cfg: TrainConfig) -> "Deadlines":
        budget = cfg.time_budget_s
        after_epochs = (PHASE_TWO_BUDGET_SHARE if cfg.phase_two_steps else 0.0) + CALIBRATION_BUDGET_SHARE
        return cls(started + budget * (1 - after_epochs), started + budget * (1 - CALIBRATION_BUDGET_SHARE))


def passed(deadline: float | None) -> bool:
    """True once ``deadline`` (time.monotonic(), None = none) has come."""
    return deadline is not None and time.monotonic() >= deadline


@dataclass
class StoppingRule:
    """The paper's stopping rule, made concrete.

    Condition 1: R is kept whenever its held-out reconstruction error improves.
    Condition 2: D separates real from refined held-out patches: its separation (ROC AUC of D(X) vs
    D(R_best(X))) reaches the target. D is kept whenever its held-out loss improves: the AUC saturates
    at 1.0 within an epoch or two, so it cannot tell a better D from the first one that separates.
    Stop once R has not improved for ``patience`` epochs and D's best separation reaches the target.
    """

    patience: int
    separation_target: float
    best_reconstruction: float = math.inf
    best_separation: float = -1.0
    best_detector_loss: float = math.inf
    stale_epochs: int = 0

    def observe_reconstruction(self, reconstruction: float) -> bool:
        """True when R improved (keep its parameters)."""
        if reconstruction < self.best_reconstruction:
            self.best_reconstruction, self.stale_epochs = reconstruction, 0
            return True
        self.stale_epochs += 1
        return False

    def observe_detector(self, separation: float, detector_loss: float) -> bool:
        """True when D improved (keep its parameters)."""
        self.best_separation = max(self.best_separation, separation)
        if detector_loss < self.best_detector_loss:
            self.best_detector_loss = detector_loss
            return True
        return False

    @property
    def separated(self) -> bool:
        return self.best_separation >= self.separation_target

    @property
    def should_stop(self) -> bool:
        return self.stale_epochs >= self.patience and self.separated

    def state(self) -> dict[str, float]:
        """What a checkpoint keeps of the rule (StoppingRule(patience, target, **state) restores it)."""
        return {"best_reconstruction": self.best_reconstruction, "best_separation": self.best_separation,
                "best_detector_loss": self.best_detector_loss, "stale_epochs": self.stale_epochs}


@dataclass
class HoldoutFigures:
    reconstruction: float  # per-pixel MSE of R on held-out normal patches
    separation: float  # ROC AUC of D(X) against D(R(X)) (and pseudo-anomalies, when used)
    detector_loss: float  # D's training objective on the same held-out patches; lower = better D


@torch.inference_mode()
def holdout_figures(
    refiner: Refiner, detector: Detector, patches: torch.Tensor, negatives: torch.Tensor | None = None
) -> HoldoutFigures:
    """R's and D's figures on held-out patches, in eval mode."""
    was_training = refiner.training, detector.training
    refiner.eval()
    detector.eval()
    refined = torch.cat([refiner(chunk)[0] for chunk in patches.split(2048)])
    reconstruction = float((refined - patches).pow(2).mean())
    fakes = refined if negatives is None or len(negatives) == 0 else torch.cat([refined, negatives])
    real_logits = torch.cat([detector(chunk) for chunk in patches.split(2048)])
    fake_logits = torch.cat([detector(chunk) for chunk in fakes.split(2048)])
    loss = float(detector_loss(real_logits, fake_logits))
    real, fake = real_logits.float().cpu().numpy(), fake_logits.float().cpu().numpy()
    labels = np.concatenate([np.ones(len(real)), np.zeros(len(fake))])
    separation = float(roc_auc_score(labels, np.concatenate([real, fake])))
    refiner.train(was_training[0])
    detector.train(was_training[1])
    return HoldoutFigures(reconstruction, separation, loss)
