"""Adversarial training of R and D on normal footage, the paper's stopping rule, publishing.

Each step: D learns real X -> 1, R(X~) -> 0 (and, as an option, sped-up pseudo-anomalies -> 0); then
R learns eq. (5) on X~ = X + N(0, sigma^2 I). After each epoch, on held-out normal patches:
- condition 1: R's reconstruction error ||X - R(X)||^2; the best R so far is kept;
- condition 2: D's separation, the ROC AUC of D(X) against D(R_best(X)); the D with the lowest
  held-out loss so far is kept (see StoppingRule).
Training stops once R has not improved for ``patience`` epochs and D separates at least
``separation_target``, or at ``max_epochs``. Then phase two (model/phase_two.py) retrains D alone
against the frozen best R, so that D(R(X)) scores what R made of a patch rather than whether R
touched it; the pair is calibrated on held-out normal frames and published as a new version.

``time_budget_s`` is a deadline for the whole run (reading footage, epochs, phase two and
calibration): it is checked at every step, the epochs give way to phase two and calibration at a
reserved share of it, and a run that has nothing usable when time is up fails with TimeBudgetError.

Under torchrun each process samples its own patches and DistributedDataParallel averages gradients
(gloo on CPU, nccl on GPU); rank 0 evaluates, checkpoints and publishes.

The pieces live apart: the stopping rule and the deadlines in model/stopping.py, checkpoint files in
model/checkpoints.py, reject-and-refine in model/refine.py, calibration in model/calibrate.py and the
manifest in model/manifest.py; this module runs them in order.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import registry
from model.calibrate import fit_calibration
from model.checkpoints import BestParameters, load_checkpoint, remove_checkpoints, save_checkpoint
from model.config import CalibrationConfig, ModelConfig, TrainConfig
from model.data import EncodedClip, FootageError, PatchSampler, encode_clips, footage_digest, load_normal_footage, split_holdout
from model.devices import resolve_device
from model.footage_scale import MotionSaturation, fit_input_to_footage
from model.losses import detector_loss, refiner_loss
from model.manifest import VersionManifest
from model.networks import Detector, Refiner
from model.phase_two import retrain_detector
from model.refine import drop_rejected, refine_config
from model.scoring import PatchScorer
from model.stopping import Deadlines, HoldoutFigures, StoppingRule, TimeBudgetError, holdout_figures, passed

ProgressCallback = Callable[[dict[str, Any]], None]


class TrainingCancelled(Exception):
    """Raised when the progress callback asks training to stop."""


@dataclass
class EpochRecord:
    epoch: int
    step: int
    d_loss: float
    r_loss: float
    rec_loss: float
    kl_loss: float
    holdout_reconstruction: float
    separation_auc: float
    holdout_detector_loss: float
    condition_1_improved: bool
    condition_2_met: bool
    seconds: float


@dataclass
class FitResult:
    refiner: Refiner  # the best R (condition 1): R_new of phase two
    detector: Detector
    refiner_old: Refiner  # R after epoch ``r_old_epoch`` (or the last one evaluated, if earlier)
    history: list[EpochRecord]
    sampler: PatchSampler
    holdout_sampler: PatchSampler


@dataclass
class TrainResult:
    version: str | None
    manifest: dict[str, Any]
    history: list[EpochRecord] = field(default_factory=list)


def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(
    normal_paths: list[str | Path],
    weights_dir: str | Path,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    device: str | None = None,
    resume: bool = False,
    parent_version: str | None = None,
    reject_and_refine: bool = False,
    progress: ProgressCallback | None = None,
    show_progress_bar: bool = True,
    checkpoint_dir: str | Path | None = None,
    calibration_config: CalibrationConfig | None = None,
    training_job: dict[str, Any] | None = None,
) -> TrainResult:
    """Train on normal footage, calibrate on its held-out normal frames and publish a version (rank
    0). Raises FootageError on bad footage, ConfigError when the score does not fit the input,
    TimeBudgetError when the budget ends before anything usable exists. ``training_job``: the
    service's job record, stored in the manifest as the version is published."""
    started = time.monotonic()
    model_config = model_config or ModelConfig()
    train_config = train_config or TrainConfig()
    calibration_config = calibration_config or CalibrationConfig()
    torch_device = resolve_device(device)
    if parent_version:  # fine-tuning keeps the parent's network shape and input
        model_config = registry.load_version(weights_dir, parent_version).config
    calibration_config.check_input(model_config)
    clips = load_normal_footage(list(normal_paths))
    digest = footage_digest(clips)
    input_report: dict[str, Any] = {}
    if parent_version is None and train_config.fit_input_to_footage:
        model_config, input_report = fit_input_to_footage(
            model_config, [c.gray for c in clips], float(np.median([c.fps for c in clips])), model_config.frame_height
        )
    encoded = encode_clips(clips, model_config)
    saturation = MotionSaturation()
    for clip in encoded:
        saturation.add(clip.channels)
    input_report["motion_saturated_share"] = saturation.share
    train_clips, holdout = split_holdout(encoded, train_config.holdout_fraction)
    if sum(c.frames for c in train_clips) < 2 or sum(c.frames for c in holdout) < 1:
        raise FootageError(f"{normal_paths[0]}: too little footage (need at least 3 frames)")
    checkpoint_dir = Path(checkpoint_dir or Path(weights_dir) / ".checkpoints" / f"train-{digest[:16]}")
    deadlines = Deadlines.from_budget(started, train_config)
    fitted = _fit(
        train_clips, holdout, model_config, train_config, torch_device, resume,
        parent_version, weights_dir, progress, show_progress_bar, checkpoint_dir, deadline=deadlines.epochs,
    )
    history = fitted.history
    refine_report: dict[str, Any] | None = None
    if reject_and_refine and passed(deadlines.epochs):
        refine_report = {"skipped": "the time budget ended before fine-tuning could start"}
    elif reject_and_refine:
        # what the first model rejects is judged by the whole model, phase two included
        first_detector, _ = _phase_two(fitted, train_config, torch_device, deadlines.epochs, None, False)
        before = sum(c.frames for c in train_clips)
        train_clips, dropped = drop_rejected(
            fitted.refiner, first_detector, model_config, calibration_config, train_clips, holdout, torch_device
        )
        refine_report = {"frames_before": before, "frames_dropped": len(dropped), "dropped": dropped[:1000]}
        if show_progress_bar:
            tqdm.write(f"reject-and-refine: dropped {len(dropped)} of {before} training frames, fine-tuning")
        refitted = _fit(
            train_clips, holdout, model_config, refine_config(train_config), torch_device, False,
            None, weights_dir, progress, show_progress_bar, checkpoint_dir / "refine",
            initial=(fitted.refiner, fitted.detector), deadline=deadlines.epochs,
        )
        history += refitted.history
        fitted = FitResult(refitted.refiner, refitted.detector, fitted.refiner_old, history,
                           refitted.sampler, refitted.holdout_sampler)
    rank, _ = _distributed()
    if rank != 0:
        return TrainResult(None, {}, history)
    refiner = fitted.refiner
    detector, phase_two_report = _phase_two(
        fitted, train_config, torch_device, deadlines.phase_two, progress, show_progress_bar
    )
    scorer = PatchScorer(refiner, detector, model_config, device="cpu")
    calibration = fit_calibration(scorer, holdout, calibration_config)
    last = history[-1] if history else None
    manifest = VersionManifest(
        model_config=model_config,
        train_config=train_config,
        calibration_config=calibration_config,
        calibration=calibration,
        parent_version=parent_version,
        reject_and_refine=refine_report,
        phase_two=phase_two_report,
        input=input_report,
        training_footage={
            "sha256": digest,
            "clips": len(clips),
            "frames": int(sum(c.gray.shape[0] for c in clips)),
            "train_frames": int(sum(c.frames for c in train_clips)),
            "holdout_frames": int(sum(c.frames for c in holdout)),
            "names": [c.name for c in clips][:100],
        },
        validation={
            "holdout_reconstruction": min(h.holdout_reconstruction for h in history) if history else None,
            "separation_auc": max(h.separation_auc for h in history) if history else None,
            "epochs": last.epoch if last else 0,
            "seconds": round(sum(h.seconds for h in history), 1),
            "total_seconds": round(time.monotonic() - started, 1),
            "normal_frame_quantiles": calibration.normal_frame_quantiles,
            "false_alarm_rate_second_slice": calibration.holdout_check,
        },
        history=[asdict(h) for h in history],
        training_job=training_job,
    )
    version = registry.publish(weights_dir, refiner, detector, manifest)
    remove_checkpoints(checkpoint_dir)
    return TrainResult(version, registry.read_manifest(weights_dir, version), history)


def _phase_two(
    fitted: FitResult, cfg: TrainConfig, device: torch.device, deadline: float | None,
    progress: ProgressCallback | None, verbose: bool,
) -> tuple[Detector, dict[str, Any] | None]:
    """D after phase two (or as fitted, when ``phase_two_steps`` is 0) and phase two's report."""
    if cfg.phase_two_steps == 0:
        return fitted.detector, None
    detector, report = retrain_detector(
        fitted.refiner, fitted.refiner_old, fitted.detector, fitted.sampler, fitted.holdout_sampler, cfg,
        device, deadline, _phase_two_progress(progress), verbose,
    )
    return detector, report.to_dict()


def _phase_two_progress(progress: ProgressCallback | None) -> Callable[[int, int], None] | None:
    """Phase two's steps as progress events (a job's status shows them; a callback may cancel)."""
    if progress is None:
        return None

    def report(step: int, total: int) -> None:
        if step % 50 == 0 or step == total:
            progress({"phase": "phase_two", "phase_two_step": step, "phase_two_steps": total})

    return report


def _fit(
    train_clips: list[EncodedClip],
    holdout: list[EncodedClip],
    model_config: ModelConfig,
    cfg: TrainConfig,
    device: torch.device,
    resume: bool,
    parent_version: str | None,
    weights_dir: str | Path,
    progress: ProgressCallback | None,
    show_progress_bar: bool,
    checkpoint_dir: Path,
    initial: tuple[Refiner, Detector] | None = None,
    deadline: float | None = None,
) -> FitResult:
    rank, world = _distributed()
    torch.manual_seed(cfg.seed + rank)
    if initial is not None:
        refiner, detector = copy.deepcopy(initial[0]), copy.deepcopy(initial[1])
    elif parent_version:
        parent = registry.load_version(weights_dir, parent_version)
        refiner, detector = parent.refiner, parent.detector
    else:
        refiner, detector = Refiner(model_config), Detector(model_config)
    refiner.to(device).train()
    detector.to(device).train()
    opt_r = torch.optim.Adam(refiner.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(detector.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
    sampler = PatchSampler(train_clips, model_config.patch_size, cfg.motion_sampling, cfg.seed + 1000 * rank)
    holdout_sampler = PatchSampler(holdout, model_config.patch_size, cfg.motion_sampling, cfg.seed + 7)
    holdout_patches = holdout_sampler.sample(cfg.holdout_patches).to(device)
    holdout_pseudo = _pseudo_anomalies(holdout_sampler, cfg, cfg.holdout_patches).to(device)

    best_r = copy.deepcopy(refiner.state_dict())
    best_d = copy.deepcopy(detector.state_dict())
    old_r: dict[str, torch.Tensor] | None = None  # R after epoch r_old_epoch (phase two's R_old)
    rule = StoppingRule(cfg.patience, cfg.separation_target)
    start_epoch, step = 0, 0
    history: list[EpochRecord] = []
    networks = {"refiner": refiner, "detector": detector}
    if resume and rank == 0:
        restored = load_checkpoint(checkpoint_dir, networks, {"refiner": opt_r, "detector": opt_d})
        if restored is not None:
            meta, kept = restored
            rule = StoppingRule(cfg.patience, cfg.separation_target, **meta["rule"])
            start_epoch, step = meta["epoch"], meta["step"]
            if show_progress_bar:
                tqdm.write(f"resuming after epoch {start_epoch} from {checkpoint_dir}")
            history = [EpochRecord(**h) for h in meta["history"]]
            best_r, best_d, old_r = kept.refiner, kept.detector, kept.refiner_old
    if world > 1:
        for module in (refiner, detector):
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, 0)
        start_epoch_t = torch.tensor([start_epoch, step])
        dist.broadcast(start_epoch_t, 0)
        start_epoch, step = int(start_epoch_t[0]), int(start_epoch_t[1])
        ddp_r: torch.nn.Module = DistributedDataParallel(refiner)
        ddp_d: torch.nn.Module = DistributedDataParallel(detector)
    else:
        ddp_r, ddp_d = refiner, detector

    steps_per_epoch = max(1, cfg.patches_per_epoch // (cfg.batch_size * world))
    started = time.monotonic()
    for epoch in range(start_epoch + 1, cfg.max_epochs + 1):
        epoch_start = time.monotonic()
        sums = {"d": 0.0, "r": 0.0, "rec": 0.0, "kl": 0.0}
        done = 0
        bar = tqdm(
            range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.max_epochs}", unit="step",
            disable=not show_progress_bar or rank != 0, leave=False,
        )
        for _ in bar:
            if passed(deadline):
                if step == 0:
                    raise TimeBudgetError(
                        f"the time budget of {cfg.time_budget_s:g} s ended before the first training step "
                        f"(reading and encoding the footage took most of it): give a larger budget"
                    )
                break  # the deadline: evaluate what this epoch reached, then stop
            x = sampler.sample(cfg.batch_size).to(device, non_blocking=True)
            pseudo = _pseudo_anomalies(sampler, cfg).to(device, non_blocking=True)
            noisy = x + cfg.noise_sigma * torch.randn_like(x)
            refined, mu, logvar = ddp_r(noisy)
            logits = ddp_d(torch.cat([x, refined.detach(), pseudo]))
            loss_d = detector_loss(logits[: len(x)], logits[len(x) :])
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # D sees the same real+refined(+pseudo) batch as in its own step: with batch norm, a
            # refined-only batch would be normalised differently and D fooled by the statistics alone.
            refined_logits = ddp_d(torch.cat([x, refined, pseudo]))[len(x) : 2 * len(x)]
            loss_r, terms = refiner_loss(
                refined_logits, x, refined, mu, logvar, cfg.lambda_rec, cfg.lambda_kl
            )
            opt_r.zero_grad(set_to_none=True)
            loss_r.backward()
            opt_r.step()
            opt_d.zero_grad(set_to_none=True)  # R's step also filled D's gradients
            step += 1
            done += 1
            sums["d"] += loss_d.item()
            sums["r"] += loss_r.item()
            sums["rec"] += terms["rec"]
            sums["kl"] += terms["kl"]
            bar.set_postfix(d=f"{loss_d.item():.3f}", r=f"{loss_r.item():.3f}", rec=f"{terms['rec']:.4f}")
        reconstruction = holdout_figures(refiner, detector, holdout_patches).reconstruction
        improved = rule.observe_reconstruction(reconstruction)
        if improved:
            best_r = copy.deepcopy(refiner.state_dict())
        d_figures = _detector_against(best_r, detector, model_config, holdout_patches, holdout_pseudo, device)
        separation = d_figures.separation
        if rule.observe_detector(separation, d_figures.detector_loss):
            best_d = copy.deepcopy(detector.state_dict())
        if epoch == cfg.r_old_epoch or old_r is None:
            old_r = copy.deepcopy(refiner.state_dict())
        done = max(1, done)
        record = EpochRecord(
            epoch=epoch, step=step,
            d_loss=sums["d"] / done, r_loss=sums["r"] / done,
            rec_loss=sums["rec"] / done, kl_loss=sums["kl"] / done,
            holdout_reconstruction=reconstruction, separation_auc=separation,
            holdout_detector_loss=d_figures.detector_loss,
            condition_1_improved=improved, condition_2_met=rule.separated,
            seconds=time.monotonic() - epoch_start,
        )
        history.append(record)
        elapsed = time.monotonic() - started
        if rank == 0:
            if show_progress_bar:
                tqdm.write(
                    f"epoch {epoch}: D {record.d_loss:.3f} R {record.r_loss:.3f} | cond1 held-out rec "
                    f"{reconstruction:.5f}{' (best)' if improved else ''} | cond2 separation "
                    f"{separation:.3f} (best {rule.best_separation:.3f}, target {cfg.separation_target}), "
                    f"D held-out loss {d_figures.detector_loss:.4f}{' (best)' if d_figures.detector_loss == rule.best_detector_loss else ''}"
                )
            save_checkpoint(
                checkpoint_dir, networks, {"refiner": opt_r, "detector": opt_d},
                {"epoch": epoch, "step": step, "history": [asdict(h) for h in history], "rule": rule.state()},
                BestParameters(best_r, best_d, old_r),
            )
            if progress is not None:
                epochs_left = cfg.max_epochs - epoch
                left = max(0.0, deadline - time.monotonic()) if deadline is not None else math.inf
                eta = min(epochs_left * elapsed / max(1, epoch - start_epoch), left)
                progress({**asdict(record), "max_epochs": cfg.max_epochs, "eta_s": round(eta, 1)})
        if rule.should_stop or passed(deadline):
            break

    refiner_old = Refiner(model_config)
    refiner_old.load_state_dict(old_r if old_r is not None else best_r)
    refiner.load_state_dict(best_r)
    detector.load_state_dict(best_d)
    if not passed(deadline):
        _polish_detector(refiner, detector, sampler, holdout_patches, holdout_pseudo, cfg, device,
                         steps_per_epoch, show_progress_bar and rank == 0)
    return FitResult(refiner.cpu().eval(), detector.cpu().eval(), refiner_old.eval(), history, sampler,
                     holdout_sampler)


def _pseudo_anomalies(sampler: PatchSampler, cfg: TrainConfig, per: int | None = None) -> torch.Tensor:
    """The optional sped-up negatives for D (none in the paper's setting or without motion):
    ``pseudo_anomaly_share`` of ``per`` (default: one batch)."""
    count = int(round((per or cfg.batch_size) * cfg.pseudo_anomaly_share))
    if count == 0 or not sampler.has_motion:
        channels = sampler.clips[0].channels.shape[1]
        return torch.empty(0, channels, sampler.patch_size, sampler.patch_size)
    return sampler.sample_sped_up(count, cfg.pseudo_speedup)


def _detector_against(
    best_r: dict[str, torch.Tensor], detector: Detector, config: ModelConfig,
    patches: torch.Tensor, negatives: torch.Tensor, device: torch.device,
) -> HoldoutFigures:
    reference = Refiner(config).to(device)
    reference.load_state_dict(best_r)
    return holdout_figures(reference, detector, patches, negatives)


def _polish_detector(
    refiner: Refiner, detector: Detector, sampler: PatchSampler, holdout_patches: torch.Tensor,
    holdout_pseudo: torch.Tensor, cfg: TrainConfig, device: torch.device, steps_per_epoch: int,
    verbose: bool,
) -> None:
    """Train D against the frozen best R; keep the D with the lowest held-out loss."""
    if cfg.detector_polish_epochs <= 0:
        return
    refiner.eval()
    optimizer = torch.optim.Adam(detector.parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
    best_loss = holdout_figures(refiner, detector, holdout_patches, holdout_pseudo).detector_loss
    best_d = copy.deepcopy(detector.state_dict())
    for epoch in range(cfg.detector_polish_epochs):
        detector.train()
        for _ in range(steps_per_epoch):
            x = sampler.sample(cfg.batch_size).to(device)
            pseudo = _pseudo_anomalies(sampler, cfg).to(device)
            with torch.no_grad():
                refined = refiner(x + cfg.noise_sigma * torch.randn_like(x))[0]
            logits = detector(torch.cat([x, refined, pseudo]))
            loss = detector_loss(logits[: len(x)], logits[len(x) :])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        figures = holdout_figures(refiner, detector, holdout_patches, holdout_pseudo)
        if verbose:
            tqdm.write(f"D polish {epoch + 1}/{cfg.detector_polish_epochs}: separation "
                       f"{figures.separation:.3f}, held-out D loss {figures.detector_loss:.4f}")
        if figures.detector_loss < best_loss:
            best_loss = figures.detector_loss
            best_d = copy.deepcopy(detector.state_dict())
    detector.load_state_dict(best_d)
