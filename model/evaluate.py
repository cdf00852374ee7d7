"""Frame-level ROC AUC and EER on UCSD Ped2, the paper's protocol.

Every one of the 2010 test frames is scored from what a live stream would have seen up to it: the
motion channel uses the previous frame only, smoothing (where a version uses it) is causal, and all
frames are ranked together. A frame's score is its most anomalous patch. Test labels are read only
here, to compute the reported figures; the threshold drawn on the plots comes from the manifest.
The per-clip min-max protocol of FFP/MNAD-style papers (which looks at future frames) is reported
beside it, labelled, for comparison only.

With ``inject_kind="appearance"`` a second test set is scored the same way: the normal runs of the test
clips, clean and with foreign objects pasted in (model/inject.py), which measures what the served
score sees of an anomaly that is only in appearance; the motion score is reported beside every
figure as the no-network baseline.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from model import inject, registry
from model.calibrate import clip_raw_scores, frame_peaks
from model.data import read_footage
from model.offline import scorer_for
from model.footage_scale import MotionSaturation
from model.scoring import PatchScorer, causal_mean

PAPER_MODES = ("d_r_x", "d_x", "reconstruction")  # the modes of the --json summary
PED2_TEST_CLIPS = 12
PED2_TEST_FRAMES = 2010
PED2_FPS = 10.0  # the dataset's README
BASELINE_MODE = "motion"  # the no-network score: the input's own motion energy


class DatasetError(ValueError):
    """The dataset folder is missing or not laid out as expected."""


@dataclass
class TestClip:
    name: str
    folder: Path
    labels: np.ndarray  # (T,) 1 = abnormal


def ped2_test_clips(root: str | Path) -> list[TestClip]:
    root = Path(root)
    labels_file = root / "labels" / "test_frame_labels.json"
    if not labels_file.is_file():
        raise DatasetError(f"{labels_file}: not found (expected the UCSD Ped2 layout, see its README)")
    videos = json.loads(labels_file.read_text())["videos"]
    clips = [TestClip(name, root / "testing" / "frames" / name, np.asarray(v, dtype=np.int64)) for name, v in sorted(videos.items())]
    for clip in clips:
        if not clip.folder.is_dir():
            raise DatasetError(f"{clip.folder}: test clip folder missing")
    return clips


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> float:
    """The rate where false positives equal misses, interpolated along the ROC curve."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    diff = fpr - fnr
    i = int(np.argmax(diff >= 0))
    if i == 0:
        return float(fpr[0])
    # linear interpolation between points i-1 (fpr < fnr) and i (fpr >= fnr)
    t = -diff[i - 1] / (diff[i] - diff[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def figures(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {"auc": round(float(roc_auc_score(labels, scores)), 4), "eer": round(equal_error_rate(labels, scores), 4)}


def minmax_per_clip(scores: list[np.ndarray]) -> np.ndarray:
    """The non-causal comparison protocol: each clip's scores scaled by its own min and max."""
    return np.concatenate([(s - s.min()) / max(s.max() - s.min(), 1e-12) for s in scores])


def stream_peaks(
    scorer: PatchScorer, channels: np.ndarray, loaded: registry.LoadedVersion, modes: Sequence[str]
) -> dict[str, np.ndarray]:
    """One stream's unsmoothed frame scores of each mode from its encoded ``channels`` (encoded as
    one stream: the first frame has no predecessor), exactly as every evaluation here scores a clip."""
    raw, _ = clip_raw_scores(scorer, channels)
    return {mode: frame_peaks(raw, mode, loaded.calibration) for mode in modes}


@dataclass(frozen=True)
class Playback:
    """The test footage as another camera would deliver it: resized to ``size`` (width, height) and/or
    every ``frame_step``-th frame (a lower frame rate). The model's own settings stay as they are."""

    size: tuple[int, int] | None = None
    frame_step: int = 1

    def __post_init__(self) -> None:
        if self.frame_step < 1:
            raise ValueError(f"frame step must be at least 1, got {self.frame_step}")
        if self.size is not None and min(self.size) < 8:
            raise ValueError(f"playback size must be at least 8x8, got {self.size}")

    @property
    def fps(self) -> float:
        return PED2_FPS / self.frame_step

    def apply(self, gray: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gray, labels = gray[:: self.frame_step], labels[:: self.frame_step]
        if self.size is not None and self.size != (gray.shape[2], gray.shape[1]):
            gray = np.stack([cv2.resize(frame, self.size, interpolation=cv2.INTER_LINEAR) for frame in gray])
        return gray, labels

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size) if self.size else None, "frame_step": self.frame_step, "fps": self.fps}


def evaluate_ped2(
    root: str | Path, weights_dir: str | Path, version: str | None = None, device: str = "cpu",
    plots_dir: str | Path | None = None, progress: bool = True, inject_kind: str | None = None,
    inject_seed: int = 0, inject_copies: int = 1, playback: Playback | None = None,
    clip_names: Sequence[str] | None = None, encoding: str = "auto", precision: str = "float32",
) -> dict[str, Any]:
    """Score all Ped2 test frames; return the report (exact --json shape under 'summary').

    ``playback`` changes how the test footage arrives (size, frame rate) to check that the figures do
    not depend on them; the default is Ped2 as it is. ``clip_names`` scores only those test clips (a
    quick check; the protocol's figures are over all 12). ``encoding``: who encodes the frames
    (model/encoding.py ENCODINGS; auto: torch on CUDA, OpenCV on the CPU).

    ``precision``: the networks' (VAD_PRECISION's values; checked at load like the server's).

    ``inject_kind="appearance"`` adds the injected set's figures (module docstring) under
    summary["injected"]."""
    started = time.perf_counter()
    if inject_kind is not None and inject_kind not in inject.INJECT_KINDS:
        raise ValueError(f"unknown injection {inject_kind!r} (one of {inject.INJECT_KINDS})")
    version = version or registry.active_version(weights_dir)
    if version is None:
        raise registry.VersionNotFound(f"no published version in {weights_dir}")
    loaded = registry.load_version(weights_dir, version, device)
    scorer = scorer_for(loaded, device, encoding=encoding, precision=precision)
    calibration = loaded.calibration
    playback = playback or Playback()
    clips = ped2_test_clips(root)
    if clip_names:
        unknown = sorted(set(clip_names) - {c.name for c in clips})
        if unknown:
            raise DatasetError(f"{root}: no test clips named {unknown} (there are {[c.name for c in clips]})")
        clips = [c for c in clips if c.name in set(clip_names)]
    # the reported modes and the served one, whatever it is
    modes = tuple(dict.fromkeys((*PAPER_MODES, BASELINE_MODE, "fused", calibration.score_mode)))
    peaks: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    normal_footage: list[tuple[np.ndarray, np.ndarray]] = []  # (gray, labels) of clips with normal frames
    saturation = MotionSaturation()
    played: list[TestClip] = []
    for clip in _progress(clips, progress, "ped2 test clips", "clip"):
        gray = read_footage(clip.folder).gray
        if len(gray) != len(clip.labels):
            raise DatasetError(f"{clip.folder}: {len(gray)} frames but {len(clip.labels)} labels")
        gray, clip_labels = playback.apply(gray, clip.labels)
        played.append(TestClip(clip.name, clip.folder, clip_labels))
        channels = scorer.encode(gray, fps=playback.fps).cpu().numpy()
        saturation.add(channels)
        for mode, scores in stream_peaks(scorer, channels, loaded, modes).items():
            peaks[mode].append(scores)
        if inject_kind is not None and (clip_labels == 0).any():
            normal_footage.append((gray, clip_labels))
    clips = played
    labels = np.concatenate([c.labels for c in clips])
    served = [causal_mean(p, calibration.smoothing_frames) for p in peaks[calibration.score_mode]]
    served_scores = np.concatenate(served)
    baseline = np.concatenate([causal_mean(p, calibration.smoothing_frames) for p in peaks[BASELINE_MODE]])
    served_figures = {
        "score_mode": calibration.score_mode,
        **figures(labels, served_scores),
        # operating point of tau (from normal footage): what a deployment would see
        "detection_rate_at_tau": round(float((served_scores[labels == 1] > calibration.threshold).mean()), 4),
        "false_alarm_rate_at_tau": round(float((served_scores[labels == 0] > calibration.threshold).mean()), 4),
    }
    summary = {
        "dataset": "ped2",
        "version": version,
        "input_mode": loaded.config.input_mode,
        # what the networks ran in (VAD_PRECISION; a precision refused at load runs float32)
        "precision": scorer.engine.precision if scorer.engine else "float32",
        "frames": int(len(labels)),
        "scores": {mode: figures(labels, np.concatenate(peaks[mode])) for mode in PAPER_MODES},
        "served": served_figures,
        # the flow-speed / frame-difference heuristic with the served causal window: no network
        "baselines": {BASELINE_MODE: figures(labels, baseline)},
        # moving values of the motion channel at full scale: a channel that saturates ranks nothing
        "motion_saturated_share": saturation.share,
        "playback": playback.to_dict(),
    }
    details: dict[str, Any] = {
        "protocol": "frame-level, all test frames ranked together, frame = most anomalous patch, causal",
        "fused": figures(labels, np.concatenate(peaks["fused"])),
        "motion": figures(labels, np.concatenate(peaks[BASELINE_MODE])),
        "served": {**served_figures, "smoothing_frames": calibration.smoothing_frames},
        "per_clip_minmax_non_causal": {
            "note": "each clip normalised by its own min/max (uses future frames); for comparison with FFP/MNAD-style figures only",
            **figures(labels, minmax_per_clip(served)),
        },
    }
    if inject_kind is not None:
        runs = inject.inject_appearance(normal_footage, inject_seed, inject_copies)
        if not runs:
            raise DatasetError(f"{root}: no run of {inject.MIN_RUN} normal test frames to inject objects into")
        names = [c.name for c in clips if (c.labels == 0).any()]
        summary["injected"], details["injected_objects"] = _injected_figures(
            scorer, loaded, runs, names, inject_seed, inject_copies, progress, playback.fps)
        if plots_dir is not None:
            _plot_injected_examples(Path(plots_dir), runs, names, version)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if plots_dir is not None:
        _plot_clips(Path(plots_dir), clips, served, calibration.threshold, calibration.reject_band, version)
    return {"summary": summary, "details": details}


def _progress(items: Sequence[Any], shown: bool, description: str, unit: str) -> Iterable[Any]:
    if not shown:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit=unit)


def _injected_figures(
    scorer: PatchScorer, loaded: registry.LoadedVersion, runs: list[inject.NormalRun], clip_names: list[str],
    seed: int, copies: int, progress: bool, fps: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Served and motion scores of every run's clean and injected streams -> (the summary's
    "injected" figures, one description per object). Clean frames: all frames of the clean copies
    and the object-free frames of the injected ones (the frames right after an object leaves carry
    its smoothed score, so they count against the false alarms: a conservative measure)."""
    calibration = loaded.calibration
    modes = tuple(dict.fromkeys((calibration.score_mode, BASELINE_MODE)))
    scores: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    injected: list[np.ndarray] = []
    clean_copies = sum(len(run.clean) for run in runs)  # the streams' frames start with them
    streams = [(run.clean, np.zeros(len(run.clean), bool)) for run in runs]
    streams += [(copy.frames, copy.injected) for run in runs for copy in run.copies]
    for gray, mask in _progress(streams, progress, "injected set streams", "stream"):
        channels = scorer.encode(gray, fps=fps).cpu().numpy()
        for mode, peaks in stream_peaks(scorer, channels, loaded, modes).items():
            scores[mode].append(causal_mean(peaks, calibration.smoothing_frames))
        injected.append(mask)
    labels = np.concatenate(injected)
    served = np.concatenate(scores[calibration.score_mode])
    flagged = served > calibration.threshold
    summary = {
        "kind": "appearance",
        "seed": seed,
        "copies_per_run": copies,
        "runs": len(runs),
        "objects": sum(len(run.copies) for run in runs),
        "frames": int(labels.sum()),
        "clean_frames": int((~labels).sum()),
        "score_mode": calibration.score_mode,
        "detected_at_tau": round(float(flagged[labels].mean()), 4),
        "clean_false_alarms": round(float(flagged[~labels].mean()), 4),
        # the clean copies alone: without the frames just after an object
        "clean_copy_false_alarms": round(float(flagged[:clean_copies].mean()), 4),
        "auc": figures(labels, served)["auc"],
        "motion_auc": figures(labels, np.concatenate(scores[BASELINE_MODE]))["auc"],
    }
    objects = [
        {"clip": clip_names[run.clip], "run": [run.start, run.stop], **copy.spec.to_dict()}
        for run in runs for copy in run.copies
    ]
    return summary, objects


def _plot_injected_examples(
    folder: Path, runs: list[inject.NormalRun], clip_names: list[str], version: str, count: int = 4
) -> None:
    """Up to ``count`` objects (spread over the set), each at the middle of its run, boxed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    pasted = [(run, copy) for run in runs for copy in run.copies]
    picks = [pasted[i] for i in np.unique(np.linspace(0, len(pasted) - 1, count).round().astype(int))]
    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(picks), figsize=(4 * len(picks), 3.5), squeeze=False)
    for ax, (run, copy) in zip(axes[0], picks):
        spec = copy.spec
        t = spec.first + spec.length // 2
        top, left = spec.position(t)
        ax.imshow(copy.frames[t], cmap="gray", vmin=0, vmax=255)
        ax.add_patch(Rectangle((left - 3, top - 3), spec.width + 6, spec.height + 6, fill=False,
                               edgecolor="tab:red", lw=1))
        ax.set_title(f"clip {clip_names[run.clip]} frame {run.start + t}: {spec.shape}, {spec.texture.kind}\n"
                     f"{spec.width}x{spec.height} px, {'soft' if spec.soft_edge else 'hard'} edge, "
                     f"{spec.speed:.1f} px/frame", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"Injected appearance anomalies (Ped2 normal frames, {version})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(folder / "ped2_injected_examples.png", dpi=100)
    plt.close(fig)


def _plot_clips(
    folder: Path, clips: list[TestClip], scores: list[np.ndarray], threshold: float,
    band: tuple[float, float], version: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for clip, curve in zip(clips, scores):
        fig, ax = plt.subplots(figsize=(8, 3))
        frames = np.arange(len(curve))
        abnormal = clip.labels.astype(bool)
        ax.fill_between(frames, 0, 1, where=abnormal, transform=ax.get_xaxis_transform(),
                        color="tab:red", alpha=0.15, step="mid", label="ground truth abnormal")
        ax.axhspan(band[0], band[1], color="tab:orange", alpha=0.2, label="reject band")
        ax.plot(frames, curve, color="tab:blue", lw=1.2, label="frame score")
        ax.axhline(threshold, color="black", ls="--", lw=1, label="tau")
        ax.set_xlabel("frame")
        ax.set_ylabel("anomaly score")
        ax.set_title(f"Ped2 test clip {clip.name} ({version})")
        ax.legend(loc="upper left", fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"ped2_test_{clip.name}.png", dpi=100)
        plt.close(fig)
