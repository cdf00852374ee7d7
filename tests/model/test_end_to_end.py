"""Train, detect and evaluate through the `vad` CLI, as a user runs it, on synthetic footage."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model import registry
from model.offline import detect_file
from model.cli import main
from model.config import CalibrationConfig
from tests.support import synthetic_frames, write_frames, write_video

TINY = ["--patch-size", "16", "--stride", "16", "--latent-dim", "8", "--patches-per-epoch", "1024",
        "--phase-two-steps", "100", "--batch-size", "64", "--epochs", "2"]


def test_detect_json_shape_and_flags(trained_weights: Path, anomalous_clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    assert main(["detect", str(anomalous_clip), "--weights", str(trained_weights), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"model_version", "threshold", "fps", "frame_count", "anomalous_frames", "frames", "timings"}
    assert result["frame_count"] == 30 and len(result["frames"]) == 30
    assert result["fps"] == pytest.approx(10.0)
    frame = result["frames"][20]
    assert set(frame) == {"index", "timestamp_s", "score", "anomalous", "uncertain", "map"}
    assert frame["timestamp_s"] == pytest.approx(2.0)
    grid = np.array(frame["map"])
    assert grid.shape == (4, 6)  # 64x96 frames, 16x16 patches
    assert ((grid >= 0) & (grid <= 1)).all()
    assert result["anomalous_frames"] == [f["index"] for f in result["frames"] if f["anomalous"]]
    scores = np.array([f["score"] for f in result["frames"]])
    # the fast bright block (frames 15+) must stand out from the normal first half
    assert scores[16:].mean() > scores[1:15].max()
    assert len(set(result["anomalous_frames"]) & set(range(16, 30))) >= 7


def test_detect_is_the_same_in_pieces_and_at_once(trained_weights: Path, anomalous_clip: Path) -> None:
    whole = detect_file(anomalous_clip, trained_weights)
    from model.offline import scorer_for
    from model.data import read_footage
    from model.scoring import FrameStream

    loaded = registry.load_version(trained_weights, whole["model_version"])
    stream = FrameStream(scorer_for(loaded), fps=10.0)
    gray = read_footage(anomalous_clip).gray
    piecewise = [r for i in range(len(gray)) for r in stream.score(gray[i : i + 1])]
    assert [r.score for r in piecewise] == pytest.approx([f["score"] for f in whole["frames"]], rel=1e-4, abs=1e-5)


def test_train_cli_publishes_with_manifest(normal_footage: list[Path], tmp_path: Path, capsys) -> None:
    code = main(["train", "--normal", *map(str, normal_footage), "--weights", str(tmp_path),
                 "--input-mode", "appearance", *TINY])
    assert code == 0
    assert "published v0001" in capsys.readouterr().out
    manifest = registry.read_manifest(tmp_path, "v0001")
    for key in ("model_config", "train_config", "calibration_config", "calibration", "input_mode", "training_footage",
                "validation", "created_at", "package_version", "parent_version", "history"):
        assert key in manifest, key
    assert "threshold" not in manifest and "reject_band" not in manifest  # tau lives in "calibration" only
    assert manifest["calibration_config"]["score_mode"] == manifest["calibration"]["score_mode"] == "d_r_x"
    assert manifest["input_mode"] == "appearance"
    assert manifest["training_footage"]["frames"] == 80
    # phase two ran, with the appearance kinds (no motion channel for `speed`)
    assert manifest["phase_two"]["steps"] == 100 and manifest["phase_two"]["negatives"] == ["average", "paste"]
    assert manifest["input"]["frame_height_chosen"] == "from footage" and manifest["input"]["reference_fps"] == 10.0
    assert manifest["input"]["motion_saturated_share"] is None
    assert set(manifest["validation"]["false_alarm_rate_second_slice"]) >= {"asked", "mean"}
    lo, hi = manifest["calibration"]["reject_band"]
    assert lo <= manifest["calibration"]["threshold"] <= hi
    for record in manifest["history"]:
        assert {"holdout_reconstruction", "separation_auc", "condition_1_improved", "condition_2_met"} <= set(record)
    assert not (tmp_path / ".checkpoints").exists() or not any((tmp_path / ".checkpoints").iterdir())


@pytest.mark.parametrize("case", ["missing", "empty_folder", "not_video", "mixed_sizes", "too_short"])
def test_bad_footage_fails_clearly_and_publishes_nothing(case: str, tmp_path: Path, normal_footage, capsys) -> None:
    weights = tmp_path / "weights"
    if case == "missing":
        bad = tmp_path / "nope.mp4"
    elif case == "empty_folder":
        bad = tmp_path / "empty"
        bad.mkdir()
    elif case == "not_video":
        bad = tmp_path / "notes.mp4"
        bad.write_bytes(os.urandom(2048))
    elif case == "mixed_sizes":
        bad = write_frames(tmp_path / "mixed", synthetic_frames(5, seed=1))
        import cv2

        cv2.imwrite(str(bad / "002.png"), np.zeros((10, 10), np.uint8))
    else:
        bad = write_frames(tmp_path / "short", synthetic_frames(2, seed=1))
    code = main(["train", "--normal", str(bad), "--weights", str(weights), *TINY])
    message = capsys.readouterr().err
    assert code == 2
    assert "error" in message and str(bad.name) in message
    assert registry.list_versions(weights) == []


def test_different_frame_sizes_across_clips_are_refused(normal_footage, tmp_path: Path, capsys) -> None:
    other = write_video(tmp_path / "other.avi", np.zeros((5, 32, 48), np.uint8))
    assert main(["train", "--normal", str(normal_footage[0]), str(other), "--weights", str(tmp_path / "w"), *TINY]) == 2
    assert "other.avi" in capsys.readouterr().err


def test_resume_after_a_crash_continues_from_the_last_epoch(normal_footage, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    args = [sys.executable, "-m", "model.cli", "train", "--normal", *map(str, normal_footage),
            "--weights", str(weights), "--input-mode", "appearance", *TINY[:-1], "4"]
    root = Path(__file__).parents[2]
    process = subprocess.Popen(args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(weights.glob(".checkpoints/*/checkpoint.safetensors")):
        assert time.monotonic() < deadline and process.poll() is None, "no checkpoint was written"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert registry.list_versions(weights) == []
    resumed = subprocess.run([*args, "--resume"], cwd=root, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming after epoch [123]\b", resumed.stdout + resumed.stderr)
    history = registry.read_manifest(weights, "v0001")["history"]
    epochs = [h["epoch"] for h in history]
    assert epochs == sorted(epochs) and epochs[0] == 1 and len(epochs) == len(set(epochs))


def test_reject_and_refine_drops_contaminated_frames(tmp_path: Path) -> None:
    """Mix anomalous frames into the training footage: the first model must reject mostly those."""
    from model.train import train
    from tests.support import tiny_model_config, tiny_train_config

    clean = write_frames(tmp_path / "clean", synthetic_frames(60, seed=2))
    # Each 60-frame clip is cut into ten blocks of 6 frames; blocks 4 and 9 (frames 24..29 and 54..59)
    # are held out for the stopping rule and calibration. The anomaly is in frames 30..49 of the
    # second clip, between them, so tau comes from normal frames only, and the first model is asked
    # to reject 20 anomalous frames among 96 training frames (2 clips x 48).
    dirty = write_frames(tmp_path / "dirty", synthetic_frames(60, seed=3, anomaly_from=30, anomaly_until=50))
    result = train([clean, dirty], tmp_path / "w", tiny_model_config(),
                   tiny_train_config(max_epochs=3), reject_and_refine=True, show_progress_bar=False,
                   calibration_config=CalibrationConfig(false_alarm_rate=0.05, reject_band=(0.02, 0.1)))
    report = result.manifest["reject_and_refine"]
    assert (report["frames_before"], result.manifest["training_footage"]["holdout_frames"]) == (96, 24)
    assert report["frames_dropped"] > 0
    dropped_dirty = [i for name, i in report["dropped"] if name == "dirty" and 30 <= i < 50]
    # most dropped frames must be among the 20 anomalous ones
    assert len(dropped_dirty) / report["frames_dropped"] > 0.5
    assert result.version == "v0001"


def test_calibrate_publishes_a_new_version_with_the_same_networks(trained_weights: Path, normal_footage, tmp_path: Path) -> None:
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(trained_weights, weights)
    before = registry.read_manifest(weights, "v0001")
    code = main(["calibrate", "--version", "v0001", "--normal", *map(str, normal_footage), "--weights", str(weights),
                 "--score-mode", "reconstruction", "--smoothing", "1"])
    assert code == 0
    after = registry.read_manifest(weights, "v0002")
    assert after["weights_sha256"] == before["weights_sha256"]
    assert after["parent_version"] == "v0001"
    assert after["calibration"]["score_mode"] == "reconstruction" and after["calibration"]["smoothing_frames"] == 1
    assert registry.load_version(weights, "v0002").calibration.threshold == after["calibration"]["threshold"]
    assert main(["calibrate", "--version", "v0009", "--normal", str(normal_footage[0]), "--weights", str(weights)]) == 2


def test_torchrun_trains_with_two_cpu_processes(normal_footage, tmp_path: Path) -> None:
    """DistributedDataParallel over gloo: two processes, one published version."""
    weights = tmp_path / "weights"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "model.cli", "train",
               "--normal", *map(str, normal_footage), "--weights", str(weights), *TINY[:-1], "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert registry.list_versions(weights) == ["v0001"]  # rank 0 alone publishes
    assert registry.load_version(weights, "v0001").manifest["history"][0]["epoch"] == 1
