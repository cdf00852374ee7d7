"""Frame-level ROC AUC and EER on UCSD Ped2, the paper's protocol.

Every one of the 2010 test frames is scored from what a live stream would have seen up to it: the
motion channel uses the previous frame only, smoothing (where a version uses it) is causal, and all
frames are ranked together. A frame's score is its most anomalous patch. Test labels are read only
here, to compute the reported figures; the threshold drawn on the plots comes from the manifest.
The per-clip min-max protocol of FFP/MNAD-style papers (which looks at future frames) is reported
beside it, labelled, for comparison only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from model import registry
from model.calibrate import clip_raw_scores, frame_peaks
from model.data import read_footage
from model.detect import scorer_for
from model.frames import encode_frames
from model.scoring import COMPONENTS, causal_mean

PAPER_MODES = ("d_r_x", "d_x", "reconstruction")  # the modes of the --json summary
PED2_TEST_CLIPS = 12
PED2_TEST_FRAMES = 2010


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


def evaluate_ped2(
    root: str | Path, weights_dir: str | Path, version: str | None = None, device: str = "cpu",
    plots_dir: str | Path | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Score all Ped2 test frames; return the report (exact --json shape under 'summary')."""
    started = time.perf_counter()
    version = version or registry.active_version(weights_dir)
    if version is None:
        raise registry.VersionNotFound(f"no published version in {weights_dir}")
    loaded = registry.load_version(weights_dir, version, device)
    scorer = scorer_for(loaded, device)
    calibration = loaded.calibration
    clips = ped2_test_clips(root)
    peaks: dict[str, list[np.ndarray]] = {mode: [] for mode in (*COMPONENTS, "fused")}
    iterator = clips
    if progress:
        from tqdm import tqdm

        iterator = tqdm(clips, desc="ped2 test clips", unit="clip")
    for clip in iterator:
        gray = read_footage(clip.folder).gray
        if len(gray) != len(clip.labels):
            raise DatasetError(f"{clip.folder}: {len(gray)} frames but {len(clip.labels)} labels")
        raw, _ = clip_raw_scores(scorer, encode_frames(gray, loaded.config))
        for mode in peaks:
            peaks[mode].append(frame_peaks(raw, mode, calibration))
    labels = np.concatenate([c.labels for c in clips])
    served = [causal_mean(p, calibration.smoothing_frames) for p in peaks[calibration.score_mode]]
    summary = {
        "dataset": "ped2",
        "version": version,
        "input_mode": loaded.config.input_mode,
        "frames": int(len(labels)),
        "scores": {mode: figures(labels, np.concatenate(peaks[mode])) for mode in PAPER_MODES},
        "seconds": round(time.perf_counter() - started, 1),
    }
    served_scores = np.concatenate(served)
    details = {
        "protocol": "frame-level, all test frames ranked together, frame = most anomalous patch, causal",
        "fused": figures(labels, np.concatenate(peaks["fused"])),
        "motion": figures(labels, np.concatenate(peaks["motion"])),
        "served": {
            "score_mode": calibration.score_mode,
            "smoothing_frames": calibration.smoothing_frames,
            **figures(labels, served_scores),
            # operating point of tau (from normal footage): what a deployment would see
            "detection_rate_at_tau": round(float((served_scores[labels == 1] > calibration.threshold).mean()), 4),
            "false_alarm_rate_at_tau": round(float((served_scores[labels == 0] > calibration.threshold).mean()), 4),
        },
        "per_clip_minmax_non_causal": {
            "note": "each clip normalised by its own min/max (uses future frames); for comparison with FFP/MNAD-style figures only",
            **figures(labels, minmax_per_clip(served)),
        },
    }
    if plots_dir is not None:
        _plot_clips(Path(plots_dir), clips, served, calibration.threshold, calibration.reject_band, version)
    return {"summary": summary, "details": details}


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
