"""Figures on hand-made scores, and a Ped2 smoke test with the bundled default version."""

from pathlib import Path

import numpy as np
import pytest

from model import registry
from model.evaluate import Playback, equal_error_rate, evaluate_ped2, figures, minmax_per_clip, ped2_test_clips
from tests.conftest import PED2_ROOT


def test_perfect_and_inverted_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert figures(labels, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])) == {"auc": 1.0, "eer": 0.0}
    assert figures(labels, -np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])) == {"auc": 0.0, "eer": 1.0}


def test_eer_matches_a_brute_force_search() -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(400), np.ones(600)].astype(int)
    scores = np.r_[rng.normal(0, 1, 400), rng.normal(1.5, 1, 600)]
    best = min(
        (abs(((scores > t) & (labels == 0)).sum() / 400 - ((scores <= t) & (labels == 1)).sum() / 600),
         ((scores > t) & (labels == 0)).sum() / 400)
        for t in np.sort(scores)
    )[1]
    assert equal_error_rate(labels, scores) == pytest.approx(best, abs=0.005)
    # two unit-variance normals 1.5 apart: EER = Phi(-0.75) = 0.2266
    assert equal_error_rate(labels, scores) == pytest.approx(0.2266, abs=0.03)


def test_minmax_is_per_clip() -> None:
    out = minmax_per_clip([np.array([1.0, 3.0]), np.array([10.0, 20.0, 30.0])])
    assert out.tolist() == [0.0, 1.0, 0.0, 0.5, 1.0]


@pytest.mark.skipif(not PED2_ROOT.is_dir(), reason=f"UCSD Ped2 not found at {PED2_ROOT} (see its README)")
def test_ped2_smoke_bundled_default_separates_test_clip_01() -> None:
    """Clip 01 (180 frames, frames 60..179 abnormal: a cyclist): abnormal frames must score higher."""
    from model.offline import detect_file

    if registry.active_version(registry.BUNDLED_WEIGHTS_DIR) is None:
        pytest.skip("no bundled default version in weights/")
    clips = {c.name: c for c in ped2_test_clips(PED2_ROOT)}
    assert len(clips) == 12 and sum(len(c.labels) for c in clips.values()) == 2010
    clip = clips["01"]
    result = detect_file(clip.folder, registry.BUNDLED_WEIGHTS_DIR, include_maps=False)
    scores = np.array([f["score"] for f in result["frames"]])
    assert len(scores) == len(clip.labels)
    labels = clip.labels.astype(bool)
    assert figures(clip.labels, scores)["auc"] > 0.8
    flagged = np.array([f["anomalous"] for f in result["frames"]])
    assert flagged[labels].mean() > 0.5 > flagged[~labels].mean()


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    from model.evaluate import DatasetError

    with pytest.raises(DatasetError, match="test_frame_labels.json"):
        ped2_test_clips(tmp_path)


def _ped2_like(root: Path) -> Path:
    """A Ped2-laid-out folder of small synthetic JPEG frames: clip 01 has a 45-frame normal run then
    15 abnormal frames (a bright fast block), clip 02 is 40 normal frames."""
    import json

    import cv2

    from tests.conftest import synthetic_frames

    labels = {"01": [0] * 45 + [1] * 15, "02": [0] * 40}
    for seed, (name, clip_labels) in enumerate(labels.items()):
        anomaly_from = clip_labels.index(1) if 1 in clip_labels else None
        folder = root / "testing" / "frames" / name
        folder.mkdir(parents=True)
        for i, frame in enumerate(synthetic_frames(len(clip_labels), seed=seed, anomaly_from=anomaly_from)):
            cv2.imwrite(str(folder / f"{i:03d}.jpg"), frame)
    (root / "labels").mkdir()
    (root / "labels" / "test_frame_labels.json").write_text(json.dumps({"videos": labels}))
    return root


def _tiny_untrained_version(weights: Path) -> None:
    """The tests' tiny model with initial weights and a hand-set calibration: the figures'
    values do not matter here, only that every key is computed (a served network score, not motion)."""
    import torch

    from model.config import CalibrationConfig, TrainConfig
    from model.manifest import VersionManifest
    from model.networks import Detector, Refiner
    from model.scoring import Calibration
    from tests.conftest import tiny_model_config

    config = tiny_model_config()
    torch.manual_seed(0)
    names = ("d_r_x", "d_x", "reconstruction", "motion")
    calibration = Calibration(
        score_mode="fused", threshold=0.0, reject_band=(-0.5, 0.5), smoothing_frames=3,
        component_center={n: 0.0 for n in names}, component_scale={n: 1.0 for n in names},
        map_width=0.2, false_alarm_rate=0.01,
    )
    registry.publish(weights, Refiner(config), Detector(config),
                     VersionManifest(config, TrainConfig(), CalibrationConfig(smoothing_frames=3), calibration))


def test_eval_json_has_served_baseline_and_injected_figures(tmp_path: Path, capsys) -> None:
    import json

    from model.cli import main

    root = _ped2_like(tmp_path / "ped2")
    weights, out, plots = tmp_path / "weights", tmp_path / "eval.json", tmp_path / "plots"
    _tiny_untrained_version(weights)
    code = main(["eval", "--root", str(root), "--weights", str(weights), "--json", str(out), "--plots", str(plots),
                 "--inject", "appearance", "--inject-seed", "1", "--record"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "baseline: motion (no network)" in printed and "Injected appearance anomalies" in printed
    summary = json.loads(out.read_text())
    for key in ("dataset", "version", "input_mode", "frames", "scores", "seconds"):  # the keys it always had
        assert key in summary
    assert summary["frames"] == 100

    def rate(value: float) -> bool:
        return isinstance(value, float) and 0 <= value <= 1

    served = summary["served"]
    assert set(served) == {"score_mode", "auc", "eer", "detection_rate_at_tau", "false_alarm_rate_at_tau"}
    assert served["score_mode"] == "fused"
    assert all(rate(served[k]) for k in served if k != "score_mode")
    assert set(summary["baselines"]) == {"motion"} and set(summary["baselines"]["motion"]) == {"auc", "eer"}
    assert all(rate(v) for v in summary["baselines"]["motion"].values())
    injected = summary["injected"]
    assert injected["seed"] == 1 and injected["objects"] == 2  # one object in each of the two runs
    assert isinstance(injected["frames"], int) and 40 <= injected["frames"] <= 70  # 20-40 frames per object
    assert injected["clean_frames"] == 2 * (45 + 40) - injected["frames"]
    for key in ("detected_at_tau", "clean_false_alarms", "clean_copy_false_alarms", "auc", "motion_auc"):
        assert rate(injected[key]), key
    assert (plots / "ped2_injected_examples.png").is_file()
    recorded = registry.read_manifest(weights, summary["version"])["ped2"]
    assert recorded["injected"] == injected and recorded["baselines"] == summary["baselines"]
    assert len(recorded["injected_objects"]) == 2


def test_eval_inject_bad_input_exits_2(tmp_path: Path, capsys) -> None:
    from model.cli import main

    weights = tmp_path / "weights"
    _tiny_untrained_version(weights)
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--root", str(tmp_path), "--weights", str(weights), "--inject", "motion"])
    assert exited.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main(["eval", "--root", str(tmp_path / "nowhere"), "--weights", str(weights), "--inject", "appearance"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "test_frame_labels.json" in error


MIXED_CLIPS = ("01", "02", "07", "12")  # Ped2 test clips with normal and abnormal frames


@pytest.fixture(scope="module")
def native_figures() -> dict:
    return evaluate_ped2(PED2_ROOT, registry.BUNDLED_WEIGHTS_DIR, progress=False,
                         clip_names=MIXED_CLIPS)["summary"]["served"]


@pytest.mark.skipif(not PED2_ROOT.is_dir(), reason=f"UCSD Ped2 not found at {PED2_ROOT} (see its README)")
@pytest.mark.parametrize("playback", [Playback(size=(720, 480)), Playback(size=(1620, 1080)), Playback(frame_step=2)],
                         ids=["720x480", "1080p-sized", "half-frame-rate"])
def test_served_figures_do_not_depend_on_resolution_or_frame_rate(playback: Playback, native_figures) -> None:
    """The bundled default on four mixed Ped2 test clips delivered bigger or at half the frame rate,
    with no change of settings: served AUC within 2 points of the native footage's."""
    changed = evaluate_ped2(PED2_ROOT, registry.BUNDLED_WEIGHTS_DIR, progress=False, playback=playback,
                            clip_names=MIXED_CLIPS)["summary"]["served"]
    assert abs(changed["auc"] - native_figures["auc"]) <= 0.02, (changed, native_figures)


def test_playback_and_clip_choice_refuse_bad_values(tmp_path: Path) -> None:
    from model.evaluate import DatasetError

    with pytest.raises(ValueError, match="frame step"):
        Playback(frame_step=0)
    gray = np.zeros((6, 24, 36), np.uint8)
    played, labels = Playback(size=(72, 48), frame_step=2).apply(gray, np.arange(6))
    assert played.shape == (3, 48, 72) and labels.tolist() == [0, 2, 4]
    if PED2_ROOT.is_dir():
        with pytest.raises(DatasetError, match="no test clips named"):
            evaluate_ped2(PED2_ROOT, registry.BUNDLED_WEIGHTS_DIR, progress=False, clip_names=["99"])
