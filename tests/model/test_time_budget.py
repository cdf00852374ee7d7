"""A time budget is a deadline for the whole run, checked within epochs and within phase two."""

from __future__ import annotations

from pathlib import Path

import pytest

from model import registry
from model.stopping import TimeBudgetError
from model.train import train
from model.cli import main
from tests.conftest import tiny_model_config, tiny_train_config


def test_an_endless_epoch_is_cut_at_the_deadline_and_the_best_so_far_published(normal_footage, tmp_path: Path) -> None:
    """One epoch of ten million patches would run for hours; the deadline ends it within the epoch,
    phase two and calibration still run, and a version is published."""
    config = tiny_train_config(patches_per_epoch=10_000_000, max_epochs=1000, patience=1000,
                               phase_two_steps=100_000, time_budget_s=8.0, detector_polish_epochs=0)
    result = train(normal_footage, tmp_path / "w", tiny_model_config(), config, show_progress_bar=False)
    assert result.version == "v0001"
    (epoch,) = result.history
    assert 0 < epoch.step < 10_000_000 // config.batch_size  # stopped inside the first epoch
    # phase two was cut by its own deadline too; how many steps it got depends on the machine's load
    # (on a busy machine the epoch's last evaluation can use up phase two's share: 0 steps)
    assert result.manifest["phase_two"]["steps"] < 100_000
    assert result.manifest["validation"]["total_seconds"] >= 0
    assert registry.load_version(tmp_path / "w", "v0001").calibration.threshold == result.manifest["calibration"]["threshold"]


def test_a_budget_that_ends_before_any_training_fails_clearly(normal_footage, tmp_path: Path) -> None:
    with pytest.raises(TimeBudgetError, match="ended before the first training step"):
        train(normal_footage, tmp_path / "w", tiny_model_config(), tiny_train_config(time_budget_s=1e-6),
              show_progress_bar=False)
    assert registry.list_versions(tmp_path / "w") == []


def test_the_cli_reports_a_budget_too_short_in_one_line(normal_footage, tmp_path: Path, capsys) -> None:
    code = main(["train", "--normal", *map(str, normal_footage), "--weights", str(tmp_path / "w"),
                 "--time-budget", "0.000001", "--patch-size", "16", "--stride", "16", "--latent-dim", "8"])
    assert code == 2
    assert "time budget" in capsys.readouterr().err
    assert registry.list_versions(tmp_path / "w") == []
